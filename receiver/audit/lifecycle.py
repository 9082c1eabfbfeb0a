"""Data over years: payload and job retention (`receiver prune`, and a background loop inside
`serve`/`worker`) and erasure of one job (`receiver forget`).

Retention works in small batches through the ledger port, so ingest is never held up for long;
erasure leaves a tombstone in the ledger so a provider's redelivery does not archive the job again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog

from receiver.archive.manifest import manifest_key
from receiver.domain import Clock, job_folder
from receiver.ledger import Ledger
from receiver.polling.schedule import Tracker
from receiver.store import Erasure, Store, StoreError

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RetentionPolicy:
    payload: timedelta  # raw bodies older than this go (0: all of them, at the next prune)
    jobs: timedelta | None = None  # whole records of jobs ended this long ago (None: kept)
    batch: int = 50  # rows per ledger write

    @classmethod
    def from_days(cls, payload_days: int, job_days: int | None, batch: int = 50) -> RetentionPolicy:
        return cls(
            timedelta(days=payload_days),
            timedelta(days=job_days) if job_days is not None else None,
            batch,
        )


@dataclass
class PruneReport:
    payloads_removed: int = 0
    jobs_removed: list[str] = field(default_factory=list)


async def _yield() -> None:
    await asyncio.sleep(0)


async def prune(
    ledger: Ledger,
    policy: RetentionPolicy,
    now: datetime,
    *,
    between_batches: Callable[[], Awaitable[None]] = _yield,
) -> PruneReport:
    """Apply `policy` as of `now`, a batch (one short write) at a time until nothing is left."""
    report = PruneReport()
    while True:
        dropped = await ledger.prune_payloads(now - policy.payload, now, policy.batch)
        report.payloads_removed += dropped
        if dropped < policy.batch:
            break
        await between_batches()  # let ingest's writes in between
    while policy.jobs is not None:
        removed = await ledger.prune_jobs(now - policy.jobs, policy.batch)
        report.jobs_removed.extend(f"{p}/{j}" for p, j in removed)
        if len(removed) < policy.batch:
            break
        await between_batches()
    return report


class RetentionLoop:
    """The background retention of `serve`/`worker`: a round every `interval` seconds, each
    batch a short write with a `pause` after it, then the freed space given back."""

    def __init__(
        self,
        ledger: Ledger,
        policy: RetentionPolicy,
        *,
        clock: Clock,
        interval: float,
        pause: float = 0.05,
        on_pruned: Callable[[PruneReport], None] = lambda report: None,
    ) -> None:
        self.ledger = ledger
        self.policy = policy
        self.clock = clock
        self.interval = interval
        self.pause = pause  # between two short writes: ingest's writes go first
        self.on_pruned = on_pruned

    async def _breathe(self) -> None:
        await asyncio.sleep(self.pause)

    async def once(self) -> PruneReport:
        """One round: everything due now, a batch at a time, then the space back."""
        report = await prune(self.ledger, self.policy, self.clock(), between_batches=self._breathe)
        if report.payloads_removed or report.jobs_removed:
            while await self.ledger.compact():
                await self._breathe()
            log.info(
                "retention_pruned",
                payloads=report.payloads_removed,
                jobs=len(report.jobs_removed),
            )
        self.on_pruned(report)
        return report

    async def run(self) -> None:
        while True:
            try:
                await self.once()
            except Exception as exc:  # a bad round must not stop the process's other work
                log.error("retention_failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(self.interval)


# --- erasure -----------------------------------------------------------------------------------


@dataclass
class ForgetReport:
    provider: str
    job_id: str
    in_ledger: bool  # the ledger had a record of the job
    keys: list[str]  # archived objects and manifests of the job (found or expected)
    in_flight: bool = False  # assets were still pending: a copy running now may still land
    tracked: bool = False  # the poll schedule had an entry for the job
    acted: bool = False  # False: a dry run, nothing changed
    erased: list[Erasure] = field(default_factory=list)
    tombstone_at: datetime | None = None

    @property
    def not_removed(self) -> list[str]:
        return [f"{e.key}: {why}" for e in self.erased for why in e.kept]


async def _job_keys(
    ledger: Ledger, store: Store, provider: str, job_id: str
) -> tuple[bool, bool, list[str]]:
    """(in the ledger, copies pending, the job's object keys): from its ledger record, else
    found in the store's layout."""
    job = await ledger.job(provider, job_id)
    keys: list[str] = []
    if job is not None:
        for asset in job.assets:
            keys.append(asset.key)
        if job.assets:
            keys.append(manifest_key(job.assets[0].key))
        pending = any(a.state == "pending" for a in job.assets)
        return True, pending, list(dict.fromkeys(keys))
    # No record (job retention removed it, or the ledger was lost): the deterministic layout
    # is provider/YYYY/MM/DD/<quoted job id>/<name>; look for that folder.
    folder = job_folder(job_id)
    async for key in store.list_keys(f"{provider}/"):
        parts = key.split("/")
        if len(parts) == 6 and parts[4] == folder:
            keys.append(key)
    return False, False, sorted(keys)


async def forget(
    ledger: Ledger,
    store: Store,
    tracker: Tracker,
    provider: str,
    job_id: str,
    *,
    reason: str,
    now: datetime,
    act: bool,
) -> ForgetReport:
    """Erase one job: its objects (every version), its manifest, its ledger record and its poll
    schedule entry, leaving a tombstone. With `act` False (the default of the CLI) only says what
    it would remove."""
    in_ledger, pending, keys = await _job_keys(ledger, store, provider, job_id)
    # Erasing the record ends the tasks (a running copy loses its lease at its next heartbeat),
    # but a copy finishing in between still writes its object: say so, forget again later.
    tracked = await tracker.get(provider, job_id) is not None
    report = ForgetReport(provider, job_id, in_ledger, keys, in_flight=pending, tracked=tracked)
    if not act:
        return report
    # The tombstone and the ledger first: from here on nothing archives the job again, and the
    # poller drops an entry it still finds for the job (one registered meanwhile).
    await ledger.forget(provider, job_id, reason, now)
    report.tombstone_at = now
    report.acted = True
    report.tracked = await tracker.forget(provider, job_id) or tracked
    for key in keys:
        try:
            report.erased.append(await store.delete_all_versions(key))
        except StoreError as exc:  # the store failing: say what is left, try the other keys
            report.erased.append(Erasure(key, 0, (f"{type(exc).__name__}: {exc}",)))
    log.info(
        "job_forgotten",
        provider=provider,
        job_id=job_id,
        objects=len(keys),
        not_removed=len(report.not_removed),
    )
    return report
