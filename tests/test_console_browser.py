"""The console in a real browser: headless Chromium (Selenium) against a real receiver.

One receiver (uvicorn in a thread, the real archive workers, SQLite, a local archive) is fed
signed webhooks whose outputs come from the local HTTP source: a real PNG, a real WebM/VP8
video (tests/fixtures/clip.webm), a real WAV, and one output whose source fails so that its
job is dead-lettered. Then the browser signs in, searches, opens jobs, plays the video, verifies,
retries, signs out, and is refused a cross-site POST.
"""

from __future__ import annotations

import math
import struct
import time
import wave
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from receiver.app import build_parts, create_app
from receiver.simulator.server import ServerThread
from tests.conftest import make_settings
from tests.payloads import APEX_SECRET, apex_completed, signed
from tests.sources import SourceServer

FIXTURES = Path(__file__).parent / "fixtures"
TOKEN = "operator-token"
FINAL = ("archived", "failed", "expired", "dead")


def png(width: int = 48, height: int = 32) -> bytes:
    """A real PNG (a colour gradient), written with zlib alone."""
    rows = b"".join(
        b"\x00" + b"".join(bytes((x * 5 % 256, y * 8 % 256, 160)) for x in range(width))
        for y in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def wav(seconds: float = 1.0, rate: int = 8000) -> bytes:
    out = BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(
            b"".join(
                struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / rate)))
                for i in range(int(seconds * rate))
            )
        )
    return out.getvalue()


class AssetRequests:
    """ASGI middleware: records (path, Range header, status) of every asset request."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seen: list[tuple[str, str | None, int]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or "/assets/" not in scope["path"]:
            await self.app(scope, receive, send)
            return
        wanted = dict(scope["headers"]).get(b"range")

        async def recording(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.seen.append(
                    (scope["path"], wanted.decode() if wanted else None, message["status"])
                )
            await send(message)

        await self.app(scope, receive, recording)


@dataclass
class Site:
    url: str
    source: SourceServer
    http: httpx.Client
    assets: AssetRequests

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"/jobs/apex/{job_id}")
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def send(self, job_id: str, path: str, kind: str, job_type: str) -> None:
        now = datetime.now(UTC)
        payload = apex_completed(
            job_id,
            url=self.source.url(path) + "?X-Amz-Signature=TOPSECRET",
            output_type=kind,
            job_type=job_type,
            completed_at=now.isoformat().replace("+00:00", "Z"),
        )
        body, headers = signed(payload, APEX_SECRET, timestamp=int(now.timestamp()))
        self.http.post("/webhooks/apex", content=body, headers=headers).raise_for_status()

    def settle(self, *job_ids: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not all(self.job(j)["state"] in FINAL for j in job_ids):
            assert time.monotonic() < deadline, f"jobs did not settle: {job_ids}"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    source = SourceServer()
    source.start()
    source.add("/media/still.png", data=png(), content_type="image/png")
    source.add(
        "/media/clip.webm", data=(FIXTURES / "clip.webm").read_bytes(), content_type="video/webm"
    )
    source.add("/media/tone.wav", data=wav(), content_type="audio/wav")
    for name in ("broken.png", "broken-2.png"):
        source.add(f"/media/{name}", 100, status=500, error_body=b"boom")
    settings = make_settings(
        tmp_path_factory.mktemp("console"),
        fetch_allow_http=True,
        fetch_allow_networks="127.0.0.0/8",
        apex_download_hosts="127.0.0.1",
        max_attempts=1,
        log_level="warning",
    )
    parts = build_parts(settings)
    assets = AssetRequests(create_app(parts, workers=2))
    server = ServerThread(assets)
    server.start()
    http = httpx.Client(
        base_url=server.url, headers={"authorization": f"Bearer {TOKEN}"}, timeout=10
    )
    site = Site(server.url, source, http, assets)
    try:
        for i in range(3):
            site.send(f"still-{i}", "/media/still.png", "image/png", "image")
        site.send("clip-1", "/media/clip.webm", "video/webm", "video")
        site.send("tone-1", "/media/tone.wav", "audio/wav", "audio")
        site.send("dead-1", "/media/broken.png", "image/png", "image")
        site.send("dead-2", "/media/broken-2.png", "image/png", "image")
        site.settle("still-0", "still-1", "still-2", "clip-1", "tone-1", "dead-1", "dead-2")
        assert site.job("dead-1")["state"] == "dead"
        yield site
    finally:
        http.close()
        server.stop()
        source.stop()


def wait_for(browser: webdriver.Chrome, script: str, timeout: float = 10) -> Any:
    """Wait until the JavaScript expression `script` is truthy; return its value."""
    return WebDriverWait(browser, timeout, poll_frequency=0.05).until(
        lambda b: b.execute_script(f"return {script}")
    )


def heading(browser: webdriver.Chrome) -> str:
    text: str = browser.find_element(By.TAG_NAME, "h1").text
    return text


def sign_in(browser: webdriver.Chrome, site: Site, path: str = "/console/") -> None:
    browser.get(site.url + path)
    if heading(browser) == "Sign in":
        field = browser.find_element(By.ID, "token")
        field.send_keys(TOKEN)
        field.send_keys(Keys.ENTER)
        wait_for(
            browser,
            "document.querySelector('h1') && "
            "document.querySelector('h1').textContent !== 'Sign in'",
        )


def test_a_signed_out_browser_gets_the_sign_in_page_for_every_console_url(
    chromium: webdriver.Chrome, site: Site
) -> None:
    chromium.get(site.url + "/console/")
    chromium.delete_all_cookies()
    for path in (
        "/console",
        "/console/",
        "/console/jobs",
        "/console/jobs?state=dead",
        "/console/problems",
        "/console/jobs/apex/clip-1",
        "/console/jobs/apex/clip-1/assets/0",
        "/console/anything",
    ):
        chromium.get(site.url + path)
        assert heading(chromium) == "Sign in", path
        page = chromium.page_source
        assert "job-state" not in page and "<table" not in page and "clip.webm" not in page


def test_sign_in_search_open_a_job_and_play_its_video(
    chromium: webdriver.Chrome, site: Site
) -> None:
    chromium.delete_all_cookies()
    sign_in(chromium, site, "/console/jobs")
    assert heading(chromium) == "Jobs"  # back where the sign-in started
    search = chromium.find_element(By.ID, "q")
    search.send_keys("clip-1")
    search.send_keys(Keys.ENTER)
    wait_for(browser=chromium, script="location.search.includes('q=clip-1')")
    links = chromium.find_elements(By.CSS_SELECTOR, "table.jobs a")
    assert [a.text for a in links] == ["clip-1"]
    links[0].click()
    wait_for(chromium, "location.pathname === '/console/jobs/apex/clip-1'")
    assert chromium.find_element(By.ID, "job-state").text == "archived"
    assert "TOPSECRET" not in chromium.page_source

    wait_for(chromium, "document.querySelector('video').readyState >= 1")
    duration = chromium.execute_script("return document.querySelector('video').duration")
    assert 3.5 < duration < 4.5  # the fixture is a 4 s clip
    chromium.execute_script("const v = document.querySelector('video'); v.muted = true; v.play();")
    wait_for(chromium, "document.querySelector('video').currentTime > 0.3")
    # Seeking ahead needs byte ranges from the console's asset route.
    chromium.execute_script("document.querySelector('video').currentTime = 3.2")
    wait_for(
        chromium,
        "!document.querySelector('video').seeking && "
        "document.querySelector('video').currentTime >= 3.2",
    )
    seekable = chromium.execute_script(
        "const s = document.querySelector('video').seekable; return s.length && s.end(0)"
    )
    assert seekable > 3.5
    ranged = [
        (wanted, status)
        for path, wanted, status in site.assets.seen
        if path == "/console/jobs/apex/clip-1/assets/0" and wanted
    ]
    assert ranged and all(status == 206 for _, status in ranged), site.assets.seen


def test_images_and_audio_preview_inline(chromium: webdriver.Chrome, site: Site) -> None:
    sign_in(chromium, site, "/console/jobs/apex/still-0")
    wait_for(chromium, "document.querySelector('img.preview').complete")
    width = chromium.execute_script("return document.querySelector('img.preview').naturalWidth")
    assert width == 48
    sign_in(chromium, site, "/console/jobs/apex/tone-1")
    wait_for(chromium, "document.querySelector('audio').readyState >= 1")
    duration = chromium.execute_script("return document.querySelector('audio').duration")
    assert 0.9 < duration < 1.1


def test_verify_an_asset(chromium: webdriver.Chrome, site: Site) -> None:
    sign_in(chromium, site, "/console/jobs/apex/still-1")
    chromium.find_element(By.ID, "verify-0").click()
    wait_for(chromium, "document.getElementById('notice')")
    notice = chromium.find_element(By.ID, "notice").text
    assert notice.startswith("Asset 0 verified: re-read")
    assert site.job("still-1")["assets"][0]["sha256"] in notice


def test_retry_a_dead_asset(chromium: webdriver.Chrome, site: Site) -> None:
    sign_in(chromium, site, "/console/jobs/apex/dead-1")
    assert chromium.find_element(By.ID, "job-state").text == "dead"
    site.source.add("/media/broken.png", data=png(), content_type="image/png")  # fixed
    chromium.find_element(By.ID, "retry").click()
    wait_for(chromium, "document.getElementById('notice')")
    assert "1 asset(s) queued again" in chromium.find_element(By.ID, "notice").text
    site.settle("dead-1")
    chromium.get(site.url + "/console/jobs/apex/dead-1")
    assert chromium.find_element(By.ID, "job-state").text == "archived"


def test_a_cross_site_post_is_refused(chromium: webdriver.Chrome, site: Site) -> None:
    sign_in(chromium, site, "/console/jobs/apex/dead-2")
    # Another origin (the source server's port) posts a forged Retry to the console.
    attack = (
        f'<form method="post" action="{site.url}/console/jobs/apex/dead-2/retry">'
        '<input name="csrf" value="forged"></form><script>document.forms[0].submit()</script>'
    ).encode()
    site.source.add("/attack.html", data=attack, content_type="text/html")
    chromium.get(site.source.url("/attack.html"))
    wait_for(chromium, "location.pathname.endsWith('/retry')")
    assert heading(chromium) == "Request refused"
    assert site.job("dead-2")["state"] == "dead"


def test_readable_at_390_px_and_usable_by_keyboard(chromium: webdriver.Chrome, site: Site) -> None:
    sign_in(chromium, site, "/console/jobs/apex/clip-1")
    chromium.set_window_size(390, 844)
    try:
        for path in (
            "/console/",
            "/console/jobs",
            "/console/jobs/apex/clip-1",
            "/console/problems",
        ):
            chromium.get(site.url + path)
            overflow = chromium.execute_script(
                "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
            )
            assert overflow <= 0, f"{path} scrolls sideways by {overflow} px at 390 px"
        chromium.get(site.url + "/console/jobs")
        body = chromium.find_element(By.TAG_NAME, "body")
        body.send_keys(Keys.TAB)
        assert chromium.switch_to.active_element.text == "Skip to content"
        unlabelled = chromium.execute_script(
            "return [...document.querySelectorAll('input:not([type=hidden]), select')]"
            ".filter(e => !e.labels || e.labels.length === 0).map(e => e.name)"
        )
        assert unlabelled == []
    finally:
        chromium.set_window_size(1280, 900)


def test_sign_out(chromium: webdriver.Chrome, site: Site) -> None:
    sign_in(chromium, site, "/console/problems")
    assert "apex/dead-2" in chromium.page_source
    chromium.find_element(By.CSS_SELECTOR, "form.signout button").click()
    wait_for(chromium, "document.body.textContent.includes('You are signed out')")
    chromium.get(site.url + "/console/problems")
    assert heading(chromium) == "Sign in"
