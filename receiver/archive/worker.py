"""Archive workers: lease the most urgent task, copy its output into the store, record the result.

One task runs four steps: **copy** (read the current link from the ledger → guarded, streamed
download → store, SHA-256 on the way), **mark** (`ledger.mark_archived`), **manifest** (beside the
asset) and **ack**. What each step does when it fails, twice, or runs late:

- copy: a source failure is an attempt (retried with backoff, ended after `max_attempts`); an
  unreachable store is not: the worker holds its task and probes the store with backoff until it
  answers or the task's deadline passes. A copy slower than the floor is cut and, if it made
  progress, given back uncounted to resume where it stopped (resume.py).
  The store's put is a conditional create: `ObjectExists` with the same SHA-256 (ours, or the
  ledger's record) means another attempt finished this copy, which is then recorded quietly; a
  different object is never overwritten and ends the task with the reason.
- lease lost or worker stopping: the source is cut (see guard.py), never the store's put, so a
  put that is already completing ends with its own answer and no cleanup deletes a final key.
- mark, manifest, ack: each is tried `step_tries` times within the lease; a task whose later
  step keeps failing comes back, and after `max_attempts` leases it ends with the step's reason
  (`receiver_archive_steps_given_up{step}`, the asset's error in the audit). A copy that
  succeeded is never undone: the asset stays archived when only its manifest could not be written.

A copy slot is held from the lease until the copy is recorded (mark); the manifest and the ack
(the task's tail) then run beside the slot's next copy, at most one tail per slot. On a burst of
small outputs this keeps the slots copying instead of waiting on a second PUT and a commit
(`BENCH_ONLY=many make bench`: slots busy 62-69% -> 69-81% of the time over 7 runs).

This module runs the loop and the copy; steps.py holds what follows a copy's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta

import anyio
import structlog

from receiver import tracing
from receiver.archive.fetch import Download, Fetcher, FetchError
from receiver.archive.guard import CopyCut, CopyGuard
from receiver.archive.resume import Partial, PartialCopies
from receiver.archive.steps import (
    CONTENT_TYPE_FALLBACK,
    COPY_SLOT,
    RetryPolicy,
    TaskSteps,
    failed_job_manifest_key,
)
from receiver.domain import Clock, JobState, source_name
from receiver.ledger import MANIFEST_TASK, ArchivedAsset, AssetToCopy, Ledger
from receiver.metrics import Metrics
from receiver.store import ObjectExists, ObjectMissing, Store, StoredObject, StoreError
from receiver.workqueue import Lease, WorkQueue

log = structlog.get_logger(__name__)

__all__ = ["Archiver", "RetryPolicy", "failed_job_manifest_key"]

# How long a stopping worker lets its cut copy finish its cleanup before giving the task back.
STOP_GRACE_SECONDS = 30.0


@dataclass
class _Attempt:
    """One lease of one task, as the heartbeat and the copy share it."""

    lease: Lease
    partial: Partial  # bytes held from an earlier, cut copy (resume.py)
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    guard: CopyGuard | None = None
    copy: asyncio.Task[ArchivedAsset] | None = None
    too_slow: bool = False  # the last copy was cut for being below the floor

    def lose(self) -> None:
        self.lost.set()
        self.cut("lease lost")

    def cut(self, reason: str) -> None:
        """Stop the running copy: by its source once the store reads it, else outright."""
        if self.guard is not None:
            self.guard.stop(reason)
            if not self.guard.started and self.copy is not None:
                # Still opening the source: the store has nothing to clean up yet.
                self.copy.cancel()


class Archiver(TaskSteps):
    def __init__(
        self,
        ledger: Ledger,
        queue: WorkQueue,
        store: Store,
        fetchers: Mapping[str, Fetcher],
        *,
        clock: Clock,
        lease_for: timedelta = timedelta(seconds=60),
        retry: RetryPolicy | None = None,
        rng: Callable[[], float] = random.random,
        idle_poll: float = 0.5,
        metrics: Metrics | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ledger = ledger
        self.queue = queue
        self.store = store
        self.fetchers = fetchers
        self.clock = clock
        self.lease_for = lease_for
        self.retry = retry or RetryPolicy()
        self.rng = rng
        self.idle_poll = idle_poll
        self.metrics = metrics or Metrics()
        self.monotonic = monotonic
        self.wake = asyncio.Event()  # set by the ingress when it queues work in this process
        self.owner_prefix = f"worker-{uuid.uuid4().hex[:8]}"
        self.partials = PartialCopies()  # cut slow copies, held for their next lease

    async def run(self, concurrency: int) -> None:
        """Run `concurrency` copy loops until cancelled."""
        async with asyncio.TaskGroup() as group:
            for i in range(concurrency):
                group.create_task(self._loop(f"{self.owner_prefix}-{i}"))

    async def _loop(self, owner: str) -> None:
        """One copy slot: lease, copy, record; then the next lease while the last task's
        manifest and ack (its tail, see `steps.release_slot`) finish beside the next copy.

        At most one tail per slot is unfinished: the next copy's tail waits for it. A tail cut
        short by a stop or a crash leaves its lease to lapse; the task comes back to exactly
        the missing steps (the asset is recorded as archived, so nothing is copied again).
        """
        tail: asyncio.Task[bool] | None = None
        try:
            while True:
                freed = asyncio.Event()
                token = COPY_SLOT.set(freed)  # the task's context is copied at its creation
                try:
                    task = asyncio.create_task(self._run_logged(owner))
                finally:
                    COPY_SLOT.reset(token)
                released = asyncio.create_task(freed.wait())
                try:
                    await asyncio.wait({task, released}, return_when=asyncio.FIRST_COMPLETED)
                except asyncio.CancelledError:
                    released.cancel()
                    await _cancel_all(task, tail)
                    raise
                released.cancel()
                if tail is not None:
                    await _finish_tail(tail, task)
                if task.done():
                    tail, worked = None, task.result()
                else:  # its copy is recorded; its manifest and ack run beside the next copy
                    tail, worked = task, True
                if not worked:
                    self.wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.wake.wait(), self.idle_poll)
        finally:
            if tail is not None:
                await _cancel_all(tail)

    async def _run_logged(self, owner: str) -> bool:
        try:
            return await self.run_once(owner)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The loop must survive anything: the lease will expire and the task come back.
            log.exception("archive_loop_error", owner=owner)
            return False

    async def run_once(self, owner: str | None = None) -> bool:
        """Lease and process one task; False when nothing was due."""
        lease = await self.queue.lease(owner or self.owner_prefix, self.clock(), self.lease_for)
        if lease is None:
            return False
        structlog.contextvars.bind_contextvars(
            provider=lease.provider, job_id=lease.job_id, asset=lease.n, attempt=lease.attempt
        )
        try:
            # The webhook's trace, carried by the task across the queue (receiver.tracing).
            with tracing.job_span(
                "receiver.archive",
                lease.traceparent,
                provider=lease.provider,
                job_id=lease.job_id,
                asset=lease.n,
                attempt=lease.attempt,
            ):
                await self._process(lease)
        finally:
            structlog.contextvars.clear_contextvars()
        return True

    async def _process(self, lease: Lease) -> None:
        if lease.n == MANIFEST_TASK:
            await self._failed_job_manifest(lease)
            return
        asset = await self.ledger.asset_to_copy(lease.provider, lease.job_id, lease.n)
        if asset is None:
            log.error("archive_task_without_asset")
            await self.queue.dead_letter(lease, "no such asset in the ledger")
            return
        if asset.state != "pending":
            # Copied (or ended) by an earlier attempt that died before its ack: finish that
            # attempt's remaining steps only.
            await self._finish(lease, asset, archived=asset.state == "archived")
            return
        attempt = _Attempt(lease, self.partials.take(asset.key))
        held = attempt.partial.size
        try:
            await self._attempt(attempt, asset, held)
        finally:
            if not self.partials.holds(attempt.partial):
                attempt.partial.close()  # archived, ended, or failed: nothing to resume

    async def _attempt(self, attempt: _Attempt, asset: AssetToCopy, held: int) -> None:
        lease = attempt.lease
        heartbeat = asyncio.create_task(self._heartbeat(attempt))
        started = time.perf_counter()
        try:
            result = await self._copy_until_answered(attempt, asset)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        if attempt.lost.is_set():
            # Another worker holds the task now; whatever our put answered is theirs to see (a
            # completed put makes theirs answer ObjectExists with the same digest).
            log.warning("archive_lease_lost", answer=type(result).__name__)
            return
        if attempt.too_slow and await self._give_slot_up(attempt, asset, held):
            return
        if isinstance(result, ArchivedAsset):
            await self._archived(lease, asset, result, started)
        elif isinstance(result, ObjectExists):
            await self._exists(lease, asset, result, started)
        elif isinstance(result, FetchError):
            await self._failed(lease, asset, result.reason, result)
        elif isinstance(result, ValueError):
            # The store refused the key or metadata before any I/O: no retry can change that.
            await self._end(lease, JobState.DEAD, f"refused by the store: {result}", "copy")
        else:
            await self._failed(lease, asset, f"{type(result).__name__}: {result}", None)

    async def _give_slot_up(self, attempt: _Attempt, asset: AssetToCopy, held: int) -> bool:
        """A copy cut for slowness: keep its bytes and requeue it if it made progress in time.

        False when it made none (or cannot resume) or its deadline passed: then the cut is an
        ordinary failed attempt.
        """
        partial = attempt.partial
        if not partial.holding or partial.size <= held or self.clock() >= asset.deadline:
            return False
        of = f" of {partial.total}" if partial.total is not None else ""
        note = (
            f"source too slow: {partial.size - held} bytes this time, {partial.size}{of} held; "
            "resumes after the tasks waiting now"
        )
        self.partials.keep(partial)
        try:
            await self.queue.requeue(attempt.lease, note)
        except Exception:
            # The lease lapses and the task comes back anyway (counted: the queue could not
            # be told otherwise); the held bytes still serve it in this process.
            log.warning("archive_requeue_failed", exc_info=True)
            return True
        self.metrics.slow_copies_resumable.inc()
        log.info("archive_slow_copy_requeued", held=partial.size, this_time=partial.size - held)
        return True

    # -- the copy -------------------------------------------------------------------------------

    async def _copy_until_answered(
        self, attempt: _Attempt, asset: AssetToCopy
    ) -> ArchivedAsset | Exception:
        """Copy until the source or the store gives an answer; store outages are waited out."""
        while True:
            guard = CopyGuard(
                min_bytes_per_second=self.retry.min_bytes_per_second,
                window=self.retry.slow_window,
                monotonic=self.monotonic,
            )
            attempt.guard = guard
            if attempt.lost.is_set():
                guard.stop("lease lost")
            copy = attempt.copy = asyncio.create_task(self._copy(asset, guard, attempt.partial))
            try:
                # asyncio.wait, unlike awaiting the task, does not cancel it if we are cancelled.
                await asyncio.wait({copy})
            except asyncio.CancelledError:
                await self._stop_copy(attempt, guard, copy)
                raise
            finally:
                attempt.guard = None
                attempt.copy = None
            result: ArchivedAsset | Exception
            if copy.cancelled():  # cut before the store began reading (see _Attempt.cut)
                result = CopyCut(guard.stopped or "copy cancelled")
            else:
                try:
                    result = copy.result()
                except Exception as exc:
                    result = exc
            attempt.too_slow = guard.too_slow
            if guard.too_slow:
                self.metrics.slow_copies_cut.inc()
            if isinstance(result, ArchivedAsset):
                self.metrics.store_up.set(1)
                return result
            if not _is_outage(result) or attempt.lost.is_set():
                return result
            try:
                waited = await self._wait_for_store(attempt, asset, result)
            except asyncio.CancelledError:
                # Stopping while the store is away: give the task back now, as for a copy.
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await self.queue.retry(
                        attempt.lease, self.clock(), "worker stopped before finishing"
                    )
                raise
            if not waited:
                return result

    async def _stop_copy(
        self, attempt: _Attempt, guard: CopyGuard, copy: asyncio.Task[ArchivedAsset]
    ) -> None:
        """Stopping (deploy, SIGTERM): cut the source, let the put clean up, give the task back."""
        attempt.cut("worker stopped before finishing")
        with anyio.CancelScope(shield=True):
            await asyncio.wait({copy}, timeout=STOP_GRACE_SECONDS)
            if not copy.done():
                copy.cancel()
                await asyncio.wait({copy})
            if not copy.cancelled():
                copy.exception()  # retrieved: the cancellation is what our caller sees
            if not attempt.lost.is_set():
                with contextlib.suppress(Exception):
                    await self.queue.retry(
                        attempt.lease, self.clock(), "worker stopped before finishing"
                    )

    async def _wait_for_store(
        self, attempt: _Attempt, asset: AssetToCopy, error: Exception
    ) -> bool:
        """Wait for an unreachable store while keeping the task; False to count it as a failure.

        The failure is counted when the store answers its probe (the put failed for a reason of
        this object's own), when the task's deadline has passed, or when the lease is lost.
        """
        delay = self.retry.store_wait_first
        first = True
        while True:
            try:
                await self.store.ping()
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                self.metrics.store_up.set(1)
                if first:
                    return False
                log.info("archive_store_back")
                return True
            self.metrics.store_up.set(0)
            if self.clock() >= asset.deadline:
                log.warning("archive_store_outage_past_deadline", error=problem)
                return False
            if first:
                log.warning("archive_store_unreachable", error=problem, put_error=str(error))
            self.metrics.store_outage_waits.inc()
            first = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(attempt.lost.wait(), delay)
            if attempt.lost.is_set():
                return False
            delay = min(delay * 2, self.retry.store_wait_max)

    async def _heartbeat(self, attempt: _Attempt) -> None:
        interval = self.lease_for.total_seconds() / 3
        while True:
            await asyncio.sleep(interval)
            try:
                kept = await self.queue.heartbeat(attempt.lease, self.clock(), self.lease_for)
            except Exception:
                # The queue did not answer: the lease may still be ours; try again next beat.
                log.warning("archive_heartbeat_failed", exc_info=True)
                continue
            if not kept:
                attempt.lose()
                return

    async def _copy(self, asset: AssetToCopy, guard: CopyGuard, partial: Partial) -> ArchivedAsset:
        fetcher = self.fetchers[asset.provider]
        # One span for the copy: the download (httpx's span) streams into the put (ours, and
        # botocore's for S3) inside it.
        with tracing.span("receiver.copy", provider=asset.provider, key=asset.key) as copy_span:
            async with fetcher.open(asset.url, partial.resume_from()) as download:
                partial.bind(download)
                copy_span.set_attribute("receiver.source_host", download.source_host)
                if download.offset:
                    copy_span.set_attribute("receiver.resumed_at", download.offset)
                    log.info("archive_copy_resumed", offset=download.offset)
                stored = await self._store(asset, download, guard, partial)
            copy_span.set_attribute("receiver.size", stored.size)
        return ArchivedAsset(
            uri=stored.uri,
            key=stored.key,
            size=stored.size,
            sha256=stored.sha256,
            content_type=stored.content_type,
        )

    async def _store(
        self, asset: AssetToCopy, download: Download, guard: CopyGuard, partial: Partial
    ) -> StoredObject:
        content_type = (
            asset.content_type or _media_type(download.content_type) or CONTENT_TYPE_FALLBACK
        )
        metadata = {
            "provider": asset.provider,
            "job-id": _ascii(asset.job_id),
            "job-type": _ascii(asset.job_type or ""),
            "archived-at": self.clock().isoformat(),
            "source-host": download.source_host,
            "source-name": _ascii(source_name(asset.url)),  # the key may hold a fitted name
        }
        with tracing.span("receiver.store", key=asset.key) as store_span:
            stored = await self.store.put_stream(
                asset.key,
                partial.stream(download, guard),
                content_type=content_type,
                metadata=metadata,
            )
            store_span.set_attribute("receiver.sha256", stored.sha256)
        return stored


async def _cancel_all(*tasks: asyncio.Task[bool] | None) -> None:
    """Cancel `tasks` and wait for each to wind down (a copy gives its task back, see
    `_stop_copy`), even if we are cancelled again meanwhile."""
    running = [t for t in tasks if t is not None and not t.done()]
    for task in running:
        task.cancel()
    if running:
        with anyio.CancelScope(shield=True):
            await asyncio.wait(running)


async def _finish_tail(tail: asyncio.Task[bool], current: asyncio.Task[bool]) -> None:
    """Wait for the previous task's tail; if we are cancelled meanwhile, stop both."""
    try:
        await asyncio.wait({tail})
    except asyncio.CancelledError:
        await _cancel_all(current, tail)
        raise


def _is_outage(result: object) -> bool:
    """A store failure that may be the store being unreachable (probed before waiting)."""
    if isinstance(result, ObjectExists | ObjectMissing):
        return False
    return isinstance(result, StoreError | ConnectionError | TimeoutError)


def _media_type(value: str | None) -> str | None:
    return value.split(";", 1)[0].strip() or None if value else None


def _ascii(value: str) -> str:
    """S3 user metadata is US-ASCII: keep printable ASCII, escape the rest."""
    return "".join(c if 32 <= ord(c) < 127 else f"%{ord(c):02X}" for c in value)[:256]
