"""SQS mode on moto's server: one copy of an asset at a time; the DLQ reconciled with the ledger.

SQS delivers at least once and the outbox may send a task twice; the claim on the task's
DynamoDB item (`TASK#n`) is what keeps two workers from copying the same asset at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest

from receiver.app import end_redriven_task
from receiver.domain import JobState
from receiver.ledger.dynamodb import DynamoLedger, table_definition
from receiver.ledger.dynamodb.claims import DynamoTaskClaims
from receiver.workqueue import TaskMessage
from receiver.workqueue.sqs import SqsQueue
from tests.test_contract import Backend, completed, record, serialize_moto, stored

pytestmark = pytest.mark.anyio


def now() -> datetime:
    return datetime.now(UTC)


def make_pair(max_receives: int = 20) -> tuple[DynamoLedger, SqsQueue, Backend]:
    serialize_moto()
    prefix = f"cl-{uuid.uuid4().hex[:12]}"
    session: Any = boto3.session.Session()
    session.client("dynamodb").create_table(**table_definition(prefix))
    sqs = session.client("sqs")
    dlq = sqs.create_queue(QueueName=f"{prefix}-q-dlq")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    redrive = json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": max_receives})
    for name in (f"{prefix}-q", f"{prefix}-q-urgent"):
        sqs.create_queue(QueueName=name, Attributes={"RedrivePolicy": redrive})
    queue = SqsQueue(f"{prefix}-q", wait_seconds=0)
    ledger = DynamoLedger(prefix, publish=queue.publish)
    queue.claims = DynamoTaskClaims(ledger.table, ledger.ddb)

    async def on_redriven(provider: str, job_id: str, n: int, reason: str) -> bool:
        return await end_redriven_task(ledger, provider, job_id, n, reason)

    queue.on_redriven = on_redriven
    return ledger, queue, Backend("aws", ledger, queue, now, asyncio.sleep)


async def test_a_late_delivery_reopens_the_task_without_taking_a_workers_claim(
    moto_s3: str,
) -> None:
    """A delivery while a worker still holds the archived job's task (writing its manifest)
    queues the task again for the manifest rewrite; the holder's claim stays, so the new
    message waits for it instead of running beside it (whose older manifest could land last)."""
    ledger, queue, b = make_pair()
    await record(b, completed("tail"))
    holder = await b.lease("w1", seconds=3)
    assert holder is not None
    await ledger.mark_archived("apex", "tail", 0, stored(), now())

    late = await record(b, completed("tail"))  # a redelivery, while w1 writes the manifest
    assert (late.outcome, late.job_state) == ("duplicate", "archived")
    assert await b.lease("w2", seconds=3) is None  # received, claim held by w1: left for later
    assert await queue.heartbeat(holder, now(), timedelta(seconds=3))  # w1 still holds it
    await queue.ack(holder)
    await asyncio.sleep(4.2)  # the new message becomes visible again
    rewrite = await b.lease("w2", seconds=3)
    assert rewrite is not None and (rewrite.job_id, rewrite.n) == ("tail", 0)
    asset = await ledger.asset_to_copy("apex", "tail", 0)
    assert asset is not None and asset.state == "archived"  # the manifest only: no copy
    await queue.ack(rewrite)
    assert await b.lease("w3", seconds=3) is None


async def test_a_duplicate_message_waits_while_another_worker_holds_the_task(
    moto_s3: str,
) -> None:
    ledger, queue, b = make_pair()
    await record(b, completed("dup"))
    # The outbox's re-send: a second message for the same task.
    again_sent = TaskMessage("apex", "dup", 0, now() + timedelta(hours=20), "again")
    await queue.publish([again_sent], now())

    first = await b.lease("w1", seconds=3)
    assert first is not None
    # w2 receives the duplicate, finds the claim held and leaves the message for later.
    assert await b.lease("w2", seconds=3) is None
    assert await b.lease("w2", seconds=3) is None
    # The holder's heartbeat keeps its claim.
    assert await queue.heartbeat(first, now(), timedelta(seconds=3))

    await ledger.mark_archived("apex", "dup", 0, stored(), now())
    await queue.ack(first)  # releases the claim
    await asyncio.sleep(4.2)  # the duplicate becomes visible again
    again = await b.lease("w2", seconds=3)
    assert again is not None and again.job_id == "dup"
    asset = await ledger.asset_to_copy("apex", "dup", 0)
    assert asset is not None and asset.state == "archived"  # the worker only acks it


async def test_a_lapsed_claim_is_taken_over_and_the_old_holder_loses_its_lease(
    moto_s3: str,
) -> None:
    _, queue, b = make_pair()
    await record(b, completed("lapse"))
    old = await b.lease("w-old", seconds=1)
    assert old is not None
    await asyncio.sleep(2.2)  # w-old stopped renewing (SIGSTOP, a long GC pause...)
    new = await b.lease("w-new", seconds=5)
    assert new is not None and new.job_id == "lapse"
    assert await queue.heartbeat(old, now(), timedelta(seconds=5)) is False
    assert await queue.heartbeat(new, now(), timedelta(seconds=5)) is True


async def test_claims_are_exclusive_under_contention(moto_s3: str) -> None:
    ledger, _, b = make_pair()
    await record(b, completed("race"))
    claims = DynamoTaskClaims(ledger.table, ledger.ddb)
    t = now().timestamp()
    answers = await asyncio.gather(
        *(asyncio.to_thread(claims.claim, "apex", "race", 0, f"w{i}", t, t + 60) for i in range(8))
    )
    assert sum(a is None for a in answers) == 1
    claims.release("apex", "race", 0, "w-nobody")  # not the owner: no effect
    assert claims.claim("apex", "race", 0, "w-late", t, t + 60) is not None


async def test_tasks_the_redrive_policy_dead_letters_end_in_the_ledger_with_a_reason(
    moto_s3: str,
) -> None:
    ledger, queue, b = make_pair(max_receives=2)
    await record(b, completed("poison"))
    await record(b, completed("fine"), hours=21)
    # A worker that keeps dying before it answers: two receives, never an ack.
    for _ in range(2):
        lease = await b.lease("dies", seconds=1)
        assert lease is not None and lease.job_id == "poison"
        queue.claims.release("apex", "poison", 0, "dies")  # type: ignore[union-attr]
        await asyncio.sleep(1.3)
    # The third receive makes SQS move it to the DLQ; the worker gets the other task.
    nxt = await b.lease("w", seconds=30)
    assert nxt is not None and nxt.job_id == "fine"

    assert await queue.reconcile_dead_letters() == 1

    job = await ledger.job("apex", "poison")
    assert job is not None
    assert job.state == JobState.DEAD
    assert job.assets[0].state == "dead"
    assert "redrive policy after" in (job.assets[0].error or "")
    assert (await queue.stats(now())).dead == 1  # still listed for an operator, with its reason
    # Already reconciled: a second pass changes nothing.
    assert await queue.reconcile_dead_letters() == 0
    assert (await queue.stats(now())).dead == 1


async def test_a_redriven_task_whose_asset_was_archived_is_dropped(moto_s3: str) -> None:
    ledger, queue, b = make_pair(max_receives=1)
    await record(b, completed("late-ack"))
    lease = await b.lease("w", seconds=1)
    assert lease is not None
    await ledger.mark_archived("apex", "late-ack", 0, stored(), now())  # the ack never came
    queue.claims.release("apex", "late-ack", 0, "w")  # type: ignore[union-attr]
    await asyncio.sleep(1.3)
    assert await b.lease("w2", seconds=30) is None  # moved to the DLQ on this receive

    assert await queue.reconcile_dead_letters() == 0
    job = await ledger.job("apex", "late-ack")
    assert job is not None and job.state == JobState.ARCHIVED
    assert (await queue.stats(now())).dead == 0


async def test_two_archivers_and_a_duplicate_message_copy_the_asset_once(
    harness_factory: Any, moto_s3: str, source_server: Any, tmp_path: Any
) -> None:
    from receiver.archive.worker import Archiver
    from tests.test_archiver import LOCAL_SOURCES
    from tests.test_archiver import completed as post_completed
    from tests.test_contract import create_aws_resources

    serialize_moto()
    table, queue_name = create_aws_resources(f"two-{uuid.uuid4().hex[:12]}")
    harness = await harness_factory(
        ledger_url=f"dynamodb://{table}",
        queue_url=f"sqs://{queue_name}",
        local_db=str(tmp_path / "local.db"),
        lease_seconds=5,  # the duplicate comes back when the holder's claim would have lapsed
        **LOCAL_SOURCES,
    )
    parts = harness.parts
    # Slow enough (about 2 s) that the duplicate arrives while the first copy runs.
    url = source_server.add("/o/once.mp4", 3_000_000, trickle=0.04)
    await post_completed(harness, "once", url)
    deadline = now() + timedelta(hours=20)
    await parts.queue.publish([TaskMessage("apex", "once", 0, deadline, "dup")], now())
    other = Archiver(
        parts.ledger,
        parts.queue,
        parts.store,
        parts.archiver.fetchers,
        clock=parts.clock,
        lease_for=timedelta(seconds=5),
    )
    workers = [
        asyncio.create_task(parts.archiver.run(1)),
        asyncio.create_task(other.run(1)),
    ]
    started = asyncio.get_running_loop().time()
    try:
        for _ in range(300):
            job = await parts.ledger.job("apex", "once")
            stats = await parts.queue.stats(now())
            if job is not None and job.state == "archived" and stats.ready + stats.leased == 0:
                break
            await asyncio.sleep(0.1)
        waited = asyncio.get_running_loop().time() - started
    finally:
        for worker in workers:
            worker.cancel()
        for worker in workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker
    job = await parts.ledger.job("apex", "once")
    assert job is not None and job.state == "archived"
    stats = await parts.queue.stats(now())
    assert (stats.ready, stats.leased, stats.dead) == (0, 0, 0)  # both messages answered
    assert len(source_server.requests("/o/once.mp4")) == 1  # copied once
    print(f"both messages answered after {waited:.1f}s")
