"""The ledger's data-over-years contract (issue 15), on SQLite and on DynamoDB (moto's server).

Payload retention, job retention, erasure with a tombstone, fixity bookkeeping. Every cutoff
is passed in: nothing sleeps for days.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from datetime import datetime, timedelta

import pytest

from receiver.domain import JobEvent, JobState
from receiver.ledger import FULL_READ, IncomingDelivery, JobFilter, Ledger, RecordResult
from tests.test_contract import (  # noqa: F401 (the backend fixture)
    Backend,
    backend,
    completed,
    failed,
    record,
    stored,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def b(backend: Backend) -> Backend:  # noqa: F811
    return backend


async def record_at(ledger: Ledger, event: JobEvent, at: datetime, body: bytes) -> RecordResult:
    """Record `event` received at `at` with `body` and no outputs planned."""
    delivery = IncomingDelivery(at, "webhook", "signature", body, "00" * 32)
    return await ledger.record(event, delivery, [])


async def test_payload_retention_drops_old_bodies_and_keeps_their_audit_rows(b: Backend) -> None:
    await record(b, completed("old"), delivery_id="msg_old", body=b'{"job": "old"}')
    big = os.urandom(900_000)  # several DynamoDB parts: every one of them must go
    await record(b, completed("big"), body=big)
    await b.advance(0.05)
    cutoff = b.now()
    await b.advance(0.05)
    await record(b, completed("new"), body=b'{"job": "new"}')

    assert await b.ledger.prune_payloads(cutoff, b.now(), limit=1) == 1  # bounded batches
    assert await b.ledger.prune_payloads(cutoff, b.now(), limit=10) == 1
    assert await b.ledger.prune_payloads(cutoff, b.now(), limit=10) == 0

    old = await b.ledger.job("apex", "old")
    assert old is not None
    (delivery,) = old.deliveries
    assert delivery.payload_removed and delivery.body == b""
    # The audit row stays: time, id, source, auth, event, outcome and the payload's SHA-256.
    assert (delivery.delivery_id, delivery.source, delivery.auth, delivery.outcome) == (
        "msg_old",
        "webhook",
        "signature",
        "accepted",
    )
    assert delivery.payload_sha256 == hashlib.sha256(b'{"job": "old"}').hexdigest()
    assert old.state is JobState.QUEUED and len(old.assets) == 1  # the job itself is untouched
    big_job = await b.ledger.job("apex", "big")
    assert big_job is not None and big_job.deliveries[0].payload_removed
    new = await b.ledger.job("apex", "new")
    assert new is not None
    assert not new.deliveries[0].payload_removed
    assert new.deliveries[0].body == b'{"job": "new"}'
    # A redelivery after pruning is still recognised as what it is.
    again = await record(b, completed("old"), delivery_id="msg_old")
    assert again.outcome == "duplicate"


async def test_job_retention_removes_only_long_ended_jobs(b: Backend) -> None:
    await record(b, failed("ended-1"))
    await record(b, completed("ended-2"))
    await b.ledger.mark_archived("apex", "ended-2", 0, stored(), b.now())
    await record(b, completed("pending"))  # queued: never removed, however old
    await b.advance(0.05)
    cutoff = b.now()
    await b.advance(0.05)
    await record(b, failed("recent"))

    first = await b.ledger.prune_jobs(cutoff, limit=1)
    second = await b.ledger.prune_jobs(cutoff, limit=10)
    assert len(first) == 1
    assert sorted(first + second) == [("apex", "ended-1"), ("apex", "ended-2")]
    assert await b.ledger.prune_jobs(cutoff, limit=10) == []
    for job_id in ("ended-1", "ended-2"):
        assert await b.ledger.job("apex", job_id) is None
    for job_id in ("pending", "recent"):
        assert await b.ledger.job("apex", job_id) is not None
    listed = await b.ledger.list_jobs(JobFilter(), before_seq=None, limit=10)
    assert sorted(j.job_id for j in listed) == ["pending", "recent"]
    # Not a tombstone: the provider may deliver the job again and it is recorded afresh.
    assert await b.ledger.tombstone("apex", "ended-1") is None
    assert (await record(b, failed("ended-1"))).outcome == "accepted"


async def test_forget_erases_the_job_and_its_tombstone_refuses_redelivery(b: Backend) -> None:
    await record(b, completed("gone"), delivery_id="msg_g")
    await record(b, completed("kept"))
    at = b.now()

    assert await b.ledger.forget("apex", "gone", "GDPR request 42", at) is True
    assert await b.ledger.job("apex", "gone") is None
    assert await b.ledger.asset_to_copy("apex", "gone", 0) is None
    stone = await b.ledger.tombstone("apex", "gone")
    assert stone is not None
    assert (stone.reason, abs((stone.forgotten_at - at).total_seconds()) < 0.001) == (
        "GDPR request 42",
        True,
    )
    # Redelivered (same id, or a new one): acknowledged as forgotten, nothing recorded again.
    for delivery_id in ("msg_g", "msg_new", None):
        result = await record(b, completed("gone"), delivery_id=delivery_id)
        assert (result.outcome, result.job_state, result.tasks_queued) == (
            "forgotten",
            "forgotten",
            0,
        )
    assert await b.ledger.job("apex", "gone") is None
    assert await b.ledger.job("apex", "kept") is not None
    # A job can be forgotten before it is ever seen; the tombstone still stands.
    assert await b.ledger.forget("apex", "never-seen", "erase on sight", at) is False
    assert (await record(b, failed("never-seen"))).outcome == "forgotten"
    # Registering it for polling does not bring a record back either.
    assert await b.ledger.track("apex", "gone", {"source": "api"}, at) is False
    assert await b.ledger.job("apex", "gone") is None
    assert await b.ledger.tombstone("apex", "kept") is None
    # `reindex` does not bring an erased job back from a manifest that could not be deleted.
    kept = await b.ledger.job("apex", "kept")
    assert kept is not None
    assert await b.ledger.restore(dataclasses.replace(kept, job_id="gone")) is False
    assert await b.ledger.job("apex", "gone") is None


async def test_fixity_due_selection_records_checks_and_reports_failures(b: Backend) -> None:
    t0 = b.now()
    await record(b, completed("f1", "https://cdn.example/a.png", "https://cdn.example/b.png"))
    await record(b, completed("f2"))
    await b.ledger.mark_archived("apex", "f1", 0, stored(0), t0 - timedelta(days=200))
    await b.ledger.mark_archived("apex", "f2", 0, stored(0), t0 - timedelta(days=100))
    # f1's second asset is still pending: never due.

    due = await b.ledger.due_for_fixity(t0, limit=10)
    assert [(d.job_id, d.asset.n) for d in due] == [("f1", 0), ("f2", 0)]  # oldest first
    assert due[0].last_checked == t0 - timedelta(days=200)
    assert [d.job_id for d in await b.ledger.due_for_fixity(t0, limit=1)] == ["f1"]
    assert await b.ledger.due_for_fixity(t0 - timedelta(days=150), limit=10) == due[:1]

    status = await b.ledger.fixity_status()
    assert (status.oldest_check, status.failing) == (t0 - timedelta(days=200), 0)

    assert await b.ledger.mark_verified("apex", "f1", 0, at=t0, by=FULL_READ, error=None)
    assert await b.ledger.mark_verified(
        "apex", "f2", 0, at=t0 - timedelta(days=1), by=FULL_READ, error="sha256 mismatch"
    )
    assert not await b.ledger.mark_verified("apex", "f1", 1, at=t0, by=FULL_READ, error=None)
    assert not await b.ledger.mark_verified("apex", "nope", 0, at=t0, by=FULL_READ, error=None)

    due = await b.ledger.due_for_fixity(t0 + timedelta(seconds=1), limit=10)
    assert [d.job_id for d in due] == ["f2", "f1"]  # a failed check stays due for the next run
    failures = await b.ledger.fixity_failures(limit=10)
    assert [(f.job_id, f.asset.n, f.asset.fixity_error) for f in failures] == [
        ("f2", 0, "sha256 mismatch")
    ]
    assert due[0].asset.fixity_error == "sha256 mismatch"
    status = await b.ledger.fixity_status()
    assert (status.oldest_check, status.failing) == (t0 - timedelta(days=1), 1)
    job = await b.ledger.job("apex", "f1")
    assert job is not None
    checked = job.assets[0]
    assert (checked.verified_at, checked.verified_by, checked.fixity_error) == (
        t0,
        "full-read",
        None,
    )
    assert job.assets[1].verified_at is None

    # A passing check clears the failure.
    await b.ledger.mark_verified("apex", "f2", 0, at=t0, by=FULL_READ, error=None)
    assert (await b.ledger.fixity_status()).failing == 0
    assert await b.ledger.fixity_failures(limit=10) == []
    # Erased jobs leave the rotation.
    await b.ledger.forget("apex", "f2", "test", t0)
    assert [d.job_id for d in await b.ledger.due_for_fixity(t0 + timedelta(days=1), 10)] == ["f1"]


async def test_compact_is_safe_to_call(b: Backend) -> None:
    await record(b, completed("c"), body=os.urandom(200_000))
    await b.ledger.prune_payloads(b.now() + timedelta(seconds=1), b.now(), limit=10)
    await b.ledger.compact()
    job = await b.ledger.job("apex", "c")
    assert job is not None and job.deliveries[0].payload_removed


async def test_dynamodb_body_parts_carry_the_ttl_and_the_row_does_not(moto_s3: str) -> None:
    from datetime import UTC

    from receiver.ledger.dynamodb import DynamoLedger, query_items
    from tests.test_contract import create_aws_resources, serialize_moto

    serialize_moto()
    table, _ = create_aws_resources(f"ttl-{os.urandom(6).hex()}")
    ledger = DynamoLedger(table, payload_retention=timedelta(days=30))
    at = datetime(2026, 3, 16, 12, 0, tzinfo=UTC)
    await record_at(ledger, completed("ttl"), at, os.urandom(400_000))  # two parts
    items = list(
        query_items(
            ledger.ddb,
            table,
            KeyConditionExpression="pk = :pk",
            ExpressionAttributeValues={":pk": {"S": "JOB#apex#ttl"}},
        )
    )
    parts = [i for i in items if i["sk"].startswith("PART#")]
    rows = [i for i in items if i["sk"].startswith("DLV#")]
    expected = int(at.timestamp()) + 30 * 86400 + 1
    assert [p["expires_at"] for p in parts] == [expected, expected]
    assert len(rows) == 1 and "expires_at" not in rows[0] and "body" not in rows[0]
    assert "bdpk" in parts[0] and "bdpk" not in parts[1]  # one index entry per delivery
