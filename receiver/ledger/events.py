"""Onward events behind the ledger port: what an event says, and the outbox it waits in.

An event is built inside the ledger write that makes the state change it reports (SQLite: the
same transaction; DynamoDB: the same TransactWriteItems), and its body is stored as bytes: every
send, retry and replay posts exactly those bytes under the same id, so a crash between the
state change and the send loses nothing and never changes what an id says.

Per destination (an *endpoint*, named in settings) the outbox keeps one *send* of each event it
subscribes to: `pending` until `delivered`, or `failed` once its retries are exhausted (replay
opens it again). Every try is an *attempt*, kept for the audit. A job's sends to one endpoint
go out in the order their events were written (`claim_sends` never hands out a send while an
earlier one of the same job and endpoint is pending); across jobs no order is promised.

Adapters: `sqlite/outbox.py`, `dynamodb/events.py`; the sender is `receiver/onward`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

from receiver.domain import EventType, JobState, manifest_key
from receiver.tracing import current_traceparent

#: The version of the event body's schema (receiver/onward/schema/events.v1.json); a removal or
#: change of meaning bumps it, an added field does not.
SCHEMA_VERSION = 1
#: Consecutive failed attempts after which an endpoint shows as failing (never disabled).
FAILING_AFTER = 3

SendState = Literal["pending", "delivered", "failed"]
SEND_STATES: tuple[SendState, ...] = ("pending", "delivered", "failed")
Outcome = Literal["delivered", "retry", "failed"]

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_event_id(now: datetime, entropy: bytes | None = None) -> str:
    """`evt_` and a ULID: 48 bits of milliseconds then 80 random bits, Crockford base32, so ids
    sort by creation time and never collide across replicas."""
    millis = int(now.timestamp() * 1000) & ((1 << 48) - 1)
    rand = int.from_bytes(entropy if entropy is not None else os.urandom(10), "big")
    value = (millis << 80) | (rand & ((1 << 80) - 1))
    chars = [_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5)]
    return "evt_" + "".join(chars)


@dataclass(frozen=True)
class Subscription:
    """An endpoint and the event types it takes (None: every type)."""

    endpoint: str
    types: frozenset[str] | None = None

    def takes(self, event_type: str) -> bool:
        return self.types is None or event_type in self.types


@dataclass(frozen=True)
class Subscriptions:
    """Which endpoint receives which event types (settings; the composition root builds it)."""

    routes: tuple[Subscription, ...] = ()

    def endpoints_for(self, event_type: str) -> list[str]:
        return [r.endpoint for r in self.routes if r.takes(event_type)]

    @property
    def endpoints(self) -> list[str]:
        return [r.endpoint for r in self.routes]

    def __bool__(self) -> bool:
        return bool(self.routes)


@dataclass(frozen=True)
class EventAsset:
    """What an event says of one asset (never its source link: that is the provider's)."""

    n: int
    name: str
    state: str
    key: str
    uri: str | None
    size: int | None
    content_type: str | None
    sha256: str | None
    deadline: datetime
    archived_at: datetime | None
    error: str | None
    technical: dict[str, Any] | None = None


@dataclass(frozen=True)
class EventSubject:
    """The facts an event reports: the job after its state change."""

    provider: str
    job_id: str
    job_type: str | None
    state: JobState
    metadata: dict[str, Any]
    error: str | None
    completed_at: datetime | None
    failed_at: datetime | None
    credits_refunded: int | None
    assets: tuple[EventAsset, ...] = ()


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else None


def manifest_uri(asset: EventAsset) -> tuple[str, str | None]:
    """(key, uri) of the manifest beside the asset (the archiver writes it after the record)."""
    key = manifest_key(asset.key)
    if not (asset.uri and asset.uri.endswith(asset.key)):
        return key, None
    return key, asset.uri[: -len(asset.key)] + key


def _asset_json(asset: EventAsset) -> dict[str, Any]:
    slack = (asset.deadline - asset.archived_at).total_seconds() if asset.archived_at else None
    body: dict[str, Any] = {
        "n": asset.n,
        "name": asset.name,
        "state": asset.state,
        "key": asset.key,
        "uri": asset.uri,
        "size": asset.size,
        "content_type": asset.content_type,
        "sha256": asset.sha256,
        "deadline": _iso(asset.deadline),
        "archived_at": _iso(asset.archived_at),
        "deadline_slack_seconds": round(slack, 3) if slack is not None else None,
        "error": asset.error,
    }
    if asset.technical is not None:
        body["technical"] = asset.technical
    return body


def event_body(
    event_type: EventType,
    subject: EventSubject,
    *,
    event_id: str,
    at: datetime,
    n: int | None = None,
) -> bytes:
    """The event's bytes, as stored and sent (Standard Webhooks' `type`/`timestamp`/`data`).

    asset.* events carry the one asset (`n`) under `data.asset`; job.* events every asset under
    `data.assets`. Both carry the manifest's key and URI once an asset has a key.
    """
    data: dict[str, Any] = {
        "provider": subject.provider,
        "job_id": subject.job_id,
        "job_type": subject.job_type,
        "state": subject.state.value,
        "metadata": subject.metadata,
        "completed_at": _iso(subject.completed_at),
    }
    if event_type is EventType.JOB_FAILED:
        data |= {
            "failed_at": _iso(subject.failed_at),
            "credits_refunded": subject.credits_refunded,
        }
    if event_type in (EventType.JOB_FAILED, EventType.JOB_EXPIRED, EventType.JOB_DEAD):
        data["error"] = subject.error
    if n is not None:
        asset = next(a for a in subject.assets if a.n == n)
        data["asset"] = _asset_json(asset)
    else:
        data["assets"] = [_asset_json(a) for a in subject.assets]
    if subject.assets:
        key, uri = manifest_uri(subject.assets[0])
        data["manifest"] = {"key": key, "uri": uri}
    envelope = {
        "id": event_id,
        "type": event_type.value,
        "timestamp": _iso(at),
        "schema_version": SCHEMA_VERSION,
        "data": data,
    }
    return json.dumps(envelope, separators=(",", ":"), sort_keys=True).encode()


@dataclass(frozen=True)
class NewEvent:
    """An event ready for the outbox: its id, type, job, time and bytes."""

    id: str
    type: EventType
    provider: str
    job_id: str
    created_at: datetime
    body: bytes
    traceparent: str | None = None  # the trace of the change it reports (tracing on)


def build_events(
    subject: EventSubject, kinds: Iterable[tuple[EventType, int | None]], now: datetime
) -> list[NewEvent]:
    """The events of one state change, in the order a job's subscribers must see them. Each
    carries the current trace (the webhook's, the copy's), which its sends continue."""
    traceparent = current_traceparent()
    out = []
    for k, (event_type, n) in enumerate(kinds):
        # One microsecond apart: the events of one change keep their order in every listing
        # and claim (DynamoDB sorts them by creation time, then id).
        at = now + timedelta(microseconds=k)
        event_id = new_event_id(at)
        body = event_body(event_type, subject, event_id=event_id, at=at, n=n)
        out.append(
            NewEvent(event_id, event_type, subject.provider, subject.job_id, at, body, traceparent)
        )
    return out


# --- what the sender and the audit read and write -------------------------------------------


@dataclass(frozen=True)
class PendingSend:
    """A send claimed by one sender (`owner`) until its lease ends."""

    event_id: str
    endpoint: str
    type: str
    provider: str
    job_id: str
    body: bytes
    attempts: int  # attempts made so far in this series (a replay starts a new series)
    created_at: datetime  # the event's
    traceparent: str | None = None  # the event's trace: each try is a span in it


@dataclass(frozen=True)
class SendAttempt:
    at: datetime
    outcome: Outcome
    status: int | None  # the HTTP status (None: no answer, or not HTTP)
    duration_ms: float
    response: str = ""  # the first KB of the answer
    error: str | None = None


@dataclass(frozen=True)
class SendRecord:
    endpoint: str
    state: SendState
    attempts: int
    next_at: datetime | None
    delivered_at: datetime | None
    last_error: str | None
    history: list[SendAttempt] = field(default_factory=list)


@dataclass(frozen=True)
class EventRecord:
    id: str
    type: str
    provider: str
    job_id: str
    created_at: datetime
    body: bytes
    sends: list[SendRecord] = field(default_factory=list)

    def payload(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.body)
        return value


@dataclass(frozen=True)
class EventFilter:
    event_id: str | None = None
    provider: str | None = None
    job_id: str | None = None
    type: str | None = None
    endpoint: str | None = None  # events with a send to this endpoint
    state: SendState | None = None  # events with a send in this state
    since: datetime | None = None  # created at or after
    until: datetime | None = None  # created before

    def admits(self, event: EventRecord) -> bool:
        """The one reading of a filter, for adapters that filter rows they already read."""
        if self.event_id is not None and event.id != self.event_id:
            return False
        if self.provider is not None and event.provider != self.provider:
            return False
        if self.job_id is not None and event.job_id != self.job_id:
            return False
        if self.type is not None and event.type != self.type:
            return False
        if self.since is not None and event.created_at < self.since:
            return False
        if self.until is not None and event.created_at >= self.until:
            return False
        if self.endpoint is None and self.state is None:
            return True
        return any(
            (self.endpoint is None or s.endpoint == self.endpoint)
            and (self.state is None or s.state == self.state)
            for s in event.sends
        )


@dataclass(frozen=True)
class EndpointHealth:
    name: str
    consecutive_failures: int
    last_attempt_at: datetime | None
    last_success_at: datetime | None
    last_error: str | None

    @property
    def failing(self) -> bool:
        return self.consecutive_failures >= FAILING_AFTER


@dataclass(frozen=True)
class OnwardStatus:
    """The outbox at a glance (metrics, doctor, console)."""

    pending: int  # sends not yet delivered nor exhausted
    oldest_pending_at: datetime | None  # the creation time of the oldest pending send's event
    exhausted: int  # sends whose retries ran out (replay them)
    endpoints: list[EndpointHealth]


class EventOutbox(Protocol):
    """The ledger's onward half: what the sender claims and records, what the audit reads."""

    async def claim_sends(
        self, endpoint: str, owner: str, now: datetime, lease: timedelta, limit: int
    ) -> list[PendingSend]:
        """Up to `limit` sends to `endpoint` that are due and not leased, leased to `owner`
        until now + lease; never a send while an earlier send of its job to it is pending."""
        ...

    async def finish_send(
        self, send: PendingSend, owner: str, attempt: SendAttempt, next_at: datetime | None
    ) -> None:
        """Record `attempt`; the send is delivered, failed (exhausted) or, for a retry, due
        again at `next_at`. The endpoint's health follows the attempt's outcome."""
        ...

    async def events(self, where: EventFilter, limit: int) -> list[EventRecord]:
        """Newest first, with each event's sends (no attempt history)."""
        ...

    async def event(self, event_id: str) -> EventRecord | None:
        """One event with its sends and every attempt."""
        ...

    async def replay(
        self, where: EventFilter, endpoints: Sequence[str] | None, now: datetime, limit: int
    ) -> list[str]:
        """Open a new series of sends for the events `where` admits (to `endpoints`, or to the
        endpoints subscribed to each event's type), due now, with the same id and bytes; the
        ids replayed, oldest first."""
        ...

    async def onward_status(self, now: datetime) -> OnwardStatus: ...
