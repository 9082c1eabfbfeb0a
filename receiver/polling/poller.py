"""The poller: follow tracked jobs through their providers' status APIs, within rate budgets.

Each tick, per provider: pick the jobs that are due (most overdue first), as many as the
provider's budget allows right now; skip jobs a webhook has already settled (then there is
nothing to poll: reconciliation found the webhook came); claim the rest (so a second poller
process skips them) and ask the status API. A final answer (completed or failed) goes through
`Ingestor.ingest`, the webhook's own path: same idempotency, same deadlines, same archive tasks,
and whichever of webhook and poll comes second is recorded as a duplicate. Anything else
reschedules the job with exponential backoff and jitter.

Budgets: a sliding window per provider (at most N calls in any W seconds, below the documented
limit), narrowed further by the provider's `X-RateLimit-Remaining`/`-Reset` headers and paused
by 429 `Retry-After`. A 401/402/403 stops polling that provider (every job records why, one
error is logged) until the next start, instead of hammering it with a bad key. Malformed answers
never crash the loop: the job keeps its place, records the error and is retried later.

Time and randomness are injected; tests drive `tick()` with a fake clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import httpx
import structlog

from receiver import tracing
from receiver.domain import Clock, EventKind, JobState, backoff_delay
from receiver.ingest.record import Ingestor
from receiver.metrics import Metrics
from receiver.polling.schedule import StopReason, TrackedJob, Tracker
from receiver.polling.status import PollOutcome, PollResult, RateHeaders, StatusClient
from receiver.providers.base import ProviderSpec, RateBudget
from receiver.settings import Settings

log = structlog.get_logger(__name__)

# A job whose ledger state is one of these still needs the provider's answer.
OPEN_STATES = frozenset({JobState.TRACKING.value, JobState.PROCESSING.value})
MAX_PAUSE = 3600.0  # a provider asking us to wait longer than this is capped (and re-asked)
MAX_IDLE = 2.0  # look for new registrations (maybe from another process) at least this often
MIN_WAIT = 0.01


class RateLimiter:
    """At most `budget.requests` calls in any `budget.per_seconds` window, plus pauses.

    Times are unix seconds from the injected clock. The provider's own `X-RateLimit-*` headers
    narrow the window further: when it says N remain until reset, we send at most N.
    """

    def __init__(self, budget: RateBudget) -> None:
        self.budget = budget
        self.sent: deque[float] = deque()
        self.paused_until = 0.0
        self.server_remaining: int | None = None
        self.server_reset = 0.0
        self.consecutive_429 = 0

    def _trim(self, now: float) -> None:
        while self.sent and self.sent[0] <= now - self.budget.per_seconds:
            self.sent.popleft()

    def available(self, now: float) -> int:
        if now < self.paused_until:
            return 0
        self._trim(now)
        free = self.budget.requests - len(self.sent)
        if self.server_remaining is not None and now < self.server_reset:
            free = min(free, self.server_remaining)
        return max(0, free)

    def acquire(self, now: float) -> bool:
        if self.available(now) <= 0:
            return False
        self.sent.append(now)
        if self.server_remaining is not None and now < self.server_reset:
            self.server_remaining -= 1
        return True

    def next_free(self, now: float) -> float:
        """The earliest time `available` can be positive."""
        if self.available(now) > 0:
            return now
        candidates = [self.paused_until]
        if len(self.sent) >= self.budget.requests:
            candidates.append(
                self.sent[len(self.sent) - self.budget.requests] + self.budget.per_seconds
            )
        if self.server_remaining is not None and self.server_remaining <= 0:
            candidates.append(self.server_reset)
        return max(now, *candidates)

    def pause(self, until: float) -> None:
        self.paused_until = max(self.paused_until, until)

    def observe(self, rate: RateHeaders, now: float) -> None:
        """Take the provider's view of our remaining budget into account."""
        if rate.remaining is None or rate.reset is None:
            return
        reset = rate.reset
        if reset < 1e9:  # a delta in seconds rather than a unix time: accept both
            reset = now + reset
        reset = min(reset, now + MAX_PAUSE)
        if reset <= now:
            return
        self.server_remaining = max(0, rate.remaining)
        self.server_reset = reset


@dataclass(frozen=True)
class Problem:
    reason: str  # StopReason.AUTH | StopReason.CONFIG
    message: str


class Poller:
    def __init__(
        self,
        tracked: Tracker,
        ingestor: Ingestor,
        settings: Settings,
        specs: Mapping[str, ProviderSpec],
        *,
        clock: Clock,
        rng: Callable[[], float] = random.random,
        http: httpx.AsyncClient | None = None,
        budgets: Mapping[str, RateBudget] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.tracked = tracked
        self.ingestor = ingestor
        self.settings = settings
        self.clock = clock
        self.rng = rng
        self._own_http = http is None
        self.http = http or httpx.AsyncClient(
            timeout=settings.poll_timeout_seconds, follow_redirects=False
        )
        # What polls recorded is counted by the ingestor (receiver_deliveries_total{source="poll"}).
        self.metrics = metrics or Metrics()
        self.wake = asyncio.Event()
        self.clients: dict[str, StatusClient] = {}
        self.limiters: dict[str, RateLimiter] = {}
        self.problems: dict[str, Problem] = {}
        # Providers that have answered us with anything but an auth error since start. Until
        # one has, it gets one call per tick: a bad key costs one refused call, not a burst.
        self.verified: set[str] = set()
        self._semaphore = asyncio.Semaphore(settings.poll_concurrency)
        for name, spec in specs.items():
            if spec.status_api is None:
                continue
            budget = (budgets or {}).get(name, spec.status_api.budget)
            self.limiters[name] = RateLimiter(budget)
            config = settings.provider(name)
            upper = name.upper()
            base_url = config.base_url or (
                None if spec.status_api.base_url_is_placeholder else spec.default_base_url
            )
            if config.api_key is None:
                self.problems[name] = Problem(
                    StopReason.CONFIG,
                    f"RECEIVER_{upper}_API_KEY is not set: set it and restart receiver to poll "
                    f"{name} jobs",
                )
            elif base_url is None:
                self.problems[name] = Problem(
                    StopReason.CONFIG,
                    f"RECEIVER_{upper}_BASE_URL is not set ({name}'s documented base URL is a "
                    "placeholder): set it and restart receiver",
                )
            else:
                self.clients[name] = StatusClient(
                    spec,
                    base_url=base_url,
                    api_key=config.api_key,
                    http=self.http,
                    wall_clock=lambda: self.clock().timestamp(),
                )

    def problem(self, provider: str) -> str | None:
        """Why this provider's jobs are not being polled, if they are not (for operators)."""
        found = self.problems.get(provider)
        return found.message if found else None

    # -- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        # Jobs stopped by a bad key or missing setting get another chance after a restart
        # (which is when the operator's fix takes effect): one call each, not a hammering.
        resumed = await self.tracked.resume_stopped(
            (StopReason.AUTH, StopReason.CONFIG), self.clock()
        )
        if resumed:
            log.info("poller_resumed_stopped_jobs", jobs=resumed)
        while True:
            self.wake.clear()
            try:
                delay = await self.tick()
            except Exception:
                log.exception("poller_tick_failed")
                delay = MAX_IDLE
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=delay)

    async def aclose(self) -> None:
        if self._own_http:
            await self.http.aclose()

    async def tick(self) -> float:
        """Poll what is due and affordable; return seconds until something may be due again."""
        now = self.clock()
        lease = timedelta(seconds=self.settings.poll_timeout_seconds * 2 + 5)
        chosen: list[TrackedJob] = []
        for provider, limiter in self.limiters.items():
            problem = self.problems.get(provider)
            room = 500 if problem else limiter.available(now.timestamp())
            if problem is None and provider not in self.verified:
                room = min(room, 1)
            if room <= 0:
                continue
            for due in await self.tracked.due(now, room, provider=provider):
                # Ask the ledger (whichever adapter) whether a webhook already settled it.
                record = await self.ingestor.ledger.job(provider, due.job_id)
                if record is None and await self._forgotten(provider, due.job_id):
                    continue
                job = replace(due, job_state=record.state.value if record else None)
                if await self._settled_or_stopped(job, now, problem):
                    continue
                if limiter.acquire(now.timestamp()):
                    chosen.append(job)
        if chosen:
            claimed = await self.tracked.claim(chosen, now + lease, now)
            await asyncio.gather(
                *(self._poll(job) for job in chosen if (job.provider, job.job_id) in claimed)
            )
        return await self._next_delay()

    async def _forgotten(self, provider: str, job_id: str) -> bool:
        """A job erased on request (`receiver forget`) whose entry is still here (a registration
        racing the erasure) is dropped, unpolled. Only a job without a record can have one."""
        if await self.ingestor.ledger.tombstone(provider, job_id) is None:
            return False
        await self.tracked.forget(provider, job_id)
        log.info("poll_dropped_forgotten", provider=provider, job_id=job_id)
        return True

    async def _end(self, job: TrackedJob, reason: str, now: datetime) -> None:
        """A job polling gave up on ends in the ledger too (dead, with the reason), so the audit
        shows a final state rather than `tracking` for ever."""
        await self.ingestor.ledger.end_tracking(
            job.provider, job.job_id, JobState.DEAD, reason, now
        )

    async def _settled_or_stopped(
        self, job: TrackedJob, now: datetime, problem: Problem | None
    ) -> bool:
        """Handle a due job that must not be polled; True if it was handled."""
        if job.job_state is not None and job.job_state not in OPEN_STATES:
            # A webhook (or an earlier poll) already brought the answer.
            self.metrics.polls_settled_by_webhook.labels(job.provider).inc()
            await self.tracked.finish(
                job.provider, job.job_id, now, status=f"settled:{job.job_state}", polled=False
            )
            return True
        if problem is not None:
            await self.tracked.stop(job.provider, job.job_id, problem.reason, problem.message, now)
            return True
        if now - job.registered_at > timedelta(hours=self.settings.poll_give_up_hours):
            message = (
                f"gave up after {self.settings.poll_give_up_hours:g} h and {job.polls} polls "
                f"without a final status (last: {job.last_status or 'none'})"
            )
            await self.tracked.stop(job.provider, job.job_id, StopReason.GAVE_UP, message, now)
            await self._end(job, f"polling stopped: {message}", now)
            log.warning("poll_gave_up", provider=job.provider, job_id=job.job_id, polls=job.polls)
            return True
        return False

    async def _next_delay(self) -> float:
        now = self.clock().timestamp()
        wait = MAX_IDLE
        for provider, at in (await self.tracked.next_due_by_provider()).items():
            limiter = self.limiters.get(provider)
            ready = at.timestamp()
            if limiter is not None and provider not in self.problems:
                ready = max(ready, limiter.next_free(now))
            wait = min(wait, ready - now)
        return max(MIN_WAIT, wait)

    # -- one poll -----------------------------------------------------------------------------

    async def _poll(self, job: TrackedJob) -> None:
        try:
            # A polled job's trace starts here (a webhook's starts with its request).
            with tracing.job_span(
                "receiver.poll",
                None,
                kind=tracing.SpanKind.INTERNAL,
                provider=job.provider,
                job_id=job.job_id,
            ):
                async with self._semaphore:
                    result = await self.clients[job.provider].poll(job.job_id, job.tracking)
                self.metrics.status_calls.labels(job.provider, result.outcome.value).inc()
                await self._handle(job, result)
        except Exception as exc:
            # Never let one job's surprise stop the others: keep it, retry later.
            log.exception("poll_failed", provider=job.provider, job_id=job.job_id)
            await self._retry(job, f"internal error: {type(exc).__name__}", counted=True)

    async def _handle(self, job: TrackedJob, result: PollResult) -> None:
        now = self.clock()
        limiter = self.limiters[job.provider]
        limiter.observe(result.rate, now.timestamp())
        if result.outcome is not PollOutcome.RATE_LIMITED:
            limiter.consecutive_429 = 0
        if result.outcome is not PollOutcome.AUTH_ERROR:
            self.verified.add(job.provider)
        if result.outcome is PollOutcome.EVENT:
            await self._event(job, result)
        elif result.outcome is PollOutcome.RATE_LIMITED:
            limiter.consecutive_429 += 1
            pause = result.retry_after
            if pause is None:
                pause = backoff_delay(
                    limiter.consecutive_429,
                    self.rng,
                    base=self.settings.poll_base_seconds,
                    cap=self.settings.poll_cap_seconds,
                )
            limiter.pause(now.timestamp() + min(pause, MAX_PAUSE))
            log.warning("poll_rate_limited", provider=job.provider, pause_seconds=round(pause, 3))
            # Not the job's fault: its backoff does not grow; it waits for the provider.
            resume = datetime.fromtimestamp(limiter.paused_until, tz=now.tzinfo)
            await self.tracked.reschedule(
                job.provider, job.job_id, resume, now, counted=False, error=result.error
            )
        elif result.outcome is PollOutcome.AUTH_ERROR:
            message = (
                f"{job.provider} refused our API key ({result.error}); polling of {job.provider} "
                f"jobs is stopped: check RECEIVER_{job.provider.upper()}_API_KEY (and the "
                "account's plan and credits), then restart receiver"
            )
            if job.provider not in self.problems:
                log.error("provider_auth_failed", provider=job.provider, error=result.error)
            self.problems[job.provider] = Problem(StopReason.AUTH, message)
            await self.tracked.stop(job.provider, None, StopReason.AUTH, message, now)
        elif result.outcome is PollOutcome.NOT_FOUND:
            if job.not_found + 1 >= self.settings.poll_not_found_limit:
                message = (
                    f"{job.provider} answered 'not found' {job.not_found + 1} times in a row "
                    f"({result.error}); check the job id (and technique); register it again "
                    "to retry"
                )
                await self.tracked.stop(
                    job.provider, job.job_id, StopReason.NOT_FOUND, message, now
                )
                await self._end(job, f"polling stopped: {message}", now)
                log.warning("poll_not_found_stopped", provider=job.provider, job_id=job.job_id)
            else:
                await self._retry(job, result.error, counted=True, not_found=True)
        elif result.outcome is PollOutcome.MALFORMED:
            log.warning(
                "poll_malformed_response",
                provider=job.provider,
                job_id=job.job_id,
                error=result.error,
                details=result.details,
            )
            await self._retry(job, f"malformed status response: {result.error}", counted=True)
        else:
            log.info(
                "poll_request_failed", provider=job.provider, job_id=job.job_id, error=result.error
            )
            await self._retry(job, result.error, counted=True, at_least=result.retry_after)

    async def _event(self, job: TrackedJob, result: PollResult) -> None:
        event = result.event
        assert event is not None
        if event.kind is EventKind.PROGRESS:
            status = "progress"
            if "progress" in event.metadata:
                status = f"progress {event.metadata['progress']:g}%"
            if job.job_state == JobState.TRACKING.value and job.polls == 0:
                # The first sign of life is worth one entry in the job's history.
                await self._record(job, result)
            await self._retry(job, None, counted=True, status=status)
            return
        record = await self._record(job, result)
        await self.tracked.finish(
            job.provider, job.job_id, self.clock(), status=event.kind.value, polled=True
        )
        log.info(
            "poll_recorded",
            provider=job.provider,
            job_id=job.job_id,
            kind=event.kind.value,
            outcome=record,
            outputs=len(event.outputs),
        )

    async def _record(self, job: TrackedJob, result: PollResult) -> str:
        assert result.event is not None
        recorded = await self.ingestor.ingest(
            result.event, body=result.body, source="poll", auth="api", delivery_id=None
        )
        return recorded.outcome.value

    async def _retry(
        self,
        job: TrackedJob,
        error: str | None,
        *,
        counted: bool,
        status: str | None = None,
        not_found: bool = False,
        at_least: float | None = None,
    ) -> None:
        now = self.clock()
        delay = backoff_delay(
            job.polls + 1,
            self.rng,
            base=self.settings.poll_base_seconds,
            cap=self.settings.poll_cap_seconds,
        )
        if at_least is not None:
            delay = max(delay, min(at_least, MAX_PAUSE))
        await self.tracked.reschedule(
            job.provider,
            job.job_id,
            now + timedelta(seconds=delay),
            now,
            counted=counted,
            status=status,
            error=error,
            not_found=not_found,
        )
