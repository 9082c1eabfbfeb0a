"""The ledger port: the durable record of jobs, deliveries and archived assets.

What crosses this line: a parsed `JobEvent` with the raw delivery it came from and the archive
plan for its outputs goes in (`record`, one atomic write that also enqueues archive tasks); the
archiver reports outcomes per asset (`mark_archived`, `mark_asset_ended`); the audit side reads
whole jobs back (`job`, `list_jobs`) and, for the console's overview, what became of the
recent ones (`activity`). Adapters: `sqlite.py` (embedded) and `dynamodb.py` (scale-out, with
the SQS queue). Time is always passed in.

Data over years (issue 15): `prune_payloads` drops old raw bodies while their audit rows stay,
`prune_jobs` removes long-ended jobs' records, `forget` erases one job and leaves a `Tombstone`
that `record` honours, and `due_for_fixity` / `mark_verified` keep each archived asset's last
integrity check.

Onward events (issue 21, `events.py`): the writes that change a job's state also write the
events that report it, and the port's `EventOutbox` half is what the sender claims and records.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from receiver.domain import MANIFEST_TASK, MANIFEST_TASK_WINDOW, DeliveryOutcome, JobEvent, JobState
from receiver.ledger.events import EventOutbox

__all__ = ["MANIFEST_TASK", "MANIFEST_TASK_WINDOW_SECONDS"]  # and the port's types below

#: How long a manifest-only task may wait, in the adapters' epoch seconds.
MANIFEST_TASK_WINDOW_SECONDS = MANIFEST_TASK_WINDOW.total_seconds()


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
    # W3C traceparent of the request that brought it (tracing on): stored with the archive
    # tasks it queues, so the worker's spans join the webhook's trace (receiver.tracing).
    traceparent: str | None = None


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
    # The delivery id was seen before with a different body (payload SHA-256 of the first
    # delivery of that id): a provider bug or a replay with altered content. Recorded, flagged.
    body_mismatch: bool = False


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
    body: bytes  # b"" once the payload retention removed it (see `payload_removed`)
    body_mismatch: bool = False  # same delivery id as an earlier delivery, different body
    payload_removed: bool = False  # the raw body was dropped by retention; the row stays


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
    verified_at: datetime | None = None  # when its bytes were last re-read and checked
    verified_by: str | None = None  # how: "full-read" (every byte re-hashed)
    fixity_error: str | None = None  # what the last check found wrong; None if it passed


#: The one fixity method so far: the whole object re-read and its SHA-256 recomputed.
FULL_READ = "full-read"


@dataclass(frozen=True)
class Tombstone:
    """What remains of a job erased on request: when, and the reason the operator gave."""

    provider: str
    job_id: str
    forgotten_at: datetime
    reason: str


@dataclass(frozen=True)
class DueAsset:
    """An archived asset whose fixity check is due (never checked counts from its archiving)."""

    provider: str
    job_id: str
    asset: AssetRecord

    @property
    def last_checked(self) -> datetime | None:
        return self.asset.verified_at or self.asset.archived_at


@dataclass(frozen=True)
class FixityStatus:
    """The archive's fixity at a glance (for /metrics and the console)."""

    oldest_check: datetime | None  # the oldest last check (or archiving, if never checked)
    failing: int  # assets whose last check failed


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


@dataclass(frozen=True)
class ArchivedSample:
    """One archived asset, as the overview counts it."""

    provider: str
    job_id: str
    n: int
    size: int
    archived_at: datetime
    deadline: datetime

    @property
    def slack_seconds(self) -> float:
        """Time left before the deadline when it was archived (negative: a deadline miss)."""
        return (self.deadline - self.archived_at).total_seconds()


#: How many deadline misses an `Activity` lists (the latest ones); `missed` counts them all.
MAX_MISSES = 50


@dataclass(frozen=True)
class Activity:
    """What became of the jobs first seen at or after `since` (the console's overview)."""

    since: datetime
    jobs_by_state: dict[str, int]
    archived: int  # archived assets of those jobs
    archived_bytes_by_day: dict[str, int]  # UTC day of archiving ("2026-03-16") -> bytes
    slack_min: float | None  # seconds; None when nothing was archived
    slack_median: float | None
    missed: int  # assets archived after their deadline
    misses: list[ArchivedSample]  # the latest MAX_MISSES of them, latest first

    @classmethod
    def build(
        cls, since: datetime, jobs_by_state: dict[str, int], samples: Iterable[ArchivedSample]
    ) -> Activity:
        """The one summary both adapters return, from their rows (shared so they agree)."""
        by_day: dict[str, int] = {}
        slacks: list[float] = []
        misses: list[ArchivedSample] = []
        for sample in samples:
            day = sample.archived_at.astimezone(UTC).date().isoformat()
            by_day[day] = by_day.get(day, 0) + sample.size
            slacks.append(sample.slack_seconds)
            if sample.slack_seconds < 0:
                misses.append(sample)
        slacks.sort()
        misses.sort(key=lambda m: (m.archived_at, m.provider, m.job_id, m.n), reverse=True)
        return cls(
            since=since,
            jobs_by_state=dict(sorted(jobs_by_state.items())),
            archived=len(slacks),
            archived_bytes_by_day=dict(sorted(by_day.items())),
            slack_min=slacks[0] if slacks else None,
            slack_median=slacks[len(slacks) // 2] if slacks else None,
            missed=len(misses),
            misses=misses[:MAX_MISSES],
        )


class Ledger(EventOutbox, Protocol):
    async def record(
        self, event: JobEvent, delivery: IncomingDelivery, plan: list[PlannedOutput]
    ) -> RecordResult: ...

    async def track(
        self, provider: str, job_id: str, tracking: dict[str, Any], now: datetime
    ) -> bool:
        """Register a job to follow by polling; False if it was already known (idempotent) or
        erased on request (a tombstone: no record is created for it again)."""
        ...

    async def asset_to_copy(self, provider: str, job_id: str, n: int) -> AssetToCopy | None: ...

    async def mark_archived(
        self, provider: str, job_id: str, n: int, asset: ArchivedAsset, now: datetime
    ) -> JobState: ...

    async def mark_asset_ended(
        self, provider: str, job_id: str, n: int, state: JobState, error: str, now: datetime
    ) -> JobState: ...

    async def mark_asset_invalid(
        self, provider: str, job_id: str, n: int, error: str, now: datetime
    ) -> JobState:
        """End a pending asset as `invalid` (its source served no usable media; `error` says
        what was declared and what was found), with the `asset.invalid` event; the job settles
        as for any other end."""
        ...

    async def end_tracking(
        self, provider: str, job_id: str, state: JobState, reason: str, now: datetime
    ) -> bool:
        """End a job whose polling stopped for good (not found, gave up) as `state` (expired or
        dead) with `reason`, if the provider never finished it (still tracking/processing);
        True if it changed. Registering it again reopens it (`track`)."""
        ...

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
        """Write a job read back from the archive (reindex); False if the ledger had it, or if
        the job was erased on request (a tombstone: an object Object Lock kept stays erased)."""
        ...

    async def activity(self, since: datetime) -> Activity:
        """Jobs first seen at or after `since`: how many per state, and for their archived
        assets the bytes per day, the deadline slack and the misses (the console's overview)."""
        ...

    async def ping(self) -> None: ...

    # -- data over years (retention, erasure, fixity) -------------------------------------------

    async def prune_payloads(self, received_before: datetime, now: datetime, limit: int) -> int:
        """Drop the raw bodies of at most `limit` deliveries received before `received_before`.

        Oldest first. The delivery's row stays (time, delivery id, source, auth, event, outcome,
        payload SHA-256) and reads back with `payload_removed` and an empty body. Returns how many
        bodies were dropped now (0: nothing older is left). Small batches: each call is one short
        write, so ingest never waits long behind it.
        """
        ...

    async def prune_jobs(self, ended_before: datetime, limit: int) -> list[tuple[str, str]]:
        """Remove the whole records of at most `limit` jobs in a final state (archived, failed,
        expired, dead) last updated before `ended_before`: job, deliveries, assets, tasks.

        Archived objects and manifests are not touched (`reindex` can restore the records).
        Returns the (provider, job id) pairs removed.
        """
        ...

    async def forget(self, provider: str, job_id: str, reason: str, now: datetime) -> bool:
        """Erase the job's record (as `prune_jobs` does) and leave a `Tombstone`.

        From then on `record` answers `DeliveryOutcome.FORGOTTEN` for that job and writes
        nothing. False if there was no record to erase (the tombstone is written regardless,
        so a job can be forgotten before its first delivery).
        """
        ...

    async def tombstone(self, provider: str, job_id: str) -> Tombstone | None: ...

    async def due_for_fixity(self, checked_before: datetime, limit: int) -> list[DueAsset]:
        """Archived assets whose last check (or, never checked, archiving) is before
        `checked_before`, oldest first, at most `limit`."""
        ...

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
        """Record a fixity check of an archived asset (error None: it passed). False if the
        asset is not in the ledger (any more)."""
        ...

    async def fixity_status(self) -> FixityStatus: ...

    async def fixity_failures(self, limit: int) -> list[DueAsset]:
        """Archived assets whose last fixity check failed (`AssetRecord.fixity_error`), most
        recently checked first, at most `limit`: the console's Problems page."""
        ...

    async def compact(self) -> int:
        """Give some space freed by pruning back where the backend holds it, in one short write;
        how much it gave back (0: nothing left to give). SQLite: an incremental vacuum of at most
        a few MB; DynamoDB: nothing to do, deleted items free their space."""
        ...
