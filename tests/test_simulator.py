"""The provider simulator: media with Range and expiry, status APIs, faults, webhook retries."""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Iterator

import httpx
import pytest

from receiver.simulator import Faults, Simulator, content_sha256

KEYS = {"apex": "ak", "fliki": "fk", "flora": "flk", "vividflow": "vk"}


@pytest.fixture
def sim() -> Iterator[Simulator]:
    simulator = Simulator(api_keys=dict(KEYS))
    simulator.start()
    try:
        yield simulator
    finally:
        simulator.stop()


def test_media_links_serve_ranges_and_refuse_tampering(sim: Simulator) -> None:
    job = sim.add_job("apex", "a1", outputs=[(150_000, "video/mp4")], after=0)
    output = job.outputs[0]
    assert "X-Amz-Expires=3600" in output.url
    whole = httpx.get(output.url)
    assert whole.status_code == 200
    assert hashlib.sha256(whole.content).hexdigest() == content_sha256(output.seed, 150_000)
    etag = whole.headers["etag"]

    part = httpx.get(output.url, headers={"Range": "bytes=100000-", "If-Match": etag})
    assert part.status_code == 206
    assert part.headers["content-range"] == "bytes 100000-149999/150000"
    assert part.content == whole.content[100_000:]
    changed = httpx.get(output.url, headers={"Range": "bytes=10-", "If-Match": '"other"'})
    assert changed.status_code == 412
    tampered = httpx.get(output.url.replace("X-Amz-Expires=3600", "X-Amz-Expires=99999"))
    assert tampered.status_code == 403 and b"AccessDenied" in tampered.content


def test_expired_links_answer_like_r2_and_gcs() -> None:
    simulator = Simulator(api_keys=dict(KEYS), faults=Faults(expired_links=True))
    simulator.start()
    try:
        r2 = simulator.add_job("apex", "a", after=0).outputs[0].url
        gcs = simulator.add_job("vividflow", "v", after=0).outputs[0].url
        assert "X-Goog-Date" in gcs
        expired_r2 = httpx.get(r2)
        assert (expired_r2.status_code, b"ExpiredRequest" in expired_r2.content) == (403, True)
        expired_gcs = httpx.get(gcs)
        assert (expired_gcs.status_code, b"ExpiredToken" in expired_gcs.content) == (400, True)
    finally:
        simulator.stop()


def test_status_apis_at_their_documented_paths(sim: Simulator) -> None:
    sim.add_job("flora", "run-1", outputs=[(10, "image/png"), (20, "video/mp4")], after=0)
    sim.add_job("vividflow", "v1", after=60)
    sim.add_job("fliki", "f1", after=0, fail="boom")
    sim.add_job("apex", "a1", after=0)
    bearer = {"Authorization": "Bearer wrong"}

    flora = httpx.get(
        sim.base_url("flora") + "/api/v1/techniques/character-lock/runs/run-1",
        headers={"Authorization": "Bearer flk"},
    ).json()
    assert flora["status"] == "completed"
    assert [o["type"] for o in flora["outputs"]] == ["imageUrl", "videoUrl"]
    wrong_slug = httpx.get(
        sim.base_url("flora") + "/api/v1/techniques/mugshot/runs/run-1",
        headers={"Authorization": "Bearer flk"},
    )
    assert wrong_slug.status_code == 404
    assert wrong_slug.json()["error"]["code"] == "not_found"

    vivid = httpx.get(sim.base_url("vividflow") + "/status/v1", headers={"X-API-Key": "vk"})
    assert vivid.json() == {"job_id": "v1", "status": "PROCESSING"}
    fliki = httpx.get(
        sim.base_url("fliki") + "/v1/generate/status",
        params={"fileId": "f1"},
        headers={"Authorization": "Bearer fk"},
    )
    assert fliki.json()["status"] == "failed"
    apex = httpx.get(
        sim.base_url("apex") + "/api/jobs",
        params={"id": "a1"},
        headers={"Authorization": "Bearer ak"},
    )
    assert apex.json()["data"]["status"] == "completed"
    assert apex.headers["x-ratelimit-limit"] == "20"

    refused = httpx.get(sim.base_url("apex") + "/api/jobs", params={"id": "a1"}, headers=bearer)
    assert refused.status_code == 401
    assert refused.json() == {"error": "Missing or invalid API key", "code": "UNAUTHORIZED"}


def test_apex_read_limit_is_enforced(sim: Simulator) -> None:
    sim.add_job("apex", "a1", after=0)
    with httpx.Client(headers={"Authorization": "Bearer ak"}) as http:
        codes = [
            http.get(sim.base_url("apex") + "/api/jobs", params={"id": "a1"}).status_code
            for _ in range(22)
        ]
    assert codes[:20] == [200] * 20
    assert codes[20:] == [429, 429]


def test_fault_knobs() -> None:
    simulator = Simulator(
        api_keys=dict(KEYS), faults=Faults(status_429_every=2, status_5xx_every=3, drop_every=1)
    )
    simulator.start()
    try:
        simulator.add_job("vividflow", "v", after=0)
        codes = [
            httpx.get(simulator.base_url("vividflow") + "/status/v", headers={"X-API-Key": "vk"})
            for _ in range(4)
        ]
        assert [c.status_code for c in codes] == [200, 429, 503, 429]
        assert codes[1].headers["retry-after"] == "1"
        url = simulator.add_job("fliki", "f", outputs=[(300_000, "video/mp4")]).outputs[0].url
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(url)
    finally:
        simulator.stop()


def test_webhooks_retry_on_apex_schedule_scaled_down() -> None:
    # Nothing listens on the receiver URL: every attempt fails, so all four are made.
    simulator = Simulator(
        api_keys=dict(KEYS),
        webhook_secrets={"apex": "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"},
        receiver_url="http://127.0.0.1:9",
        retry_scale=200,
    )
    simulator.start()
    try:
        job = simulator.add_job("apex", "a", after=0)
        deadline = time.monotonic() + 5
        while len(job.webhook_attempts) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)
    finally:
        simulator.stop()
    times = [a["at"] for a in job.webhook_attempts]
    assert len(times) == 4  # the first try and three retries, then "marked as failed"
    gaps = [b - a for a, b in itertools.pairwise(times)]
    for gap, scheduled in zip(gaps, (10 / 200, 60 / 200, 300 / 200), strict=True):
        assert scheduled <= gap < scheduled + 0.2
    assert all(a.get("error") for a in job.webhook_attempts)


def test_jobs_can_be_added_over_http(sim: Simulator) -> None:
    base = f"http://127.0.0.1:{sim.port}/_sim/jobs"
    spec = {"provider": "flora", "job_id": "r", "after": 0, "outputs": [{"size": 5}, {"size": 6}]}
    created = httpx.post(base, json=spec)
    assert created.status_code == 201
    described = created.json()
    assert described["technique"] == "character-lock"
    assert [o["size"] for o in described["outputs"]] == [5, 6]
    assert described["outputs"][0]["sha256"] == content_sha256("flora:r:0", 5)
    assert [j["job_id"] for j in httpx.get(base).json()] == ["r"]
