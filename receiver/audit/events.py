"""Onward events as the audit shows them (CLI `receiver events`, the console): what receiver
told which endpoint, when, and what each attempt got. Filters are validated here, once."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from receiver.audit.api import parse_time
from receiver.domain import EventType
from receiver.errors import InvalidPayload
from receiver.ledger.events import SEND_STATES, EventFilter, EventRecord, SendAttempt, SendRecord


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def event_filter(
    *,
    event_id: str | None = None,
    job: tuple[str, str] | None = None,
    event_type: str | None = None,
    endpoint: str | None = None,
    state: str | None = None,
    since: str | None = None,
    until: str | None = None,
) -> EventFilter:
    """Validated event filters (a 4xx-style error naming each bad field)."""
    problems = []
    types = sorted(t.value for t in EventType)
    if event_type is not None and event_type not in types:
        problems.append({"field": "type", "problem": f"one of {types}"})
    if state is not None and state not in SEND_STATES:
        problems.append({"field": "state", "problem": f"one of {list(SEND_STATES)}"})
    if problems:
        raise InvalidPayload("invalid filter", problems)
    return EventFilter(
        event_id=event_id,
        provider=job[0] if job else None,
        job_id=job[1] if job else None,
        type=event_type,
        endpoint=endpoint,
        state=state,  # type: ignore[arg-type]  # checked against SEND_STATES above
        since=parse_time("since", since) if since else None,
        until=parse_time("until", until) if until else None,
    )


def attempt_json(a: SendAttempt) -> dict[str, Any]:
    return {
        "at": _iso(a.at),
        "outcome": a.outcome,
        "status": a.status,
        "duration_ms": a.duration_ms,
        "response": a.response,
        "error": a.error,
    }


def send_json(s: SendRecord) -> dict[str, Any]:
    return {
        "endpoint": s.endpoint,
        "state": s.state,
        "attempts": s.attempts,
        "next_attempt_at": _iso(s.next_at),
        "delivered_at": _iso(s.delivered_at),
        "last_error": s.last_error,
        "history": [attempt_json(a) for a in s.history],
    }


def event_json(e: EventRecord, *, body: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": e.id,
        "type": e.type,
        "provider": e.provider,
        "job_id": e.job_id,
        "created_at": _iso(e.created_at),
        "sends": [send_json(s) for s in e.sends],
    }
    if body:
        out["body"] = e.payload()
    return out
