"""Tests of receiver.archive.fetch against a real, misbehaving local source server."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from email.utils import formatdate
from ipaddress import ip_network
from typing import Any

import httpx
import pytest

from receiver.archive.fetch import (
    Fetcher,
    FetchError,
    FetchPolicy,
    ResumeFrom,
    SourceGone,
    SourceRejected,
    SourceUnavailable,
    SystemResolver,
    UrlRefused,
    guard_url,
    redact_url,
)
from tests.sources import (
    GCS_EXPIRED_JSON,
    GCS_EXPIRED_XML,
    R2_EXPIRED_XML,
    S3_EXPIRED_XML,
    SourceServer,
    content,
    expected_sha256,
)

# The fixture. "as" marks it an intended re-export, so parameters named after it are not read
# as redefinitions of an unused import (ruff F811).

pytestmark = pytest.mark.anyio

LOCAL = FetchPolicy(
    allow_http=True,
    allow_networks=(ip_network("127.0.0.0/8"),),
    allowed_hosts=("127.0.0.1", "localhost"),
)
PRODUCTION = FetchPolicy(
    allowed_hosts=(
        "cdn.useapexstudio.com",
        "*.r2.cloudflarestorage.com",
        "storage.googleapis.com",
        "*.storage.googleapis.com",
        "ik.imagekit.io",
    )
)
PUBLIC_V4 = "104.18.10.20"
PUBLIC_V6 = "2606:4700::6810:84e5"


class FakeResolver:
    """Maps names to addresses; resolving any other name fails the test."""

    def __init__(self, table: Mapping[str, list[str]]) -> None:
        self.table = dict(table)
        self.calls: list[str] = []

    async def resolve(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in self.table:
            raise AssertionError(f"unexpected DNS lookup of {host!r}")
        return self.table[host]


def policy(**changes: Any) -> FetchPolicy:
    return replace(LOCAL, **changes)


async def fetch(url: str, pol: FetchPolicy = LOCAL, **kwargs: Any) -> tuple[bytes, int, Fetcher]:
    """Download ``url``; return the body, the resume count and the (closed) fetcher."""
    fetcher = Fetcher(pol, **kwargs)
    try:
        async with fetcher.open(url) as download:
            body = b"".join([chunk async for chunk in download.iter_bytes()])
            return body, download.resumes, fetcher
    finally:
        await fetcher.aclose()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- streaming and resume ------------------------------------------------------------------


async def test_streams_whole_body(source_server: SourceServer) -> None:
    size = 3 * 2**20 + 17
    url = source_server.add("/video.mp4", size, content_type="video/mp4")
    fetcher = Fetcher(LOCAL)
    digest = hashlib.sha256()
    async with fetcher.open(url + "?X-Amz-Signature=secret") as download:
        assert download.content_type == "video/mp4"
        assert download.content_length == size
        assert download.etag is not None
        assert download.source_host == "127.0.0.1"
        async for chunk in download.iter_bytes():
            digest.update(chunk)
        assert download.resumes == 0
    await fetcher.aclose()
    assert digest.hexdigest() == expected_sha256("/video.mp4", size)
    [request] = source_server.requests("/video.mp4")
    assert request.header("accept-encoding") == "identity"
    assert request.header("range") is None


async def test_iter_bytes_only_once(source_server: SourceServer) -> None:
    url = source_server.add("/once", 10)
    fetcher = Fetcher(LOCAL)
    async with fetcher.open(url) as download:
        [_ async for _ in download.iter_bytes()]
        with pytest.raises(RuntimeError):
            [_ async for _ in download.iter_bytes()]
    await fetcher.aclose()


async def test_dropped_connection_resumes_with_range_and_if_match(
    source_server: SourceServer,
) -> None:
    size = 1_000_000
    url = source_server.add("/drop", size, drop_after=300_000)
    body, resumes, _ = await fetch(url)
    assert resumes == 1
    assert sha(body) == expected_sha256("/drop", size)
    first, second = source_server.requests("/drop")
    assert first.header("range") is None
    assert second.header("range") == "bytes=300000-"
    assert second.header("if-match") == '"/drop-1000000"'
    assert second.header("if-range") is None


async def test_several_drops_resume_each_time(source_server: SourceServer) -> None:
    size = 500_000
    url = source_server.add("/drops", size, drop_after=100_000, fault_times=3)
    body, resumes, _ = await fetch(url)
    assert resumes == 3
    assert sha(body) == expected_sha256("/drops", size)
    ranges = [r.header("range") for r in source_server.requests("/drops")]
    assert ranges == [None, "bytes=100000-", "bytes=200000-", "bytes=300000-"]


async def test_gives_up_after_max_resumes(source_server: SourceServer) -> None:
    url = source_server.add("/flaky", 500_000, drop_after=50_000, fault_times=100)
    fetcher = Fetcher(policy(max_resumes=2))
    async with fetcher.open(url) as download:
        with pytest.raises(SourceUnavailable, match="after 2 resumes"):
            [_ async for _ in download.iter_bytes()]
        assert download.resumes == 2
    await fetcher.aclose()
    assert len(source_server.requests("/flaky")) == 3


@pytest.mark.parametrize(
    "behaviour", [{"ranges": False}, {"etag": False}], ids=["no-ranges", "no-etag"]
)
async def test_drop_without_resume_support_is_unavailable(
    source_server: SourceServer, behaviour: dict[str, Any]
) -> None:
    url = source_server.add("/norange", 400_000, drop_after=100_000, **behaviour)
    with pytest.raises(SourceUnavailable, match="cannot resume") as caught:
        await fetch(url)
    assert caught.value.retryable
    assert len(source_server.requests("/norange")) == 1


async def test_resume_refused_when_object_changed(source_server: SourceServer) -> None:
    url = source_server.add("/changed", 400_000, drop_after=100_000, etag_changes=True)
    with pytest.raises(SourceUnavailable, match="412"):
        await fetch(url)


async def test_resume_refused_when_range_ignored(source_server: SourceServer) -> None:
    url = source_server.add("/whole", 400_000, drop_after=100_000, ignore_range=True)
    with pytest.raises(SourceUnavailable, match="HTTP 200"):
        await fetch(url)


async def open_from(url: str, resume: ResumeFrom) -> tuple[int, bytes]:
    """Open ``url`` asking to resume at ``resume``; return where its bytes start, and them."""
    fetcher = Fetcher(LOCAL)
    try:
        async with fetcher.open(url, resume) as download:
            body = b"".join([chunk async for chunk in download.iter_bytes()])
            if download.offset:
                assert download.content_length == resume.size
            return download.offset, body
    finally:
        await fetcher.aclose()


async def test_a_later_copy_resumes_an_object_at_an_offset(source_server: SourceServer) -> None:
    size = 300_000
    url = source_server.add("/later", size)
    etag = '"/later-300000"'
    offset, body = await open_from(url, ResumeFrom(offset=120_000, etag=etag, size=size))
    assert offset == 120_000
    assert body == content("/later", size)[120_000:]
    [request] = source_server.requests("/later")
    assert (request.header("range"), request.header("if-match")) == ("bytes=120000-", etag)


@pytest.mark.parametrize(
    ("behaviour", "offset", "size"),
    [
        ({"etag_changes": True}, 100_000, 300_000),  # 412: the object changed
        ({"ignore_range": True}, 100_000, 300_000),  # 200: range ignored
        ({}, 100_000, 400_000),  # 206, but not the total we held a part of
        ({}, 350_000, 400_000),  # 416: the offset is past the end now
    ],
    ids=["changed", "range-ignored", "other-total", "past-the-end"],
)
async def test_a_resume_the_source_cannot_honour_starts_over(
    source_server: SourceServer, behaviour: dict[str, Any], offset: int, size: int
) -> None:
    url = source_server.add("/again", 300_000, **behaviour)
    etag = '"/again-300000"'
    started, body = await open_from(url, ResumeFrom(offset=offset, etag=etag, size=size))
    assert started == 0
    assert body == content("/again", 300_000)


async def test_wrong_content_length_is_unavailable(source_server: SourceServer) -> None:
    url = source_server.add("/short", 200_000, wrong_content_length=1000, ranges=False)
    with pytest.raises(SourceUnavailable):
        await fetch(url)


async def test_max_bytes_from_content_length(source_server: SourceServer) -> None:
    url = source_server.add("/big", 5000)
    with pytest.raises(SourceRejected, match="exceeds") as caught:
        await fetch(url, policy(max_bytes=4999))
    assert not caught.value.retryable


async def test_max_bytes_while_streaming(source_server: SourceServer) -> None:
    url = source_server.add("/unsized", 300_000, content_length=False)
    with pytest.raises(SourceRejected, match="body exceeds"):
        await fetch(url, policy(max_bytes=200_000))
    # The same body within the limit streams to its end.
    body, _, _ = await fetch(url, policy(max_bytes=300_000))
    assert sha(body) == expected_sha256("/unsized", 300_000)


# --- time limits ---------------------------------------------------------------------------


async def test_stall_mid_body_ends_within_read_timeout(source_server: SourceServer) -> None:
    url = source_server.add("/stall", 400_000, stall_after=100_000, fault_times=100)
    started = time.monotonic()
    with pytest.raises(SourceUnavailable):
        await fetch(url, policy(read_timeout=0.3, max_resumes=1))
    # Two stalls (the first response and one resume), each ended by the read timeout.
    assert time.monotonic() - started < 2.0
    assert len(source_server.requests("/stall")) == 2


async def test_stall_before_headers(source_server: SourceServer) -> None:
    url = source_server.add("/slow", 10, latency=10)
    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match="ReadTimeout"):
        await fetch(url, policy(read_timeout=0.3))
    assert time.monotonic() - started < 2.0


async def test_trickle_hits_total_deadline(source_server: SourceServer) -> None:
    # Each chunk arrives well within read_timeout, so only the overall deadline can end this.
    url = source_server.add("/trickle", 200_000, chunk_size=4096, trickle=0.05)
    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match="overall deadline"):
        await fetch(url, policy(read_timeout=5.0, total_timeout=0.5))
    assert time.monotonic() - started < 2.0


async def test_total_deadline_uses_injected_clock(source_server: SourceServer) -> None:
    now = [0.0]
    url = source_server.add("/clock", 1_000_000)
    fetcher = Fetcher(policy(total_timeout=100.0), clock=lambda: now[0])
    async with fetcher.open(url) as download:
        chunks = download.iter_bytes()
        await anext(chunks)
        now[0] = 100.5
        with pytest.raises(SourceUnavailable, match="overall deadline"):
            await anext(chunks)
    await fetcher.aclose()


# --- error classification ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "code", "message"),
    [
        (403, R2_EXPIRED_XML, "ExpiredRequest", "Request has expired"),
        (403, S3_EXPIRED_XML, "AccessDenied", "Request has expired"),
        (400, GCS_EXPIRED_XML, "ExpiredToken", "The provided token has expired."),
        (400, GCS_EXPIRED_JSON, "ExpiredToken", "The provided token has expired."),
        (404, b"<Error><Code>NoSuchKey</Code><Message>gone</Message></Error>", "NoSuchKey", "gone"),
        (410, b"", None, ""),
    ],
    ids=["r2-403", "s3-403", "gcs-400-xml", "gcs-400-json", "404", "410"],
)
async def test_expired_or_missing_is_gone(
    source_server: SourceServer, status: int, body: bytes, code: str | None, message: str
) -> None:
    url = source_server.add("/gone", status=status, error_body=body)
    with pytest.raises(SourceGone) as caught:
        await fetch(url + "?X-Amz-Credential=AKIA%2Fsecret&X-Amz-Signature=abc")
    error = caught.value
    assert (error.status, error.code, error.retryable) == (status, code, False)
    assert message in error.reason
    assert "?" not in error.reason and "secret" not in error.reason


async def test_other_400_is_rejected(source_server: SourceServer) -> None:
    body = b"<Error><Code>InvalidArgument</Code><Message>bad</Message></Error>"
    url = source_server.add("/bad", status=400, error_body=body)
    with pytest.raises(SourceRejected) as caught:
        await fetch(url)
    assert (caught.value.status, caught.value.code) == (400, "InvalidArgument")


async def test_429_with_delta_seconds(source_server: SourceServer) -> None:
    url = source_server.add("/busy", 100, fail_times=1, fail_status=429, retry_after="7")
    with pytest.raises(SourceUnavailable) as caught:
        await fetch(url)
    assert (caught.value.status, caught.value.retry_after) == (429, 7.0)
    assert caught.value.retryable
    # The source recovers: the next attempt succeeds.
    body, _, _ = await fetch(url)
    assert len(body) == 100


async def test_503_with_http_date(source_server: SourceServer) -> None:
    when = formatdate(time.time() + 120, usegmt=True)
    url = source_server.add("/down", 100, fail_times=1, fail_status=503, retry_after=when)
    with pytest.raises(SourceUnavailable) as caught:
        await fetch(url)
    assert caught.value.status == 503
    assert caught.value.retry_after is not None
    assert 115 <= caught.value.retry_after <= 121


async def test_retry_after_is_capped(source_server: SourceServer) -> None:
    url = source_server.add("/later", 1, fail_times=1, fail_status=503, retry_after="99999999")
    with pytest.raises(SourceUnavailable) as caught:
        await fetch(url)
    assert caught.value.retry_after == 3600.0


async def test_connection_refused_is_unavailable() -> None:
    server = SourceServer()  # bound, never started, then closed: nothing listens on its port
    url = server.url("/x")
    server.stop()
    with pytest.raises(SourceUnavailable, match="ConnectError"):
        await fetch(url)


# --- redirects -----------------------------------------------------------------------------


async def test_redirect_to_allowed_host(source_server: SourceServer) -> None:
    source_server.add("/final", 50_000)
    url = source_server.add("/start", redirect_to="/final", redirect_status=307)
    body, _, _ = await fetch(url)
    assert sha(body) == expected_sha256("/final", 50_000)
    assert len(source_server.requests("/start")) == 1


@pytest.mark.parametrize(
    "target",
    [
        "http://internal.example.test/secret",  # allowed name, private address
        "http://metadata.example.test/latest/meta-data/",  # allowed name, link-local address
        "http://169.254.169.254/latest/meta-data/",  # address literal
        "http://evil.example.test/",  # not in the allowlist
        "file:///etc/passwd",
    ],
)
async def test_redirect_to_forbidden_target_is_refused(
    source_server: SourceServer, target: str
) -> None:
    url = source_server.add("/hop", redirect_to=target)
    resolver = FakeResolver(
        {"internal.example.test": ["10.0.0.5"], "metadata.example.test": ["169.254.169.254"]}
    )
    pol = policy(
        allowed_hosts=(*LOCAL.allowed_hosts, "internal.example.test", "metadata.example.test")
    )
    with pytest.raises(UrlRefused):
        await fetch(url, pol, resolver=resolver)


async def test_too_many_redirects(source_server: SourceServer) -> None:
    url = source_server.add("/loop", redirect_to="/loop", redirect_status=301)
    with pytest.raises(UrlRefused, match="more than 3 redirects"):
        await fetch(url, policy(max_redirects=3))
    assert len(source_server.requests("/loop")) == 4


# --- the connection goes to the checked address --------------------------------------------


async def test_connects_to_checked_address_with_original_host(
    source_server: SourceServer,
) -> None:
    source_server.add("/named", 1000)
    # "files.example.test" exists only in the fake resolver: the download works only if the
    # fetcher connects to the address it checked instead of resolving the name again.
    resolver = FakeResolver({"files.example.test": ["127.0.0.1"]})
    pol = policy(allowed_hosts=("files.example.test",))
    url = f"http://files.example.test:{source_server.port}/named"
    body, _, _ = await fetch(url, pol, resolver=resolver)
    assert len(body) == 1000
    assert resolver.calls == ["files.example.test"]
    [request] = source_server.requests("/named")
    assert request.header("host") == f"files.example.test:{source_server.port}"


async def test_https_request_targets_ip_with_sni_of_real_host() -> None:
    seen: list[httpx.Request] = []

    class Body(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b"ok"

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, stream=Body(), headers={"content-length": "2"})

    resolver = FakeResolver({"acct.r2.cloudflarestorage.com": [PUBLIC_V4]})
    url = "https://acct.r2.cloudflarestorage.com/bucket/key.mp4?X-Amz-Signature=s"
    body, _, _ = await fetch(
        url, PRODUCTION, resolver=resolver, transport=httpx.MockTransport(handler)
    )
    assert body == b"ok"
    [request] = seen
    assert request.url.host == PUBLIC_V4
    assert request.url.raw_path == b"/bucket/key.mp4?X-Amz-Signature=s"
    assert request.headers["host"] == "acct.r2.cloudflarestorage.com"
    assert request.extensions["sni_hostname"] == "acct.r2.cloudflarestorage.com"


# --- the URL guard ---------------------------------------------------------------------------

GUARD_RESOLVER_TABLE = {
    "cdn.useapexstudio.com": [PUBLIC_V4],
    "acct.r2.cloudflarestorage.com": [PUBLIC_V4],
    "acct6.r2.cloudflarestorage.com": [PUBLIC_V6],
    "bucket.storage.googleapis.com": [PUBLIC_V4],
    "ten.r2.cloudflarestorage.com": ["10.0.0.1"],
    "loop.r2.cloudflarestorage.com": ["127.0.0.1"],
    "home.r2.cloudflarestorage.com": ["192.168.1.1"],
    "cgnat.r2.cloudflarestorage.com": ["100.64.0.1"],
    "ula.r2.cloudflarestorage.com": ["fd00::1"],
    "ll6.r2.cloudflarestorage.com": ["fe80::1"],
    "zero.r2.cloudflarestorage.com": ["0.0.0.0"],
    "mcast.r2.cloudflarestorage.com": ["224.0.0.1"],
    "mapped.r2.cloudflarestorage.com": ["::ffff:10.0.0.1"],
    "meta.r2.cloudflarestorage.com": ["169.254.169.254"],
    "mixed.r2.cloudflarestorage.com": [PUBLIC_V4, "10.0.0.1"],
    "nat64.r2.cloudflarestorage.com": ["64:ff9b::a00:1"],
    "sixtofour.r2.cloudflarestorage.com": ["2002:7f00:1::"],
    "bcast.r2.cloudflarestorage.com": ["255.255.255.255"],
    "reserved.r2.cloudflarestorage.com": ["240.0.0.1"],
    "testnet.r2.cloudflarestorage.com": ["192.0.2.1"],
    "loop6.r2.cloudflarestorage.com": ["::1"],
    "garbage.r2.cloudflarestorage.com": ["not-an-ip"],
}

HOSTILE_URLS = [
    "http://2130706433/",
    "https://2130706433/",
    "https://0177.0.0.1/",
    "https://0x7f.0.0.1/",
    "https://127.1/",
    "https://[::1]/",
    "https://[::ffff:127.0.0.1]/",
    "https://[::ffff:7f00:1]/",
    "https://[::]/",
    "https://0.0.0.0/",
    "https://169.254.169.254/latest/meta-data/",
    "https://10.0.0.1/",
    "https://metadata.google.internal/computeMetadata/v1/",
    "https://Metadata.Google.Internal./computeMetadata/v1/",
    "https://cdn.useapexstudio.com@evil.com/",
    "https://evil.com#@cdn.useapexstudio.com",
    "https://evil.com?@cdn.useapexstudio.com/",
    "https://cdn.useapexstudio.com.evil.com/",
    "https://storage.googleapis.com.evil.com./",
    "https://user:pass@cdn.useapexstudio.com/",
    "https://@cdn.useapexstudio.com/",
    "https://cdn.useapexstudio.com\\@evil.com/",
    "https://ten.r2.cloudflarestorage.com/",
    "https://TEN.R2.CloudflareStorage.com./",
    "https://loop.r2.cloudflarestorage.com/",
    "https://home.r2.cloudflarestorage.com/",
    "https://cgnat.r2.cloudflarestorage.com/",
    "https://ula.r2.cloudflarestorage.com/",
    "https://ll6.r2.cloudflarestorage.com/",
    "https://zero.r2.cloudflarestorage.com/",
    "https://mcast.r2.cloudflarestorage.com/",
    "https://mapped.r2.cloudflarestorage.com/",
    "https://meta.r2.cloudflarestorage.com/",
    "https://mixed.r2.cloudflarestorage.com/",
    "https://nat64.r2.cloudflarestorage.com/",
    "https://sixtofour.r2.cloudflarestorage.com/",
    "https://bcast.r2.cloudflarestorage.com/",
    "https://reserved.r2.cloudflarestorage.com/",
    "https://testnet.r2.cloudflarestorage.com/",
    "https://loop6.r2.cloudflarestorage.com/",
    "https://garbage.r2.cloudflarestorage.com/",
    "http://cdn.useapexstudio.com/",
    "ftp://cdn.useapexstudio.com/x",
    "file:///etc/passwd",
    "gopher://cdn.useapexstudio.com:70/_GET",
    "data:text/plain,hello",
    "javascript:alert(1)",
    "https://localhost/",
    "https://LOCALHOST./",
    "https://r2.cloudflarestorage.com/",
    "https://xr2.cloudflarestorage.com/",
    "https://cdn.useapexstudio.com../",
    "https://[fe80::1%25eth0]/",
    "https:///path",
    "https:// cdn.useapexstudio.com/",
    "https://cdn.useapexstudio.com%2eevil.com/",
    "https://cdn.useapexstudio.com:0/",
    "https://cdn.useapexstudio.com:99999/",
    "https://ik.imagekit.io\t/",
]


@pytest.mark.parametrize("url", HOSTILE_URLS)
async def test_hostile_url_is_refused(url: str) -> None:
    with pytest.raises(UrlRefused) as caught:
        await guard_url(url, PRODUCTION, FakeResolver(GUARD_RESOLVER_TABLE))
    assert not caught.value.retryable


@pytest.mark.parametrize(
    ("url", "host", "port", "ip"),
    [
        ("https://cdn.useapexstudio.com/a.mp4?X-Amz-Signature=x", "cdn.useapexstudio.com", 443,
         PUBLIC_V4),
        ("https://CDN.UseApexStudio.com./a.mp4", "cdn.useapexstudio.com", 443, PUBLIC_V4),
        ("https://acct.r2.cloudflarestorage.com/b/k", "acct.r2.cloudflarestorage.com", 443,
         PUBLIC_V4),
        ("https://acct6.r2.cloudflarestorage.com:8443/k", "acct6.r2.cloudflarestorage.com", 8443,
         PUBLIC_V6),
        ("https://bucket.storage.googleapis.com/o", "bucket.storage.googleapis.com", 443,
         PUBLIC_V4),
    ],
)  # fmt: skip
async def test_allowed_url_passes(url: str, host: str, port: int, ip: str) -> None:
    target = await guard_url(url, PRODUCTION, FakeResolver(GUARD_RESOLVER_TABLE))
    assert (target.url, target.scheme, target.host, target.port, target.ip) == (
        url,
        "https",
        host,
        port,
        ip,
    )


@pytest.mark.parametrize(
    "literal",
    ["127.0.0.1", "169.254.169.254", "10.0.0.1", "0.0.0.0", "::1", "::ffff:127.0.0.1", "fd00::1"],
)
async def test_allowlisted_ip_literal_still_checked(literal: str) -> None:
    pol = replace(PRODUCTION, allowed_hosts=(literal,))
    url = f"https://[{literal}]/" if ":" in literal else f"https://{literal}/"
    with pytest.raises(UrlRefused, match="address"):
        await guard_url(url, pol, FakeResolver({}))


async def test_allowlisted_public_ip_literal_passes() -> None:
    pol = replace(PRODUCTION, allowed_hosts=(PUBLIC_V4, f"[{PUBLIC_V6}]"))
    resolver = FakeResolver({})
    assert (await guard_url(f"https://{PUBLIC_V4}/x", pol, resolver)).ip == PUBLIC_V4
    assert (await guard_url(f"https://[{PUBLIC_V6}]/x", pol, resolver)).ip == PUBLIC_V6
    assert resolver.calls == []


async def test_system_resolver() -> None:
    assert await SystemResolver().resolve("127.0.0.1", 443) == ["127.0.0.1"]


async def test_any_host_still_checks_addresses() -> None:
    resolver = FakeResolver({"anything.test": [PUBLIC_V4], "inside.test": ["10.1.2.3"]})
    pol = FetchPolicy(any_host=True)
    assert (await guard_url("https://anything.test/", pol, resolver)).ip == PUBLIC_V4
    with pytest.raises(UrlRefused, match="private"):
        await guard_url("https://inside.test/", pol, resolver)


async def test_allow_networks_exempts_only_listed_networks() -> None:
    resolver = FakeResolver({"minio.internal": ["10.9.0.7"]})
    pol = FetchPolicy(allowed_hosts=("minio.internal",))
    with pytest.raises(UrlRefused):
        await guard_url("https://minio.internal/", pol, resolver)
    on_prem = FetchPolicy(
        allowed_hosts=("minio.internal",), allow_networks=(ip_network("10.9.0.0/16"),)
    )
    assert (await guard_url("https://minio.internal/", on_prem, resolver)).ip == "10.9.0.7"


async def test_unresolvable_host_is_unavailable() -> None:
    class Failing:
        async def resolve(self, host: str, port: int) -> list[str]:
            raise OSError("Name or service not known")

    with pytest.raises(SourceUnavailable, match="cannot resolve"):
        await guard_url("https://cdn.useapexstudio.com/", PRODUCTION, Failing())


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://user:pw@Host.example.com:8443/a/b.mp4?X-Amz-Signature=s#frag",
         "https://host.example.com:8443/a/b.mp4"),
        ("https://h.example.com/p?sig=1", "https://h.example.com/p"),
        ("https://h.example.com#@evil?x=1", "https://h.example.com"),
        ("https://h.example.com?token=abc", "https://h.example.com"),
        ("data:text/plain;secret", "data:…"),
        ("https://h.example.com/a b\r\nforged: 1", "https://h.example.com/a%20b%0D%0Aforged:%201"),
    ],
)  # fmt: skip
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_errors_share_a_base() -> None:
    for kind in (UrlRefused, SourceGone, SourceUnavailable, SourceRejected):
        assert issubclass(kind, FetchError)
    assert SourceUnavailable("x").retryable and not SourceGone("x").retryable
