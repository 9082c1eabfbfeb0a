"""The steps of an archive task after its copy, and how a failing step ends the task.

`TaskSteps` is the half of `Archiver` (see worker.py) that turns a copy's answer into the ledger,
the manifest and the queue: **mark** (`ledger.mark_archived`), **manifest**, **ack**, each tried
`step_tries` times within a lease; a task whose later step keeps failing comes back, and after
`max_attempts` leases it ends with that step's reason (`receiver_archive_steps_given_up{step}`,
the asset's error in the audit). A copy that succeeded is never undone. Copy failures are
classified here too (`_failed`: retry with backoff, expired, or dead).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import structlog

from receiver.archive.fetch import FetchError, SourceGone
from receiver.archive.manifest import MANIFEST_NAME, build_manifest, encode, manifest_key
from receiver.domain import Clock, JobState, backoff_delay, job_prefix, signed_url_expiry
from receiver.ledger import ArchivedAsset, AssetToCopy, JobRecord, Ledger
from receiver.metrics import Metrics
from receiver.store import ObjectExists, ObjectInfo, ObjectMissing, Store
from receiver.workqueue import Lease, WorkQueue

log = structlog.get_logger("receiver.archive.worker")

CONTENT_TYPE_FALLBACK = "application/octet-stream"

#: Set by the copy loop that runs this task (worker.py `_loop`): the copy slot the task holds,
#: given back once the copy is recorded, so the next copy starts while this manifest and ack run.
COPY_SLOT: contextvars.ContextVar[asyncio.Event | None] = contextvars.ContextVar(
    "archive_slot", default=None
)


def release_slot() -> None:
    """This task needs no copy slot any more (its copy is recorded, or there was none)."""
    slot = COPY_SLOT.get()
    if slot is not None:
        slot.set()


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8
    base_delay: float = 5.0
    max_delay: float = 900.0
    max_retry_after: float = 3600.0  # a provider asking for more than this is capped
    step_tries: int = 3  # tries of mark / manifest / ack within one lease
    step_delay: float = 0.2  # first pause between those tries (doubling)
    min_bytes_per_second: float = 16 * 1024  # 0: no throughput floor
    slow_window: float = 60.0
    store_wait_first: float = 0.5  # first pause while the store is unreachable (doubling)
    store_wait_max: float = 30.0


class StepFailed(Exception):
    """A step after the copy kept failing within this lease."""

    def __init__(self, step: str, error: BaseException) -> None:
        super().__init__(f"{step}: {type(error).__name__}: {error}")
        self.step = step


class TaskSteps:
    """The archiver's steps after the copy (a mixin: `Archiver` provides these attributes)."""

    ledger: Ledger
    queue: WorkQueue
    store: Store
    clock: Clock
    retry: RetryPolicy
    rng: Callable[[], float]
    metrics: Metrics

    async def _archived(
        self, lease: Lease, asset: AssetToCopy, stored: ArchivedAsset, started: float
    ) -> None:
        now = self.clock()
        try:
            await self._step(
                "mark",
                lambda: self.ledger.mark_archived(
                    lease.provider, lease.job_id, lease.n, stored, now
                ),
            )
        except StepFailed as exc:
            # The object is in the store; the next attempt finds it (ObjectExists, same digest)
            # and records it without copying the bytes again.
            await self._step_gave_up(lease, exc, archived=False)
            return
        slack = (asset.deadline - now).total_seconds()
        self.metrics.archived_objects.labels(lease.provider).inc()
        self.metrics.archived_bytes.labels(lease.provider).inc(stored.size)
        self.metrics.copy_seconds.observe(time.perf_counter() - started)
        self.metrics.slack.observe(slack)
        if slack < 0:
            self.metrics.deadline_misses.inc()
        log.info(
            "asset_archived",
            uri=stored.uri,
            size=stored.size,
            sha256=stored.sha256,
            slack_seconds=round(slack, 1),
        )
        await self._finish(lease, asset, archived=True)

    async def _exists(
        self, lease: Lease, asset: AssetToCopy, exc: ObjectExists, started: float
    ) -> None:
        """The key was taken: another attempt's copy, or something else that must stay."""
        existing = exc.existing
        if existing is None:
            with contextlib.suppress(Exception):
                existing = await self.store.head(asset.key)
        current = await self.ledger.asset_to_copy(lease.provider, lease.job_id, lease.n)
        recorded = current.sha256 if current is not None else None
        found = existing.sha256 if existing is not None else None
        if found is not None and found in (exc.sha256, recorded):
            log.info("archive_already_stored", sha256=found)
            if current is not None and current.state == "archived":
                await self._finish(lease, current, archived=True)
            else:
                assert existing is not None
                await self._archived(lease, asset, _archived_from(existing, asset), started)
            return
        reason = (
            f"a different object is already stored at {asset.key!r} "
            f"(sha256 {found or 'not recorded'}; this copy's {exc.sha256}): "
            "not overwritten, an operator must decide"
        )
        await self._end(lease, JobState.DEAD, reason, "copy")

    async def _finish(self, lease: Lease, asset: AssetToCopy, *, archived: bool) -> None:
        """The steps after a recorded copy: the manifest (if archived), then the ack."""
        release_slot()
        if archived:
            try:
                await self._step("manifest", lambda: self._write_manifest(asset))
            except StepFailed as exc:
                await self._step_gave_up(lease, exc, archived=True)
                return
        try:
            await self._step("ack", lambda: self.queue.ack(lease))
        except StepFailed as exc:
            # The lease lapses and the task comes back to this step (the manifest is rewritten,
            # the same bytes); the attempt count bounds how often.
            log.warning("archive_ack_failed", error=str(exc))

    async def _failed_job_manifest(self, lease: Lease) -> None:
        """A job the provider failed: no outputs, but a manifest, so `reindex` restores it."""
        job = await self.ledger.job(lease.provider, lease.job_id)
        if job is None:
            await self.queue.dead_letter(lease, "no such job in the ledger")
            return
        if job.state is JobState.FAILED:
            key = failed_job_manifest_key(job)
            try:
                await self._step(
                    "manifest",
                    lambda: self._rewrite_manifest(job, key),
                )
            except StepFailed as exc:
                await self._step_gave_up(lease, exc, archived=True)
                return
        # (A job that completed after all writes its manifest beside its assets instead.)
        try:
            await self._step("ack", lambda: self.queue.ack(lease))
        except StepFailed as exc:
            log.warning("archive_ack_failed", error=str(exc))

    async def _step(self, name: str, run: Callable[[], Awaitable[object]]) -> None:
        delay = self.retry.step_delay
        for tries in range(1, self.retry.step_tries + 1):
            try:
                await run()
                return
            except Exception as exc:
                self.metrics.step_failures.labels(name).inc()
                log.warning("archive_step_failed", step=name, tries=tries, error=repr(exc)[:500])
                if tries == self.retry.step_tries:
                    raise StepFailed(name, exc) from exc
            await asyncio.sleep(delay)
            delay *= 2

    async def _step_gave_up(self, lease: Lease, exc: StepFailed, *, archived: bool) -> None:
        """A step after the copy failed all its tries in this lease: come back, or end."""
        now = self.clock()
        if lease.attempt < self.retry.max_attempts:
            delay = backoff_delay(
                lease.attempt, self.rng, base=self.retry.base_delay, cap=self.retry.max_delay
            )
            await self.queue.retry(lease, now + timedelta(seconds=delay), str(exc))
            self.metrics.retries.inc()
            return
        reason = f"{exc.step} gave up after {lease.attempt} attempts: {exc}"[:2000]
        self.metrics.steps_given_up.labels(exc.step).inc()
        log.error("archive_step_gave_up", step=exc.step, error=reason)
        if archived:
            # The copy stands: the asset stays archived, the reason is shown beside it.
            with contextlib.suppress(Exception):
                await self.ledger.note_asset_error(
                    lease.provider, lease.job_id, lease.n, reason, now
                )
            await self.queue.dead_letter(lease, reason)
            self.metrics.dead_letters.inc()
        else:
            await self._end(lease, JobState.DEAD, reason, None)

    # -- failures -------------------------------------------------------------------------------

    async def _failed(
        self, lease: Lease, asset: AssetToCopy, reason: str, exc: FetchError | None
    ) -> None:
        self.metrics.step_failures.labels("copy").inc()
        now = self.clock()
        answer = f"{reason} (HTTP {exc.status}, {exc.code})" if exc and exc.status else reason
        if isinstance(exc, SourceGone):
            link_expiry = signed_url_expiry(asset.url)
            link_dead = link_expiry is not None and now >= link_expiry
            if now >= asset.deadline or link_dead or lease.attempt >= self.retry.max_attempts:
                await self._end(lease, JobState.EXPIRED, f"expired: {answer}", None)
                self.metrics.expired.inc()
                return
        elif exc is not None and not exc.retryable:
            # Refused by the guard, or a permanent answer: retrying cannot help.
            await self._end(lease, JobState.DEAD, answer, "copy")
            return
        if lease.attempt >= self.retry.max_attempts:
            await self._end(
                lease, JobState.DEAD, f"gave up after {lease.attempt} attempts: {answer}", "copy"
            )
            return
        delay = backoff_delay(
            lease.attempt, self.rng, base=self.retry.base_delay, cap=self.retry.max_delay
        )
        if exc is not None and exc.retry_after is not None:
            delay = max(delay, min(exc.retry_after, self.retry.max_retry_after))
        await self.queue.retry(lease, now + timedelta(seconds=delay), answer)
        self.metrics.retries.inc()
        log.warning("archive_retry", error=answer, retry_in_seconds=round(delay, 1))

    async def _end(self, lease: Lease, state: JobState, reason: str, step: str | None) -> None:
        await self.ledger.mark_asset_ended(
            lease.provider, lease.job_id, lease.n, state, reason, self.clock()
        )
        await self.queue.dead_letter(lease, reason)
        if state is JobState.DEAD:
            self.metrics.dead_letters.inc()
            if step is not None:
                self.metrics.steps_given_up.labels(step).inc()
        log.warning("archive_ended", state=state.value, error=reason)

    async def _write_manifest(self, asset: AssetToCopy) -> None:
        job = await self.ledger.job(asset.provider, asset.job_id)
        if job is None:
            return
        await self._rewrite_manifest(job, manifest_key(asset.key))

    async def _rewrite_manifest(self, job: JobRecord, key: str) -> None:
        # Payloads the ledger no longer keeps (retention) stay as the manifest had them.
        previous = (
            await _read_json(self.store, key)
            if any(d.payload_removed for d in job.deliveries)
            else None
        )
        await self._put_manifest(key, encode(build_manifest(job, previous)))

    async def _put_manifest(self, key: str, body: bytes) -> None:
        # A manifest is rewritten as deliveries arrive, so its put must replace. Should the store
        # answer ObjectExists, the same bytes already there are as good as written; different
        # ones fail this step (counted, ended with the reason), never silently skipped.
        try:
            await self.store.put_bytes(key, body, content_type="application/json")
        except ObjectExists as exc:
            if exc.existing is None or exc.existing.sha256 != exc.sha256:
                raise


async def _read_json(store: Store, key: str) -> dict[str, Any] | None:
    try:
        value = json.loads(b"".join([chunk async for chunk in store.read(key)]))
    except (ObjectMissing, ValueError):
        return None
    return value if isinstance(value, dict) else None


def failed_job_manifest_key(job: JobRecord) -> str:
    """Where a failed job's manifest goes: its folder, dated by the failure (or first sight)."""
    for when in (job.failed_at, job.first_seen_at):
        if when is None:
            continue
        try:
            folder = job_prefix(
                prefix="", provider=job.provider, job_id=job.job_id, completed_at=when
            )
            return f"{folder}/{MANIFEST_NAME}"
        except (OverflowError, ValueError):
            continue  # a date at the edge of what datetime can shift: use the next one
    raise ValueError(f"no usable date for the manifest of {job.provider}/{job.job_id}")


def _archived_from(existing: ObjectInfo, asset: AssetToCopy) -> ArchivedAsset:
    assert existing.sha256 is not None
    return ArchivedAsset(
        uri=existing.uri,
        key=asset.key,
        size=existing.size,
        sha256=existing.sha256,
        content_type=existing.content_type or asset.content_type or CONTENT_TYPE_FALLBACK,
    )
