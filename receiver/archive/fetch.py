"""Guarded, streaming, resumable downloads from provider storage.

This module is the only code that opens outbound connections to the signed URLs that arrive in
webhooks. Anyone who can forge a webhook chooses those URLs, so every hop is checked before a
socket is opened: https only, no userinfo, a host allowlist, and no private, loopback,
link-local or otherwise non-global address after DNS. The connection then goes to the very
address that was checked (SNI and certificate verification still use the real hostname), which
leaves no DNS-rebinding window between the check and the connect.

Downloads are streamed, bounded in size and time (an overall deadline on top of httpx's per-read
timeout, which a trickling source never trips), and resumed with ``Range`` + ``If-Match`` when
the body breaks mid-stream. Errors are classified for the archiver: gone (the link expired),
unavailable (retry later), rejected (do not retry) or refused (the guard said no). Signed URLs
are credentials, so no exception message or log line ever carries a query string.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import httpx
import structlog

from receiver.archive.fetch_errors import (
    FetchError,
    SourceGone,
    SourceRejected,
    SourceUnavailable,
    UrlRefused,
    _error_code,
    _raise_for_status,
)
from receiver.archive.pool import KeyedPoolTransport
from receiver.domain import scrub_secrets

log = structlog.get_logger(__name__)

# The error classes moved to receiver.archive.fetch_errors; importing them from here still works.
__all__ = [
    "Download",
    "FetchError",
    "FetchPolicy",
    "Fetcher",
    "GuardedTarget",
    "Resolver",
    "ResumeFrom",
    "SourceGone",
    "SourceRejected",
    "SourceUnavailable",
    "SystemResolver",
    "UrlRefused",
    "_error_code",
    "guard_url",
    "redact_url",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
# WHATWG URL parsers (browsers, curl, getaddrinfo via inet_aton) read hosts such as
# "2130706433", "0x7f.1" or "0177.0.0.1" as IPv4 addresses; a host whose last label is numeric
# must therefore be a canonical dotted quad, or it is refused.
_NUMERIC_LABEL = re.compile(r"(0x[0-9a-f]*|[0-9]+)")
_URL_FORBIDDEN_CHARS = re.compile(r"[\x00-\x20\x7f\\]")
_UNPRINTABLE = re.compile(r"[\x00-\x20\x7f]")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPAT = ipaddress.IPv6Network("::/96")


@dataclass(frozen=True)
class FetchPolicy:
    """What the fetcher may connect to, and how long and how much it may read."""

    # Exact hostnames or "*.example.com" (subdomains only, not the apex); case-insensitive,
    # trailing dot ignored. IP-literal hosts match only when listed literally.
    allowed_hosts: tuple[str, ...] = ()
    # Insecure development mode: skip the host allowlist (address checks still apply).
    any_host: bool = False
    # Plain http (tests, on-prem stores).
    allow_http: bool = False
    # Addresses inside these networks are exempt from the private-address refusal.
    allow_networks: tuple[IPNetwork, ...] = ()
    max_bytes: int = 20 * 2**30
    max_redirects: int = 5
    connect_timeout: float = 10.0
    # httpx's read timeout: the longest gap between two chunks.
    read_timeout: float = 60.0
    # Overall deadline of one copy, resumes included.
    total_timeout: float = 3600.0
    max_resumes: int = 5
    # Idle kept-alive connections per (scheme, host name, port, checked IP), and how long one
    # may sit idle before it is closed.
    keepalive_per_host: int = 4
    keepalive_expiry: float = 15.0


class Resolver(Protocol):
    async def resolve(self, host: str, port: int) -> list[str]:
        """Return the IP addresses (as strings) that ``host`` resolves to."""
        ...


class SystemResolver:
    """Resolves names with the operating system's resolver (``getaddrinfo``)."""

    async def resolve(self, host: str, port: int) -> list[str]:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        # A scoped IPv6 address ("fe80::1%eth0") is link-local whatever its scope; drop the scope
        # so ipaddress can parse it and the check refuses it.
        return list(dict.fromkeys(str(info[4][0]).partition("%")[0] for info in infos))


@dataclass(frozen=True)
class GuardedTarget:
    """A URL that passed the guard, and the checked address to connect to."""

    url: str
    scheme: str
    host: str
    port: int
    ip: str


def redact_url(url: str) -> str:
    """Return ``scheme://host[:port]/path``: no userinfo, no query, no fragment."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        # Not hierarchical (data:, javascript:...): the scheme is all that is safe to show.
        return f"{url.partition(':')[0][:20]}:…"
    end = len(rest)
    for stop in "?#":
        index = rest.find(stop)
        if index != -1:
            end = min(end, index)
    authority, slash, path = rest[:end].partition("/")
    host = authority.rpartition("@")[2].lower()
    # Escape whitespace and control characters: the result goes into log lines.
    return _UNPRINTABLE.sub(
        lambda match: f"%{ord(match.group()):02X}", f"{scheme.lower()}://{host}{slash}{path}"
    )


def _scrub(text: str) -> str:
    """Remove query strings and signing parameters from text we did not write ourselves."""
    return scrub_secrets(text)


def _normalise_host(host: str) -> str:
    # One trailing dot is the same name (fully qualified); "a.com.." stays malformed.
    host = host.lower()
    return host[:-1] if host.endswith(".") else host


def _host_allowed(host: str, is_ip: bool, allowed_hosts: tuple[str, ...]) -> bool:
    for entry in allowed_hosts:
        pattern = _normalise_host(entry)
        if pattern.startswith("*."):
            # Host names never start with a dot, so this matches subdomains but not the apex.
            if not is_ip and host.endswith(pattern[1:]):
                return True
        elif is_ip:
            with contextlib.suppress(ValueError):
                if ipaddress.ip_address(pattern.strip("[]")) == ipaddress.ip_address(host):
                    return True
        elif host == pattern:
            return True
    return False


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, NAT64, 6to4), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    # "::" and "::1" sit in the compatible range too, but are IPv6's own unspecified/loopback.
    if ip in _NAT64 or (ip in _IPV4_COMPAT and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _address_problem(ip: IPAddress) -> str | None:
    """Why ``ip`` must not be connected to, or None when it is a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            problem = _address_problem(embedded)
            if problem is not None:
                return f"an IPv6 form of a {problem} IPv4 address"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "not global"
    return None


def _check_address(address: str, policy: FetchPolicy, shown: str) -> None:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise UrlRefused(f"{shown}: unusable address {address!r}") from None
    if any(ip in network for network in policy.allow_networks):
        return
    problem = _address_problem(ip)
    if problem is not None:
        raise UrlRefused(f"{shown}: address {ip} is {problem}")


def _parse_url(url: str) -> tuple[httpx.URL, str]:
    """Parse ``url`` strictly; return it with its scheme://authority for messages."""
    shown = redact_url(url)
    if _URL_FORBIDDEN_CHARS.search(url):
        raise UrlRefused(f"{shown}: whitespace, control character or backslash in URL")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise UrlRefused(f"{shown}: malformed URL") from None
    # httpx drops an empty userinfo ("https://@host/"); any "@" in the authority is refused.
    authority = url.partition("://")[2].split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    if parsed.userinfo or "@" in authority:
        raise UrlRefused(f"{shown}: userinfo in URL")
    return parsed, shown


async def guard_url(url: str, policy: FetchPolicy, resolver: Resolver) -> GuardedTarget:
    """Check ``url`` against ``policy`` and return the address to connect to.

    Raises UrlRefused when the URL may not be fetched, SourceUnavailable when its host does not
    resolve (DNS failures are usually transient).
    """
    parsed, shown = _parse_url(url)
    scheme = parsed.scheme
    if scheme != "https" and not (scheme == "http" and policy.allow_http):
        raise UrlRefused(f"{shown}: scheme {scheme or '(none)'!r} not allowed")
    raw_host = parsed.raw_host.decode("ascii")
    host = _normalise_host(raw_host)
    if not host:
        raise UrlRefused(f"{shown}: no host")
    port = parsed.port if parsed.port is not None else _DEFAULT_PORTS[scheme]
    if not 0 < port < 65536:
        raise UrlRefused(f"{shown}: bad port {port}")

    literal: IPAddress | None = None
    if "%" in host:
        raise UrlRefused(f"{shown}: scoped or percent-encoded host")
    if ":" in host:
        try:
            literal = ipaddress.IPv6Address(host)
        except ValueError:
            raise UrlRefused(f"{shown}: malformed IPv6 host") from None
    elif _NUMERIC_LABEL.fullmatch(host.rsplit(".", 1)[-1]):
        try:
            literal = ipaddress.IPv4Address(host)
        except ValueError:
            raise UrlRefused(f"{shown}: ambiguous numeric host") from None
    elif not _HOST_NAME.fullmatch(host):
        raise UrlRefused(f"{shown}: malformed host name")

    if not policy.any_host and not _host_allowed(host, literal is not None, policy.allowed_hosts):
        raise UrlRefused(f"{shown}: host not in the allowlist")

    if literal is not None:
        addresses = [str(literal)]
    else:
        # Bounded: the resolver is part of the connect phase.
        try:
            async with asyncio.timeout(policy.connect_timeout):
                addresses = await resolver.resolve(host, port)
        except (OSError, TimeoutError) as exc:
            raise SourceUnavailable(f"{shown}: cannot resolve host ({type(exc).__name__})") from exc
        if not addresses:
            raise SourceUnavailable(f"{shown}: host resolves to no address")
    # Every address is checked, not just the one we use: a name that points anywhere private is
    # suspect as a whole.
    for address in addresses:
        _check_address(address, policy, shown)
    return GuardedTarget(url=url, scheme=scheme, host=host, port=port, ip=addresses[0])


@dataclass(frozen=True)
class ResumeFrom:
    """Where an earlier, cut copy of the same object stopped (see archive/resume.py)."""

    offset: int  # bytes already held
    etag: str  # the object they came from (a strong ETag)
    size: int  # its total length


class _BodyBroken(Exception):
    """The body stopped before its end; the Download resumes or gives up."""


class Fetcher:
    """Opens guarded downloads. One instance can serve many concurrent downloads."""

    def __init__(
        self,
        policy: FetchPolicy,
        *,
        resolver: Resolver | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._policy = policy
        self._resolver: Resolver = resolver if resolver is not None else SystemResolver()
        self._clock = clock
        if transport is None:
            # Kept-alive connections are reused only for the same host name and the same
            # checked address (see receiver.archive.pool). One TLS context serves every pool
            # and every fetcher: loading the CA bundle is the costly part.
            transport = KeyedPoolTransport(
                tls=tls if tls is not None else httpx.create_ssl_context(),
                keepalive_per_key=policy.keepalive_per_host,
                keepalive_expiry=policy.keepalive_expiry,
            )
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(
                connect=policy.connect_timeout,
                read=policy.read_timeout,
                write=policy.read_timeout,
                pool=policy.connect_timeout,
            ),
            follow_redirects=False,
            # Proxies and .netrc from the environment would bypass the address we checked.
            trust_env=False,
            headers={"user-agent": "receiver-archiver", "accept-encoding": "identity"},
        )

    @property
    def policy(self) -> FetchPolicy:
        return self._policy

    @contextlib.asynccontextmanager
    async def open(self, url: str, resume: ResumeFrom | None = None) -> AsyncIterator[Download]:
        """Open ``url`` (following guarded redirects) and yield its Download.

        With ``resume``, ask for the rest of the object from ``resume.offset`` (``Range`` +
        ``If-Match``); the Download's ``offset`` says where its bytes start: ``resume.offset``
        when the source answered a matching 206, else 0 (the object changed, or the source
        ignored the range) and the caller must drop what it held.

        Raises a FetchError when the source does not answer 200 with an acceptable body.
        """
        deadline = self._clock() + self._policy.total_timeout
        response, target, resumed = await self._open(url, resume, deadline)
        try:
            download = Download(self, response, target, deadline, resumed)
        except FetchError:
            await response.aclose()
            raise
        try:
            yield download
        finally:
            await download.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _open(
        self, url: str, resume: ResumeFrom | None, deadline: float
    ) -> tuple[httpx.Response, GuardedTarget, ResumeFrom | None]:
        if resume is not None:
            headers = {"range": f"bytes={resume.offset}-", "if-match": resume.etag}
            try:
                response, target = await self._get(url, headers, deadline)
            except FetchError as exc:
                if exc.status not in (412, 416):
                    raise
                # The object changed (412), or is shorter now (416): start over.
                log.info("fetch.resume_refused", url=redact_url(url), status=exc.status)
            else:
                if response.status_code == 200:
                    return response, target, None  # the range was ignored: the whole body
                if (
                    _content_range(response.headers.get("content-range"))
                    == (resume.offset, resume.size)
                    and response.headers.get("etag") == resume.etag
                ):
                    return response, target, resume
                await response.aclose()
                log.info("fetch.resume_mismatch", url=redact_url(url))
        response, target = await self._get(url, {}, deadline)
        return response, target, None

    def _remaining(self, deadline: float, shown: str) -> float:
        """Seconds left before ``deadline``; raises SourceUnavailable when none are left."""
        left = deadline - self._clock()
        if left <= 0:
            raise SourceUnavailable(
                f"{shown}: overall deadline of {self._policy.total_timeout:g}s exceeded"
            )
        return left

    async def _get(
        self, url: str, headers: Mapping[str, str], deadline: float
    ) -> tuple[httpx.Response, GuardedTarget]:
        """GET ``url``, following redirects; return the first 200/206 response (streaming)."""
        current = url
        for hop in range(self._policy.max_redirects + 1):
            target = await guard_url(current, self._policy, self._resolver)
            response = await self._send(target, headers, deadline)
            if response.status_code in (200, 206):
                return response, target
            try:
                if response.status_code not in _REDIRECT_STATUSES:
                    await _raise_for_status(response, redact_url(current))
            finally:
                await response.aclose()
            location = response.headers.get("location")
            if not location:
                raise SourceRejected(
                    f"{redact_url(current)}: HTTP {response.status_code} without Location",
                    status=response.status_code,
                )
            try:
                following = str(httpx.URL(current).join(location))
            except httpx.InvalidURL:
                raise UrlRefused(f"{redact_url(current)}: malformed redirect") from None
            log.debug(
                "fetch.redirect", hop=hop + 1, src=redact_url(current), dst=redact_url(following)
            )
            current = following
        raise UrlRefused(f"{redact_url(url)}: more than {self._policy.max_redirects} redirects")

    async def _send(
        self, target: GuardedTarget, headers: Mapping[str, str], deadline: float
    ) -> httpx.Response:
        shown = redact_url(target.url)
        # Connect to the checked address; Host and SNI carry the real name, so virtual hosting
        # and certificate verification work as if we had connected by name.
        request_url = httpx.URL(target.url).copy_with(host=target.ip)
        host = f"[{target.host}]" if ":" in target.host else target.host
        if _DEFAULT_PORTS[target.scheme] != target.port:
            host += f":{target.port}"
        request = self._client.build_request(
            "GET",
            request_url,
            headers={**headers, "host": host},
            extensions={"sni_hostname": target.host},
        )
        try:
            async with asyncio.timeout(self._remaining(deadline, shown)):
                return await self._client.send(request, stream=True)
        except TimeoutError:
            raise SourceUnavailable(
                f"{shown}: overall deadline of {self._policy.total_timeout:g}s exceeded"
            ) from None
        except httpx.TimeoutException as exc:
            raise SourceUnavailable(f"{shown}: {type(exc).__name__}") from exc
        except httpx.TransportError as exc:
            raise SourceUnavailable(f"{shown}: {type(exc).__name__}: {_scrub(str(exc))}") from exc


def _content_range(value: str | None) -> tuple[int, int | None] | None:
    """(start, total) of a ``Content-Range: bytes start-end/total`` header."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if match is None:
        return None
    total = match.group(3)
    return int(match.group(1)), None if total == "*" else int(total)


class Download:
    """One open download; ``iter_bytes`` yields the whole body, resuming transparently."""

    def __init__(
        self,
        fetcher: Fetcher,
        response: httpx.Response,
        target: GuardedTarget,
        deadline: float,
        resumed: ResumeFrom | None = None,
    ) -> None:
        self._fetcher = fetcher
        self._response = response
        self._target = target
        self._deadline = deadline
        self._shown = redact_url(target.url)
        self._started = False
        expected = 206 if resumed is not None else 200
        if response.status_code != expected:
            # A 206 to a request without Range: not something we know how to archive.
            raise SourceRejected(
                f"{self._shown}: unexpected HTTP {response.status_code}",
                status=response.status_code,
            )
        headers = response.headers
        self.content_type: str | None = headers.get("content-type")
        length = headers.get("content-length", "")
        # The whole object's length (a resumed download's Content-Range total).
        self.content_length: int | None = (
            resumed.size if resumed is not None else int(length) if length.isdigit() else None
        )
        # Where this download's bytes start in the object (0 unless resumed).
        self.offset: int = resumed.offset if resumed is not None else 0
        self.etag: str | None = headers.get("etag")
        self.source_host: str = target.host
        self.resumes: int = 0
        # If-Match compares strongly: a weak ETag never matches, so it cannot anchor a resume.
        # Without a known total, a resumed Content-Range could not be checked against it.
        self._resumable = (
            (resumed is not None or headers.get("accept-ranges", "").strip().lower() == "bytes")
            and self.content_length is not None
            and self.etag is not None
            and not self.etag.startswith("W/")
        )
        limit = fetcher.policy.max_bytes
        if self.content_length is not None and self.content_length > limit:
            raise SourceRejected(
                f"{self._shown}: Content-Length {self.content_length} exceeds {limit} bytes"
            )

    async def aclose(self) -> None:
        await self._response.aclose()

    def resume_point(self, offset: int) -> ResumeFrom | None:
        """How a later copy could ask for this object from ``offset`` on (None: it cannot)."""
        if not self._resumable:
            return None
        assert self.etag is not None and self.content_length is not None
        return ResumeFrom(offset=offset, etag=self.etag, size=self.content_length)

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        """Yield the body from its first byte to its last, resuming after breaks."""
        if self._started:
            raise RuntimeError("iter_bytes() can only be called once per Download")
        self._started = True
        policy = self._fetcher.policy
        received = self.offset
        while True:
            try:
                async with contextlib.aclosing(self._chunks()) as chunks:
                    async for chunk in chunks:
                        received += len(chunk)
                        if received > policy.max_bytes:
                            raise SourceRejected(
                                f"{self._shown}: body exceeds {policy.max_bytes} bytes"
                            )
                        yield chunk
                if self.content_length is None or received == self.content_length:
                    return
                problem = f"body ended after {received} of {self.content_length} bytes"
            except _BodyBroken as exc:
                problem = str(exc)
            await self._response.aclose()
            if not self._resumable:
                raise SourceUnavailable(f"{self._shown}: {problem}; source cannot resume")
            if self.resumes >= policy.max_resumes:
                raise SourceUnavailable(
                    f"{self._shown}: {problem}; gave up after {self.resumes} resumes"
                )
            self.resumes += 1
            log.info("fetch.resume", url=self._shown, offset=received, problem=problem)
            await self._resume(received)

    async def _chunks(self) -> AsyncGenerator[bytes, None]:
        """The current response's raw bytes, each read bounded by the deadline."""
        policy = self._fetcher.policy
        raw = self._response.aiter_raw()
        while True:
            left = self._fetcher._remaining(self._deadline, self._shown)
            # httpx's read timeout already bounds a stall; this also bounds it by the overall
            # deadline, and covers transports that do not implement read timeouts.
            wait = min(policy.read_timeout, left)
            try:
                async with asyncio.timeout(wait):
                    chunk = await anext(raw, None)
            except TimeoutError:
                self._fetcher._remaining(self._deadline, self._shown)
                raise _BodyBroken(f"no data for {wait:g}s") from None
            except (httpx.ReadError, httpx.RemoteProtocolError, httpx.ReadTimeout) as exc:
                raise _BodyBroken(f"{type(exc).__name__}: {_scrub(str(exc))}") from exc
            except httpx.TransportError as exc:
                raise SourceUnavailable(
                    f"{self._shown}: {type(exc).__name__}: {_scrub(str(exc))}"
                ) from exc
            if chunk is None:
                return
            yield chunk

    async def _resume(self, offset: int) -> None:
        assert self.etag is not None  # guaranteed by _resumable
        headers = {"range": f"bytes={offset}-", "if-match": self.etag}
        try:
            response, target = await self._fetcher._get(self._target.url, headers, self._deadline)
        except (SourceGone, SourceRejected) as exc:
            # Whatever a resume hears (412: the object changed; 403: the link just expired),
            # the archiver's answer is to restart the copy, which classifies the source afresh.
            raise SourceUnavailable(
                f"resume at byte {offset} failed: {exc.reason}", status=exc.status, code=exc.code
            ) from exc
        content_range = _content_range(response.headers.get("content-range"))
        if response.status_code != 206 or content_range != (offset, self.content_length):
            await response.aclose()
            raise SourceUnavailable(
                f"{self._shown}: resume at byte {offset} answered HTTP {response.status_code}"
                f" with Content-Range {_scrub(response.headers.get('content-range', ''))!r}",
                status=response.status_code,
            )
        self._response = response
        self.source_host = target.host
