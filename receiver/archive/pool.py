"""Kept-alive source connections, reused only for the same host name and the same checked address.

The fetcher connects to the address the guard checked, not to the name, so httpx's own pool
(keyed by origin, which is then the IP) would hand a connection opened, and TLS-verified, for
one host name to a request for another name that resolves to the same address. This transport
keeps one pool per ``(scheme, host name, port, checked IP)`` instead:

- a redirect to another name, or the same address under another name, opens its own connection;
- a name whose DNS answer changed connects to the new address (another key), never rides the
  connection to the old one;
- every request still goes through the guard first (the fetcher checks each hop before it gets
  here), so reuse never skips a check.

Bounds: at most ``keepalive_per_key`` idle connections per key, each closed after
``keepalive_expiry`` seconds idle; at most ``max_keys`` keys with pools, the least recently used
idle one closed first; everything closed with the transport. A kept-alive connection the server
closed while it sat idle is noticed when it is next taken (httpcore sees the socket readable)
or, in the race where the server closes it just as the request goes out, the request fails
before any response on a connection this request did not open: it is then sent again, on
another connection (a GET, so repeating it is safe), at most ``keepalive_per_key + 1`` times.
A failure on a connection the request opened itself is reported as before.

Reads: httpcore asks the socket for at most 64 KiB at a time, and every chunk then passes
through several layers of Python (anyio, httpcore, h11, httpx, the fetcher's deadline, the copy
guard, the store's part buffer): 16,384 passes for 1 GiB. Asking for up to ``READ_SIZE`` lets
a fast source hand over bigger chunks (the kernel returns what it has, so a slow one is read
as before): fetching 1 GiB from a local source took 1.02 s of CPU instead of 1.63 s. httpcore
has no per-pool setting for this, only the class attribute every HTTP/1.1 read consults; it is
set here, where source connections are made. A chunk is at most ``READ_SIZE`` bytes, which the
store's memory bound allows for (its 16 MiB of slack).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpcore
import httpx

# Errors that mean "the connection died before the server answered"; on a reused connection
# that is a stale keep-alive, not a source failure.
_STALE_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)

PoolKey = tuple[str, str, int, str]

#: The most one read from a source connection asks for (see the module docstring).
READ_SIZE = 1 << 20
httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = READ_SIZE


def pool_key(request: httpx.Request) -> PoolKey:
    """(scheme, host name, port, IP) of a request the fetcher built.

    The URL's host is the checked address; the name is the SNI host name (the Host header's
    name), which the fetcher always sets.
    """
    url = request.url
    name = request.extensions.get("sni_hostname") or url.host
    port = url.port if url.port is not None else (443 if url.scheme == "https" else 80)
    return url.scheme, str(name).lower(), port, url.host


@dataclass
class _Entry:
    transport: httpx.AsyncHTTPTransport
    last_used: float
    active: int = 0  # responses handed out and not yet closed
    opened: int = field(default=0)  # connections this key ever opened (for tests and stats)


class _CountedStream(httpx.AsyncByteStream):
    """The response body; closing it marks the key's response as finished (once)."""

    def __init__(self, inner: httpx.AsyncByteStream, done: Callable[[], None]) -> None:
        self._inner = inner
        self._done: Callable[[], None] | None = done

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            done, self._done = self._done, None
            if done is not None:
                done()


class KeyedPoolTransport(httpx.AsyncBaseTransport):
    """An httpx transport with one keep-alive pool per (scheme, host name, port, IP)."""

    def __init__(
        self,
        *,
        tls: ssl.SSLContext,
        keepalive_per_key: int = 4,
        keepalive_expiry: float = 30.0,
        max_keys: int = 64,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tls = tls
        self._keepalive_per_key = keepalive_per_key
        self._keepalive_expiry = keepalive_expiry
        self._max_keys = max_keys
        self._monotonic = monotonic
        self._entries: dict[PoolKey, _Entry] = {}
        self._closed = False

    @property
    def keys(self) -> list[PoolKey]:
        """The keys that currently hold a pool, least recently used first."""
        return list(self._entries)

    def opened(self, key: PoolKey) -> int:
        """How many connections ``key``'s pool has opened (0 for an unknown key)."""
        entry = self._entries.get(key)
        return entry.opened if entry is not None else 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("the source connection pool is closed")
        entry, retired = self._acquire(pool_key(request))
        try:
            for transport in retired:
                await transport.aclose()
            response = await self._send(entry, request)
        except BaseException:
            self._release(entry)
            raise
        response.stream = _CountedStream(
            response.stream,  # type: ignore[arg-type]
            lambda: self._release(entry),
        )
        return response

    async def aclose(self) -> None:
        self._closed = True
        entries, self._entries = list(self._entries.values()), {}
        for entry in entries:
            await entry.transport.aclose()

    async def _send(self, entry: _Entry, request: httpx.Request) -> httpx.Response:
        outer_trace = request.extensions.get("trace")
        attempts = self._keepalive_per_key + 1
        for attempt in range(attempts):
            connected = False

            async def trace(name: str, info: dict[str, Any]) -> None:
                nonlocal connected
                if name == "connection.connect_tcp.started":
                    connected = True
                    entry.opened += 1
                if outer_trace is not None:
                    await outer_trace(name, info)

            request.extensions["trace"] = trace
            try:
                return await entry.transport.handle_async_request(request)
            except _STALE_ERRORS:
                # Only a connection we took from the pool can be a stale keep-alive; the
                # failed one is closed by httpcore, so the next attempt gets another.
                if connected or attempt == attempts - 1:
                    raise
            finally:
                if outer_trace is None:
                    request.extensions.pop("trace", None)
                else:
                    request.extensions["trace"] = outer_trace
        raise AssertionError("unreachable")  # pragma: no cover

    def _acquire(self, key: PoolKey) -> tuple[_Entry, list[httpx.AsyncHTTPTransport]]:
        """``key``'s pool, marked busy, and the pools to close (expired or evicted).

        No await in here: the pools change hands atomically, so two requests for one key
        never create two pools and a pool being handed out is never evicted.
        """
        now = self._monotonic()
        retired: list[httpx.AsyncHTTPTransport] = []
        entry = self._entries.pop(key, None)
        for other_key, other in list(self._entries.items()):
            # Pools unused past the idle expiry hold only expired connections: drop them.
            if other.active == 0 and now - other.last_used > self._keepalive_expiry:
                del self._entries[other_key]
                retired.append(other.transport)
        if entry is None:
            entry = _Entry(
                transport=httpx.AsyncHTTPTransport(
                    verify=self._tls,
                    trust_env=False,
                    limits=httpx.Limits(
                        max_connections=None,
                        max_keepalive_connections=self._keepalive_per_key,
                        keepalive_expiry=self._keepalive_expiry,
                    ),
                ),
                last_used=now,
            )
            # Least recently used idle pools go first; when every pool is busy the bound is
            # exceeded for now (busy pools are bounded by the number of copies in flight).
            for other_key, other in list(self._entries.items()):
                if len(self._entries) < self._max_keys:
                    break
                if other.active == 0:
                    del self._entries[other_key]
                    retired.append(other.transport)
        entry.last_used = now
        entry.active += 1
        self._entries[key] = entry  # most recently used last
        return entry, retired

    def _release(self, entry: _Entry) -> None:
        entry.active -= 1
        entry.last_used = self._monotonic()
