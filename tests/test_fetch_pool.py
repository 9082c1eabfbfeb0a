"""Connection reuse of receiver.archive.fetch, counted on a real local source server.

A kept-alive connection may carry a second download only for the same host name and the same
checked address: never for another name on the same address, never after the name's DNS answer
changed, never across a redirect to another name. Each test counts the connections the server
accepted and which connection carried which request.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import ip_network

import httpx
import pytest

from receiver.archive.fetch import Fetcher, FetchPolicy, SourceUnavailable, UrlRefused
from receiver.archive.pool import READ_SIZE, KeyedPoolTransport
from tests.sources import SourceServer, expected_sha256, tls_contexts
from tests.test_fetch import FakeResolver, sha

pytestmark = pytest.mark.anyio

NAMES = ("a.example.test", "b.example.test")
POLICY = FetchPolicy(
    allow_http=True,
    allow_networks=(ip_network("127.0.0.0/8"),),
    allowed_hosts=NAMES,
)


async def download(fetcher: Fetcher, url: str) -> bytes:
    async with fetcher.open(url) as opened:
        return b"".join([chunk async for chunk in opened.iter_bytes()])


def url(server: SourceServer, name: str, path: str) -> str:
    return f"http://{name}:{server.port}{path}"


def hosts_by_connection(*servers: SourceServer, paths: tuple[str, ...]) -> dict[int, set[str]]:
    seen: dict[int, set[str]] = {}
    for server in servers:
        for path in paths:
            for request in server.requests(path):
                seen.setdefault(request.connection, set()).add(request.header("host") or "")
    return seen


@pytest.fixture
def resolver() -> FakeResolver:
    return FakeResolver({name: ["127.0.0.1"] for name in NAMES})


async def test_same_name_reuses_one_connection(
    source_server: SourceServer, resolver: FakeResolver
) -> None:
    source_server.add("/one", 300_000)
    source_server.add("/two", 200_000)
    fetcher = Fetcher(POLICY, resolver=resolver)
    try:
        first = await download(fetcher, url(source_server, NAMES[0], "/one"))
        second = await download(fetcher, url(source_server, NAMES[0], "/two"))
    finally:
        await fetcher.aclose()
    assert sha(first) == expected_sha256("/one", 300_000)
    assert sha(second) == expected_sha256("/two", 200_000)
    assert source_server.connections == 1
    # Every hop is still checked: the name was resolved (and its address checked) each time.
    assert resolver.calls == [NAMES[0], NAMES[0]]


async def test_a_fast_source_is_read_in_chunks_bigger_than_httpcores_64_kib(
    source_server: SourceServer, resolver: FakeResolver
) -> None:
    size = 8 * 2**20
    source_server.add("/big", size)
    fetcher = Fetcher(POLICY, resolver=resolver)
    sizes: list[int] = []
    try:
        async with fetcher.open(url(source_server, NAMES[0], "/big")) as opened:
            async for chunk in opened.iter_bytes():
                sizes.append(len(chunk))
                if len(sizes) == 1:
                    await asyncio.sleep(0.2)  # the source fills the socket buffers meanwhile
    finally:
        await fetcher.aclose()
    assert sum(sizes) == size
    assert max(sizes) > 64 * 1024, sorted(sizes)[-5:]
    assert max(sizes) <= READ_SIZE


async def test_same_address_under_another_name_opens_its_own_connection(
    source_server: SourceServer, resolver: FakeResolver
) -> None:
    source_server.add("/x", 1000)
    fetcher = Fetcher(POLICY, resolver=resolver)
    try:
        for name in (NAMES[0], NAMES[1], NAMES[0], NAMES[1]):
            assert len(await download(fetcher, url(source_server, name, "/x"))) == 1000
    finally:
        await fetcher.aclose()
    assert source_server.connections == 2
    by_connection = hosts_by_connection(source_server, paths=("/x",))
    # No connection ever carried two host names.
    assert sorted(len(hosts) for hosts in by_connection.values()) == [1, 1]


@pytest.fixture
def second_address(source_server: SourceServer) -> Iterator[SourceServer]:
    """The same port on 127.0.0.2: where the name points after its DNS answer changed."""
    try:
        server = SourceServer(host="127.0.0.2", port=source_server.port)
    except OSError as exc:  # pragma: no cover - the port happens to be taken there
        pytest.skip(f"cannot listen on 127.0.0.2:{source_server.port}: {exc}")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_changed_dns_answer_never_rides_the_old_connection(
    source_server: SourceServer, second_address: SourceServer, resolver: FakeResolver
) -> None:
    for server in (source_server, second_address):
        server.add("/moved", 5000)
    fetcher = Fetcher(POLICY, resolver=resolver)
    try:
        await download(fetcher, url(source_server, NAMES[0], "/moved"))
        resolver.table[NAMES[0]] = ["127.0.0.2"]
        await download(fetcher, url(source_server, NAMES[0], "/moved"))
        # The new address refused after a change is refused, kept-alive connection or not.
        resolver.table[NAMES[0]] = ["10.0.0.9"]
        with pytest.raises(UrlRefused, match="private"):
            await download(fetcher, url(source_server, NAMES[0], "/moved"))
    finally:
        await fetcher.aclose()
    assert source_server.connections == 1
    assert len(source_server.requests("/moved")) == 1
    assert second_address.connections == 1
    assert len(second_address.requests("/moved")) == 1


async def test_redirect_to_another_name_opens_its_own_connection(
    source_server: SourceServer, resolver: FakeResolver
) -> None:
    source_server.add("/final", 40_000)
    source_server.add("/hop", redirect_to=url(source_server, NAMES[1], "/final"))
    fetcher = Fetcher(POLICY, resolver=resolver)
    try:
        # Two downloads at once leave two idle connections to a.example.test (127.0.0.1): the
        # redirect's own connection may be closed with the 302, the other one is still there.
        await asyncio.gather(
            *(download(fetcher, url(source_server, NAMES[0], "/final")) for _ in range(2))
        )
        body = await download(fetcher, url(source_server, NAMES[0], "/hop"))
    finally:
        await fetcher.aclose()
    assert sha(body) == expected_sha256("/final", 40_000)
    # a.example.test: two connections; b.example.test: a third, its own.
    assert source_server.connections == 3
    by_connection = hosts_by_connection(source_server, paths=("/final", "/hop"))
    assert sorted(map(sorted, by_connection.values())) == [
        [f"{NAMES[0]}:{source_server.port}"],
        [f"{NAMES[0]}:{source_server.port}"],
        [f"{NAMES[1]}:{source_server.port}"],
    ]


async def test_idle_connection_closed_by_the_server_is_replaced(
    source_server: SourceServer, resolver: FakeResolver
) -> None:
    source_server.add("/closing", 10_000, close_after=True)
    fetcher = Fetcher(POLICY, resolver=resolver)
    try:
        for _ in range(3):
            body = await download(fetcher, url(source_server, NAMES[0], "/closing"))
            assert sha(body) == expected_sha256("/closing", 10_000)
            # Let the server's close arrive: the pool sees the idle socket readable (at EOF)
            # and opens another connection instead of sending on a dead one.
            await asyncio.sleep(0.1)
    finally:
        await fetcher.aclose()
    assert source_server.connections == 3
    assert len(source_server.requests("/closing")) == 3


async def test_connection_dropped_as_the_request_goes_out_is_retried_on_a_new_one(
    source_server: SourceServer, resolver: FakeResolver
) -> None:
    # The server hangs up, without answering, on any request that arrives on a connection that
    # already served one: the race a readability check cannot see.
    source_server.add("/racy", 10_000, hangup_on_reuse=True)
    fetcher = Fetcher(POLICY, resolver=resolver)
    try:
        for _ in range(3):
            body = await download(fetcher, url(source_server, NAMES[0], "/racy"))
            assert sha(body) == expected_sha256("/racy", 10_000)
    finally:
        await fetcher.aclose()
    requests = source_server.requests("/racy")
    # Download 1 on connection 1; downloads 2 and 3 each try the kept-alive connection, which
    # hangs up, then succeed on a fresh one.
    assert [r.connection for r in requests] == [1, 1, 2, 2, 3]
    assert source_server.connections == 3


async def test_hang_up_on_a_fresh_connection_is_still_unavailable(resolver: FakeResolver) -> None:
    # A server that reads the request and closes without answering, on every connection: the
    # connection was the request's own, so nothing is retried and the source is unavailable.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted: list[int] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                accepted.append(1)
                conn.recv(65536)
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    fetcher = Fetcher(POLICY, resolver=resolver)
    try:
        with pytest.raises(SourceUnavailable, match="RemoteProtocolError"):
            await download(fetcher, f"http://{NAMES[0]}:{port}/x")
    finally:
        await fetcher.aclose()
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(timeout=5)
    assert len(accepted) == 1


async def test_pool_is_bounded_and_closed_with_the_fetcher(source_server: SourceServer) -> None:
    names = [f"n{i}.example.test" for i in range(5)]
    resolver = FakeResolver({name: ["127.0.0.1"] for name in names})
    source_server.add("/b", 100)
    now = [0.0]
    transport = KeyedPoolTransport(
        tls=httpx.create_ssl_context(), max_keys=3, keepalive_expiry=15.0, monotonic=lambda: now[0]
    )
    fetcher = Fetcher(
        replace(POLICY, allowed_hosts=tuple(names)), resolver=resolver, transport=transport
    )
    try:
        for name in names:
            await download(fetcher, url(source_server, name, "/b"))
        # At most three pools, the most recently used kept.
        assert [key[1] for key in transport.keys] == names[2:]
        now[0] = 100.0  # past the idle expiry: the next request drops the idle pools
        await download(fetcher, url(source_server, names[0], "/b"))
        assert [key[1] for key in transport.keys] == [names[0]]
        assert transport.opened(("http", names[0], source_server.port, "127.0.0.1")) == 1
    finally:
        await fetcher.aclose()
    assert transport.keys == []
    with pytest.raises(RuntimeError, match="closed"):
        await transport.handle_async_request(httpx.Request("GET", source_server.url("/b")))


async def test_a_busy_pool_is_never_evicted(source_server: SourceServer) -> None:
    names = [f"n{i}.example.test" for i in range(3)]
    resolver = FakeResolver({name: ["127.0.0.1"] for name in names})
    source_server.add("/big", 2_000_000)
    source_server.add("/small", 100)
    transport = KeyedPoolTransport(tls=httpx.create_ssl_context(), max_keys=1)
    fetcher = Fetcher(
        replace(POLICY, allowed_hosts=tuple(names)), resolver=resolver, transport=transport
    )
    try:
        async with fetcher.open(url(source_server, names[0], "/big")) as busy:
            # Over the bound while names[0]'s download is open: its pool stays.
            assert len(await download(fetcher, url(source_server, names[1], "/small"))) == 100
            assert [key[1] for key in transport.keys] == names[:2]
            body = b"".join([chunk async for chunk in busy.iter_bytes()])
        assert sha(body) == expected_sha256("/big", 2_000_000)
        await download(fetcher, url(source_server, names[2], "/small"))
        assert [key[1] for key in transport.keys] == [names[2]]
    finally:
        await fetcher.aclose()


async def test_https_connection_carries_only_the_name_it_was_verified_for(
    resolver: FakeResolver,
) -> None:
    server_tls, client_tls = tls_contexts(*NAMES)
    server = SourceServer(tls=server_tls)
    server.start()
    server.add("/s", 70_000)
    fetcher = Fetcher(replace(POLICY, allow_http=False), resolver=resolver, tls=client_tls)
    try:
        for name in (NAMES[0], NAMES[0], NAMES[1], NAMES[1], NAMES[0]):
            body = await download(fetcher, f"https://{name}:{server.port}/s")
            assert sha(body) == expected_sha256("/s", 70_000)
    finally:
        await fetcher.aclose()
        server.stop()
    assert server.connections == 2
    assert sorted(n or "" for n in server.server_names.values()) == sorted(NAMES)
    # Every request went over a connection whose TLS server name is its own Host.
    for request in server.requests("/s"):
        assert request.header("host") == f"{server.server_names[request.connection]}:{server.port}"
