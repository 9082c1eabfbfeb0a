"""The SQLite ledger's onward outbox (receiver/ledger/events.py): events written inside the
writer transaction of the state change they report, their sends, attempts and endpoint health.

Plain functions over a connection, as lifecycle.py: `emit` runs inside the ledger's own writes;
the others are the sender's and the audit's, each one short transaction or one read.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from receiver.domain import EventType, JobState
from receiver.ledger import at_ts as _at
from receiver.ledger import from_ts
from receiver.ledger.events import (
    EndpointHealth,
    EventAsset,
    EventFilter,
    EventRecord,
    EventSubject,
    OnwardStatus,
    PendingSend,
    SendAttempt,
    SendRecord,
    Subscriptions,
    build_events,
)

#: How much of an endpoint's answer an attempt keeps.
RESPONSE_KEPT = 1024


def subject(conn: sqlite3.Connection, provider: str, job_id: str) -> EventSubject:
    """The job as its events report it, read inside the write that changed it."""
    job = conn.execute(
        "SELECT * FROM jobs WHERE provider = ? AND job_id = ?", (provider, job_id)
    ).fetchone()
    metadata: dict[str, Any] = json.loads(job["metadata"] or "{}")
    # The caller's own metadata from POST /jobs (an order id, say) is what its application
    # needs most; it wins over what the provider echoed.
    metadata |= json.loads(job["tracking"] or "{}").get("metadata") or {}
    assets = tuple(
        EventAsset(
            n=a["n"],
            name=a["name"],
            state=a["state"],
            key=a["key"],
            uri=a["uri"],
            size=a["size"],
            content_type=a["content_type"],
            sha256=a["sha256"],
            deadline=_at(a["deadline"]),
            archived_at=from_ts(a["archived_at"]),
            error=a["error"],
        )
        for a in conn.execute(
            "SELECT * FROM assets WHERE provider = ? AND job_id = ? ORDER BY n", (provider, job_id)
        )
    )
    return EventSubject(
        provider=provider,
        job_id=job_id,
        job_type=job["job_type"],
        state=JobState(job["state"]),
        metadata=metadata,
        error=job["error"],
        completed_at=from_ts(job["completed_at"]),
        failed_at=from_ts(job["failed_at"]),
        credits_refunded=job["credits_refunded"],
        assets=assets,
    )


def emit(
    conn: sqlite3.Connection,
    subscriptions: Subscriptions,
    provider: str,
    job_id: str,
    kinds: Sequence[tuple[EventType, int | None]],
    now: datetime,
) -> None:
    """Write the events of a state change (and a send per subscribed endpoint) in its write."""
    if not kinds:
        return
    at = now.timestamp()
    for event in build_events(subject(conn, provider, job_id), kinds, now):
        seq = conn.execute(
            "INSERT INTO events (id, type, provider, job_id, created_at, body, traceparent) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                event.id,
                event.type.value,
                provider,
                job_id,
                event.created_at.timestamp(),
                event.body,
                event.traceparent,
            ),
        ).lastrowid
        for endpoint in subscriptions.endpoints_for(event.type):
            conn.execute(
                "INSERT INTO event_sends (event_seq, endpoint, provider, job_id, state, next_at) "
                "VALUES (?, ?, ?, ?, 'pending', ?)",
                (seq, endpoint, provider, job_id, at),
            )


def claim_sends(
    conn: sqlite3.Connection, endpoint: str, owner: str, now: float, until: float, limit: int
) -> list[PendingSend]:
    rows = conn.execute(
        "SELECT s.event_seq, s.attempts, e.id, e.type, e.provider, e.job_id, e.body, "
        "e.created_at, e.traceparent FROM event_sends s JOIN events e ON e.seq = s.event_seq "
        "WHERE s.endpoint = ? AND s.state = 'pending' AND s.next_at <= ? "
        "AND (s.lease_expires IS NULL OR s.lease_expires <= ?) "
        # A job's events reach an endpoint in the order they were written.
        "AND NOT EXISTS (SELECT 1 FROM event_sends p WHERE p.endpoint = s.endpoint "
        "AND p.provider = s.provider AND p.job_id = s.job_id AND p.state = 'pending' "
        "AND p.event_seq < s.event_seq) "
        "ORDER BY s.next_at, s.event_seq LIMIT ?",
        (endpoint, now, now, limit),
    ).fetchall()
    for row in rows:
        conn.execute(
            "UPDATE event_sends SET lease_owner = ?, lease_expires = ? "
            "WHERE event_seq = ? AND endpoint = ?",
            (owner, until, row["event_seq"], endpoint),
        )
    return [
        PendingSend(
            event_id=r["id"],
            endpoint=endpoint,
            type=r["type"],
            provider=r["provider"],
            job_id=r["job_id"],
            body=bytes(r["body"]),
            attempts=r["attempts"],
            created_at=_at(r["created_at"]),
            traceparent=r["traceparent"],
        )
        for r in rows
    ]


def finish_send(
    conn: sqlite3.Connection,
    send: PendingSend,
    owner: str,
    attempt: SendAttempt,
    next_at: datetime | None,
) -> None:
    row = conn.execute("SELECT seq FROM events WHERE id = ?", (send.event_id,)).fetchone()
    if row is None:  # erased meanwhile (`receiver forget`): nothing to record against
        return
    seq, at = row["seq"], attempt.at.timestamp()
    conn.execute(
        "INSERT INTO event_attempts (event_seq, endpoint, at, outcome, status, duration_ms, "
        "response, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            seq,
            send.endpoint,
            at,
            attempt.outcome,
            attempt.status,
            attempt.duration_ms,
            attempt.response[:RESPONSE_KEPT],
            attempt.error,
        ),
    )
    state = {"delivered": "delivered", "failed": "failed", "retry": "pending"}[attempt.outcome]
    # Only the lease holder moves the send: a sender whose lease lapsed (and whose send another
    # sender took over) keeps its attempt in the history but not the say over the state.
    conn.execute(
        "UPDATE event_sends SET state = ?, attempts = attempts + 1, next_at = ?, "
        "lease_owner = NULL, lease_expires = NULL, last_error = ?, "
        "delivered_at = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_at END "
        "WHERE event_seq = ? AND endpoint = ? AND lease_owner = ? AND state = 'pending'",
        (
            state,
            next_at.timestamp() if next_at is not None else at,
            attempt.error,
            state,
            at,
            seq,
            send.endpoint,
            owner,
        ),
    )
    ok = attempt.outcome == "delivered"
    conn.execute(
        "INSERT INTO endpoints (name, consecutive_failures, last_attempt_at, last_success_at, "
        "last_error) VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
        "consecutive_failures = CASE WHEN ? THEN 0 ELSE consecutive_failures + 1 END, "
        "last_attempt_at = excluded.last_attempt_at, "
        "last_success_at = COALESCE(excluded.last_success_at, last_success_at), "
        "last_error = CASE WHEN ? THEN last_error ELSE excluded.last_error END",
        (
            send.endpoint,
            0 if ok else 1,
            at,
            at if ok else None,
            None if ok else attempt.error,
            ok,
            ok,
        ),
    )


def _sends(conn: sqlite3.Connection, seq: int, *, history: bool) -> list[SendRecord]:
    out = []
    for s in conn.execute(
        "SELECT * FROM event_sends WHERE event_seq = ? ORDER BY endpoint", (seq,)
    ).fetchall():
        attempts = (
            [
                SendAttempt(
                    at=_at(a["at"]),
                    outcome=a["outcome"],
                    status=a["status"],
                    duration_ms=a["duration_ms"],
                    response=a["response"],
                    error=a["error"],
                )
                for a in conn.execute(
                    "SELECT * FROM event_attempts WHERE event_seq = ? AND endpoint = ? ORDER BY id",
                    (seq, s["endpoint"]),
                )
            ]
            if history
            else []
        )
        out.append(
            SendRecord(
                endpoint=s["endpoint"],
                state=s["state"],
                attempts=s["attempts"],
                next_at=_at(s["next_at"]) if s["state"] == "pending" else None,
                delivered_at=from_ts(s["delivered_at"]),
                last_error=s["last_error"],
                history=attempts,
            )
        )
    return out


def _record(conn: sqlite3.Connection, row: sqlite3.Row, *, history: bool) -> EventRecord:
    return EventRecord(
        id=row["id"],
        type=row["type"],
        provider=row["provider"],
        job_id=row["job_id"],
        created_at=_at(row["created_at"]),
        body=bytes(row["body"]),
        sends=_sends(conn, row["seq"], history=history),
    )


def _where(where: EventFilter) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    for column, value in (
        ("id", where.event_id),
        ("provider", where.provider),
        ("job_id", where.job_id),
        ("type", where.type),
    ):
        if value is not None:
            clauses.append(f"e.{column} = ?")
            args.append(value)
    if where.since is not None:
        clauses.append("e.created_at >= ?")
        args.append(where.since.timestamp())
    if where.until is not None:
        clauses.append("e.created_at < ?")
        args.append(where.until.timestamp())
    if where.endpoint is not None or where.state is not None:
        sub, sub_args = ["s.event_seq = e.seq"], []  # fixed column names, values bound
        if where.endpoint is not None:
            sub.append("s.endpoint = ?")
            sub_args.append(where.endpoint)
        if where.state is not None:
            sub.append("s.state = ?")
            sub_args.append(where.state)
        clauses.append(f"EXISTS (SELECT 1 FROM event_sends s WHERE {' AND '.join(sub)})")  # noqa: S608
        args.extend(sub_args)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def events(conn: sqlite3.Connection, where: EventFilter, limit: int) -> list[EventRecord]:
    sql, args = _where(where)
    rows = conn.execute(
        f"SELECT e.* FROM events e{sql} ORDER BY e.seq DESC LIMIT ?",  # noqa: S608
        (*args, limit),
    ).fetchall()
    return [_record(conn, r, history=False) for r in rows]


def event(conn: sqlite3.Connection, event_id: str) -> EventRecord | None:
    row = conn.execute("SELECT * FROM events WHERE id = ?", (event_id,)).fetchone()
    return _record(conn, row, history=True) if row is not None else None


def replay(
    conn: sqlite3.Connection,
    subscriptions: Subscriptions,
    where: EventFilter,
    endpoints: Iterable[str] | None,
    now: float,
    limit: int,
) -> list[str]:
    sql, args = _where(where)
    rows = conn.execute(
        f"SELECT e.seq, e.id, e.type, e.provider, e.job_id FROM events e{sql} "  # noqa: S608
        "ORDER BY e.seq LIMIT ?",
        (*args, limit),
    ).fetchall()
    chosen = list(endpoints) if endpoints is not None else None
    replayed = []
    for row in rows:
        targets = chosen if chosen is not None else subscriptions.endpoints_for(row["type"])
        for endpoint in targets:
            # A new series: the same id and bytes, its attempts counted afresh (the history of
            # the earlier ones stays).
            conn.execute(
                "INSERT INTO event_sends (event_seq, endpoint, provider, job_id, state, next_at) "
                "VALUES (?, ?, ?, ?, 'pending', ?) ON CONFLICT (event_seq, endpoint) DO UPDATE "
                "SET state = 'pending', attempts = 0, next_at = excluded.next_at, "
                "lease_owner = NULL, lease_expires = NULL",
                (row["seq"], endpoint, row["provider"], row["job_id"], now),
            )
        if targets:
            replayed.append(row["id"])
    return replayed


def status(conn: sqlite3.Connection, endpoints: Sequence[str]) -> OnwardStatus:
    pending = conn.execute(
        "SELECT COUNT(*) AS n, MIN(e.created_at) AS oldest FROM event_sends s "
        "JOIN events e ON e.seq = s.event_seq WHERE s.state = 'pending'"
    ).fetchone()
    exhausted = conn.execute("SELECT COUNT(*) FROM event_sends WHERE state = 'failed'").fetchone()
    health = {
        r["name"]: EndpointHealth(
            name=r["name"],
            consecutive_failures=r["consecutive_failures"],
            last_attempt_at=from_ts(r["last_attempt_at"]),
            last_success_at=from_ts(r["last_success_at"]),
            last_error=r["last_error"],
        )
        for r in conn.execute("SELECT * FROM endpoints")
    }
    return OnwardStatus(
        pending=pending["n"],
        oldest_pending_at=from_ts(pending["oldest"]),
        exhausted=exhausted[0],
        endpoints=[
            health.get(name) or EndpointHealth(name, 0, None, None, None)
            for name in dict.fromkeys([*endpoints, *health])
        ],
    )


def lease_until(now: datetime, lease: timedelta) -> float:
    return (now + lease).timestamp()
