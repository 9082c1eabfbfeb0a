"""The SQLite schedule: the `tracked` table in the ledger's file (schema: backends.sqlite)."""

from __future__ import annotations

import sqlite3
from datetime import datetime

from receiver.backends.sqlite import Database
from receiver.ledger import at_ts as _at
from receiver.polling.schedule import TrackedJob


def _row(row: sqlite3.Row) -> TrackedJob:
    return TrackedJob(
        provider=row["provider"],
        job_id=row["job_id"],
        technique=row["technique"],
        state=row["state"],
        next_poll_at=_at(row["next_poll_at"]),
        polls=row["polls"],
        not_found=row["not_found"],
        last_status=row["last_status"],
        last_error=row["last_error"],
        stop_reason=row["stop_reason"],
        registered_at=_at(row["registered_at"]),
    )


class TrackedStore:
    """The SQLite tracker: the `tracked` table (see `receiver.backends.sqlite.SCHEMA`)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def add(
        self, provider: str, job_id: str, technique: str | None, first_poll: datetime, now: datetime
    ) -> str:
        """Insert (`created`), reactivate a stopped job (`reactivated`) or leave it (`known`)."""

        def write(conn: sqlite3.Connection) -> str:
            created = conn.execute(
                "INSERT INTO tracked (provider, job_id, technique, state, next_poll_at, "
                "registered_at, updated_at) VALUES (?, ?, ?, 'active', ?, ?, ?) "
                "ON CONFLICT (provider, job_id) DO NOTHING",
                (
                    provider,
                    job_id,
                    technique,
                    first_poll.timestamp(),
                    now.timestamp(),
                    now.timestamp(),
                ),
            ).rowcount
            if created:
                return "created"
            # Registering a stopped job again is how an operator says "try again".
            reactivated = conn.execute(
                "UPDATE tracked SET state = 'active', next_poll_at = ?, not_found = 0, "
                "stop_reason = NULL, technique = COALESCE(?, technique), updated_at = ? "
                "WHERE provider = ? AND job_id = ? AND state = 'stopped'",
                (first_poll.timestamp(), technique, now.timestamp(), provider, job_id),
            ).rowcount
            return "reactivated" if reactivated else "known"

        return await self.db.write(write)

    async def get(self, provider: str, job_id: str) -> TrackedJob | None:
        def read(conn: sqlite3.Connection) -> TrackedJob | None:
            row = conn.execute(
                "SELECT * FROM tracked WHERE provider = ? AND job_id = ?", (provider, job_id)
            ).fetchone()
            return _row(row) if row else None

        return await self.db.read(read)

    async def forget(self, provider: str, job_id: str) -> bool:
        # Every other write is an UPDATE of the row, or an INSERT only by `add`: gone stays gone.
        removed = await self.db.write(
            lambda conn: (
                conn.execute(
                    "DELETE FROM tracked WHERE provider = ? AND job_id = ?", (provider, job_id)
                ).rowcount
            )
        )
        return bool(removed)

    async def due(self, now: datetime, limit: int, *, provider: str) -> list[TrackedJob]:
        """A provider's active jobs whose time has come, most overdue first."""

        def read(conn: sqlite3.Connection) -> list[TrackedJob]:
            rows = conn.execute(
                "SELECT * FROM tracked WHERE state = 'active' AND provider = ? "
                "AND next_poll_at <= ? ORDER BY next_poll_at LIMIT ?",
                (provider, now.timestamp(), limit),
            ).fetchall()
            return [_row(r) for r in rows]

        return await self.db.read(read)

    async def next_due_by_provider(self) -> dict[str, datetime]:
        def read(conn: sqlite3.Connection) -> dict[str, datetime]:
            return {
                r["provider"]: _at(r["at"])
                for r in conn.execute(
                    "SELECT provider, MIN(next_poll_at) AS at FROM tracked "
                    "WHERE state = 'active' GROUP BY provider"
                )
            }

        return await self.db.read(read)

    async def claim(
        self, jobs: list[TrackedJob], until: datetime, now: datetime
    ) -> set[tuple[str, str]]:
        """Push the chosen jobs' next poll to `until` so another poller process skips them.

        Returns the (provider, job id) pairs actually claimed (another process may be first).
        """

        def write(conn: sqlite3.Connection) -> set[tuple[str, str]]:
            claimed: set[tuple[str, str]] = set()
            for job in jobs:
                if conn.execute(
                    "UPDATE tracked SET next_poll_at = ?, updated_at = ? WHERE provider = ? "
                    "AND job_id = ? AND state = 'active' AND next_poll_at <= ?",
                    (until.timestamp(), now.timestamp(), job.provider, job.job_id, now.timestamp()),
                ).rowcount:
                    claimed.add((job.provider, job.job_id))
            return claimed

        return await self.db.write(write)

    async def reschedule(
        self,
        provider: str,
        job_id: str,
        at: datetime,
        now: datetime,
        *,
        counted: bool,
        status: str | None = None,
        error: str | None = None,
        not_found: bool = False,
    ) -> None:
        """Next poll at `at`; `counted` adds to the poll count that drives the backoff."""
        await self.db.write(
            lambda conn: conn.execute(
                "UPDATE tracked SET next_poll_at = ?, polls = polls + ?, "
                "not_found = CASE WHEN ? THEN not_found + 1 ELSE 0 END, "
                "last_status = COALESCE(?, last_status), last_error = ?, updated_at = ? "
                "WHERE provider = ? AND job_id = ? AND state = 'active'",
                (
                    at.timestamp(),
                    1 if counted else 0,
                    not_found,
                    status,
                    error,
                    now.timestamp(),
                    provider,
                    job_id,
                ),
            )
        )

    async def finish(
        self, provider: str, job_id: str, now: datetime, *, status: str | None, polled: bool
    ) -> None:
        await self.db.write(
            lambda conn: conn.execute(
                "UPDATE tracked SET state = 'done', polls = polls + ?, "
                "last_status = COALESCE(?, last_status), last_error = NULL, updated_at = ? "
                "WHERE provider = ? AND job_id = ?",
                (1 if polled else 0, status, now.timestamp(), provider, job_id),
            )
        )

    async def stop(
        self, provider: str, job_id: str | None, reason: str, error: str, now: datetime
    ) -> int:
        """Stop one job, or (job_id None) every active job of the provider. Returns how many."""
        where, args = "provider = ? AND state = 'active'", [provider]
        if job_id is not None:
            where += " AND job_id = ?"
            args.append(job_id)

        def write(conn: sqlite3.Connection) -> int:
            return conn.execute(
                f"UPDATE tracked SET state = 'stopped', stop_reason = ?, last_error = ?, "  # noqa: S608 (constant clauses)
                f"updated_at = ? WHERE {where}",
                (reason, error, now.timestamp(), *args),
            ).rowcount

        return await self.db.write(write)

    async def resume_stopped(self, reasons: tuple[str, ...], now: datetime) -> int:
        """At start-up: jobs stopped for a configuration or auth reason get one more try."""
        marks = ",".join("?" * len(reasons))

        def write(conn: sqlite3.Connection) -> int:
            return conn.execute(
                f"UPDATE tracked SET state = 'active', stop_reason = NULL, next_poll_at = ?, "  # noqa: S608 (placeholders only)
                f"updated_at = ? WHERE state = 'stopped' AND stop_reason IN ({marks})",
                (now.timestamp(), now.timestamp(), *reasons),
            ).rowcount

        return await self.db.write(write)

    async def stopped(self, limit: int) -> list[TrackedJob]:
        def read(conn: sqlite3.Connection) -> list[TrackedJob]:
            rows = conn.execute(
                "SELECT * FROM tracked WHERE state = 'stopped' "
                "ORDER BY registered_at DESC, provider, job_id LIMIT ?",
                (limit,),
            ).fetchall()
            return [_row(r) for r in rows]

        return await self.db.read(read)

    async def counts(self) -> dict[tuple[str, str], int]:
        """(provider, state) -> number of tracked jobs, for metrics and the CLI."""

        def read(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
            return {
                (r["provider"], r["state"]): r["n"]
                for r in conn.execute(
                    "SELECT provider, state, COUNT(*) AS n FROM tracked GROUP BY provider, state"
                )
            }

        return await self.db.read(read)
