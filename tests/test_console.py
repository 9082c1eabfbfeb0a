"""The operator console over HTTP (no browser): sign-in, CSRF, pages, ranges, Verify and Retry.

The real app on a temporary database, filled through the real ingest path and archiver; the
browser tests (test_console_browser.py) drive the same pages in Chromium.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from itsdangerous import URLSafeSerializer
from prometheus_client import generate_latest

from receiver.audit.console import pages
from receiver.audit.console.media import parse_range, preview_kind
from receiver.audit.console.session import COOKIE, SALT
from receiver.domain import JobState
from receiver.polling.schedule import StopReason
from tests.conftest import LOCAL_SOURCES, Harness, post_signed
from tests.payloads import APEX_SECRET, apex_completed
from tests.sources import SourceServer, content

pytestmark = pytest.mark.anyio

TOKEN = "operator-token"
SAME_ORIGIN = {"sec-fetch-site": "same-origin"}


@pytest.fixture
async def console(harness_factory: Any) -> Harness:
    harness: Harness = await harness_factory(**LOCAL_SOURCES, max_attempts=1)
    return harness


async def sign_in(h: Harness, token: str = TOKEN) -> httpx.Response:
    return await h.client.post(
        "/console/signin", data={"token": token, "next": "/console/jobs"}, headers=SAME_ORIGIN
    )


def csrf_of(page: httpx.Response) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found, "the page has no CSRF field"
    return found.group(1)


async def archived_job(
    h: Harness, source: SourceServer, job_id: str, *, size: int = 5000, kind: str = "image/png"
) -> str:
    url = source.add(f"/o/{job_id}/out.bin", size, content_type=kind)
    signed_url = url + "?X-Amz-Date=20260316T120000Z&X-Amz-Expires=86400&X-Amz-Signature=TOPSECRET"
    payload = apex_completed(job_id, url=signed_url, output_type=kind)
    response = await post_signed(h, "apex", payload, APEX_SECRET)
    assert response.status_code == 202
    assert await h.parts.archiver.run_once()
    return url


async def dead_job(h: Harness, source: SourceServer, job_id: str) -> str:
    url = source.add(f"/o/{job_id}/out.png", 100, status=500, error_body=b"boom")
    response = await post_signed(h, "apex", apex_completed(job_id, url=url), APEX_SECRET)
    assert response.status_code == 202
    assert await h.parts.archiver.run_once()
    job = await h.parts.ledger.job("apex", job_id)
    assert job is not None and job.state == JobState.DEAD
    return url


# --- the gate ----------------------------------------------------------------------------------

CONSOLE_URLS = [
    "/console",
    "/console/",
    "/console/jobs",
    "/console/jobs?provider=apex",
    "/console/problems",
    "/console/jobs/apex/job-1",
    "/console/jobs/apex/job-1/assets/0",
    "/console/no-such-page",
]


@pytest.mark.parametrize("path", CONSOLE_URLS)
async def test_signed_out_every_console_url_answers_the_sign_in_page(
    console: Harness, source_server: SourceServer, path: str
) -> None:
    await archived_job(console, source_server, "job-1")
    response = await console.client.get(path)
    assert response.status_code == 401
    assert "<h1>Sign in</h1>" in response.text
    assert "TOPSECRET" not in response.text and "job-1/out" not in response.text


@pytest.mark.parametrize(
    "path", ["/console/jobs/apex/job-1/retry", "/console/jobs/apex/job-1/assets/0/verify"]
)
async def test_signed_out_posts_change_nothing(
    console: Harness, source_server: SourceServer, path: str
) -> None:
    await dead_job(console, source_server, "job-1")
    response = await console.client.post(path, data={"csrf": "x"}, headers=SAME_ORIGIN)
    assert response.status_code == 401
    job = await console.parts.ledger.job("apex", "job-1")
    assert job is not None and job.state == JobState.DEAD


@pytest.mark.parametrize("path", ["/console", "/console/jobs", "/console/signin"])
async def test_without_a_token_the_console_says_how_to_set_one_and_shows_nothing(
    harness_factory: Any, path: str
) -> None:
    h: Harness = await harness_factory(api_token=None)
    response = await h.client.get(path)
    assert response.status_code == 503
    assert "RECEIVER_API_TOKEN" in response.text
    assert "Sign in</button>" not in response.text and "<nav" not in response.text
    posted = await h.client.post("/console/signin", data={"token": ""}, headers=SAME_ORIGIN)
    assert posted.status_code == 503
    assert COOKIE not in posted.headers.get("set-cookie", "")


async def test_sign_in_sets_a_strict_http_only_cookie_and_goes_where_asked(
    console: Harness,
) -> None:
    wrong = await sign_in(console, "not-the-token")
    assert wrong.status_code == 401
    assert "not the operator token" in wrong.text
    assert "set-cookie" not in wrong.headers

    response = await sign_in(console)
    assert response.status_code == 303
    assert response.headers["location"] == "/console/jobs"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    for attribute in ("HttpOnly", "SameSite=strict", "Path=/console", "Max-Age=28800"):
        assert attribute.lower() in cookie.lower()
    assert "secure" not in cookie.lower()  # plain http (tests, a local run)
    assert TOKEN not in cookie
    page = await console.client.get("/console/jobs")
    assert page.status_code == 200
    assert "<h1>Jobs</h1>" in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    assert page.headers["x-frame-options"] == "DENY"


async def test_the_cookie_is_secure_over_https(console: Harness) -> None:
    async with httpx.AsyncClient(
        transport=console.client._transport, base_url="https://receiver.test"
    ) as client:
        response = await client.post("/console/signin", data={"token": TOKEN}, headers=SAME_ORIGIN)
    assert response.status_code == 303
    assert "secure" in response.headers["set-cookie"].lower()


@pytest.mark.parametrize("wanted", ["https://evil.example/", "//evil.example", "/jobs", "/x\\y"])
async def test_sign_in_never_redirects_off_the_console(console: Harness, wanted: str) -> None:
    response = await console.client.post(
        "/console/signin", data={"token": TOKEN, "next": wanted}, headers=SAME_ORIGIN
    )
    assert response.headers["location"] == "/console/"


async def test_a_cross_site_sign_in_is_refused(console: Harness) -> None:
    response = await console.client.post(
        "/console/signin", data={"token": TOKEN}, headers={"sec-fetch-site": "cross-site"}
    )
    assert response.status_code == 403
    assert "set-cookie" not in response.headers


async def test_sessions_expire_and_a_token_rotation_or_tampering_signs_out(
    console: Harness,
) -> None:
    await sign_in(console)
    assert (await console.client.get("/console/")).status_code == 200
    console.clock.advance(8 * 3600 - 1)
    assert (await console.client.get("/console/")).status_code == 200
    console.clock.advance(2)
    assert (await console.client.get("/console/")).status_code == 401

    await sign_in(console)
    value = console.client.cookies[COOKIE]
    console.client.cookies.set(COOKIE, value[:-2] + ("AA" if value[-2:] != "AA" else "BB"))
    assert (await console.client.get("/console/")).status_code == 401
    # A cookie signed with another token (before a rotation) is worthless.
    forged = URLSafeSerializer(
        "old-token", salt=SALT, signer_kwargs={"digest_method": hashlib.sha256}
    )
    console.client.cookies.set(
        COOKIE, forged.dumps({"csrf": "x", "iat": console.clock().timestamp()}), path="/console"
    )
    assert (await console.client.get("/console/")).status_code == 401


async def test_sign_out_needs_the_form_token_and_ends_the_session(console: Harness) -> None:
    await sign_in(console)
    page = await console.client.get("/console/")
    refused = await console.client.post(
        "/console/signout", data={"csrf": "guess"}, headers=SAME_ORIGIN
    )
    assert refused.status_code == 403
    response = await console.client.post(
        "/console/signout", data={"csrf": csrf_of(page)}, headers=SAME_ORIGIN
    )
    assert response.status_code == 200
    assert "You are signed out" in response.text
    assert "max-age=0" in response.headers["set-cookie"].lower()
    assert (await console.client.get("/console/")).status_code == 401


@pytest.mark.parametrize(
    ("headers", "good_token"),
    [
        ({"sec-fetch-site": "cross-site"}, True),
        ({"sec-fetch-site": "same-site"}, True),
        ({"origin": "http://evil.example"}, True),
        ({"origin": "null"}, True),
        (SAME_ORIGIN, False),
        ({}, False),
    ],
)
async def test_a_cross_site_or_tokenless_retry_is_refused(
    console: Harness, source_server: SourceServer, headers: dict[str, str], good_token: bool
) -> None:
    await dead_job(console, source_server, "job-1")
    await sign_in(console)
    page = await console.client.get("/console/jobs/apex/job-1")
    form = {"csrf": csrf_of(page) if good_token else "forged"}
    response = await console.client.post(
        "/console/jobs/apex/job-1/retry", data=form, headers=headers
    )
    assert response.status_code == 403
    assert "Nothing was changed" in response.text
    job = await console.parts.ledger.job("apex", "job-1")
    assert job is not None and job.state == JobState.DEAD


# --- pages -------------------------------------------------------------------------------------


async def test_job_page_shows_times_assets_and_redacted_deliveries(
    console: Harness, source_server: SourceServer
) -> None:
    await archived_job(console, source_server, "job-1")
    await sign_in(console)
    response = await console.client.get("/console/jobs/apex/job-1")
    assert response.status_code == 200
    text = response.text
    job = await console.parts.ledger.job("apex", "job-1")
    assert job is not None
    asset = job.assets[0]
    assert asset.sha256 and asset.sha256 in text
    assert asset.uri and asset.uri in text
    assert "2026-03-16 12:05:00 UTC" in text  # received (the fake clock)
    assert "23 h 45 min" in text  # slack before the signed URL's deadline
    assert '<img src="/console/jobs/apex/job-1/assets/0"' in text
    assert "View (redacted)" in text and "flux-2-pro" in text
    assert "TOPSECRET" not in text and "X-Amz-Signature" not in text
    assert 'id="retry"' not in text  # nothing dead or expired


async def test_jobs_list_filters_searches_and_pages_newest_first(
    console: Harness, source_server: SourceServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pages, "PAGE_SIZE", 2)
    for i in range(3):
        await archived_job(console, source_server, f"job-{i}")
        console.clock.advance(60)
    await dead_job(console, source_server, "job-dead")
    await sign_in(console)

    def ids(page: httpx.Response) -> list[str]:
        return re.findall(r'href="/console/jobs/apex/([^"/]+)"', page.text)

    first = await console.client.get("/console/jobs")
    assert ids(first) == ["job-dead", "job-2"]
    older = re.search(r'href="([^"]+)" rel="next"', first.text)
    assert older is not None
    second = await console.client.get(older.group(1).replace("&amp;", "&"))
    assert ids(second) == ["job-1", "job-0"]
    assert 'rel="next"' not in second.text

    dead = await console.client.get("/console/jobs", params={"state": "dead"})
    assert ids(dead) == ["job-dead"]
    assert "gave up after 1 attempts" in dead.text
    window = await console.client.get(
        "/console/jobs", params={"since": "2026-03-16T12:06", "until": "2026-03-16T12:06:30"}
    )
    assert ids(window) == ["job-1"]
    found = await console.client.get("/console/jobs", params={"q": "job-1"})
    assert ids(found) == ["job-1"]
    none = await console.client.get("/console/jobs", params={"q": "job-1", "provider": "fliki"})
    assert ids(none) == [] and "No job matches" in none.text
    bad = await console.client.get("/console/jobs", params={"state": "nope"})
    assert bad.status_code == 400
    assert "state: one of" in bad.text
    when = await console.client.get("/console/jobs", params={"since": "soon"})
    assert when.status_code == 400
    assert "since: expected an ISO 8601 time" in when.text
    cursor = await console.client.get("/console/jobs", params={"cursor": "garbage!"})
    assert cursor.status_code == 400


async def test_an_unknown_job_is_a_not_found_page(console: Harness) -> None:
    await sign_in(console)
    response = await console.client.get("/console/jobs/apex/nope")
    assert response.status_code == 404
    assert "no job &#39;nope&#39;" in response.text


async def test_overview_counts_jobs_queue_slack_bytes_and_refusals(
    console: Harness, source_server: SourceServer
) -> None:
    await archived_job(console, source_server, "job-1", size=5000)
    await dead_job(console, source_server, "job-dead")
    bad_auth = await console.client.post(
        "/webhooks/apex", content=b"{}", headers={"content-type": "application/json"}
    )
    assert bad_auth.status_code == 401
    await sign_in(console)
    response = await console.client.get("/console/")
    assert response.status_code == 200
    text = response.text
    row = re.search(r"Last 24 h</th>(.*?)</tr>", text, re.S)
    assert row is not None
    assert re.findall(r"<td>(\d+)</td>", row.group(1)) == ["2", "1", "0", "0", "1", "0"]
    assert "5.0 KB" in text  # the chart's bar for today
    assert "apex: authentication</dt><dd>1</dd>" in text
    assert "23 h 45 min" in text  # closest slack
    assert "Dead-lettered</dt><dd>1</dd>" in text


async def test_webhook_rejections_are_counted_per_provider_and_code(console: Harness) -> None:
    response = await post_signed(console, "apex", b"not json", APEX_SECRET)
    assert response.status_code == 400
    value = console.parts.metrics.value(
        "receiver_webhook_rejections_total", provider="apex", code=response.json()["error"]["code"]
    )
    assert value == 1
    unknown = await console.client.post(
        "/webhooks/made-up", content=b"x", headers={"content-type": "application/json"}
    )
    assert unknown.status_code == 404
    assert b"made-up" not in generate_latest(console.parts.metrics.registry)
    await sign_in(console)
    page = await console.client.get("/console/")
    assert f"apex: {response.json()['error']['code']}</dt><dd>1</dd>" in page.text


async def test_problems_lists_dead_assets_and_stopped_polling(
    console: Harness, source_server: SourceServer
) -> None:
    await dead_job(console, source_server, "job-dead")
    tracker = console.parts.poller.tracked if console.parts.poller else None
    assert tracker is not None
    now = console.clock()
    await tracker.add("vividflow", "vf-1", None, now, now)
    await tracker.stop("vividflow", "vf-1", StopReason.NOT_FOUND, "404 five times", now)
    await sign_in(console)
    response = await console.client.get("/console/problems")
    assert response.status_code == 200
    assert "apex/job-dead" in response.text and "gave up after 1 attempts" in response.text
    assert "vividflow/vf-1" in response.text and "not_found: 404 five times" in response.text


# --- Verify and Retry --------------------------------------------------------------------------


async def test_verify_recomputes_the_sha256_and_reports_corruption(
    console: Harness, source_server: SourceServer
) -> None:
    await archived_job(console, source_server, "job-1")
    await sign_in(console)
    page = await console.client.get("/console/jobs/apex/job-1")
    form = {"csrf": csrf_of(page)}
    ok = await console.client.post(
        "/console/jobs/apex/job-1/assets/0/verify", data=form, headers=SAME_ORIGIN
    )
    assert ok.status_code == 200
    assert "Asset 0 verified: re-read 5000 bytes" in ok.text

    job = await console.parts.ledger.job("apex", "job-1")
    assert job is not None and job.assets[0].uri is not None
    path = Path(job.assets[0].uri.removeprefix("file://"))
    path.write_bytes(b"x" + path.read_bytes()[1:])
    bad = await console.client.post(
        "/console/jobs/apex/job-1/assets/0/verify", data=form, headers=SAME_ORIGIN
    )
    assert bad.status_code == 409
    assert "failed verification: sha256 mismatch" in bad.text
    # Recorded like a scheduled fixity check: in the audit, and on the Problems page.
    bearer = {"authorization": f"Bearer {TOKEN}"}
    shown = (await console.client.get("/jobs/apex/job-1", headers=bearer)).json()
    assert shown["assets"][0]["fixity"]["ok"] is False
    assert shown["assets"][0]["fixity"]["problem"].startswith("sha256 mismatch")
    problems = await console.client.get("/console/problems")
    assert "fixity failure" in problems.text and "apex/job-1" in problems.text
    path.unlink()
    gone = await console.client.post(
        "/console/jobs/apex/job-1/assets/0/verify", data=form, headers=SAME_ORIGIN
    )
    assert "failed verification: missing" in gone.text
    preview = await console.client.get("/console/jobs/apex/job-1/assets/0")
    assert preview.status_code == 404


async def test_retry_requeues_a_dead_asset_which_the_worker_then_archives(
    console: Harness, source_server: SourceServer
) -> None:
    await dead_job(console, source_server, "job-1")
    await sign_in(console)
    page = await console.client.get("/console/jobs/apex/job-1")
    assert 'id="retry"' in page.text
    source_server.add("/o/job-1/out.png", 100)  # the source works again
    response = await console.client.post(
        "/console/jobs/apex/job-1/retry", data={"csrf": csrf_of(page)}, headers=SAME_ORIGIN
    )
    assert response.status_code == 200
    assert "1 asset(s) queued again" in response.text
    assert console.parts.archiver.wake.is_set()
    assert await console.parts.archiver.run_once()
    job = await console.parts.ledger.job("apex", "job-1")
    assert job is not None and job.state == JobState.ARCHIVED
    again = await console.client.post(
        "/console/jobs/apex/job-1/retry", data={"csrf": csrf_of(page)}, headers=SAME_ORIGIN
    )
    assert again.status_code == 409
    assert "Nothing to retry" in again.text


# --- asset downloads ---------------------------------------------------------------------------


async def test_assets_stream_with_byte_ranges(
    console: Harness, source_server: SourceServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    await archived_job(console, source_server, "job-1", size=300_000, kind="video/webm")
    expected = content("/o/job-1/out.bin", 300_000)
    await sign_in(console)
    url = "/console/jobs/apex/job-1/assets/0"
    # What the store hands over: a seek in a long video reads only the range asked for, not
    # the object from its first byte.
    store_class = type(console.parts.store)
    original = store_class.read
    read_from_store: list[int] = []

    async def counted(self: Any, key: str, *args: Any) -> AsyncIterator[bytes]:
        read_from_store.append(0)
        async for chunk in original(self, key, *args):
            read_from_store[-1] += len(chunk)
            yield chunk

    monkeypatch.setattr(store_class, "read", counted)

    whole = await console.client.get(url)
    assert whole.status_code == 200
    assert whole.content == expected
    assert whole.headers["accept-ranges"] == "bytes"
    assert whole.headers["content-type"] == "video/webm"
    assert whole.headers["content-disposition"].startswith("inline;")
    assert whole.headers["content-security-policy"] == "sandbox; default-src 'none'"

    for header, first, last in (
        ("bytes=0-0", 0, 0),
        ("bytes=70000-200000", 70_000, 200_000),
        ("bytes=299990-", 299_990, 299_999),
        ("bytes=-10", 299_990, 299_999),
        ("bytes=299000-999999", 299_000, 299_999),
    ):
        part = await console.client.get(url, headers={"range": header})
        assert part.status_code == 206, header
        assert part.headers["content-range"] == f"bytes {first}-{last}/300000"
        assert part.headers["content-length"] == str(last - first + 1)
        assert part.content == expected[first : last + 1], header
        assert read_from_store[-1] == last - first + 1, header

    outside = await console.client.get(url, headers={"range": "bytes=300000-"})
    assert outside.status_code == 416
    assert outside.headers["content-range"] == "bytes */300000"
    download = await console.client.get(url, params={"download": "1"})
    assert download.headers["content-disposition"].startswith("attachment;")


async def test_active_content_is_never_shown_inline(
    console: Harness, source_server: SourceServer
) -> None:
    await archived_job(console, source_server, "job-1", kind="image/svg+xml")
    await sign_in(console)
    page = await console.client.get("/console/jobs/apex/job-1")
    assert "<img" not in page.text
    response = await console.client.get("/console/jobs/apex/job-1/assets/0")
    assert response.headers["content-disposition"].startswith("attachment;")
    assert response.headers["x-content-type-options"] == "nosniff"


def test_parse_range() -> None:
    assert parse_range(None, 10) is None
    assert parse_range("bytes=0-4", 10) == (0, 4)
    assert parse_range("bytes=5-", 10) == (5, 9)
    assert parse_range("bytes=-3", 10) == (7, 9)
    assert parse_range("bytes=-30", 10) == (0, 9)
    assert parse_range("bytes=0-1,4-5", 10) is None  # several ranges: the whole object
    assert parse_range("items=0-1", 10) is None
    assert parse_range("bytes=-", 10) is None
    assert parse_range("bytes=10-", 10) == "unsatisfiable"
    assert parse_range("bytes=5-2", 10) == "unsatisfiable"
    assert parse_range("bytes=-0", 10) == "unsatisfiable"
    assert parse_range("bytes=0-", 0) == "unsatisfiable"


def test_preview_kinds() -> None:
    assert preview_kind("image/png") == "image"
    assert preview_kind("video/mp4") == "video"
    assert preview_kind("audio/wav; codecs=1") == "audio"
    assert preview_kind("image/svg+xml") is None
    assert preview_kind("text/html") is None
    assert preview_kind(None) is None


def test_every_console_template_and_static_file_ships_in_the_wheel() -> None:
    import fnmatch
    import tomllib

    root = Path(pages.__file__).parent
    config = tomllib.loads((root.parents[2] / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["receiver.audit.console"]
    files = [
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc")
    ]
    assert "templates/job.html" in files and "static/console.css" in files
    assert [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)] == []
