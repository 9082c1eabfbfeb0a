"""The SQLite queue: the `tasks` table of the embedded database, leased by deadline."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta

from receiver.backends.sqlite import Database
from receiver.workqueue import Lease, QueueStats


class SqliteQueue:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def lease(self, owner: str, now: datetime, lease_for: timedelta) -> Lease | None:
        at = now.timestamp()

        def write(conn: sqlite3.Connection) -> Lease | None:
            # Due ready tasks and tasks whose lease lapsed (their worker died), earliest deadline
            # first. The two index-backed lookups keep this cheap with a large backlog.
            candidates = [
                conn.execute(
                    "SELECT id, deadline FROM tasks WHERE state = 'ready' AND not_before <= ? "
                    "AND id NOT IN (SELECT id FROM task_yields) ORDER BY deadline LIMIT 1",
                    (at,),
                ).fetchone(),
                # A task that gave its slot up (requeue) competes by its rank, not its deadline.
                conn.execute(
                    "SELECT t.id, y.rank AS deadline FROM task_yields AS y "
                    "JOIN tasks AS t ON t.id = y.id "
                    "WHERE t.state = 'ready' AND t.not_before <= ? ORDER BY y.rank LIMIT 1",
                    (at,),
                ).fetchone(),
                conn.execute(
                    "SELECT id, deadline FROM tasks WHERE state = 'leased' AND lease_expires < ? "
                    "ORDER BY deadline LIMIT 1",
                    (at,),
                ).fetchone(),
            ]
            due = [c for c in candidates if c is not None]
            if not due:
                return None
            chosen = min(due, key=lambda c: c["deadline"])
            conn.execute("DELETE FROM task_yields WHERE id = ?", (chosen["id"],))
            row = conn.execute(
                "UPDATE tasks SET state = 'leased', lease_owner = ?, lease_expires = ?, "
                "attempts = attempts + 1 WHERE id = ? "
                "RETURNING id, provider, job_id, n, deadline, attempts, traceparent",
                (owner, at + lease_for.total_seconds(), chosen["id"]),
            ).fetchone()
            return Lease(
                task_id=row["id"],
                provider=row["provider"],
                job_id=row["job_id"],
                n=row["n"],
                deadline=datetime.fromtimestamp(row["deadline"], tz=UTC),
                attempt=row["attempts"],
                owner=owner,
                traceparent=row["traceparent"],
            )

        return await self.db.write(write)

    async def heartbeat(self, lease: Lease, now: datetime, lease_for: timedelta) -> bool:
        until = now.timestamp() + lease_for.total_seconds()
        return await self.db.write(
            lambda conn: (
                conn.execute(
                    "UPDATE tasks SET lease_expires = ? "
                    "WHERE id = ? AND lease_owner = ? AND state = 'leased'",
                    (until, lease.task_id, lease.owner),
                ).rowcount
                == 1
            )
        )

    async def ack(self, lease: Lease) -> None:
        await self._end(lease, "done", None, None)

    async def retry(self, lease: Lease, not_before: datetime, error: str) -> None:
        await self._end(lease, "ready", not_before.timestamp(), error)

    async def requeue(self, lease: Lease, note: str) -> None:
        def write(conn: sqlite3.Connection) -> None:
            # Behind every task that waits now, ahead of later arrivals with later deadlines.
            rank = conn.execute(
                "SELECT MAX(deadline) AS d FROM tasks WHERE state = 'ready' AND n >= 0"
            ).fetchone()["d"]
            gave_back = conn.execute(
                # not_before stays as it was when leased: due at once.
                "UPDATE tasks SET state = 'ready', lease_owner = NULL, lease_expires = NULL, "
                "attempts = MAX(attempts - 1, 0), last_error = ? "
                "WHERE id = ? AND lease_owner = ?",
                (note, lease.task_id, lease.owner),
            ).rowcount
            if gave_back:
                conn.execute(
                    "INSERT OR REPLACE INTO task_yields (id, rank) VALUES (?, ?)",
                    (lease.task_id, max(rank or 0.0, lease.deadline.timestamp())),
                )
            conn.execute("DELETE FROM task_yields WHERE id NOT IN (SELECT id FROM tasks)")

        await self.db.write(write)

    async def dead_letter(self, lease: Lease, error: str) -> None:
        await self._end(lease, "dead", None, error)

    async def _end(
        self, lease: Lease, state: str, not_before: float | None, error: str | None
    ) -> None:
        # Only the current holder may end a task: a worker whose lease lapsed and was taken over
        # must not undo the new holder's work.
        await self.db.write(
            lambda conn: conn.execute(
                "UPDATE tasks SET state = ?, lease_owner = NULL, lease_expires = NULL, "
                "not_before = COALESCE(?, not_before), last_error = COALESCE(?, last_error) "
                "WHERE id = ? AND lease_owner = ?",
                (state, not_before, error, lease.task_id, lease.owner),
            )
        )

    async def stats(self, now: datetime) -> QueueStats:
        def read(conn: sqlite3.Connection) -> QueueStats:
            counts = dict.fromkeys(("ready", "leased", "dead"), 0)
            for row in conn.execute("SELECT state, COUNT(*) AS c FROM tasks GROUP BY state"):
                if row["state"] in counts:
                    counts[row["state"]] = row["c"]
            oldest = conn.execute(
                "SELECT MIN(created_at) AS t FROM tasks WHERE state IN ('ready', 'leased')"
            ).fetchone()["t"]
            # Copies only (n >= 0): a manifest rewrite's deadline is a formality, not a link's.
            earliest = conn.execute(
                "SELECT MIN(deadline) AS t FROM tasks WHERE n >= 0 AND (state = 'ready' "
                "OR (state = 'leased' AND lease_expires < ?))",
                (now.timestamp(),),
            ).fetchone()["t"]
            return QueueStats(
                ready=counts["ready"],
                leased=counts["leased"],
                dead=counts["dead"],
                oldest_ready_at=datetime.fromtimestamp(oldest, tz=UTC) if oldest else None,
                earliest_unleased_deadline=(
                    datetime.fromtimestamp(earliest, tz=UTC) if earliest is not None else None
                ),
            )

        return await self.db.read(read)
