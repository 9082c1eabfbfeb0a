"""The SQLite ledger: jobs, deliveries and assets in the embedded database (group-committed)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from receiver.backends.sqlite import Database
from receiver.domain import (
    DeliveryOutcome,
    EventKind,
    EventType,
    JobEvent,
    JobState,
    asset_event,
    completion_time,
    decide,
    ended_event,
    manifest_work,
    settle,
    settled_error,
)
from receiver.errors import LedgerUnavailable
from receiver.ledger import (
    MANIFEST_TASK_WINDOW_SECONDS,
    Activity,
    ArchivedAsset,
    AssetRecord,
    AssetToCopy,
    DueAsset,
    FixityStatus,
    IncomingDelivery,
    JobFilter,
    JobRecord,
    JobSummary,
    PlannedOutput,
    RecordResult,
    Tombstone,
    from_ts,
    to_ts,
)
from receiver.ledger import at_ts as _at
from receiver.ledger.events import (
    EventFilter,
    EventRecord,
    OnwardStatus,
    PendingSend,
    SendAttempt,
    Subscriptions,
)
from receiver.ledger.sqlite import lifecycle, outbox, reads
from receiver.ledger.sqlite.reads import read_job

__all__ = ["SqliteLedger", "read_job"]


class SqliteLedger:
    def __init__(self, db: Database, subscriptions: Subscriptions | None = None) -> None:
        self.db = db
        # Who receives which onward event: each event's sends are written with it.
        self.subscriptions = subscriptions or Subscriptions()

    async def record(
        self, event: JobEvent, delivery: IncomingDelivery, plan: list[PlannedOutput]
    ) -> RecordResult:
        def write(conn: sqlite3.Connection) -> RecordResult:
            result = _record(conn, event, delivery, plan)
            if result.outcome is DeliveryOutcome.ACCEPTED and result.job_state is JobState.FAILED:
                self._emit(conn, event.provider, event.job_id, [(EventType.JOB_FAILED, None)], at)
            return result

        at = delivery.received_at
        return await self.db.write(write)

    def _emit(
        self,
        conn: sqlite3.Connection,
        provider: str,
        job_id: str,
        kinds: list[tuple[EventType, int | None]],
        now: datetime,
    ) -> None:
        outbox.emit(conn, self.subscriptions, provider, job_id, kinds, now)

    def _settle(
        self,
        conn: sqlite3.Connection,
        provider: str,
        job_id: str,
        now: datetime,
        kinds: list[tuple[EventType, int | None]],
    ) -> JobState:
        """Settle the job, then write the events of this change (the asset's, then the job's)."""
        state, moved = _settle_job(conn, provider, job_id, now)
        ended = ended_event(state) if moved else None
        self._emit(conn, provider, job_id, [*kinds, *([(ended, None)] if ended else [])], now)
        return state

    async def track(
        self, provider: str, job_id: str, tracking: dict[str, Any], now: datetime
    ) -> bool:
        def write(conn: sqlite3.Connection) -> bool:
            at = now.timestamp()
            if lifecycle.is_forgotten(conn, provider, job_id):
                return False
            created = (
                conn.execute(
                    "INSERT INTO jobs (provider, job_id, state, first_seen_at, updated_at, "
                    "tracking) VALUES (?, ?, 'tracking', ?, ?, ?) "
                    "ON CONFLICT (provider, job_id) DO NOTHING",
                    (provider, job_id, at, at, json.dumps(tracking)),
                ).rowcount
                == 1
            )
            if not created:
                # Known already (a webhook may have come first): keep its state, add the
                # caller's registration if it has none yet.
                conn.execute(
                    "UPDATE jobs SET tracking = ? WHERE provider = ? AND job_id = ? "
                    "AND tracking IS NULL",
                    (json.dumps(tracking), provider, job_id),
                )
                # Ended by polling (never finished by the provider, nothing to copy): a new
                # registration reopens it.
                conn.execute(
                    "UPDATE jobs SET state = 'tracking', error = NULL, updated_at = ? "
                    "WHERE provider = ? AND job_id = ? AND state IN ('dead', 'expired') "
                    "AND completed_at IS NULL AND failed_at IS NULL",
                    (at, provider, job_id),
                )
            return created

        return await self.db.write(write)

    async def end_tracking(
        self, provider: str, job_id: str, state: JobState, reason: str, now: datetime
    ) -> bool:
        if state not in (JobState.EXPIRED, JobState.DEAD):
            raise ValueError(f"tracking ends as expired or dead, not {state}")

        def write(conn: sqlite3.Connection) -> bool:
            ended = (
                conn.execute(
                    "UPDATE jobs SET state = ?, error = ?, updated_at = ? "
                    "WHERE provider = ? AND job_id = ? AND state IN ('tracking', 'processing')",
                    (state.value, reason, now.timestamp(), provider, job_id),
                ).rowcount
                == 1
            )
            kind = ended_event(state)
            if ended and kind is not None:
                self._emit(conn, provider, job_id, [(kind, None)], now)
            return ended

        return await self.db.write(write)

    async def asset_to_copy(self, provider: str, job_id: str, n: int) -> AssetToCopy | None:
        def read(conn: sqlite3.Connection) -> AssetToCopy | None:
            row = conn.execute(
                "SELECT a.*, j.job_type, j.completed_at, j.first_seen_at FROM assets a "
                "JOIN jobs j USING (provider, job_id) "
                "WHERE a.provider = ? AND a.job_id = ? AND a.n = ?",
                (provider, job_id, n),
            ).fetchone()
            if row is None:
                return None
            return AssetToCopy(
                provider=provider,
                job_id=job_id,
                n=n,
                url=row["source_url"],
                name=row["name"],
                key=row["key"],
                content_type=row["content_type"],
                job_type=row["job_type"],
                deadline=_at(row["deadline"]),
                state=row["state"],
                completed_at=from_ts(row["completed_at"]),
                sha256=row["sha256"],
            )

        return await self.db.read(read)

    async def mark_archived(
        self, provider: str, job_id: str, n: int, asset: ArchivedAsset, now: datetime
    ) -> JobState:
        def write(conn: sqlite3.Connection) -> JobState:
            before = conn.execute(
                "SELECT state FROM assets WHERE provider = ? AND job_id = ? AND n = ?",
                (provider, job_id, n),
            ).fetchone()
            conn.execute(
                "UPDATE assets SET state = 'archived', uri = ?, key = ?, size = ?, sha256 = ?, "
                "content_type = ?, archived_at = ?, error = NULL "
                "WHERE provider = ? AND job_id = ? AND n = ?",
                (
                    asset.uri,
                    asset.key,
                    asset.size,
                    asset.sha256,
                    asset.content_type,
                    now.timestamp(),
                    provider,
                    job_id,
                    n,
                ),
            )
            news = asset_event(before["state"], "archived") if before is not None else None
            kinds: list[tuple[EventType, int | None]] = [(news, n)] if news else []
            return self._settle(conn, provider, job_id, now, kinds)

        return await self.db.write(write)

    async def mark_asset_ended(
        self, provider: str, job_id: str, n: int, state: JobState, error: str, now: datetime
    ) -> JobState:
        if state not in (JobState.EXPIRED, JobState.DEAD):
            raise ValueError(f"an asset ends as expired or dead, not {state}")

        def write(conn: sqlite3.Connection) -> JobState:
            conn.execute(
                "UPDATE assets SET state = ?, error = ? "
                "WHERE provider = ? AND job_id = ? AND n = ? AND state = 'pending'",
                (state.value, error, provider, job_id, n),
            )
            return self._settle(conn, provider, job_id, now, [])

        return await self.db.write(write)

    async def mark_asset_invalid(
        self, provider: str, job_id: str, n: int, error: str, now: datetime
    ) -> JobState:
        def write(conn: sqlite3.Connection) -> JobState:
            ended = conn.execute(
                "UPDATE assets SET state = 'invalid', error = ? "
                "WHERE provider = ? AND job_id = ? AND n = ? AND state = 'pending'",
                (error, provider, job_id, n),
            ).rowcount
            news = asset_event("pending", "invalid") if ended else None
            return self._settle(conn, provider, job_id, now, [(news, n)] if news else [])

        return await self.db.write(write)

    async def note_asset_error(
        self, provider: str, job_id: str, n: int, error: str, now: datetime
    ) -> None:
        await self.db.write(
            lambda conn: conn.execute(
                "UPDATE assets SET error = ? WHERE provider = ? AND job_id = ? AND n = ?",
                (error, provider, job_id, n),
            )
        )

    async def job(self, provider: str, job_id: str) -> JobRecord | None:
        return await self.db.read(lambda conn: reads.read_job(conn, provider, job_id))

    async def list_jobs(
        self, where: JobFilter, *, before_seq: int | None, limit: int
    ) -> list[JobSummary]:
        return await self.db.read(lambda conn: reads.list_jobs(conn, where, before_seq, limit))

    async def requeue(self, provider: str, job_id: str, now: datetime) -> int:
        return await self.db.write(lambda conn: _requeue(conn, provider, job_id, now.timestamp()))

    async def archived_assets(self, where: JobFilter) -> list[tuple[str, str, AssetRecord]]:
        return await self.db.read(lambda conn: reads.archived_assets(conn, where))

    async def restore(self, job: JobRecord) -> bool:
        return await self.db.write(lambda conn: _restore(conn, job))

    async def activity(self, since: datetime) -> Activity:
        return await self.db.read(lambda conn: reads.activity(conn, since))

    async def ping(self) -> None:
        await self.db.read(lambda conn: conn.execute("SELECT 1").fetchone())
        free = await asyncio.to_thread(self.db.free_bytes)
        if free < self.db.min_free_bytes:
            raise LedgerUnavailable(
                f"the ledger's file system has {free} bytes free "
                f"(at least {self.db.min_free_bytes} needed to take deliveries)"
            )
        if self.db.write_error is not None:
            # The last write or checkpoint failed: ready again only once a real write commits.
            await self.db.probe_write()

    # -- data over years (receiver.ledger.sqlite.lifecycle) ---------------------------------------

    async def prune_payloads(self, received_before: datetime, now: datetime, limit: int) -> int:
        before, at = received_before.timestamp(), now.timestamp()
        return await self.db.write(lambda conn: lifecycle.prune_payloads(conn, before, at, limit))

    async def prune_jobs(self, ended_before: datetime, limit: int) -> list[tuple[str, str]]:
        before = ended_before.timestamp()
        return await self.db.write(lambda conn: lifecycle.prune_jobs(conn, before, limit))

    async def forget(self, provider: str, job_id: str, reason: str, now: datetime) -> bool:
        at = now.timestamp()
        return await self.db.write(
            lambda conn: lifecycle.forget(conn, provider, job_id, reason, at)
        )

    async def tombstone(self, provider: str, job_id: str) -> Tombstone | None:
        return await self.db.read(lambda conn: lifecycle.tombstone(conn, provider, job_id))

    async def due_for_fixity(self, checked_before: datetime, limit: int) -> list[DueAsset]:
        before = checked_before.timestamp()
        return await self.db.read(lambda conn: lifecycle.due_for_fixity(conn, before, limit))

    async def mark_verified(
        self,
        provider: str,
        job_id: str,
        n: int,
        *,
        at: datetime,
        by: str,
        error: str | None,
    ) -> bool:
        ts = at.timestamp()
        return await self.db.write(
            lambda conn: lifecycle.mark_verified(conn, provider, job_id, n, ts, by, error)
        )

    async def fixity_status(self) -> FixityStatus:
        return await self.db.read(lifecycle.fixity_status)

    async def fixity_failures(self, limit: int) -> list[DueAsset]:
        return await self.db.read(lambda conn: lifecycle.fixity_failures(conn, limit))

    async def compact(self, pages: int = 1024) -> int:
        return await self.db.write(lambda conn: lifecycle.incremental_vacuum(conn, pages))

    # -- onward events (receiver.ledger.sqlite.outbox) --------------------------------------------

    async def claim_sends(
        self, endpoint: str, owner: str, now: datetime, lease: timedelta, limit: int
    ) -> list[PendingSend]:
        at, until = now.timestamp(), (now + lease).timestamp()
        return await self.db.write(
            lambda conn: outbox.claim_sends(conn, endpoint, owner, at, until, limit)
        )

    async def finish_send(
        self, send: PendingSend, owner: str, attempt: SendAttempt, next_at: datetime | None
    ) -> None:
        await self.db.write(lambda conn: outbox.finish_send(conn, send, owner, attempt, next_at))

    async def events(self, where: EventFilter, limit: int) -> list[EventRecord]:
        return await self.db.read(lambda conn: outbox.events(conn, where, limit))

    async def event(self, event_id: str) -> EventRecord | None:
        return await self.db.read(lambda conn: outbox.event(conn, event_id))

    async def replay(
        self, where: EventFilter, endpoints: Sequence[str] | None, now: datetime, limit: int
    ) -> list[str]:
        at = now.timestamp()
        return await self.db.write(
            lambda conn: outbox.replay(conn, self.subscriptions, where, endpoints, at, limit)
        )

    async def onward_status(self, now: datetime) -> OnwardStatus:
        names = self.subscriptions.endpoints
        return await self.db.read(lambda conn: outbox.status(conn, names))


def _record(
    conn: sqlite3.Connection,
    event: JobEvent,
    delivery: IncomingDelivery,
    plan: list[PlannedOutput],
) -> RecordResult:
    # The hot path of every webhook: as few statements as the state machine allows
    # (a new completed job is one read and four inserts).
    key = (event.provider, event.job_id)
    row = conn.execute(
        "SELECT state, metadata, job_type FROM jobs WHERE provider = ? AND job_id = ?", key
    ).fetchone()
    current = JobState(row["state"]) if row else None
    current_urls: tuple[str, ...] = ()
    # The first delivery with this id (any job): a replay, or the same id with another body.
    first = (
        conn.execute(
            "SELECT payload_sha256 FROM deliveries WHERE provider = ? AND delivery_id = ? "
            "ORDER BY seq LIMIT 1",
            (event.provider, delivery.delivery_id),
        ).fetchone()
        if delivery.delivery_id is not None
        else None
    )
    body_mismatch = first is not None and first["payload_sha256"] != delivery.payload_sha256
    seen_id = False
    # Only an unknown job can have a tombstone (`forget` erases the row): one indexed read.
    forgotten = row is None and lifecycle.is_forgotten(conn, *key)
    if forgotten:
        decision = decide(None, (), event, seen_id=False, forgotten=True)
        return RecordResult(decision.outcome, decision.state, 0, 0)
    if row is not None:
        # A new job has no links yet, and a replayed delivery id only matters for a known job.
        current_urls = tuple(
            r["source_url"]
            for r in conn.execute(
                "SELECT source_url FROM assets WHERE provider = ? AND job_id = ? ORDER BY n", key
            )
        )
        seen_id = first is not None
    decision = decide(current, current_urls, event, seen_id=seen_id)
    now = delivery.received_at.timestamp()
    deadline = min((to_ts(o.deadline) or 0.0 for o in plan), default=None)

    if decision.outcome is DeliveryOutcome.ACCEPTED:
        metadata: dict[str, Any] = json.loads(row["metadata"]) if row else {}
        metadata.update(event.metadata)
        fields: dict[str, Any] = {
            "state": decision.state.value,
            "job_type": event.job_type or (row["job_type"] if row else None),
            "metadata": json.dumps(metadata),
            "updated_at": now,
        }
        if event.kind is EventKind.FAILED:
            fields |= {
                "failed_at": to_ts(event.failed_at),
                "error": event.error,
                "credits_refunded": event.credits_refunded,
            }
        elif event.kind is EventKind.COMPLETED:
            fields["completed_at"] = to_ts(completion_time(event, delivery.received_at))
        if decision.queue_outputs:
            fields["deadline"] = deadline
        if row is None:
            fields |= {"provider": event.provider, "job_id": event.job_id, "first_seen_at": now}
            names = ", ".join(fields)
            marks = ", ".join("?" * len(fields))
            conn.execute(f"INSERT INTO jobs ({names}) VALUES ({marks})", tuple(fields.values()))  # noqa: S608
        else:
            assignments = ", ".join(f"{name} = ?" for name in fields)
            conn.execute(
                f"UPDATE jobs SET {assignments} WHERE provider = ? AND job_id = ?",  # noqa: S608
                (*fields.values(), *key),
            )
    else:
        conn.execute(
            "UPDATE jobs SET updated_at = ? WHERE provider = ? AND job_id = ?", (now, *key)
        )

    tasks = 0
    if decision.queue_outputs:
        for out in plan:
            conn.execute(
                "INSERT OR REPLACE INTO assets (provider, job_id, n, name, key, source_url, "
                "content_type, deadline, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending')",
                (*key, out.n, out.name, out.key, out.url, out.content_type, to_ts(out.deadline)),
            )
            conn.execute(
                "INSERT OR REPLACE INTO tasks (provider, job_id, n, deadline, not_before, "
                "state, created_at, traceparent) VALUES (?, ?, ?, ?, ?, 'ready', ?, ?)",
                (*key, out.n, to_ts(out.deadline), now, now, delivery.traceparent),
            )
            tasks += 1
    if decision.refresh_outputs:
        # A fresher link never moves a deadline later: the provider's window still counts from
        # the original completion (Fliki gives no completion time, so a later delivery's
        # receipt would otherwise stretch its 3 hours).
        for out in plan:
            conn.execute(
                "UPDATE assets SET source_url = ?, deadline = MIN(deadline, ?) "
                "WHERE provider = ? AND job_id = ? AND n = ? AND state = 'pending'",
                (out.url, to_ts(out.deadline), *key, out.n),
            )
            conn.execute(
                "UPDATE tasks SET deadline = MIN(deadline, ?) "
                "WHERE provider = ? AND job_id = ? AND n = ? AND state IN ('ready', 'leased')",
                (to_ts(out.deadline), *key, out.n),
            )
        conn.execute(
            "UPDATE jobs SET deadline = (SELECT MIN(deadline) FROM assets "
            "WHERE provider = ? AND job_id = ? AND state = 'pending') "
            "WHERE provider = ? AND job_id = ?",
            (*key, *key),
        )

    work = manifest_work(current, decision)
    if work is not None and work.new:
        conn.execute(
            "INSERT OR REPLACE INTO tasks (provider, job_id, n, deadline, not_before, "
            "state, created_at, traceparent) VALUES (?, ?, ?, ?, ?, 'ready', ?, ?)",
            (
                *key,
                work.n,
                now + MANIFEST_TASK_WINDOW_SECONDS,
                now,
                now,
                delivery.traceparent,
            ),
        )
    elif work is not None:
        # Hand the job's finished task back to the archiver, which rewrites the manifest and
        # copies nothing (see Archiver._process).
        conn.execute(
            "UPDATE tasks SET state = 'ready', not_before = ?, attempts = 0 "
            "WHERE provider = ? AND job_id = ? AND n = ? AND state = 'done'",
            (now, *key, work.n),
        )
    cursor = conn.execute(
        "INSERT INTO deliveries (provider, job_id, delivery_id, received_at, source, auth, "
        "event, payload_sha256, body, outcome, body_mismatch) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            *key,
            delivery.delivery_id,
            now,
            delivery.source,
            delivery.auth,
            event.kind.value,
            delivery.payload_sha256,
            delivery.body,
            decision.outcome.value,
            int(body_mismatch),
        ),
    )
    return RecordResult(
        outcome=decision.outcome,
        job_state=decision.state,
        delivery_seq=cursor.lastrowid or 0,
        tasks_queued=tasks,
        body_mismatch=body_mismatch,
    )


def _settle_job(
    conn: sqlite3.Connection, provider: str, job_id: str, now: datetime
) -> tuple[JobState, bool]:
    """After an asset ends, the job ends too once no asset is pending (`domain.settle`): its
    state, and whether it moved now."""
    assets = conn.execute(
        "SELECT state, error FROM assets WHERE provider = ? AND job_id = ? ORDER BY n",
        (provider, job_id),
    ).fetchall()
    row = conn.execute(
        "SELECT state, error FROM jobs WHERE provider = ? AND job_id = ?", (provider, job_id)
    ).fetchone()
    if row is None:  # erased meanwhile (`receiver forget`), as the DynamoDB adapter says too
        raise LookupError(f"no job {provider}/{job_id} in the ledger")
    current = JobState(row["state"])
    new = settle(current, (a["state"] for a in assets))
    if new is None:
        return current, False
    conn.execute(
        "UPDATE jobs SET state = ?, archived_at = ?, updated_at = ?, deadline = NULL, "
        "error = ? WHERE provider = ? AND job_id = ?",
        (
            new.value,
            now.timestamp() if new is JobState.ARCHIVED else None,
            now.timestamp(),
            settled_error((a["error"] for a in assets), row["error"]),
            provider,
            job_id,
        ),
    )
    return new, True


def _requeue(conn: sqlite3.Connection, provider: str, job_id: str, now: float) -> int:
    key = (provider, job_id)
    requeued = conn.execute(
        "UPDATE assets SET state = 'pending', error = NULL "
        "WHERE provider = ? AND job_id = ? AND state IN ('dead', 'expired')",
        key,
    ).rowcount
    if requeued:
        conn.execute(
            # Only the dead-lettered tasks: a copy of another asset may be running right now.
            "UPDATE tasks SET state = 'ready', attempts = 0, not_before = ?, lease_owner = NULL, "
            "lease_expires = NULL WHERE provider = ? AND job_id = ? AND state = 'dead' AND n IN "
            "(SELECT n FROM assets WHERE provider = ? AND job_id = ? AND state = 'pending')",
            (now, *key, *key),
        )
        conn.execute(
            "UPDATE jobs SET state = 'queued', error = NULL, updated_at = ?, deadline = "
            "(SELECT MIN(deadline) FROM assets WHERE provider = ? AND job_id = ? "
            "AND state = 'pending') WHERE provider = ? AND job_id = ?",
            (now, *key, *key),
        )
    return requeued


def _restore(conn: sqlite3.Connection, job: JobRecord) -> bool:
    key = (job.provider, job.job_id)
    if conn.execute("SELECT 1 FROM jobs WHERE provider = ? AND job_id = ?", key).fetchone():
        return False
    if lifecycle.is_forgotten(conn, *key):
        return False
    conn.execute(
        "INSERT INTO jobs (provider, job_id, state, job_type, first_seen_at, updated_at, "
        "completed_at, failed_at, archived_at, deadline, error, credits_refunded, metadata, "
        "tracking) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            *key,
            job.state.value,
            job.job_type,
            to_ts(job.first_seen_at),
            to_ts(job.updated_at),
            to_ts(job.completed_at),
            to_ts(job.failed_at),
            to_ts(job.archived_at),
            to_ts(job.deadline),
            job.error,
            job.credits_refunded,
            json.dumps(job.metadata),
            json.dumps(job.tracking) if job.tracking is not None else None,
        ),
    )
    for d in job.deliveries:
        conn.execute(
            "INSERT INTO deliveries (provider, job_id, delivery_id, received_at, source, auth, "
            "event, payload_sha256, body, outcome, body_mismatch) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                *key,
                d.delivery_id,
                to_ts(d.received_at),
                d.source,
                d.auth,
                d.event,
                d.payload_sha256,
                d.body,
                d.outcome,
                int(d.body_mismatch),
            ),
        )
    for a in job.assets:
        conn.execute(
            "INSERT INTO assets (provider, job_id, n, name, key, source_url, content_type, "
            "deadline, state, uri, size, sha256, archived_at, error) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                *key,
                a.n,
                a.name,
                a.key,
                a.source_url,
                a.content_type,
                to_ts(a.deadline),
                a.state,
                a.uri,
                a.size,
                a.sha256,
                to_ts(a.archived_at),
                a.error,
            ),
        )
    return True
