"""Archive workers: lease the most urgent task, copy its output into the store, record the result.

One copy: read the current link from the ledger → guarded, streamed download → store (SHA-256
on the way) → `ledger.mark_archived` → manifest beside the asset → ack. A crash anywhere before
the ack leaves the lease to expire and the task to come back; keys are deterministic, so the
retry overwrites the same object, and an asset already marked archived is not copied again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import structlog

from receiver.archive.fetch import Fetcher, FetchError, SourceGone
from receiver.archive.manifest import build_manifest, encode, manifest_key
from receiver.domain import Clock, JobState, backoff_delay, signed_url_expiry
from receiver.ledger import ArchivedAsset, AssetToCopy, Ledger
from receiver.metrics import Metrics
from receiver.store import ObjectMissing, Store
from receiver.workqueue import Lease, WorkQueue

log = structlog.get_logger(__name__)

CONTENT_TYPE_FALLBACK = "application/octet-stream"


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8
    base_delay: float = 5.0
    max_delay: float = 900.0
    max_retry_after: float = 3600.0  # a provider asking for more than this is capped


class Archiver:
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
        self.wake = asyncio.Event()  # set by the ingress when it queues work in this process
        self.owner_prefix = f"worker-{uuid.uuid4().hex[:8]}"

    async def run(self, concurrency: int) -> None:
        """Run `concurrency` copy loops until cancelled."""
        async with asyncio.TaskGroup() as group:
            for i in range(concurrency):
                group.create_task(self._loop(f"{self.owner_prefix}-{i}"))

    async def _loop(self, owner: str) -> None:
        while True:
            try:
                worked = await self.run_once(owner)
            except asyncio.CancelledError:
                raise
            except Exception:
                # The loop must survive anything: the lease will expire and the task come back.
                log.exception("archive_loop_error", owner=owner)
                worked = False
            if not worked:
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), self.idle_poll)

    async def run_once(self, owner: str | None = None) -> bool:
        """Lease and process one task; False when nothing was due."""
        lease = await self.queue.lease(owner or self.owner_prefix, self.clock(), self.lease_for)
        if lease is None:
            return False
        structlog.contextvars.bind_contextvars(
            provider=lease.provider, job_id=lease.job_id, asset=lease.n, attempt=lease.attempt
        )
        try:
            await self._process(lease)
        finally:
            structlog.contextvars.clear_contextvars()
        return True

    async def _process(self, lease: Lease) -> None:
        asset = await self.ledger.asset_to_copy(lease.provider, lease.job_id, lease.n)
        if asset is None:
            log.error("archive_task_without_asset")
            await self.queue.dead_letter(lease, "no such asset in the ledger")
            return
        if asset.state != "pending":
            # Copied (or ended) by an earlier attempt that died before its ack: finish that
            # attempt's remaining steps only.
            if asset.state == "archived":
                await self._write_manifest(asset)
            await self.queue.ack(lease)
            return
        started = time.perf_counter()
        heartbeat = asyncio.create_task(self._heartbeat(lease))
        copy = asyncio.create_task(self._copy(asset))
        try:
            done, _ = await asyncio.wait({heartbeat, copy}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # Stopping (deploy, SIGTERM): let the copy clean up (abort its upload), then give
            # the task back now instead of when its lease lapses.
            heartbeat.cancel()
            copy.cancel()
            await asyncio.gather(heartbeat, copy, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.queue.retry(lease, self.clock(), "worker stopped before finishing")
            raise
        if heartbeat in done:
            # We lost the lease (another worker took the task over): stop copying, keep quiet.
            copy.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await copy
            log.warning("archive_lease_lost")
            return
        heartbeat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heartbeat
        try:
            stored = copy.result()
        except FetchError as exc:
            await self._failed(lease, asset, exc.reason, exc)
            return
        except Exception as exc:
            await self._failed(lease, asset, f"{type(exc).__name__}: {exc}", None)
            return
        now = self.clock()
        await self.ledger.mark_archived(lease.provider, lease.job_id, lease.n, stored, now)
        await self._write_manifest(asset)
        await self.queue.ack(lease)
        slack = (asset.deadline - now).total_seconds()
        self.metrics.archived_objects.inc()
        self.metrics.archived_bytes.inc(stored.size)
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

    async def _heartbeat(self, lease: Lease) -> None:
        interval = self.lease_for.total_seconds() / 3
        while True:
            await asyncio.sleep(interval)
            if not await self.queue.heartbeat(lease, self.clock(), self.lease_for):
                return

    async def _copy(self, asset: AssetToCopy) -> ArchivedAsset:
        fetcher = self.fetchers[asset.provider]
        async with fetcher.open(asset.url) as download:
            content_type = (
                asset.content_type or _media_type(download.content_type) or CONTENT_TYPE_FALLBACK
            )
            metadata = {
                "provider": asset.provider,
                "job-id": _ascii(asset.job_id),
                "job-type": _ascii(asset.job_type or ""),
                "archived-at": self.clock().isoformat(),
                "source-host": download.source_host,
            }
            stored = await self.store.put_stream(
                asset.key, download.iter_bytes(), content_type=content_type, metadata=metadata
            )
        return ArchivedAsset(
            uri=stored.uri,
            key=stored.key,
            size=stored.size,
            sha256=stored.sha256,
            content_type=stored.content_type,
        )

    async def _failed(
        self, lease: Lease, asset: AssetToCopy, reason: str, exc: FetchError | None
    ) -> None:
        now = self.clock()
        answer = f"{reason} (HTTP {exc.status}, {exc.code})" if exc and exc.status else reason
        if isinstance(exc, SourceGone):
            link_expiry = signed_url_expiry(asset.url)
            link_dead = link_expiry is not None and now >= link_expiry
            if now >= asset.deadline or link_dead or lease.attempt >= self.retry.max_attempts:
                await self._end(lease, JobState.EXPIRED, f"expired: {answer}")
                self.metrics.expired.inc()
                return
        elif exc is not None and not exc.retryable:
            # Refused by the guard, or a permanent answer: retrying cannot help.
            await self._end(lease, JobState.DEAD, answer)
            return
        if lease.attempt >= self.retry.max_attempts:
            await self._end(
                lease, JobState.DEAD, f"gave up after {lease.attempt} attempts: {answer}"
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

    async def _end(self, lease: Lease, state: JobState, reason: str) -> None:
        await self.ledger.mark_asset_ended(
            lease.provider, lease.job_id, lease.n, state, reason, self.clock()
        )
        await self.queue.dead_letter(lease, reason)
        if state is JobState.DEAD:
            self.metrics.dead_letters.inc()
        log.warning("archive_ended", state=state.value, error=reason)

    async def _write_manifest(self, asset: AssetToCopy) -> None:
        job = await self.ledger.job(asset.provider, asset.job_id)
        if job is None:
            return
        key = manifest_key(asset.key)
        # Payloads the ledger no longer keeps (retention) stay as the manifest had them.
        previous = (
            await _read_json(self.store, key)
            if any(d.payload_removed for d in job.deliveries)
            else None
        )
        await self.store.put_bytes(
            key, encode(build_manifest(job, previous)), content_type="application/json"
        )


async def _read_json(store: Store, key: str) -> dict[str, Any] | None:
    try:
        value = json.loads(b"".join([chunk async for chunk in store.read(key)]))
    except (ObjectMissing, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _media_type(value: str | None) -> str | None:
    return value.split(";", 1)[0].strip() or None if value else None


def _ascii(value: str) -> str:
    """S3 user metadata is US-ASCII: keep printable ASCII, escape the rest."""
    return "".join(c if 32 <= ord(c) < 127 else f"%{ord(c):02X}" for c in value)[:256]
