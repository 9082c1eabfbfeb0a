"""The onward outbox's contract (receiver/ledger/events.py), run against both ledgers: SQLite and
DynamoDB on moto's server. Events are written with the state change they report, once; sends
are claimed by one sender at a time, in order per job and endpoint; attempts, exhaustion,
endpoint health and replay behave the same on both."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from receiver.backends.sqlite import Database
from receiver.domain import JobState
from receiver.ledger import Ledger
from receiver.ledger.events import (
    FAILING_AFTER,
    EventFilter,
    PendingSend,
    SendAttempt,
    Subscription,
    Subscriptions,
)
from receiver.ledger.sqlite import SqliteLedger
from receiver.workqueue.sqlite import SqliteQueue
from tests.conftest import FakeClock
from tests.test_contract import (
    Backend,
    aws_pair,
    completed,
    create_aws_resources,
    failed,
    record,
    serialize_moto,
    stored,
)

pytestmark = pytest.mark.anyio

SUBSCRIPTIONS = Subscriptions(
    (Subscription("app"), Subscription("billing", frozenset({"job.archived", "job.failed"})))
)
LEASE = timedelta(seconds=30)


@pytest.fixture(params=["sqlite", "aws"])
async def b(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        clock = FakeClock()
        db = Database(tmp_path / "outbox.db")
        db.start()

        async def advance_fake(seconds: float) -> None:
            clock.advance(seconds)

        try:
            ledger = SqliteLedger(db, SUBSCRIPTIONS)
            yield Backend("sqlite", ledger, SqliteQueue(db), clock, advance_fake)
        finally:
            db.stop()
        return
    serialize_moto()
    request.getfixturevalue("moto_s3")
    table, queue_name = create_aws_resources(f"o-{uuid.uuid4().hex[:12]}")
    dynamo, queue = aws_pair(table, queue_name, subscriptions=SUBSCRIPTIONS)

    async def advance_real(seconds: float) -> None:
        await asyncio.sleep(seconds)

    yield Backend("aws", dynamo, queue, lambda: datetime.now(UTC), advance_real)


def attempt(b: Backend, outcome: str = "delivered", status: int | None = 200) -> SendAttempt:
    return SendAttempt(
        b.now(), outcome, status, 12.5, "ok", None if outcome == "delivered" else "x"
    )  # type: ignore[arg-type]


async def claim(
    ledger: Ledger, b: Backend, endpoint: str = "app", owner: str = "s1"
) -> list[PendingSend]:
    return await ledger.claim_sends(endpoint, owner, b.now(), LEASE, 100)


async def archive_two(b: Backend, job_id: str = "j") -> None:
    await record(b, completed(job_id, "https://cdn.example/0.png", "https://cdn.example/1.png"))
    await b.ledger.mark_archived("apex", job_id, 0, stored(0), b.now())
    await b.ledger.mark_archived("apex", job_id, 1, stored(1), b.now())


async def test_events_are_written_once_with_their_state_change(b: Backend) -> None:
    await archive_two(b)
    # A second record of the same copy (an attempt that died before its ack) is no news.
    await b.ledger.mark_archived("apex", "j", 1, stored(1), b.now())

    events = await b.ledger.events(EventFilter(provider="apex", job_id="j"), 10)
    assert [e.type for e in reversed(events)] == [
        "asset.archived",
        "asset.archived",
        "job.archived",
    ]
    last = events[0].payload()
    assert last["id"] == events[0].id and last["id"].startswith("evt_")
    assert last["type"] == "job.archived" and last["schema_version"] == 1
    data = last["data"]
    assert (data["provider"], data["job_id"], data["job_type"], data["state"]) == (
        "apex",
        "j",
        "image",
        "archived",
    )
    assert data["metadata"] == {"model": "flux"}
    assert [(a["n"], a["uri"], a["sha256"], a["size"]) for a in data["assets"]] == [
        (0, "s3://bucket/k0", "ab" * 32, 3),
        (1, "s3://bucket/k1", "ab" * 32, 3),
    ]
    assert data["assets"][0]["deadline_slack_seconds"] > 0
    # Never the provider's link.
    assert "cdn.example" not in events[0].body.decode()
    # Sends: app takes every type, billing only job.*.
    assert {s.endpoint for s in events[0].sends} == {"app", "billing"}
    assert {s.endpoint for s in events[2].sends} == {"app"}
    assert all(s.state == "pending" for e in events for s in e.sends)


async def test_failed_expired_and_dead_jobs_emit_their_event(b: Backend) -> None:
    await record(b, failed("f"))
    await record(b, failed("f"))  # a duplicate: no second event
    await record(b, completed("e"))
    await b.ledger.mark_asset_ended("apex", "e", 0, JobState.EXPIRED, "HTTP 403 expired", b.now())
    await b.ledger.track("flora", "t", {"metadata": {"order": "A-1"}}, b.now())
    await b.ledger.end_tracking("flora", "t", JobState.DEAD, "gave up", b.now())

    f = await b.ledger.events(EventFilter(provider="apex", job_id="f"), 10)
    assert [e.type for e in f] == ["job.failed"]
    assert f[0].payload()["data"]["error"] == "Generation failed"
    assert f[0].payload()["data"]["credits_refunded"] == 250
    e = await b.ledger.events(EventFilter(provider="apex", job_id="e"), 10)
    assert [x.type for x in e] == ["job.expired"]
    assert e[0].payload()["data"]["error"] == "HTTP 403 expired"
    t = await b.ledger.events(EventFilter(provider="flora", job_id="t"), 10)
    assert [x.type for x in t] == ["job.dead"]
    # The caller's metadata from POST /jobs travels with the job's events.
    assert t[0].payload()["data"]["metadata"] == {"order": "A-1"}


async def test_an_invalid_output_emits_asset_invalid_and_the_job_ends_dead(b: Backend) -> None:
    await record(b, completed("bad"))
    reason = "invalid content: declared image/png (image job), detected text/html: not media"
    state = await b.ledger.mark_asset_invalid("apex", "bad", 0, reason, b.now())
    again = await b.ledger.mark_asset_invalid("apex", "bad", 0, "other", b.now())  # no-op

    assert (state, again) == (JobState.DEAD, JobState.DEAD)
    job = await b.ledger.job("apex", "bad")
    assert job is not None and job.state is JobState.DEAD and job.error == reason
    assert [(a.state, a.error) for a in job.assets] == [("invalid", reason)]
    events = await b.ledger.events(EventFilter(provider="apex", job_id="bad"), 10)
    assert [e.type for e in reversed(events)] == ["asset.invalid", "job.dead"]
    data = events[1].payload()["data"]
    assert (data["asset"]["state"], data["asset"]["error"]) == ("invalid", reason)


async def test_a_send_is_claimed_by_one_sender_and_delivered_once(b: Backend) -> None:
    await record(b, failed("f"))
    first = await claim(b.ledger, b, owner="s1")
    second = await claim(b.ledger, b, owner="s2")
    assert [s.type for s in first] == ["job.failed"] and second == []
    send = first[0]
    stored_event = await b.ledger.event(send.event_id)
    assert stored_event is not None and stored_event.body == send.body

    await b.ledger.finish_send(send, "s1", attempt(b), None)
    assert await claim(b.ledger, b) == []
    event = await b.ledger.event(send.event_id)
    assert event is not None
    app = next(s for s in event.sends if s.endpoint == "app")
    assert (app.state, app.attempts) == ("delivered", 1)
    assert [(h.outcome, h.status, h.response) for h in app.history] == [("delivered", 200, "ok")]
    assert await b.ledger.events(EventFilter(endpoint="app", state="delivered"), 10)
    assert not await b.ledger.events(EventFilter(endpoint="app", state="pending"), 10)


async def test_a_lapsed_lease_is_claimed_again_and_the_late_sender_loses_its_say(
    b: Backend,
) -> None:
    await record(b, failed("f"))
    [send] = await b.ledger.claim_sends("app", "s1", b.now(), timedelta(seconds=1), 10)
    await b.advance(1.5)
    [again] = await claim(b.ledger, b, owner="s2")
    assert again.event_id == send.event_id and again.body == send.body
    # s1 answers late: its attempt is kept, but s2 holds the send.
    await b.ledger.finish_send(send, "s1", attempt(b, "retry", 503), b.now())
    await b.ledger.finish_send(again, "s2", attempt(b), None)
    event = await b.ledger.event(send.event_id)
    assert event is not None
    app = next(s for s in event.sends if s.endpoint == "app")
    assert app.state == "delivered"
    assert sorted(h.outcome for h in app.history) == ["delivered", "retry"]


async def test_a_jobs_events_go_out_in_order_per_endpoint(b: Backend) -> None:
    await archive_two(b, "a")
    await archive_two(b, "z")
    order: list[tuple[str, str]] = []
    while sends := await claim(b.ledger, b):
        # Never two sends of one job at once: the next waits for the earlier to end.
        assert len({s.job_id for s in sends}) == len(sends)
        for send in sends:
            order.append((send.job_id, send.type))
            await b.ledger.finish_send(send, "s1", attempt(b), None)
    for job in ("a", "z"):
        assert [t for j, t in order if j == job] == [
            "asset.archived",
            "asset.archived",
            "job.archived",
        ]


async def test_retries_exhaustion_health_and_replay(b: Backend) -> None:
    await record(b, failed("f"))
    for k in range(FAILING_AFTER):
        [send] = await claim(b.ledger, b)
        last = k == FAILING_AFTER - 1
        await b.ledger.finish_send(
            send, "s1", attempt(b, "failed" if last else "retry", 503), None if last else b.now()
        )
    status = await b.ledger.onward_status(b.now())
    app = next(e for e in status.endpoints if e.name == "app")
    assert app.failing and app.consecutive_failures == FAILING_AFTER
    assert status.exhausted == 1
    assert status.pending == 1  # billing's send of job.failed is still waiting
    assert [e.type for e in await b.ledger.events(EventFilter(state="failed"), 10)] == [
        "job.failed"
    ]

    # Replay opens a new series, same id and bytes; success clears the failing state.
    before = await b.ledger.event(send.event_id)
    replayed = await b.ledger.replay(EventFilter(event_id=send.event_id), ["app"], b.now(), 10)
    assert replayed == [send.event_id]
    [again] = await claim(b.ledger, b)
    assert (again.event_id, again.body, again.attempts) == (send.event_id, send.body, 0)
    await b.ledger.finish_send(again, "s1", attempt(b), None)
    status = await b.ledger.onward_status(b.now())
    assert not next(e for e in status.endpoints if e.name == "app").failing
    assert status.exhausted == 0
    after = await b.ledger.event(send.event_id)
    assert before is not None and after is not None and after.body == before.body
    app_send = next(s for s in after.sends if s.endpoint == "app")
    assert len(app_send.history) == FAILING_AFTER + 1


async def test_replay_over_a_window_resends_exactly_its_events(b: Backend) -> None:
    await record(b, failed("before"))
    await b.advance(1.2)
    start = b.now()
    await record(b, failed("in1"))
    await record(b, failed("in2"))
    await b.advance(1.2)
    end = b.now()
    await record(b, failed("after"))
    for send in await claim(b.ledger, b):
        await b.ledger.finish_send(send, "s1", attempt(b), None)

    replayed = await b.ledger.replay(EventFilter(since=start, until=end), None, b.now(), 100)
    events = {e.id: e.job_id for e in await b.ledger.events(EventFilter(), 100)}
    assert sorted(events[i] for i in replayed) == ["in1", "in2"]
    again = await claim(b.ledger, b)
    assert sorted(s.job_id for s in again) == ["in1", "in2"]
    # Replaying to a named endpoint only opens that endpoint's sends.
    assert await claim(b.ledger, b, endpoint="billing") != []


async def test_forget_erases_the_jobs_events(b: Backend) -> None:
    await record(b, failed("gone"))
    [send] = await claim(b.ledger, b)
    assert await b.ledger.forget("apex", "gone", "GDPR request", b.now())
    assert await b.ledger.events(EventFilter(provider="apex", job_id="gone"), 10) == []
    assert await b.ledger.event(send.event_id) is None
    # A sender that held the send records nothing against an erased job.
    await b.ledger.finish_send(send, "s1", attempt(b), None)
    assert await b.ledger.event(send.event_id) is None
    assert json.loads(send.body)["data"]["job_id"] == "gone"  # (the sender's copy only)


async def test_a_send_carries_the_trace_its_event_was_written_in(b: Backend) -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from receiver import tracing

    tracing.setup([InMemorySpanExporter()])
    try:
        with tracing.job_span("test.change", None) as span:
            expected = tracing.current_traceparent()
            await record(b, failed("traced"))
        await record(b, failed("untraced"))  # outside any span: no trace to continue
    finally:
        tracing.shutdown()
    assert expected is not None and f"{span.get_span_context().trace_id:032x}" in expected
    sends = {s.job_id: s for s in await claim(b.ledger, b)}
    assert sends["traced"].traceparent == expected
    assert sends["untraced"].traceparent is None
