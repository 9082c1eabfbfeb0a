"""The SQLite ledger's reads: whole jobs, listings with the audit API's filters, the assets to
verify, and the console's activity figures. Pure functions of a connection (the reader side of
`backends.sqlite.Database`); nothing here writes."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime
from typing import Any

from receiver.domain import JobState
from receiver.ledger import (
    Activity,
    ArchivedSample,
    AssetRecord,
    DeliveryRecord,
    JobFilter,
    JobRecord,
    JobSummary,
    from_ts,
)
from receiver.ledger import at_ts as _at


def asset_record(a: sqlite3.Row) -> AssetRecord:
    return AssetRecord(
        n=a["n"],
        name=a["name"],
        key=a["key"],
        source_url=a["source_url"],
        content_type=a["content_type"],
        deadline=_at(a["deadline"]),
        state=a["state"],
        uri=a["uri"],
        size=a["size"],
        sha256=a["sha256"],
        archived_at=from_ts(a["archived_at"]),
        error=a["error"],
        verified_at=from_ts(a["verified_at"]),
        verified_by=a["verified_by"],
        fixity_error=a["fixity_error"],
    )


def read_job(conn: sqlite3.Connection, provider: str, job_id: str) -> JobRecord | None:
    row = conn.execute(
        "SELECT * FROM jobs WHERE provider = ? AND job_id = ?", (provider, job_id)
    ).fetchone()
    if row is None:
        return None
    deliveries = [
        DeliveryRecord(
            seq=d["seq"],
            delivery_id=d["delivery_id"],
            received_at=_at(d["received_at"]),
            source=d["source"],
            auth=d["auth"],
            event=d["event"],
            payload_sha256=d["payload_sha256"],
            outcome=d["outcome"],
            body=bytes(d["body"]),
            body_mismatch=bool(d["body_mismatch"]),
            payload_removed=d["body_removed_at"] is not None,
        )
        for d in conn.execute(
            "SELECT * FROM deliveries WHERE provider = ? AND job_id = ? ORDER BY seq",
            (provider, job_id),
        )
    ]
    assets = [
        asset_record(a)
        for a in conn.execute(
            "SELECT * FROM assets WHERE provider = ? AND job_id = ? ORDER BY n",
            (provider, job_id),
        )
    ]
    return JobRecord(
        provider=provider,
        job_id=job_id,
        state=JobState(row["state"]),
        job_type=row["job_type"],
        first_seen_at=_at(row["first_seen_at"]),
        updated_at=_at(row["updated_at"]),
        completed_at=from_ts(row["completed_at"]),
        failed_at=from_ts(row["failed_at"]),
        archived_at=from_ts(row["archived_at"]),
        deadline=from_ts(row["deadline"]),
        error=row["error"],
        credits_refunded=row["credits_refunded"],
        metadata=json.loads(row["metadata"]),
        tracking=json.loads(row["tracking"]) if row["tracking"] else None,
        deliveries=deliveries,
        assets=assets,
    )


def _where(where: JobFilter) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    for column, value in (
        ("provider", where.provider),
        ("state", where.state),
        ("job_type", where.job_type),
    ):
        if value is not None:
            clauses.append(f"{column} = ?")
            args.append(value)
    if where.since is not None:
        clauses.append("first_seen_at >= ?")
        args.append(where.since.timestamp())
    if where.until is not None:
        clauses.append("first_seen_at < ?")
        args.append(where.until.timestamp())
    return (" AND ".join(clauses) or "1"), args


def _summary(row: sqlite3.Row) -> JobSummary:
    return JobSummary(
        seq=row["seq"],
        provider=row["provider"],
        job_id=row["job_id"],
        state=JobState(row["state"]),
        job_type=row["job_type"],
        first_seen_at=_at(row["first_seen_at"]),
        completed_at=from_ts(row["completed_at"]),
        archived_at=from_ts(row["archived_at"]),
        deadline=from_ts(row["deadline"]),
        error=row["error"],
    )


def list_jobs(
    conn: sqlite3.Connection, where: JobFilter, before_seq: int | None, limit: int
) -> list[JobSummary]:
    sql, args = _where(where)
    if before_seq is not None:
        sql += " AND seq < ?"
        args.append(before_seq)
    rows = conn.execute(
        f"SELECT * FROM jobs WHERE {sql} ORDER BY seq DESC LIMIT ?",  # noqa: S608 (fixed columns)
        (*args, limit),
    )
    return [_summary(r) for r in rows]


def archived_assets(
    conn: sqlite3.Connection, where: JobFilter
) -> list[tuple[str, str, AssetRecord]]:
    sql, args = _where(where)
    jobs = conn.execute(
        f"SELECT provider, job_id FROM jobs WHERE {sql} ORDER BY seq",  # noqa: S608
        args,
    ).fetchall()
    found: list[tuple[str, str, AssetRecord]] = []
    for job in jobs:
        record = read_job(conn, job["provider"], job["job_id"])
        assert record is not None
        found.extend(
            (record.provider, record.job_id, a) for a in record.assets if a.state == "archived"
        )
    return found


def activity(conn: sqlite3.Connection, since: datetime) -> Activity:
    start = since.timestamp()
    states = {
        r["state"]: r["n"]
        for r in conn.execute(
            "SELECT state, COUNT(*) AS n FROM jobs WHERE first_seen_at >= ? GROUP BY state",
            (start,),
        )
    }
    rows = conn.execute(
        "SELECT a.provider, a.job_id, a.n, a.size, a.archived_at, a.deadline FROM assets a "
        "JOIN jobs j ON j.provider = a.provider AND j.job_id = a.job_id "
        "WHERE j.first_seen_at >= ? AND a.state = 'archived'",
        (start,),
    )
    samples = (
        ArchivedSample(
            r["provider"],
            r["job_id"],
            r["n"],
            r["size"] or 0,
            _at(r["archived_at"]),
            _at(r["deadline"]),
        )
        for r in rows
    )
    return Activity.build(since, states, samples)
