"""The SQLite ledger's data-over-years writes: payload and job retention, erasure, fixity.

Part of the SQLite adapter (`receiver.ledger.sqlite` delegates here): plain functions over a
connection, each run inside one writer transaction (or one read).
"""

from __future__ import annotations

import hashlib
import sqlite3

from receiver.domain import FINAL_STATES
from receiver.ledger import DueAsset, FixityStatus, Tombstone, from_ts
from receiver.ledger import at_ts as _at
from receiver.ledger.sqlite.reads import asset_record

_FINAL = tuple(s.value for s in FINAL_STATES)
_FINAL_MARKS = ", ".join("?" * len(_FINAL))


def prune_payloads(conn: sqlite3.Connection, before: float, now: float, limit: int) -> int:
    rows = conn.execute(
        "SELECT seq, body, payload_sha256 FROM deliveries "
        "WHERE body_removed_at IS NULL AND received_at < ? ORDER BY received_at LIMIT ?",
        (before, limit),
    ).fetchall()
    for row in rows:
        # Rows recorded before the SHA-256 was kept (or restored without one) get it now, from
        # the body about to go: the audit keeps a fingerprint of what was received.
        digest = row["payload_sha256"] or hashlib.sha256(bytes(row["body"])).hexdigest()
        conn.execute(
            "UPDATE deliveries SET body = x'', body_removed_at = ?, payload_sha256 = ? "
            "WHERE seq = ?",
            (now, digest, row["seq"]),
        )
    return len(rows)


def _erase(conn: sqlite3.Connection, provider: str, job_id: str) -> bool:
    key = (provider, job_id)
    conn.execute(
        "DELETE FROM event_attempts WHERE event_seq IN "
        "(SELECT seq FROM events WHERE provider = ? AND job_id = ?)",
        key,
    )
    for table in ("deliveries", "assets", "tasks", "events", "event_sends"):
        conn.execute(f"DELETE FROM {table} WHERE provider = ? AND job_id = ?", key)  # noqa: S608
    return conn.execute("DELETE FROM jobs WHERE provider = ? AND job_id = ?", key).rowcount == 1


def prune_jobs(conn: sqlite3.Connection, before: float, limit: int) -> list[tuple[str, str]]:
    rows = conn.execute(
        f"SELECT provider, job_id FROM jobs WHERE updated_at < ? AND state IN ({_FINAL_MARKS}) "  # noqa: S608
        "ORDER BY updated_at LIMIT ?",
        (before, *_FINAL, limit),
    ).fetchall()
    removed = [(r["provider"], r["job_id"]) for r in rows]
    for provider, job_id in removed:
        _erase(conn, provider, job_id)
    return removed


def forget(conn: sqlite3.Connection, provider: str, job_id: str, reason: str, now: float) -> bool:
    conn.execute(
        "INSERT INTO tombstones (provider, job_id, forgotten_at, reason) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (provider, job_id) DO UPDATE SET forgotten_at = excluded.forgotten_at, "
        "reason = excluded.reason",
        (provider, job_id, now, reason),
    )
    return _erase(conn, provider, job_id)


def is_forgotten(conn: sqlite3.Connection, provider: str, job_id: str) -> bool:
    return (
        conn.execute(
            "SELECT 1 FROM tombstones WHERE provider = ? AND job_id = ?", (provider, job_id)
        ).fetchone()
        is not None
    )


def tombstone(conn: sqlite3.Connection, provider: str, job_id: str) -> Tombstone | None:
    row = conn.execute(
        "SELECT * FROM tombstones WHERE provider = ? AND job_id = ?", (provider, job_id)
    ).fetchone()
    if row is None:
        return None
    return Tombstone(provider, job_id, _at(row["forgotten_at"]), row["reason"])


def due_for_fixity(conn: sqlite3.Connection, before: float, limit: int) -> list[DueAsset]:
    rows = conn.execute(
        "SELECT * FROM assets WHERE state = 'archived' "
        "AND COALESCE(verified_at, archived_at) < ? "
        "ORDER BY COALESCE(verified_at, archived_at) LIMIT ?",
        (before, limit),
    ).fetchall()
    return [DueAsset(r["provider"], r["job_id"], asset_record(r)) for r in rows]


def mark_verified(
    conn: sqlite3.Connection,
    provider: str,
    job_id: str,
    n: int,
    at: float,
    by: str,
    error: str | None,
) -> bool:
    return (
        conn.execute(
            "UPDATE assets SET verified_at = ?, verified_by = ?, fixity_error = ? "
            "WHERE provider = ? AND job_id = ? AND n = ? AND state = 'archived'",
            (at, by, error, provider, job_id, n),
        ).rowcount
        == 1
    )


def fixity_failures(conn: sqlite3.Connection, limit: int) -> list[DueAsset]:
    rows = conn.execute(
        "SELECT * FROM assets WHERE state = 'archived' AND fixity_error IS NOT NULL "
        "ORDER BY verified_at DESC LIMIT ?",
        (limit,),
    ).fetchall()
    return [DueAsset(r["provider"], r["job_id"], asset_record(r)) for r in rows]


def fixity_status(conn: sqlite3.Connection) -> FixityStatus:
    row = conn.execute(
        "SELECT MIN(COALESCE(verified_at, archived_at)) AS oldest, "
        "COALESCE(SUM(fixity_error IS NOT NULL), 0) AS failing "
        "FROM assets WHERE state = 'archived'"
    ).fetchone()
    return FixityStatus(oldest_check=from_ts(row["oldest"]), failing=row["failing"])


def incremental_vacuum(conn: sqlite3.Connection, pages: int) -> int:
    """Give up to `pages` free pages back to the filesystem; how many were free to give.

    A no-op unless the file uses incremental auto-vacuum (new files do; see Database). SQLite
    frees one page per step of the statement and Python's sqlite3 steps a row-less PRAGMA only
    once, hence a statement per page.
    """
    free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:  # 2: incremental
        return 0
    for _ in range(min(free, pages)):
        conn.execute("PRAGMA incremental_vacuum(1)")
    return min(free, pages)
