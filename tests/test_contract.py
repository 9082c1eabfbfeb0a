"""One contract for every ledger + queue pair: SQLite (embedded) and DynamoDB + SQS (moto server).

Each test runs twice. The SQLite pair runs on a fake clock; the AWS pair runs on the wall clock
against moto's HTTP server (boto3's whole stack), so its queue waits are real but short (leases
of one or two seconds: SQS counts visibility in whole seconds).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest

from receiver.backends.sqlite import Database
from receiver.domain import EventKind, JobEvent, JobState, Output
from receiver.ledger import (
    MANIFEST_TASK,
    ArchivedAsset,
    IncomingDelivery,
    JobFilter,
    Ledger,
    PlannedOutput,
    RecordResult,
)
from receiver.ledger.dynamodb import DynamoLedger, table_definition
from receiver.ledger.sqlite import SqliteLedger
from receiver.workqueue import Lease, TaskMessage, WorkQueue
from receiver.workqueue.sqlite import SqliteQueue
from receiver.workqueue.sqs import SqsQueue
from tests.conftest import FakeClock

pytestmark = pytest.mark.anyio


@dataclass
class Backend:
    kind: str
    ledger: Ledger
    queue: WorkQueue
    now: Callable[[], datetime]
    advance: Callable[[float], Awaitable[None]]

    async def lease(self, owner: str = "w1", seconds: float = 1) -> Lease | None:
        return await self.queue.lease(owner, self.now(), timedelta(seconds=seconds))


def create_aws_resources(prefix: str) -> tuple[str, str]:
    """A table and the three queues as infra/receiver.yaml makes them; (table, queue) names."""
    session: Any = boto3.session.Session()
    session.client("dynamodb").create_table(**table_definition(prefix))
    sqs = session.client("sqs")
    dlq = sqs.create_queue(QueueName=f"{prefix}-q-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    redrive = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 20})
    for name in (f"{prefix}-q", f"{prefix}-q-urgent"):
        sqs.create_queue(QueueName=name, Attributes={"RedrivePolicy": redrive})
    return prefix, f"{prefix}-q"


def aws_pair(table: str, queue_name: str, **ledger_options: Any) -> tuple[DynamoLedger, SqsQueue]:
    queue = SqsQueue(queue_name, wait_seconds=0)
    ledger = DynamoLedger(table, publish=queue.publish, **ledger_options)
    return ledger, queue


_moto_lock = threading.RLock()


def serialize_moto() -> None:
    """Make moto's DynamoDB and SQS backends safe to call from many threads (idempotent).

    moto's server handles each request on a thread of its own, but its backends are not
    thread-safe: TransactWriteItems deep-copies whole tables and restores the copy when a
    condition fails (wiping concurrent commits, or failing with a 500 while another thread
    writes), and ReceiveMessage can hand one visible message to two callers. DynamoDB and SQS
    are atomic per request; so is moto once every backend call holds one lock. Transactions are
    checked first and applied after, without snapshots; long polls wait outside the lock.
    """
    from moto.dynamodb.comparisons import get_filter_expression
    from moto.dynamodb.exceptions import TransactionCanceledException
    from moto.dynamodb.models import DynamoDBBackend
    from moto.sqs.models import SQSBackend

    if getattr(DynamoDBBackend, "receiver_serialized", False):
        return

    def locked(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            with _moto_lock:
                return fn(*args, **kwargs)

        return call

    for name in ("get_item", "put_item", "update_item", "delete_item", "query", "scan"):
        setattr(DynamoDBBackend, name, locked(getattr(DynamoDBBackend, name)))
    original_transact = DynamoDBBackend.transact_write_items

    def transact(self: Any, transact_items: list[dict[str, Any]]) -> None:
        with _moto_lock:
            if any(next(iter(i)) not in ("Put", "ConditionCheck") for i in transact_items):
                return original_transact(self, transact_items)  # type: ignore[no-any-return]
            errors: list[tuple[Any, Any, Any]] = []
            for item in transact_items:
                kind, op = next(iter(item.items()))
                table = self.get_table(op["TableName"])
                if kind == "Put":
                    attrs = op["Item"]
                    key = {table.hash_key_attr: attrs[table.hash_key_attr]}
                    if table.range_key_attr is not None:
                        key[table.range_key_attr] = attrs[table.range_key_attr]
                else:
                    key = op["Key"]
                condition = op.get("ConditionExpression")
                if condition and not get_filter_expression(
                    condition,
                    op.get("ExpressionAttributeNames"),
                    op.get("ExpressionAttributeValues"),
                ).expr(self.get_item(op["TableName"], key)):
                    errors.append(
                        ("ConditionalCheckFailed", "The conditional request failed", None)
                    )
                else:
                    errors.append((None, None, None))
            if any(code is not None for code, _, _ in errors):
                raise TransactionCanceledException(errors)
            for item in transact_items:
                kind, op = next(iter(item.items()))
                if kind == "Put":
                    self.put_item(op["TableName"], op["Item"])

    DynamoDBBackend.transact_write_items = transact  # type: ignore[method-assign]

    for name in ("send_message", "send_message_batch", "delete_message"):
        setattr(SQSBackend, name, locked(getattr(SQSBackend, name)))
    SQSBackend.change_message_visibility = locked(  # type: ignore[method-assign]
        SQSBackend.change_message_visibility
    )
    original_receive = SQSBackend.receive_message

    def receive(
        self: Any,
        queue_name: str,
        count: int,
        wait_seconds_timeout: int,
        visibility_timeout: int,
        message_attribute_names: list[str] | None = None,
    ) -> Any:
        until = time.monotonic() + wait_seconds_timeout
        while True:
            with _moto_lock:
                found = original_receive(
                    self, queue_name, count, 0, visibility_timeout, message_attribute_names
                )
            remaining = until - time.monotonic()
            if found or remaining <= 0:
                return found
            # moto's own wait: wakes when a message is sent (or when the poll times out).
            self.get_queue(queue_name).wait_for_messages(min(remaining, 0.5))

    SQSBackend.receive_message = receive  # type: ignore[method-assign]
    DynamoDBBackend.receiver_serialized = True  # type: ignore[attr-defined]


@pytest.fixture(params=["sqlite", "aws"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        clock = FakeClock()
        db = Database(tmp_path / "contract.db")
        db.start()

        async def advance_fake(seconds: float) -> None:
            clock.advance(seconds)

        try:
            yield Backend("sqlite", SqliteLedger(db), SqliteQueue(db), clock, advance_fake)
        finally:
            db.stop()
        return
    serialize_moto()
    request.getfixturevalue("moto_s3")
    table, queue_name = create_aws_resources(f"c-{uuid.uuid4().hex[:12]}")
    ledger, queue = aws_pair(table, queue_name)

    async def advance_real(seconds: float) -> None:
        await asyncio.sleep(seconds)

    yield Backend("aws", ledger, queue, lambda: datetime.now(UTC), advance_real)


# --- builders -----------------------------------------------------------------------------------


def completed(job_id: str, *urls: str, provider: str = "apex") -> JobEvent:
    return JobEvent(
        provider=provider,
        job_id=job_id,
        kind=EventKind.COMPLETED,
        job_type="image",
        outputs=tuple(
            Output(url, f"out{i}.png", "image/png")
            for i, url in enumerate(urls or ("https://cdn.example/out.png",))
        ),
        completed_at=datetime(2026, 3, 16, 12, 0, tzinfo=UTC),
        metadata={"model": "flux"},
    )


def failed(job_id: str) -> JobEvent:
    return JobEvent(
        provider="apex",
        job_id=job_id,
        kind=EventKind.FAILED,
        job_type="image",
        failed_at=datetime(2026, 3, 16, 12, 0, tzinfo=UTC),
        error="Generation failed",
        credits_refunded=250,
    )


async def record(
    b: Backend,
    event: JobEvent,
    *,
    delivery_id: str | None = None,
    hours: float = 20,
    body: bytes | None = None,
    traceparent: str | None = None,
) -> RecordResult:
    now = b.now()
    plan = [
        PlannedOutput(
            n=n,
            url=o.url,
            name=o.name,
            key=f"{event.provider}/{event.job_id}/{o.name}",
            content_type=o.content_type,
            deadline=now + timedelta(hours=hours),
        )
        for n, o in enumerate(event.outputs)
    ]
    raw = body if body is not None else json.dumps({"job": event.job_id}).encode()
    delivery = IncomingDelivery(
        received_at=now,
        source="webhook",
        auth="signature",
        body=raw,
        payload_sha256=hashlib.sha256(raw).hexdigest(),
        delivery_id=delivery_id,
        traceparent=traceparent,
    )
    return await b.ledger.record(event, delivery, plan)


def stored(n: int = 0) -> ArchivedAsset:
    return ArchivedAsset(f"s3://bucket/k{n}", f"k{n}", 3, "ab" * 32, "image/png")


async def drain(b: Backend) -> list[Lease]:
    """Lease everything leaseable now (and ack it)."""
    leases: list[Lease] = []
    while (lease := await b.lease()) is not None:
        leases.append(lease)
        await b.queue.ack(lease)
    return leases


# --- recording ----------------------------------------------------------------------------------


async def test_a_new_completed_job_is_recorded_with_its_asset_and_one_task(b: Backend) -> None:
    result = await record(b, completed("j1"), delivery_id="msg_1")

    assert (result.outcome, result.job_state, result.tasks_queued) == ("accepted", "queued", 1)
    job = await b.ledger.job("apex", "j1")
    assert job is not None
    assert (job.state, job.job_type, job.metadata) == ("queued", "image", {"model": "flux"})
    assert job.completed_at == datetime(2026, 3, 16, 12, 0, tzinfo=UTC)
    assert [d.delivery_id for d in job.deliveries] == ["msg_1"]
    assert job.deliveries[0].body == b'{"job": "j1"}'
    assert [(a.n, a.state, a.source_url) for a in job.assets] == [
        (0, "pending", "https://cdn.example/out.png")
    ]
    assert job.deadline == job.assets[0].deadline
    leases = await drain(b)
    assert [(lease.provider, lease.job_id, lease.n, lease.attempt) for lease in leases] == [
        ("apex", "j1", 0, 1)
    ]
    copy = await b.ledger.asset_to_copy("apex", "j1", 0)
    assert copy is not None
    assert (copy.url, copy.state, copy.job_type) == (
        "https://cdn.example/out.png",
        "pending",
        "image",
    )
    assert await b.ledger.asset_to_copy("apex", "j1", 1) is None
    assert await b.ledger.job("apex", "nope") is None


async def test_the_queuing_deliverys_trace_context_comes_back_with_its_lease(b: Backend) -> None:
    """The trace crosses the queue with the task (receiver.tracing): SQLite column, SQS body."""
    traceparent = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    await record(b, completed("traced"), traceparent=traceparent)
    await record(b, completed("untraced"))
    leases = {lease.job_id: lease for lease in await drain(b)}
    assert leases["traced"].traceparent == traceparent
    assert leases["untraced"].traceparent is None


async def test_redelivery_replayed_id_and_same_content_are_duplicates(b: Backend) -> None:
    await record(b, completed("j2"), delivery_id="msg_a")
    again = await record(b, completed("j2"), delivery_id="msg_a")
    same = await record(b, completed("j2"), delivery_id="msg_b")
    # A replayed webhook id is a duplicate whatever it now says.
    replay = await record(b, failed("j2"), delivery_id="msg_a")

    assert [r.outcome for r in (again, same, replay)] == ["duplicate"] * 3
    assert all(r.tasks_queued == 0 for r in (again, same, replay))
    job = await b.ledger.job("apex", "j2")
    assert job is not None
    assert job.state == "queued"
    assert [d.outcome for d in job.deliveries] == [
        "accepted",
        "duplicate",
        "duplicate",
        "duplicate",
    ]
    assert len(await drain(b)) == 1


async def test_same_delivery_id_with_another_body_is_recorded_and_flagged(b: Backend) -> None:
    first = await record(b, completed("j3"), delivery_id="msg_x", body=b'{"v": 1}')
    same = await record(b, completed("j3"), delivery_id="msg_x", body=b'{"v": 1}')
    altered = await record(b, completed("j3"), delivery_id="msg_x", body=b'{"v": 2}')
    # The id reused for another job, with another body: flagged too (nothing is trusted by id).
    elsewhere = await record(b, completed("j4"), delivery_id="msg_x", body=b'{"v": 3}')

    assert [r.body_mismatch for r in (first, same, altered, elsewhere)] == [
        False,
        False,
        True,
        True,
    ]
    assert altered.outcome == "duplicate" and altered.tasks_queued == 0
    job = await b.ledger.job("apex", "j3")
    assert job is not None
    assert [(d.body, d.body_mismatch) for d in job.deliveries] == [
        (b'{"v": 1}', False),
        (b'{"v": 1}', False),
        (b'{"v": 2}', True),  # recorded, with its own body, and flagged
    ]
    other = await b.ledger.job("apex", "j4")
    assert other is not None and [d.body_mismatch for d in other.deliveries] == [True]


async def test_out_of_order_events(b: Backend) -> None:
    await record(b, completed("late-fail"))
    late = await record(b, failed("late-fail"))
    assert (late.outcome, late.job_state) == ("ignored", "queued")

    await record(b, failed("changed-mind"))
    later = await record(b, completed("changed-mind"))
    assert (later.outcome, later.job_state, later.tasks_queued) == ("accepted", "queued", 1)
    job = await b.ledger.job("apex", "changed-mind")
    assert job is not None
    assert (job.credits_refunded, job.error) == (250, "Generation failed")  # the failure stays
    assert [d.event for d in job.deliveries] == ["failed", "completed"]
    # Two outputs, plus the manifest-only task the failure queued (it writes nothing now).
    assert sorted(lease.n for lease in await drain(b)) == [MANIFEST_TASK, 0, 0]


async def test_a_fresher_link_refreshes_a_pending_copy_but_never_an_archived_one(
    b: Backend,
) -> None:
    await record(b, completed("r1", "https://cdn.example/a.png"))
    fresh = await record(b, completed("r1", "https://cdn.example/a.png?v=2"), hours=2)
    assert (fresh.outcome, fresh.tasks_queued) == ("refreshed", 0)
    job = await b.ledger.job("apex", "r1")
    assert job is not None
    assert job.assets[0].source_url == "https://cdn.example/a.png?v=2"
    assert job.deadline == job.assets[0].deadline
    assert job.deadline is not None and job.deadline - b.now() < timedelta(hours=3)
    # A later link never moves the deadline later (Fliki's window counts from completion).
    later = await record(b, completed("r1", "https://cdn.example/a.png?v=3"), hours=30)
    assert later.outcome == "refreshed"
    again = await b.ledger.job("apex", "r1")
    assert again is not None
    assert again.assets[0].source_url == "https://cdn.example/a.png?v=3"
    assert again.assets[0].deadline == job.assets[0].deadline

    assert await b.ledger.mark_archived("apex", "r1", 0, stored(), b.now()) == "archived"
    other = await record(b, completed("r1", "https://cdn.example/other.png"))
    assert other.outcome == "ignored"
    job = await b.ledger.job("apex", "r1")
    assert job is not None
    assert (job.state, job.assets[0].source_url) == ("archived", "https://cdn.example/a.png?v=3")


async def test_fifty_concurrent_identical_deliveries_make_one_job_and_one_task(
    b: Backend,
) -> None:
    results = await asyncio.gather(
        *(record(b, completed("c50"), delivery_id="msg_same") for _ in range(50))
    )

    outcomes = sorted(r.outcome for r in results)
    assert outcomes == ["accepted"] + ["duplicate"] * 49
    assert sum(r.tasks_queued for r in results) == 1
    job = await b.ledger.job("apex", "c50")
    assert job is not None
    assert len(job.deliveries) == 50
    assert len(job.assets) == 1
    assert len(await drain(b)) == 1


async def test_a_large_body_comes_back_verbatim(b: Backend) -> None:
    body = os.urandom(900_000)  # incompressible: more than one DynamoDB item's worth
    await record(b, completed("big"), body=body)
    job = await b.ledger.job("apex", "big")
    assert job is not None
    assert job.deliveries[0].body == body


# --- tracking, outcomes, operator actions -------------------------------------------------------


async def test_track_is_idempotent_and_keeps_a_webhooks_state(b: Backend) -> None:
    assert await b.ledger.track("flora", "run-1", {"technique": "t"}, b.now()) is True
    assert await b.ledger.track("flora", "run-1", {"technique": "other"}, b.now()) is False
    job = await b.ledger.job("flora", "run-1")
    assert job is not None
    assert (job.state, job.tracking) == ("tracking", {"technique": "t"})

    await record(b, completed("known"))
    assert await b.ledger.track("apex", "known", {"by": "api"}, b.now()) is False
    job = await b.ledger.job("apex", "known")
    assert job is not None
    assert (job.state, job.tracking) == ("queued", {"by": "api"})

    done = await record(b, completed("run-1", provider="flora"))
    assert (done.outcome, done.job_state) == ("accepted", "queued")


async def test_a_job_is_archived_when_its_last_asset_is(b: Backend) -> None:
    await record(b, completed("two", "https://cdn.example/0.png", "https://cdn.example/1.png"))
    assert await b.ledger.mark_archived("apex", "two", 1, stored(1), b.now()) == "queued"
    assert await b.ledger.mark_archived("apex", "two", 0, stored(0), b.now()) == "archived"

    job = await b.ledger.job("apex", "two")
    assert job is not None
    assert (job.state, job.deadline) == ("archived", None)
    assert job.archived_at is not None
    assert [(a.state, a.uri, a.sha256) for a in job.assets] == [
        ("archived", "s3://bucket/k0", "ab" * 32),
        ("archived", "s3://bucket/k1", "ab" * 32),
    ]
    archived = await b.ledger.archived_assets(JobFilter(provider="apex"))
    assert [(p, j, a.n) for p, j, a in archived] == [("apex", "two", 0), ("apex", "two", 1)]


async def test_concurrent_last_assets_settle_the_job_once(b: Backend) -> None:
    urls = [f"https://cdn.example/{n}.png" for n in range(4)]
    await record(b, completed("four", *urls))
    states = await asyncio.gather(
        *(b.ledger.mark_archived("apex", "four", n, stored(n), b.now()) for n in range(4))
    )
    assert sorted(states) == ["archived"] + ["queued"] * 3
    job = await b.ledger.job("apex", "four")
    assert job is not None
    assert job.state == "archived"


async def test_ended_assets_end_the_job_with_the_reason_and_requeue_restarts_it(
    b: Backend,
) -> None:
    await record(b, completed("gone"))
    state = await b.ledger.mark_asset_ended(
        "apex", "gone", 0, JobState.EXPIRED, "expired: HTTP 403", b.now()
    )
    assert state == "expired"
    job = await b.ledger.job("apex", "gone")
    assert job is not None
    assert (job.state, job.error, job.assets[0].state) == (
        "expired",
        "expired: HTTP 403",
        "expired",
    )
    with pytest.raises(ValueError):
        await b.ledger.mark_asset_ended("apex", "gone", 0, JobState.ARCHIVED, "x", b.now())
    lease = await b.lease()
    assert lease is not None
    await b.queue.dead_letter(lease, "expired: HTTP 403")

    assert await b.ledger.requeue("apex", "gone", b.now()) == 1
    assert await b.ledger.requeue("apex", "gone", b.now()) == 0  # nothing dead any more
    job = await b.ledger.job("apex", "gone")
    assert job is not None
    assert (job.state, job.error, job.assets[0].state) == ("queued", None, "pending")
    again = await b.lease()
    assert again is not None
    assert (again.job_id, again.attempt) == ("gone", 1)  # a fresh set of attempts


async def test_list_jobs_is_newest_first_with_a_stable_cursor_and_filters(b: Backend) -> None:
    started = b.now()
    for i in range(7):
        event = completed(f"L{i}") if i % 2 == 0 else failed(f"L{i}")
        await record(b, event)
        await b.advance(0.01)
    middle = b.now()
    await record(b, completed("F0", provider="fliki"))

    pages: list[str] = []
    before: int | None = None
    while True:
        page = await b.ledger.list_jobs(JobFilter(provider="apex"), before_seq=before, limit=3)
        pages.extend(s.job_id for s in page)
        if len(page) < 3:
            break
        before = page[-1].seq
    assert pages == [f"L{i}" for i in reversed(range(7))]

    failed_jobs = await b.ledger.list_jobs(JobFilter(state="failed"), before_seq=None, limit=50)
    assert [s.job_id for s in failed_jobs] == ["L5", "L3", "L1"]
    assert all(s.error == "Generation failed" for s in failed_jobs)
    fliki = await b.ledger.list_jobs(JobFilter(provider="fliki"), before_seq=None, limit=50)
    assert [s.job_id for s in fliki] == ["F0"]
    images = await b.ledger.list_jobs(JobFilter(job_type="video"), before_seq=None, limit=50)
    assert images == []
    window = await b.ledger.list_jobs(
        JobFilter(since=started, until=middle), before_seq=None, limit=50
    )
    assert [s.job_id for s in window] == [f"L{i}" for i in reversed(range(7))]
    await b.advance(0.01)
    assert await b.ledger.list_jobs(JobFilter(since=b.now()), before_seq=None, limit=5) == []


async def test_restore_writes_a_job_read_back_once(b: Backend) -> None:
    await record(b, completed("orig"), delivery_id="msg_r")
    await b.ledger.mark_archived("apex", "orig", 0, stored(), b.now())
    original = await b.ledger.job("apex", "orig")
    assert original is not None
    assert await b.ledger.restore(original) is False  # known already

    copy = dataclasses.replace(original, job_id="restored")
    assert await b.ledger.restore(copy) is True
    back = await b.ledger.job("apex", "restored")
    assert back is not None
    assert dataclasses.replace(back, job_id="orig", deliveries=[]) == dataclasses.replace(
        original, deliveries=[]
    )
    assert [(d.delivery_id, d.body, d.outcome) for d in back.deliveries] == [
        (d.delivery_id, d.body, d.outcome) for d in original.deliveries
    ]
    listed = await b.ledger.list_jobs(JobFilter(), before_seq=None, limit=10)
    assert {s.job_id for s in listed} == {"orig", "restored"}


async def test_activity_counts_states_bytes_per_day_slack_and_misses_since_a_time(
    b: Backend,
) -> None:
    def archived(n: int, size: int) -> ArchivedAsset:
        return ArchivedAsset(f"s3://bucket/k{n}", f"k{n}", size, "ab" * 32, "image/png")

    await record(b, completed("before"))
    await b.ledger.mark_archived("apex", "before", 0, archived(0, 1000), b.now())
    await b.advance(0.01)
    since = b.now()
    await record(b, completed("on-time", "https://cdn.example/0.png", "https://cdn.example/1.png"))
    await record(b, completed("late"), hours=-1)
    await record(b, failed("broke"))
    await record(b, completed("waiting"))
    await b.ledger.mark_archived("apex", "on-time", 0, archived(0, 100), b.now())
    await b.ledger.mark_archived("apex", "on-time", 1, archived(1, 50), b.now())
    await b.ledger.mark_archived("apex", "late", 0, archived(0, 7), b.now())

    seen = await b.ledger.activity(since)

    assert seen.jobs_by_state == {"archived": 2, "failed": 1, "queued": 1}
    assert seen.archived == 3
    assert sum(seen.archived_bytes_by_day.values()) == 157  # "before" is not counted
    assert set(seen.archived_bytes_by_day) <= {
        since.date().isoformat(),
        b.now().date().isoformat(),
    }
    assert (seen.missed, [(m.job_id, m.n) for m in seen.misses]) == (1, [("late", 0)])
    assert seen.slack_min is not None and -3700 < seen.slack_min < -3500
    assert seen.slack_median is not None and 19 * 3600 < seen.slack_median <= 20 * 3600
    later = await b.ledger.activity(b.now() + timedelta(seconds=1))
    assert (later.jobs_by_state, later.archived, later.slack_min, later.misses) == ({}, 0, None, [])


async def test_a_delivery_after_the_job_ended_hands_its_manifest_back_to_the_archiver(
    b: Backend,
) -> None:
    """Every delivery belongs in the job's manifest, the record that outlives the ledger: one
    that arrives after the job was archived (or failed) queues the job's task again, whose
    worker copies nothing and rewrites the manifest (see Archiver._process)."""
    await record(b, completed("done"), delivery_id="msg_1")
    assert [(lease.job_id, lease.n) for lease in await drain(b)] == [("done", 0)]
    await b.ledger.mark_archived("apex", "done", 0, stored(0), b.now())
    await record(b, failed("broke"))
    assert [lease.n for lease in await drain(b)] == [MANIFEST_TASK]
    assert await b.lease() is None

    again = await record(b, completed("done"), delivery_id="msg_1")  # a redelivery
    late = await record(b, failed("broke"))

    assert (again.outcome, again.job_state, again.tasks_queued) == ("duplicate", "archived", 0)
    assert (late.outcome, late.job_state, late.tasks_queued) == ("duplicate", "failed", 0)
    leased = sorted((lease.job_id, lease.n) for lease in await drain(b))
    assert leased == [("broke", MANIFEST_TASK), ("done", 0)]
    job = await b.ledger.job("apex", "done")
    assert job is not None and (job.state, job.assets[0].state) == ("archived", "archived")
    assert [d.outcome for d in job.deliveries] == ["accepted", "duplicate"]


async def test_ping(b: Backend) -> None:
    await b.ledger.ping()


# --- the queue ----------------------------------------------------------------------------------


async def test_an_urgent_task_is_leased_before_a_backlog_of_later_ones(b: Backend) -> None:
    for i in range(3):
        await record(b, completed(f"later{i}"), hours=20)
    await record(b, completed("urgent"), hours=1)

    first = await b.lease()
    assert first is not None
    assert first.job_id == "urgent"
    rest = await drain(b)
    assert sorted(lease.job_id for lease in rest) == ["later0", "later1", "later2"]


async def test_a_lapsed_lease_comes_back_and_a_heartbeat_keeps_it(b: Backend) -> None:
    await record(b, completed("lapse"))
    first = await b.lease("w1", seconds=1)
    assert first is not None
    assert await b.lease("w2") is None  # held

    await b.advance(1.6)
    second = await b.lease("w2", seconds=1)
    assert second is not None
    assert (second.job_id, second.attempt) == ("lapse", 2)
    # The new holder keeps it alive past its first lease.
    assert await b.queue.heartbeat(second, b.now(), timedelta(seconds=4)) is True
    await b.advance(1.6)
    assert await b.lease("w3") is None
    await b.queue.ack(second)
    stats = await b.queue.stats(b.now())
    assert (stats.ready, stats.leased, stats.dead) == (0, 0, 0)


async def test_retry_brings_the_task_back_after_its_delay(b: Backend) -> None:
    await record(b, completed("flaky"))
    lease = await b.lease(seconds=30)
    assert lease is not None
    await b.queue.retry(lease, b.now() + timedelta(seconds=1.5), "HTTP 503")

    assert await b.lease() is None  # not before its time
    await b.advance(2.2)
    again = await b.lease()
    assert again is not None
    assert (again.job_id, again.attempt) == ("flaky", 2)


async def test_requeue_gives_the_task_back_behind_what_waits_without_counting_it(
    b: Backend,
) -> None:
    # A slow copy that made progress gives its slot up (archive/resume.py): due at once, but
    # behind the tasks waiting now (even those with later deadlines), and not an attempt.
    await record(b, completed("slow"), hours=1)
    await record(b, completed("waiting"), hours=2)
    slow = await b.lease(seconds=30)
    assert slow is not None and (slow.job_id, slow.attempt) == ("slow", 1)
    await b.queue.requeue(slow, "source too slow; resumes at byte 4096")

    after = await b.lease(seconds=30)
    assert after is not None and after.job_id == "waiting"
    again = await b.lease(seconds=30)
    assert again is not None
    assert (again.job_id, again.attempt) == ("slow", 1)  # not counted
    await b.queue.requeue(again, "source too slow; resumes at byte 8192")
    await record(b, completed("later"), hours=20)  # arrives after: the slow task goes first
    third = await b.lease(seconds=30)
    assert third is not None and (third.job_id, third.attempt) == ("slow", 1)
    await b.queue.ack(third)
    await b.queue.ack(after)
    assert [lease.job_id for lease in await drain(b)] == ["later"]


async def test_dead_letter_ends_the_task_and_counts_it(b: Backend) -> None:
    await record(b, completed("poison"))
    await record(b, completed("fine"), hours=21)
    lease = await b.lease(seconds=30)
    assert lease is not None and lease.job_id == "poison"
    await b.queue.dead_letter(lease, "gave up after 8 attempts")

    stats = await b.queue.stats(b.now())
    assert (stats.ready, stats.leased, stats.dead) == (1, 0, 1)
    rest = await drain(b)
    assert [lease.job_id for lease in rest] == ["fine"]


# --- AWS only: the outbox -----------------------------------------------------------------------


async def test_the_outbox_relay_sends_what_a_failed_send_left_behind(moto_s3: str) -> None:
    serialize_moto()
    table, queue_name = create_aws_resources(f"o-{uuid.uuid4().hex[:12]}")
    queue = SqsQueue(queue_name, wait_seconds=0)

    async def refuse(tasks: Any, now: datetime) -> None:
        raise ConnectionError("SQS unreachable")

    broken = DynamoLedger(table, publish=refuse)
    b = Backend("aws", broken, queue, lambda: datetime.now(UTC), asyncio.sleep)
    result = await record(b, completed("outbox"))
    assert (result.outcome, result.tasks_queued) == ("accepted", 1)  # committed regardless
    assert await b.lease() is None  # but not sent

    healthy = DynamoLedger(table, publish=queue.publish)
    # Young unsent tasks are left to their sender; old ones are re-sent, once.
    assert await healthy.relay_outbox(b.now()) == 0
    assert await healthy.relay_outbox(b.now() + timedelta(seconds=61)) == 1
    assert await healthy.relay_outbox(b.now() + timedelta(seconds=61)) == 0
    lease = await b.lease()
    assert lease is not None
    assert (lease.job_id, lease.n) == ("outbox", 0)


async def test_a_duplicate_message_is_harmless_to_the_worker_contract(moto_s3: str) -> None:
    """SQS may deliver twice; the ledger says the asset is archived, so the copy is skipped."""
    serialize_moto()
    table, queue_name = create_aws_resources(f"d-{uuid.uuid4().hex[:12]}")
    ledger, queue = aws_pair(table, queue_name)
    b = Backend("aws", ledger, queue, lambda: datetime.now(UTC), asyncio.sleep)
    await record(b, completed("twice"))
    first = await b.lease()
    assert first is not None
    await ledger.mark_archived("apex", "twice", 0, stored(), b.now())
    await queue.ack(first)
    await queue.publish([TaskMessage("apex", "twice", 0, b.now(), "dup")], b.now())
    dup = await b.lease()
    assert dup is not None
    asset = await ledger.asset_to_copy("apex", "twice", 0)
    assert asset is not None and asset.state == "archived"


def test_settings_pair_dynamodb_with_sqs_only() -> None:
    from receiver.errors import ConfigurationError
    from receiver.settings import Settings

    ok = Settings(_env_file=None, ledger_url="dynamodb://t", queue_url="sqs://q")  # type: ignore[call-arg]
    ok.check_queue()
    assert ok.distributed
    for ledger, queue in (("dynamodb://t", None), ("sqlite:///x.db", "sqs://q")):
        bad = Settings(_env_file=None, ledger_url=ledger, queue_url=queue)  # type: ignore[call-arg]
        with pytest.raises(ConfigurationError):
            bad.check_queue()


# The contract tests take the backend under a short name.
@pytest.fixture
def b(backend: Backend) -> Backend:
    return backend


async def test_end_tracking_ends_only_unfinished_jobs_and_track_reopens(b: Backend) -> None:
    from receiver.domain import JobState

    now = b.now()
    await b.ledger.track("vividflow", "t1", {"technique": None}, now)
    assert await b.ledger.end_tracking("vividflow", "t1", JobState.DEAD, "polling stopped", now)
    job = await b.ledger.job("vividflow", "t1")
    assert job is not None and (job.state, job.error) == ("dead", "polling stopped")
    # Already ended, or finished by the provider: unchanged.
    assert not await b.ledger.end_tracking("vividflow", "t1", JobState.DEAD, "again", now)
    await record(b, completed("done"))
    assert not await b.ledger.end_tracking("apex", "done", JobState.DEAD, "x", now)
    assert not await b.ledger.end_tracking("apex", "missing", JobState.DEAD, "x", now)
    with pytest.raises(ValueError, match="expired or dead"):
        await b.ledger.end_tracking("vividflow", "t1", JobState.ARCHIVED, "x", now)
    # Registering it again reopens it.
    assert not await b.ledger.track("vividflow", "t1", {"technique": None}, now)
    job = await b.ledger.job("vividflow", "t1")
    assert job is not None and (job.state, job.error) == ("tracking", None)
