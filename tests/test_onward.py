"""Onward delivery end to end: receiver's events reach a real local application endpoint, signed
so that the official `standardwebhooks` verifier accepts them, retried through outages, final on
a refusal, and never carrying a provider's link or the endpoint's own credentials."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from standardwebhooks.webhooks import WebhookVerificationError

from receiver.domain import JobState
from receiver.ledger.events import FAILING_AFTER, EventFilter
from tests.app_endpoint import AppEndpoint
from tests.conftest import APEX_SECRET, LOCAL_SOURCES, Harness, HarnessFactory, post_signed
from tests.payloads import apex_failed
from tests.sources import SourceServer
from tests.test_archiver import completed
from tests.test_onward_schema import assert_valid

pytestmark = pytest.mark.anyio


def secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


NEW, OLD = secret(), secret()


def endpoints(*items: dict[str, Any]) -> str:
    return json.dumps(list(items))


@pytest.fixture
async def onward(
    harness_factory: HarnessFactory, app_endpoint: AppEndpoint
) -> AsyncIterator[Harness]:
    harness: Harness = await harness_factory(
        **LOCAL_SOURCES,
        onward_endpoints=endpoints(
            {"name": "app", "url": app_endpoint.url(), "secrets": [NEW, OLD]}
        ),
        onward_retry_schedule="5,5,5,5,5",
    )
    yield harness


async def archive(h: Harness, source: SourceServer, job_id: str, **kw: Any) -> None:
    url = source.add(f"/o/{job_id}.png", 1000, content_type="image/png")
    await completed(h, job_id, url, **kw)
    assert await h.parts.archiver.run_once()


async def drain(h: Harness) -> None:
    assert h.parts.sender is not None
    await h.parts.sender.drain()


async def test_every_event_type_reaches_the_application_and_verifies_with_either_secret(
    onward: Harness, app_endpoint: AppEndpoint, source_server: SourceServer
) -> None:
    h = onward
    await archive(h, source_server, "ok")
    assert (await post_signed(h, "apex", apex_failed("bad"), APEX_SECRET)).status_code == 202
    await completed(h, "gone", source_server.add("/o/gone.png", 10))
    await h.parts.ledger.mark_asset_ended(
        "apex", "gone", 0, JobState.EXPIRED, "HTTP 403", h.clock()
    )
    await h.parts.ledger.track("flora", "lost", {"metadata": {"order": "A-7"}}, h.clock())
    await h.parts.ledger.end_tracking("flora", "lost", JobState.DEAD, "gave up", h.clock())
    await drain(h)

    got = app_endpoint.by_type()
    assert sorted(got) == [
        "asset.archived",
        "job.archived",
        "job.dead",
        "job.expired",
        "job.failed",
    ]
    for received in app_endpoint.received:
        # Rotation: the application may know either secret; a stranger's fails.
        for known in (NEW, OLD):
            assert received.verify(known) == received.payload()
        with pytest.raises(WebhookVerificationError):
            received.verify(secret())
        assert received.headers["webhook-id"] == received.payload()["id"]
        # Every body obeys the documented schema (receiver/onward/schema/events.v1.json).
        assert_valid(received.body)
    archived = got["asset.archived"][0].payload()["data"]
    assert archived["job_id"] == "ok"
    assert archived["asset"]["uri"].startswith("file://")
    assert archived["asset"]["sha256"] and archived["asset"]["size"] == 1000
    assert archived["manifest"]["key"].endswith("/ok/manifest.json")
    assert got["job.dead"][0].payload()["data"]["metadata"] == {"order": "A-7"}
    # The provider's link (host and query) is never in what the application receives.
    assert all(b"/o/ok.png" not in r.body for r in app_endpoint.received)
    # A job's events arrive in state order.
    order = [
        r.payload()["type"] for r in app_endpoint.received if r.payload()["data"]["job_id"] == "ok"
    ]
    assert order == ["asset.archived", "job.archived"]


async def test_an_outage_of_503s_then_refused_connections_recovers_and_shows_failing(
    onward: Harness, app_endpoint: AppEndpoint
) -> None:
    h = onward
    for n in range(3):
        await post_signed(h, "apex", apex_failed(f"f{n}"), APEX_SECRET)
    app_endpoint.default = (503, {}, 0.0)
    await drain(h)  # the first try of each: 503
    status = await h.parts.ledger.onward_status(h.clock())
    # Three failed attempts in a row (one per event): failing, but never disabled.
    assert status.pending == 3 and status.endpoints[0].consecutive_failures == FAILING_AFTER
    assert status.endpoints[0].failing
    app_endpoint.down()
    h.clock.advance(6)
    await drain(h)  # refused
    assert h.parts.sender is not None
    await h.parts.sender.refresh_metrics()
    status = await h.parts.ledger.onward_status(h.clock())
    assert status.endpoints[0].failing and status.endpoints[0].consecutive_failures == 6
    metrics = (await h.client.get("/metrics")).text
    assert 'receiver_onward_endpoint_up{endpoint="app"} 0.0' in metrics
    assert 'receiver_onward_attempts_total{endpoint="app",outcome="retry"} 6.0' in metrics

    app_endpoint.up()
    app_endpoint.default = (204, {}, 0.0)
    h.clock.advance(6)
    await drain(h)
    await h.parts.sender.refresh_metrics()
    assert len(set(app_endpoint.ids())) == 3
    status = await h.parts.ledger.onward_status(h.clock())
    assert status.pending == 0 and not status.endpoints[0].failing
    metrics = (await h.client.get("/metrics")).text
    assert 'receiver_onward_endpoint_up{endpoint="app"} 1.0' in metrics
    # Every attempt is on record: 503, refused, delivered.
    event = (await h.parts.ledger.events(EventFilter(job_id="f0", provider="apex"), 1))[0]
    full = await h.parts.ledger.event(event.id)
    assert full is not None
    history = full.sends[0].history
    assert [(a.outcome, a.status) for a in history] == [
        ("retry", 503),
        ("retry", None),
        ("delivered", 204),
    ]
    assert "ConnectError" in (history[1].error or "")
    assert history[0].response == '{"ok": false}'


async def test_a_refusal_ends_the_series_and_retries_are_bounded(
    harness_factory: HarnessFactory, app_endpoint: AppEndpoint
) -> None:
    h: Harness = await harness_factory(
        onward_endpoints=endpoints({"name": "app", "url": app_endpoint.url(), "secrets": [NEW]}),
        onward_retry_schedule="5,5",
        onward_concurrency=1,  # one try at a time: the answers below meet the jobs in order
    )
    await post_signed(h, "apex", apex_failed("refused"), APEX_SECRET)
    await post_signed(h, "apex", apex_failed("moved"), APEX_SECRET)
    await post_signed(h, "apex", apex_failed("busy"), APEX_SECRET)
    app_endpoint.answers = [
        (400, {}, 0.0),
        (302, {"location": "http://169.254.169.254/"}, 0.0),
        (429, {"retry-after": "120"}, 0.0),
    ]
    app_endpoint.default = (500, {}, 0.0)
    await drain(h)
    by_job = {}
    for event in await h.parts.ledger.events(EventFilter(), 10):
        full = await h.parts.ledger.event(event.id)
        assert full is not None
        by_job[full.job_id] = full.sends[0]
    assert (by_job["refused"].state, by_job["refused"].attempts) == ("failed", 1)
    assert by_job["moved"].state == "failed"
    assert "redirects are not followed" in (by_job["moved"].last_error or "")
    # 429 with Retry-After: not before it, even though the schedule says 5 s.
    busy = by_job["busy"]
    assert busy.state == "pending" and busy.next_at is not None
    assert busy.next_at >= h.clock() + timedelta(seconds=119)
    # 500s: tried 1 + len(schedule) times, then failed (exhausted), never more.
    for _ in range(4):
        h.clock.advance(200)
        await drain(h)
    busy_event = next(
        e for e in await h.parts.ledger.events(EventFilter(job_id="busy", provider="apex"), 1)
    )
    full = await h.parts.ledger.event(busy_event.id)
    assert full is not None
    assert (full.sends[0].state, len(full.sends[0].history)) == ("failed", 3)
    assert "gave up after 3 tries" in (full.sends[0].last_error or "")
    assert (await h.parts.ledger.onward_status(h.clock())).exhausted == 3


async def test_the_endpoints_credentials_and_query_never_reach_an_error(
    harness_factory: HarnessFactory, app_endpoint: AppEndpoint, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://app-user:s3cr3t-pass@127.0.0.1:{app_endpoint.port}/hook?token=tok-123"
    h: Harness = await harness_factory(
        onward_endpoints=endpoints({"name": "app", "url": url, "secrets": [NEW]}),
    )
    app_endpoint.down()
    await post_signed(h, "apex", apex_failed("x"), APEX_SECRET)
    await drain(h)
    [event] = await h.parts.ledger.events(EventFilter(), 10)
    full = await h.parts.ledger.event(event.id)
    assert full is not None
    logged = capsys.readouterr()
    text = json.dumps([a.error for s in full.sends for a in s.history]) + logged.out + logged.err
    assert "onward_attempt" in logged.out + logged.err  # the log line is there, scrubbed
    assert full.sends[0].history[0].error
    for leaked in ("s3cr3t-pass", "tok-123", "app-user"):
        assert leaked not in text
