"""The ledger port: the durable record of jobs, deliveries and archived assets.

What crosses this line: a parsed `JobEvent` with the raw delivery it came from and the archive
plan for its outputs goes in (`record`, one atomic write that also enqueues archive tasks); the
archiver reports outcomes per asset (`mark_archived`, `mark_asset_ended`); the audit side reads
whole jobs back (`job`). Adapters: `sqlite.py` (embedded) and `dynamodb.py` (scale-out, with
the SQS queue). Time is always passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from receiver.domain import DeliveryOutcome, JobEvent, JobState

#: The task number of a job's manifest-only task: a job the provider failed has no outputs to
#: copy, but its manifest is still written (so `receiver reindex` restores it). The archiver
#: reads such a task as "write this job's manifest", not as an output.
MANIFEST_TASK = -1
#: How long a manifest-only task may wait (it has no provider deadline of its own).
MANIFEST_TASK_WINDOW_SECONDS = 24 * 3600


def to_ts(value: datetime | None) -> float | None:
    """Adapters store times as UTC epoch seconds."""
    return value.timestamp() if value is not None else None


def at_ts(value: float) -> datetime:
    return datetime.fromtimestamp(value, tz=UTC)


def from_ts(value: float | None) -> datetime | None:
    return at_ts(value) if value is not None else None


@dataclass(frozen=True)
class IncomingDelivery:
    """One authenticated delivery, as received. The raw body is kept verbatim for the audit."""

    received_at: datetime
    source: str  # "webhook" | "poll"
    auth: str  # how it was authenticated: "signature" | "token" | "insecure-dev" | "api"
    body: bytes
    payload_sha256: str
    delivery_id: str | None = None  # the webhook-id when the sender gave one


@dataclass(frozen=True)
class PlannedOutput:
    """An output to archive: where it lands and by when it must be copied."""

    n: int
    url: str
    name: str
    key: str
    content_type: str | None
    deadline: datetime


@dataclass(frozen=True)
class RecordResult:
    outcome: DeliveryOutcome
    job_state: JobState
    delivery_seq: int
    tasks_queued: int


@dataclass(frozen=True)
class AssetToCopy:
    """Everything a worker needs to copy one output (the URL is read fresh: it may be refreshed)."""

    provider: str
    job_id: str
    n: int
    url: str
    name: str
    key: str
    content_type: str | None
    job_type: str | None
    deadline: datetime
    state: str  # "pending" | "archived" | "expired" | "dead"
    completed_at: datetime | None
    sha256: str | None = None  # set once archived: what a later attempt compares against


@dataclass(frozen=True)
class ArchivedAsset:
    uri: str
    key: str
    size: int
    sha256: str
    content_type: str


@dataclass(frozen=True)
class DeliveryRecord:
    seq: int
    delivery_id: str | None
    received_at: datetime
    source: str
    auth: str
    event: str
    payload_sha256: str
    outcome: str
    body: bytes


@dataclass(frozen=True)
class AssetRecord:
    n: int
    name: str
    key: str
    source_url: str
    content_type: str | None
    deadline: datetime
    state: str
    uri: str | None
    size: int | None
    sha256: str | None
    archived_at: datetime | None
    error: str | None


@dataclass(frozen=True)
class JobRecord:
    provider: str
    job_id: str
    state: JobState
    job_type: str | None
    first_seen_at: datetime
    updated_at: datetime
    completed_at: datetime | None
    failed_at: datetime | None
    archived_at: datetime | None
    deadline: datetime | None
    error: str | None
    credits_refunded: int | None
    metadata: dict[str, Any]
    tracking: dict[str, Any] | None = None  # set when registered with POST /jobs
    deliveries: list[DeliveryRecord] = field(default_factory=list)
    assets: list[AssetRecord] = field(default_factory=list)


@dataclass(frozen=True)
class JobFilter:
    provider: str | None = None
    state: str | None = None
    job_type: str | None = None
    since: datetime | None = None  # first seen at or after
    until: datetime | None = None  # first seen before


@dataclass(frozen=True)
class JobSummary:
    seq: int  # insertion order: the stable cursor for newest-first pages
    provider: str
    job_id: str
    state: JobState
    job_type: str | None
    first_seen_at: datetime
    completed_at: datetime | None
    archived_at: datetime | None
    deadline: datetime | None
    error: str | None


class Ledger(Protocol):
    async def record(
        self, event: JobEvent, delivery: IncomingDelivery, plan: list[PlannedOutput]
    ) -> RecordResult: ...

    async def track(
        self, provider: str, job_id: str, tracking: dict[str, Any], now: datetime
    ) -> bool:
        """Register a job to follow by polling; False if it was already known (idempotent)."""
        ...

    async def asset_to_copy(self, provider: str, job_id: str, n: int) -> AssetToCopy | None: ...

    async def mark_archived(
        self, provider: str, job_id: str, n: int, asset: ArchivedAsset, now: datetime
    ) -> JobState: ...

    async def mark_asset_ended(
        self, provider: str, job_id: str, n: int, state: JobState, error: str, now: datetime
    ) -> JobState: ...

    async def note_asset_error(
        self, provider: str, job_id: str, n: int, error: str, now: datetime
    ) -> None:
        """Record why a step after the copy gave up (manifest, ack), keeping the asset's state."""
        ...

    async def job(self, provider: str, job_id: str) -> JobRecord | None: ...

    async def list_jobs(
        self, where: JobFilter, *, before_seq: int | None, limit: int
    ) -> list[JobSummary]:
        """Newest first; `before_seq` continues after the last row of the previous page."""
        ...

    async def requeue(self, provider: str, job_id: str, now: datetime) -> int:
        """Give a dead or expired job's assets a fresh set of attempts; how many were requeued."""
        ...

    async def archived_assets(self, where: JobFilter) -> list[tuple[str, str, AssetRecord]]:
        """(provider, job id, asset) for every archived asset of the matching jobs."""
        ...

    async def restore(self, job: JobRecord) -> bool:
        """Write a job read back from the archive (reindex); False if the ledger had it."""
        ...

    async def ping(self) -> None: ...
