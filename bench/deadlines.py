"""Deadline ordering: deadline misses on one backlog, receiver's scheduler against FIFO.

A simulated outage: ``JOBS`` (300) completed jobs arrive over 30 minutes, in random order, with
mixed windows: Apex outputs (24 h from completion), Fliki outputs (3 h from receipt) and Apex
outputs whose signed link carries its own 1-hour expiry (``X-Amz-Date`` + ``X-Amz-Expires``).
Two workers copy them; a copy takes 10 s (images) to 3 minutes (videos), so the backlog holds
about 2.5 hours of work. Time is simulated (receiver's clocks are injected), so this measures
ordering, not speed, and gives the same answer on any machine.

receiver: the real ingest path and the real SQLite queue (``Ingestor.ingest``, then
``SqliteQueue.lease`` / ``ack``) in a temporary database; workers take whatever the queue hands
out. FIFO: the same jobs, the same deadlines (receiver's own ``plan_outputs``), copied in
arrival order. A miss is a copy finishing after its deadline (which already keeps receiver's
default 10-minute safety margin).
"""

from __future__ import annotations

import asyncio
import heapq
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from bench._common import workdir
from receiver.app import build_parts
from receiver.domain import EventKind, JobEvent, Output
from receiver.ingest.record import plan_outputs
from receiver.providers import REGISTRY
from receiver.settings import Settings

JOBS = 300
WORKERS = 2
ARRIVALS = timedelta(minutes=30)
MARGIN = timedelta(seconds=600)  # RECEIVER_DEADLINE_MARGIN_SECONDS' default
START = datetime(2026, 3, 16, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Job:
    arrival: datetime
    event: JobEvent
    duration: timedelta


@dataclass
class DeadlineResult:
    jobs: int
    workers: int
    receiver_misses: int
    fifo_misses: int


def backlog(seed: int = 7) -> list[Job]:
    rng = random.Random(seed)
    jobs = []
    for i in range(JOBS):
        arrival = START + ARRIVALS * rng.random()
        kind = rng.choice(("apex", "fliki", "apex-signed"))
        video = rng.random() < 0.6
        name = "output.mp4" if video else "output.png"
        url = f"https://cdn.useapexstudio.com/outputs/{i}/{name}"
        if kind == "apex-signed":
            url += f"?X-Amz-Date={arrival:%Y%m%dT%H%M%SZ}&X-Amz-Expires=3600&X-Amz-Signature=x"
        provider = "fliki" if kind == "fliki" else "apex"
        event = JobEvent(
            provider=provider,
            job_id=f"job-{i}",
            kind=EventKind.COMPLETED,
            job_type="video" if video else "image",
            outputs=(Output(url, name, "video/mp4" if video else "image/png"),),
            completed_at=arrival if provider == "apex" else None,
        )
        seconds = rng.uniform(60, 180) if video else 10
        jobs.append(Job(arrival, event, timedelta(seconds=seconds)))
    jobs.sort(key=lambda job: job.arrival)
    return jobs


def _deadline(job: Job) -> datetime:
    (planned,) = plan_outputs(job.event, REGISTRY[job.event.provider], job.arrival, MARGIN)
    return planned.deadline


def fifo(jobs: list[Job]) -> int:
    free = [START] * WORKERS
    misses = 0
    for job in jobs:  # already in arrival order
        start = max(heapq.heappop(free), job.arrival)
        done = start + job.duration
        heapq.heappush(free, done)
        misses += done > _deadline(job)
    return misses


async def _receiver(jobs: list[Job]) -> int:
    received_at = START  # the ingest clock: a job is recorded at its arrival
    with workdir() as tmp:
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            ledger_url=f"sqlite:///{tmp / 'deadlines.db'}",
            archive_url=f"file://{tmp / 'archive'}",
            deadline_margin_seconds=int(MARGIN.total_seconds()),
            log_format="json",
            log_level="warning",
        )
        parts = build_parts(settings, clock=lambda: received_at)
        parts.db.start()
        try:
            by_id = {job.event.job_id: job for job in jobs}
            pending = list(jobs)  # arrival order
            free = [START] * WORKERS
            misses = 0
            for _ in jobs:
                now = heapq.heappop(free)
                # Everything that arrived by now is in the queue; an idle worker waits for more.
                if not pending or pending[0].arrival > now:
                    now = max(now, pending[0].arrival) if pending else now
                while pending and pending[0].arrival <= now:
                    arrived = pending.pop(0)
                    received_at = arrived.arrival
                    await parts.ingestor.ingest(
                        arrived.event, body=b"{}", source="webhook", auth="bench", delivery_id=None
                    )
                lease = await parts.queue.lease("bench", now, timedelta(days=7))
                assert lease is not None
                job = by_id[lease.job_id]
                done = now + job.duration
                misses += done > lease.deadline
                await parts.queue.ack(lease)
                heapq.heappush(free, done)
            return misses
        finally:
            await parts.stop()


def run() -> DeadlineResult:
    jobs = backlog()
    return DeadlineResult(JOBS, WORKERS, asyncio.run(_receiver(jobs)), fifo(jobs))
