"""The poller against in-memory provider APIs, the real ledger and a fake clock (no sleeping)."""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from structlog.testing import capture_logs

from receiver.polling.poller import Poller
from receiver.polling.schedule import TrackedJob, Tracker
from receiver.polling.schedule.dynamodb import DynamoTrackedStore
from receiver.providers import REGISTRY
from receiver.providers.base import RateBudget
from tests.conftest import FakeClock, Harness, post_signed
from tests.payloads import APEX_SECRET, FLIKI_SECRET, apex_completed, fliki_status
from tests.sources import SourceServer, expected_sha256

pytestmark = pytest.mark.anyio

KEYS = {p: f"{p}-KEY-do-not-log" for p in REGISTRY}
HOSTS = {
    "apex.test": "apex",
    "fliki.test": "fliki",
    "flora.test": "flora",
    "vivid.test": "vividflow",
}
SETTINGS: dict[str, Any] = {
    **{f"{p}_api_key": k for p, k in KEYS.items()},
    "apex_base_url": "https://apex.test",
    "fliki_base_url": "https://fliki.test",
    "flora_base_url": "https://flora.test",
    "vividflow_base_url": "https://vivid.test/api/v1",
    "poll_grace_seconds": 60,
    "poll_base_seconds": 4,
    "poll_cap_seconds": 300,
    # Outputs come from the local source server.
    "fetch_allow_http": True,
    "fetch_allow_networks": "127.0.0.0/8",
    **{f"{p}_download_hosts": "127.0.0.1" for p in REGISTRY},
}
OPERATOR = {"Authorization": "Bearer operator-token"}

Answer = httpx.Response | Callable[[], Awaitable[httpx.Response]]


def ok(body: Any, status: int = 200, **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.Response(status, content=content, headers=headers)


@dataclass
class FakeApis:
    """Every provider's status API in memory: scripted answers per job, calls timed by the clock.

    A job's answers are used in order; the last one repeats.
    """

    clock: FakeClock
    scripts: dict[tuple[str, str], list[Answer]] = field(default_factory=dict)
    calls: list[tuple[str, str, float]] = field(default_factory=list)
    headers: list[httpx.Headers] = field(default_factory=list)

    def script(self, provider: str, job_id: str, *answers: Answer) -> None:
        self.scripts[(provider, job_id)] = list(answers)

    def calls_for(self, provider: str, job_id: str | None = None) -> list[float]:
        return [t for p, j, t in self.calls if p == provider and job_id in (None, j)]

    async def handler(self, request: httpx.Request) -> httpx.Response:
        provider = HOSTS[request.url.host]
        if provider in ("apex", "fliki"):
            job_id = request.url.params["id" if provider == "apex" else "fileId"]
        else:
            job_id = unquote(request.url.raw_path.decode().rsplit("/", 1)[-1])
        self.calls.append((provider, job_id, self.clock.wall()))
        self.headers.append(request.headers)
        script = self.scripts.get((provider, job_id))
        if not script:
            return ok({"error": {"code": "not_found", "message": "no such run"}}, 404)
        answer = script.pop(0) if len(script) > 1 else script[0]
        return answer if isinstance(answer, httpx.Response) else await answer()


@dataclass
class Polling:
    harness: Harness
    poller: Poller
    apis: FakeApis
    tracked: Tracker

    async def register(self, provider: str, job_id: str, **extra: Any) -> httpx.Response:
        body = {"provider": provider, "job_id": job_id, **extra}
        response = await self.harness.client.post("/jobs", json=body, headers=OPERATOR)
        assert response.status_code in (200, 201), response.text
        return response

    async def row(self, provider: str, job_id: str) -> TrackedJob:
        row = await self.tracked.get(provider, job_id)
        assert row is not None
        return row

    async def state(self, provider: str, job_id: str) -> str:
        job = await self.harness.parts.ledger.job(provider, job_id)
        assert job is not None
        return job.state.value

    async def run_for(self, seconds: float, step: float = 0.5) -> None:
        """Tick, advance the fake clock, repeat."""
        end = self.harness.clock.wall() + seconds
        while self.harness.clock.wall() < end:
            await self.poller.tick()
            self.harness.clock.advance(step)


PollingFactory = Callable[..., Awaitable[Polling]]


@pytest.fixture
def tracker_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Where the poll schedule lives: SQLite, or (indirect parametrisation) DynamoDB.

    The DynamoDB schedule is a table on moto's server under the same SQLite ledger and fake
    clock: every tracker call takes its time as an argument.
    """
    backend: str = getattr(request, "param", "sqlite")
    if backend == "dynamodb":
        from tests.test_contract import serialize_moto
        from tests.test_tracking_contract import create_table

        serialize_moto()
        request.getfixturevalue("moto_s3")
        table = create_table(f"p-{uuid.uuid4().hex[:12]}")
        # build_parts makes the poller's (and so `POST /jobs`'s) tracker from this name.
        monkeypatch.setattr("receiver.app.TrackedStore", lambda db: DynamoTrackedStore(table))
    return backend


@pytest.fixture
async def polling_factory(harness_factory: Any, clock: FakeClock, tracker_backend: str) -> Any:
    made: list[Poller] = []

    async def make(budgets: dict[str, RateBudget] | None = None, **overrides: Any) -> Polling:
        harness: Harness = await harness_factory(**{**SETTINGS, **overrides})
        apis = FakeApis(clock)
        http = httpx.AsyncClient(transport=httpx.MockTransport(apis.handler))
        assert harness.parts.poller is not None
        tracked = harness.parts.poller.tracked  # the schedule `POST /jobs` writes to
        assert isinstance(tracked, DynamoTrackedStore) == (tracker_backend == "dynamodb")
        poller = Poller(
            tracked,
            harness.parts.ingestor,
            harness.parts.settings,
            REGISTRY,
            clock=clock,
            rng=lambda: 0.5,  # backoff = base * 2^(n-1) * 0.75
            http=http,
            budgets=budgets,
            metrics=harness.parts.metrics,  # what /metrics shows
        )
        made.append(poller)
        return Polling(harness, poller, apis, tracked)

    yield make
    for poller in made:
        await poller.http.aclose()


@pytest.fixture
async def polling(polling_factory: PollingFactory) -> Polling:
    return await polling_factory()


def flora_run(run_id: str, status: str, **extra: Any) -> httpx.Response:
    return ok({"runId": run_id, "status": status, "createdAt": 1773662400000, **extra})


# --- happy paths ---------------------------------------------------------------------------


async def test_flora_run_is_polled_until_done_and_every_output_is_archived(
    polling: Polling, source_server: SourceServer
) -> None:
    urls = [
        source_server.add("/flora/a/angle.png", 20_000, content_type="image/png"),
        source_server.add("/flora/b/angle.png", 30_000, content_type="image/png"),
        source_server.add("/flora/c/clip.mp4", 40_000, content_type="video/mp4"),
    ]
    outputs = [
        {"outputId": f"o{n}", "type": "imageUrl", "url": url + "?tr=w-1024"}
        for n, url in enumerate(urls)
    ]
    polling.apis.script(
        "flora",
        "run-1",
        flora_run("run-1", "pending", progress=0),
        flora_run("run-1", "running", progress=50),
        flora_run("run-1", "completed", completedAt=1773662430000, outputs=outputs),
    )
    response = await polling.register(
        "flora", "run-1", technique="character-lock", metadata={"campaign": "spring"}
    )
    assert response.status_code == 201

    await polling.poller.tick()  # FLORA has no webhooks: polled at once
    assert len(polling.apis.calls) == 1
    assert await polling.state("flora", "run-1") == "processing"  # first sign of life recorded
    await polling.poller.tick()
    assert len(polling.apis.calls) == 1  # not due again yet (4 s * 0.75 = 3 s)
    polling.harness.clock.advance(3)
    await polling.poller.tick()
    assert (await polling.row("flora", "run-1")).last_status == "progress 50%"
    polling.harness.clock.advance(6)
    await polling.poller.tick()
    assert len(polling.apis.calls) == 3

    job = await polling.harness.parts.ledger.job("flora", "run-1")
    assert job is not None and job.state.value == "queued"
    assert [a.name for a in job.assets] == ["angle.png", "1-angle.png", "clip.mp4"]
    assert [(d.source, d.auth, d.event, d.outcome) for d in job.deliveries] == [
        ("poll", "api", "progress", "accepted"),
        ("poll", "api", "completed", "accepted"),
    ]
    assert json.loads(job.deliveries[1].body)["outputs"][2]["outputId"] == "o2"
    row = await polling.row("flora", "run-1")
    assert (row.state, row.polls, row.last_error) == ("done", 3, None)

    for _ in range(3):
        assert await polling.harness.parts.archiver.run_once()
    job = await polling.harness.parts.ledger.job("flora", "run-1")
    assert job is not None and job.state.value == "archived"
    sizes = [a.size for a in job.assets]
    assert sizes == [20_000, 30_000, 40_000]
    assert job.assets[2].sha256 == expected_sha256("/flora/c/clip.mp4", 40_000)
    manifest = json.loads(_read_manifest(polling, job.assets[0].key))
    assert manifest["job"]["tracking"]["metadata"] == {"campaign": "spring"}
    assert manifest["job"]["tracking"]["technique"] == "character-lock"
    assert len(manifest["assets"]) == 3


def _read_manifest(polling: Polling, asset_key: str) -> str:
    root = Path(polling.harness.parts.settings.archive_url[len("file://") :])
    return (root / asset_key).with_name("manifest.json").read_text()


async def test_vividflow_completed_and_failed(polling: Polling) -> None:
    url = (
        "https://storage.googleapis.com/bucket/v1.mp4"
        "?X-Goog-Date=20260316T120000Z&X-Goog-Expires=7200"
    )
    completed = {"job_id": "v1", "status": "COMPLETED", "video_url": url}
    polling.apis.script("vividflow", "v1", ok({"status": "PROCESSING"}), ok(completed))
    failed = {"status": "FAILED", "error": "Video generation returned no results."}
    polling.apis.script("vividflow", "v2", ok(failed))
    await polling.register("vividflow", "v1")
    await polling.register("vividflow", "v2")

    await polling.run_for(10)

    done = await polling.harness.parts.ledger.job("vividflow", "v1")
    assert done is not None and done.state.value == "queued"
    # The GCS link's own expiry (12:00 + 2 h) minus the 10 min margin.
    assert done.assets[0].deadline.isoformat() == "2026-03-16T13:50:00+00:00"
    failed = await polling.harness.parts.ledger.job("vividflow", "v2")
    assert failed is not None
    assert (failed.state.value, failed.error) == ("failed", "Video generation returned no results.")
    assert len(polling.apis.calls_for("vividflow", "v2")) == 1
    assert polling.apis.headers[0]["x-api-key"] == KEYS["vividflow"]


# --- reconciliation ------------------------------------------------------------------------


async def test_fliki_missed_webhook_is_recovered_after_the_grace_period(polling: Polling) -> None:
    polling.apis.script("fliki", "f1", ok(fliki_status("f1")))
    await polling.register("fliki", "f1")

    await polling.run_for(59)
    assert polling.apis.calls == []  # the webhook still has its chance
    await polling.run_for(2)
    assert len(polling.apis.calls) == 1
    assert await polling.state("fliki", "f1") == "queued"

    # The webhook arrives after all: recorded, as a duplicate, and nothing queued twice.
    late = await post_signed(polling.harness, "fliki", fliki_status("f1"), FLIKI_SECRET)
    assert late.status_code == 200
    assert late.json()["outcome"] == "duplicate"
    assert polling.harness.counts()["tasks"] == 1


async def test_apex_webhook_first_means_no_status_call_at_all(polling: Polling) -> None:
    await polling.register("apex", "a1")
    response = await post_signed(polling.harness, "apex", apex_completed("a1"), APEX_SECRET)
    assert response.status_code == 202

    await polling.run_for(120)

    assert polling.apis.calls == []
    row = await polling.row("apex", "a1")
    assert (row.state, row.last_status) == ("done", "settled:queued")
    metrics = polling.harness.parts.metrics
    assert metrics.value("receiver_polls_settled_by_webhook_total", provider="apex") == 1


@pytest.mark.parametrize("tracker_backend", ["sqlite", "dynamodb"], indirect=True)
async def test_webhook_racing_a_poll_makes_the_poll_the_duplicate(polling: Polling) -> None:
    payload = apex_completed("a2")

    async def webhook_lands_first() -> httpx.Response:
        response = await post_signed(polling.harness, "apex", payload, APEX_SECRET)
        assert response.status_code == 202
        return ok({"data": payload["data"]})

    polling.apis.script("apex", "a2", webhook_lands_first)
    await polling.register("apex", "a2")
    await polling.run_for(61)

    job = await polling.harness.parts.ledger.job("apex", "a2")
    assert job is not None
    assert [(d.source, d.outcome) for d in job.deliveries] == [
        ("webhook", "accepted"),
        ("poll", "duplicate"),
    ]
    assert polling.harness.counts()["tasks"] == 1


async def test_apex_failed_status_records_the_refund(polling: Polling) -> None:
    failed = {"jobId": "a3", "type": "video", "status": "failed", "error": "Generation failed"}
    polling.apis.script("apex", "a3", ok({"data": {**failed, "creditsRefunded": 250}}))
    await polling.register("apex", "a3")
    await polling.run_for(61)
    job = await polling.harness.parts.ledger.job("apex", "a3")
    assert job is not None
    assert (job.state.value, job.credits_refunded) == ("failed", 250)
    assert polling.apis.headers[0]["authorization"] == f"Bearer {KEYS['apex']}"


# --- rate limits ---------------------------------------------------------------------------


def max_in_window(times: list[float], window: float) -> int:
    return max((sum(1 for u in times if t <= u < t + window) for t in times), default=0)


async def test_many_apex_jobs_never_exceed_twenty_reads_per_ten_seconds(polling: Polling) -> None:
    for n in range(120):
        polling.apis.script("apex", f"j{n}", ok({"data": {"jobId": f"j{n}", "status": "queued"}}))
        await polling.register("apex", f"j{n}")
    polling.harness.clock.advance(60)

    await polling.run_for(60, step=0.25)

    times = polling.apis.calls_for("apex")
    assert max_in_window(times, 10) <= 20  # the documented limit
    assert max_in_window(times, 10) <= 16  # our budget, with headroom
    assert len(times) >= 6 * 16 - 16  # and the budget is actually used


async def test_fliki_backs_off_exponentially_per_job(polling: Polling) -> None:
    polling.apis.script("fliki", "slow", ok(fliki_status("slow", "processing", None, 10)))
    await polling.register("fliki", "slow")

    await polling.run_for(60 + 200, step=0.25)

    times = polling.apis.calls_for("fliki", "slow")
    gaps = [round(b - a) for a, b in itertools.pairwise(times)]
    assert gaps[:5] == [3, 6, 12, 24, 48]  # 4 s base doubling, jitter fixed at 0.75


async def test_429_pauses_the_whole_provider_for_retry_after(polling: Polling) -> None:
    body = {"error": "Too many requests", "code": "RATE_LIMITED"}
    limited = ok(body, 429, **{"Retry-After": "30"})
    polling.apis.script("apex", "r1", limited, ok({"data": {"status": "queued"}}))
    for job_id in ("r2", "r3"):
        polling.apis.script("apex", job_id, ok({"data": {"status": "queued"}}))
    await polling.register("apex", "r1")
    polling.harness.clock.advance(1)
    for job_id in ("r2", "r3"):
        await polling.register("apex", job_id)
    start = polling.harness.clock.wall()
    polling.harness.clock.advance(60)

    await polling.poller.tick()
    row = await polling.row("apex", "r1")
    # The 429 is the provider's state, not the job's: r1's own backoff did not grow, it
    # simply waits for the pause to end.
    assert row.polls == 0
    assert row.next_poll_at.timestamp() == start + 90
    await polling.run_for(40, step=0.5)

    times = polling.apis.calls_for("apex")
    assert times[0] == start + 60  # r1 became due first and met the 429
    assert len(times) >= 4
    assert all(t >= times[0] + 30 for t in times[1:])  # nobody asked during the pause


async def test_ratelimit_remaining_zero_waits_for_the_reset(polling: Polling) -> None:
    reset = str(int(polling.harness.clock.wall()) + 60 + 20)
    drained = ok(
        {"data": {"status": "queued"}},
        **{"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": reset, "X-RateLimit-Limit": "20"},
    )
    for job_id in ("h1", "h2"):
        polling.apis.script("apex", job_id, drained)
        await polling.register("apex", job_id)
    polling.harness.clock.advance(60)

    await polling.run_for(30, step=0.5)

    times = polling.apis.calls_for("apex")
    assert times[0] == polling.harness.clock.wall() - 30
    assert all(t >= float(reset) for t in times[1:])
    assert len(times) >= 2


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("tracker_backend", ["sqlite", "dynamodb"], indirect=True)
async def test_auth_error_stops_the_provider_once_and_loudly(polling: Polling) -> None:
    refused = ok({"error": {"code": "invalid_api_key", "message": "Bad or revoked key"}}, 401)
    for n in range(3):
        polling.apis.script("flora", f"r{n}", refused)
        await polling.register("flora", f"r{n}", technique="mugshot")

    with capture_logs() as logs:
        await polling.run_for(30)
        late = await polling.register("flora", "r9", technique="mugshot")
        await polling.run_for(30)

    assert len(polling.apis.calls) == 1  # one refused call, not a hammering
    metrics = polling.harness.parts.metrics
    assert metrics.value("receiver_status_calls_total", provider="flora", outcome="auth_error") == 1
    errors = [e for e in logs if e["log_level"] == "error"]
    assert [e["event"] for e in errors] == ["provider_auth_failed"]
    for job_id in ("r0", "r1", "r2", "r9"):
        row = await polling.row("flora", job_id)
        assert row.state == "stopped"
        assert row.last_error is not None and "RECEIVER_FLORA_API_KEY" in row.last_error
        assert "revoked" in row.last_error
    assert polling.poller.problem("flora") is not None
    assert late.json()["tracked_state"] == "active"
    assert KEYS["flora"] not in json.dumps(logs, default=str)

    # Other providers are unaffected.
    polling.apis.script("vividflow", "v", ok({"status": "PROCESSING"}))
    await polling.register("vividflow", "v")
    await polling.run_for(1)
    assert polling.apis.calls_for("vividflow") != []


@pytest.mark.parametrize("tracker_backend", ["sqlite", "dynamodb"], indirect=True)
async def test_a_restart_gives_auth_stopped_jobs_one_more_try(
    polling_factory: PollingFactory,
) -> None:
    polling = await polling_factory()
    polling.apis.script("flora", "r", ok({"error": {"code": "unauthorized"}}, 401))
    await polling.register("flora", "r", technique="mugshot")
    await polling.run_for(2)
    assert (await polling.row("flora", "r")).state == "stopped"

    # "Restart": a new poller on the same database, with the key fixed at the provider.
    polling.apis.script("flora", "r", flora_run("r", "running"))
    restarted = Poller(
        polling.tracked,
        polling.harness.parts.ingestor,
        polling.harness.parts.settings,
        REGISTRY,
        clock=polling.harness.clock,
        rng=lambda: 0.5,
        http=polling.poller.http,
    )
    task = asyncio.create_task(restarted.run())
    try:
        # Wait for the poll's outcome to be written, not just for the call: with DynamoDB the
        # write is a round trip of its own after the provider answered.
        for _ in range(500):  # up to 5 s on a loaded machine; usually a few ms
            row = await polling.row("flora", "r")
            if row.last_status == "progress":
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
    assert len(polling.apis.calls) == 2
    row = await polling.row("flora", "r")
    assert (row.state, row.last_status) == ("active", "progress")


async def test_not_found_is_retried_then_stopped_with_a_clear_error(polling: Polling) -> None:
    await polling.register("vividflow", "nope")  # nothing scripted: 404

    await polling.run_for(400)

    assert len(polling.apis.calls) == 5  # RECEIVER_POLL_NOT_FOUND_LIMIT
    row = await polling.row("vividflow", "nope")
    assert (row.state, row.stop_reason) == ("stopped", "not_found")
    assert row.last_error is not None and "not found" in row.last_error
    # The job itself ends too (dead, with the reason), rather than staying "tracking".
    assert await polling.state("vividflow", "nope") == "dead"
    # Support sees that polling stopped, and why, in the audit answer.
    audit = await polling.harness.client.get("/jobs/vividflow/nope", headers=OPERATOR)
    assert audit.json()["state"] == "dead"
    assert "polling stopped" in audit.json()["error"] and "not found" in audit.json()["error"]
    shown = audit.json()["polling"]
    assert (shown["state"], shown["stop_reason"], shown["next_poll_at"]) == (
        "stopped",
        "not_found",
        None,
    )
    assert "not found" in shown["last_error"]

    # Registering it again is how an operator retries.
    polling.apis.script("vividflow", "nope", ok({"status": "PROCESSING"}))
    again = await polling.register("vividflow", "nope")
    assert (again.status_code, again.json()["status"]) == (200, "reactivated")
    assert await polling.state("vividflow", "nope") == "tracking"  # reopened
    await polling.run_for(1)
    assert (await polling.row("vividflow", "nope")).state == "active"


@pytest.mark.parametrize(
    "bad",
    [
        ok(b"<html><body>502 Bad Gateway</body></html>"),
        ok({"runId": "m", "status": "completed", "outputs": []}),
        ok({"runId": "m", "status": "teleported"}),
        ok({"runId": "m", "status": "completed", "outputs": [{"url": "javascript:alert(1)"}]}),
        ok({"error": "upstream"}, 500),
    ],
)
async def test_malformed_or_failed_answers_keep_the_job_and_retry(
    polling: Polling, bad: httpx.Response, source_server: SourceServer
) -> None:
    url = source_server.add("/m/out.png", 100)
    good = flora_run("m", "completed", outputs=[{"type": "imageUrl", "url": url}])
    polling.apis.script("flora", "m", bad, good)
    await polling.register("flora", "m", technique="mugshot")

    with capture_logs():
        await polling.poller.tick()
    row = await polling.row("flora", "m")
    assert row.state == "active"
    assert row.last_error is not None
    assert row.next_poll_at > polling.harness.clock()
    assert await polling.state("flora", "m") == "tracking"

    await polling.run_for(10)
    assert await polling.state("flora", "m") == "queued"
    assert (await polling.row("flora", "m")).last_error is None


async def test_an_exploding_transport_never_crashes_the_poller(polling: Polling) -> None:
    async def explode() -> httpx.Response:
        raise RuntimeError("surprise")

    polling.apis.script("vividflow", "boom", explode, ok({"status": "FAILED", "error": "x"}))
    await polling.register("vividflow", "boom")
    with capture_logs() as logs:
        await polling.run_for(10)
    assert any(e["event"] == "poll_failed" for e in logs)
    assert await polling.state("vividflow", "boom") == "failed"


async def test_missing_key_or_base_url_stops_jobs_with_a_config_error(
    polling_factory: PollingFactory,
) -> None:
    polling = await polling_factory(vividflow_base_url=None, fliki_api_key=None)
    vivid = await polling.register("vividflow", "v")
    fliki = await polling.register("fliki", "f")
    assert any("RECEIVER_VIVIDFLOW_BASE_URL" in w for w in vivid.json()["warnings"])
    assert any("RECEIVER_FLIKI_API_KEY" in w for w in fliki.json()["warnings"])

    await polling.run_for(70)

    assert polling.apis.calls == []
    vivid_row = await polling.row("vividflow", "v")
    assert (vivid_row.state, vivid_row.stop_reason) == ("stopped", "config")
    assert "RECEIVER_VIVIDFLOW_BASE_URL" in (vivid_row.last_error or "")
    assert "RECEIVER_FLIKI_API_KEY" in ((await polling.row("fliki", "f")).last_error or "")


async def test_jobs_that_never_finish_are_given_up_visibly(
    polling_factory: PollingFactory,
) -> None:
    polling = await polling_factory(poll_give_up_hours=0.01, poll_cap_seconds=5)
    polling.apis.script("vividflow", "forever", ok({"status": "PROCESSING"}))
    await polling.register("vividflow", "forever")

    await polling.run_for(60)

    row = await polling.row("vividflow", "forever")
    assert (row.state, row.stop_reason) == ("stopped", "gave_up")
    assert "gave up" in (row.last_error or "")
    job = await polling.harness.parts.ledger.job("vividflow", "forever")
    assert job is not None and job.state == "dead"
    assert job.error is not None and job.error.startswith("polling stopped: gave up")


@pytest.mark.parametrize("tracker_backend", ["sqlite", "dynamodb"], indirect=True)
async def test_a_forgotten_job_is_never_polled_or_tracked_again(polling: Polling) -> None:
    """`receiver forget` on a job followed by polling: its schedule entry (job id, technique,
    last errors) goes with the record, the provider is not asked about it again, and
    registering it again is refused with 410, writing nothing."""
    from receiver.audit.lifecycle import forget

    polling.apis.script("flora", "erase", flora_run("erase", "running", progress=10))
    await polling.register("flora", "erase", technique="mugshot")
    await polling.poller.tick()
    assert len(polling.apis.calls_for("flora", "erase")) == 1
    parts = polling.harness.parts

    async def erase(act: bool) -> bool:
        report = await forget(
            parts.ledger,
            parts.store,
            polling.tracked,
            "flora",
            "erase",
            reason="DSR-9",
            now=polling.harness.clock(),
            act=act,
        )
        return report.tracked

    assert await erase(act=False) is True  # the dry run says so, and changes nothing
    assert await polling.tracked.get("flora", "erase") is not None
    assert await erase(act=True) is True
    assert await polling.tracked.get("flora", "erase") is None
    await polling.run_for(600)
    assert len(polling.apis.calls_for("flora", "erase")) == 1

    body = {"provider": "flora", "job_id": "erase", "technique": "mugshot"}
    again = await polling.harness.client.post("/jobs", json=body, headers=OPERATOR)
    assert again.status_code == 410, again.text
    assert again.json()["error"]["code"] == "gone"
    assert "erased on request" in again.json()["error"]["message"]
    assert await polling.tracked.get("flora", "erase") is None
    assert await parts.ledger.job("flora", "erase") is None


@pytest.mark.parametrize("tracker_backend", ["sqlite", "dynamodb"], indirect=True)
async def test_an_entry_written_after_the_erasure_is_dropped_unpolled(polling: Polling) -> None:
    """A registration racing `receiver forget` can leave a schedule entry for a job with a
    tombstone; the poller drops it without asking the provider."""
    polling.apis.script("flora", "late", flora_run("late", "running"))
    now = polling.harness.clock()
    await polling.harness.parts.ledger.forget("flora", "late", "DSR-10", now)
    await polling.tracked.add("flora", "late", "mugshot", now, now)
    with capture_logs() as logs:
        await polling.poller.tick()
    assert polling.apis.calls_for("flora", "late") == []
    assert await polling.tracked.get("flora", "late") is None
    assert [e["event"] for e in logs if e["event"].startswith("poll_")] == [
        "poll_dropped_forgotten"
    ]


async def test_the_running_loop_wakes_on_registration(polling: Polling) -> None:
    polling.apis.script("vividflow", "w", ok({"status": "PROCESSING"}))
    task = asyncio.create_task(polling.poller.run())
    try:
        await asyncio.sleep(0.05)
        now = polling.harness.clock()
        await polling.tracked.add("vividflow", "w", None, now, now)
        polling.poller.wake.set()
        for _ in range(500):  # up to 5 s on a loaded machine; usually a few ms
            if polling.apis.calls:
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
    assert polling.apis.calls_for("vividflow", "w")


async def test_parts_start_runs_the_poller_beside_the_workers(harness_factory: Any) -> None:
    harness: Harness = await harness_factory(**SETTINGS)
    assert harness.parts.poller is not None
    harness.parts.start(workers=1)
    # The archive workers, the poller, and the retention loop (issue 15).
    assert len(harness.parts.background) == 3
    await harness.parts.stop()
    harness.parts.db.start()  # the fixture stops it again


def test_backoff_cap_is_respected() -> None:
    from receiver.domain import backoff_delay

    assert backoff_delay(40, lambda: 1.0, base=4, cap=300) == 300
    assert timedelta(seconds=backoff_delay(1, lambda: 0.0, base=4, cap=300)) == timedelta(seconds=2)
