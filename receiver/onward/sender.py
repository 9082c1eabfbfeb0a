"""The onward sender: claims due sends per endpoint, tries each once, records what happened.

At least once: a send is claimed with a lease (`claim_sends`), tried, then recorded
(`finish_send`). A sender that dies between the try and the record leaves the lease to lapse,
and a sender claims the send again: the application may see an event id twice, always with
the same bytes, and deduplicates on `webhook-id`. What each answer means:

- 2xx: delivered.
- 408, 409, 425, 429, 5xx, a timeout or a refused connection: tried again after the retry
  schedule's next delay (with jitter), or later if a 429/503 says `Retry-After`; once the
  schedule is used up the send is `failed` (exhausted: replay opens it again).
- any other 4xx, or a 3xx (redirects are not followed): `failed` at once: the endpoint said it
  will not take it, and retrying the same bytes cannot change that.

An endpoint whose last few attempts all failed shows as failing (metrics, doctor, console); it
is never disabled: its sends keep their schedule, and the first success clears it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

from receiver.domain import Clock
from receiver.ledger.events import EventOutbox, Outcome, PendingSend, SendAttempt
from receiver.metrics import Metrics
from receiver.onward import Answer, Destination
from receiver.tracing import job_span

log = structlog.get_logger(__name__)

#: Statuses worth another try (RFC 9110's "try again" answers and every server error).
RETRY_STATUSES = frozenset({408, 409, 425, 429})


def outcome_of(answer: Answer) -> Outcome:
    """The one reading of an answer: delivered, worth a retry, or final for the series."""
    if answer.status is None:
        return "retry"
    if 200 <= answer.status < 300:
        return "delivered"
    if answer.status in RETRY_STATUSES or answer.status >= 500:
        return "retry"
    return "failed"


@dataclass(frozen=True)
class RetrySchedule:
    """Seconds before each retry after the first try (Svix's by default); jittered by up to
    `jitter` of each delay so that a recovered endpoint is not hit by every sender at once."""

    delays: tuple[float, ...]
    jitter: float = 0.1
    max_retry_after: float = 6 * 3600.0  # a Retry-After beyond this is capped, not obeyed

    def next_at(
        self, tries: int, now: datetime, rng: Callable[[], float], retry_after: float | None
    ) -> datetime | None:
        """When try number `tries + 1` is due after `tries` tries failed (None: exhausted)."""
        if tries > len(self.delays):
            return None
        delay = self.delays[tries - 1] * (1 + self.jitter * (2 * rng() - 1))
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_retry_after))
        return now + timedelta(seconds=max(0.0, delay))


class Sender:
    def __init__(
        self,
        outbox: EventOutbox,
        destinations: Mapping[str, Destination],
        schedule: RetrySchedule,
        *,
        clock: Clock,
        concurrency: int = 4,
        lease: timedelta = timedelta(seconds=60),
        poll_interval: float = 0.5,
        status_interval: float = 10.0,
        rng: Callable[[], float] = random.random,
        metrics: Metrics | None = None,
    ) -> None:
        self.outbox = outbox
        self.destinations = dict(destinations)
        self.schedule = schedule
        self.clock = clock
        self.concurrency = concurrency
        self.lease = lease
        self.poll_interval = poll_interval
        self.status_interval = status_interval
        self.rng = rng
        self.metrics = metrics
        self.owner = f"onward-{uuid.uuid4().hex[:12]}"
        self.wake = asyncio.Event()  # set by whoever wrote new events (the archiver, ingest)
        self._in_flight: dict[str, set[asyncio.Task[None]]] = {n: set() for n in destinations}

    async def run(self) -> None:
        """Claim and send until cancelled; refresh the onward gauges on the way."""
        if not self.destinations:
            return
        status = asyncio.create_task(self._refresh_status())
        try:
            while True:
                try:
                    claimed = await self.send_due()
                except Exception as exc:  # the ledger is away: wait and try again
                    log.warning("onward_claim_failed", error=str(exc))
                    claimed = 0
                if not claimed:
                    self.wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.wake.wait(), self.poll_interval)
        finally:
            status.cancel()
            for tasks in self._in_flight.values():
                for task in tasks:
                    task.cancel()
            await asyncio.gather(
                status, *(t for ts in self._in_flight.values() for t in ts), return_exceptions=True
            )

    async def send_due(self) -> int:
        """Claim what each endpoint has room for and start sending it; how many were claimed."""
        claimed = 0
        for name in self.destinations:
            room = self.concurrency - len(self._in_flight[name])
            if room <= 0:
                continue
            sends = await self.outbox.claim_sends(name, self.owner, self.clock(), self.lease, room)
            claimed += len(sends)
            for send in sends:
                task = asyncio.create_task(self.deliver(send))
                self._in_flight[name].add(task)
                task.add_done_callback(self._in_flight[name].discard)
                # A slot is free again, and a job's next event may be due now: claim at once
                # instead of waiting out the poll interval.
                task.add_done_callback(lambda _: self.wake.set())
        return claimed

    async def drain(self) -> None:
        """Send everything due now and wait for it (tests, `receiver events replay --now`)."""
        while await self.send_due() or any(self._in_flight.values()):
            await asyncio.gather(*(t for ts in self._in_flight.values() for t in ts))

    async def deliver(self, send: PendingSend) -> None:
        """One try of `send`, recorded; never raises (a failure to record lets the lease lapse,
        and the send comes back)."""
        destination = self.destinations[send.endpoint]
        with job_span(
            "receiver.onward.deliver",
            send.traceparent,
            provider=send.provider,
            job_id=send.job_id,
            endpoint=send.endpoint,
            event_type=send.type,
        ):
            started = time.monotonic()
            try:
                answer = await destination.send(send)
            except Exception as exc:  # a destination bug must not stop the sender
                answer = Answer(None, error=f"{type(exc).__name__}: {exc}")
            duration = (time.monotonic() - started) * 1000
        now = self.clock()
        outcome = outcome_of(answer)
        next_at, error = None, answer.error
        if outcome == "retry":
            tries = send.attempts + 1
            next_at = self.schedule.next_at(tries, now, self.rng, answer.retry_after)
            if next_at is None:
                outcome, error = "failed", f"{error}; gave up after {tries} tries"
        attempt = SendAttempt(
            at=now,
            outcome=outcome,
            status=answer.status,
            duration_ms=round(duration, 3),
            response=answer.response,
            error=error,
        )
        try:
            await self.outbox.finish_send(send, self.owner, attempt, next_at)
        except Exception as exc:
            log.warning("onward_record_failed", event_id=send.event_id, error=str(exc))
            return
        if self.metrics is not None:
            self.metrics.onward_attempts.labels(send.endpoint, outcome).inc()
        log.info(
            "onward_attempt",
            event_id=send.event_id,
            endpoint=send.endpoint,
            type=send.type,
            outcome=outcome,
            status=answer.status,
            error=answer.error,
        )

    async def _refresh_status(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.refresh_metrics()
            await asyncio.sleep(self.status_interval)

    async def refresh_metrics(self) -> None:
        if self.metrics is None:
            return
        now = self.clock()
        status = await self.outbox.onward_status(now)
        self.metrics.onward_pending.set(status.pending)
        oldest = status.oldest_pending_at
        self.metrics.onward_oldest_undelivered.set(
            max(0.0, (now - oldest).total_seconds()) if oldest else 0.0
        )
        for health in status.endpoints:
            self.metrics.onward_endpoint_up.labels(health.name).set(0 if health.failing else 1)

    async def aclose(self) -> None:
        for destination in self.destinations.values():
            await destination.aclose()
