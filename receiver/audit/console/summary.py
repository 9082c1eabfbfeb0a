"""What the Overview and Problems pages show, gathered from the ports (plain data for templates)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from receiver.domain import JobState
from receiver.ledger import Activity, AssetRecord, JobFilter, Ledger
from receiver.ledger.events import EndpointHealth, EventFilter
from receiver.metrics import Metrics
from receiver.polling.schedule import TrackedJob, Tracker
from receiver.providers import REGISTRY
from receiver.workqueue import QueueStats, WorkQueue

PROBLEMS_LIMIT = 50
CHART_DAYS = 7
ENDED = (JobState.ARCHIVED, JobState.FAILED, JobState.EXPIRED, JobState.DEAD)


@dataclass(frozen=True)
class Bar:
    """One day of the archived-bytes chart, laid out for an inline SVG."""

    day: str
    bytes: int
    x: int
    y: int
    height: int


@dataclass(frozen=True)
class ProviderPolling:
    provider: str
    state: str  # "active" | "idle" | "stopped"
    detail: str
    stopped_jobs: int


@dataclass
class Overview:
    now: datetime
    day: Activity
    week: Activity
    queue: QueueStats
    oldest_task_age: float | None
    bars: list[Bar]
    polling: list[ProviderPolling]
    auth_failures: dict[str, int]
    rejections: list[tuple[str, str, int]]  # (provider, error code, count)


@dataclass
class Problem:
    # "dead" | "expired" | "deadline miss" | "polling stopped" | "fixity failure" | "not delivered"
    kind: str
    provider: str
    job_id: str
    at: datetime | None
    reason: str
    asset: int | None = None


@dataclass
class Problems:
    items: list[Problem] = field(default_factory=list)
    more_misses: int = 0
    failing_endpoints: list[EndpointHealth] = field(default_factory=list)


CHART_HEIGHT = 120
BAR_WIDTH = 40
BAR_GAP = 12


def bars(activity: Activity, now: datetime, days: int = CHART_DAYS) -> list[Bar]:
    """The last `days` UTC days, zeros included, scaled to the chart's height."""
    today = now.date()
    labels = [(today - timedelta(days=days - 1 - i)).isoformat() for i in range(days)]
    values = [activity.archived_bytes_by_day.get(day, 0) for day in labels]
    top = max(values) or 1
    made = []
    for i, (day, value) in enumerate(zip(labels, values, strict=True)):
        height = round(value / top * CHART_HEIGHT) if value else 0
        made.append(Bar(day, value, i * (BAR_WIDTH + BAR_GAP), CHART_HEIGHT - height, height))
    return made


async def overview(
    ledger: Ledger,
    queue: WorkQueue,
    tracker: Tracker | None,
    metrics: Metrics,
    poll_problem: Callable[[str], str | None],
    now: datetime,
) -> Overview:
    day = await ledger.activity(now - timedelta(days=1))
    week = await ledger.activity(now - timedelta(days=7))
    stats = await queue.stats(now)
    age = (now - stats.oldest_ready_at).total_seconds() if stats.oldest_ready_at else None
    return Overview(
        now=now,
        day=day,
        week=week,
        queue=stats,
        oldest_task_age=age,
        bars=bars(week, now),
        polling=await polling(tracker, poll_problem),
        auth_failures={
            name: int(metrics.value("receiver_webhook_auth_failures_total", provider=name))
            for name, spec in REGISTRY.items()
            if spec.parse_webhook is not None
        },
        rejections=_rejections(metrics),
    )


def _rejections(metrics: Metrics) -> list[tuple[str, str, int]]:
    found = []
    for family in metrics.registry.collect():
        if family.name != "receiver_webhook_rejections":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.value:
                found.append((sample.labels["provider"], sample.labels["code"], int(sample.value)))
    return sorted(found)


async def polling(
    tracker: Tracker | None, poll_problem: Callable[[str], str | None]
) -> list[ProviderPolling]:
    """Per provider with a status API: polling, idle, or stopped and why."""
    due = await tracker.next_due_by_provider() if tracker else {}
    stopped = await tracker.stopped(PROBLEMS_LIMIT * 10) if tracker else []
    rows = []
    for name, spec in REGISTRY.items():
        if spec.status_api is None:
            continue
        mine = [j for j in stopped if j.provider == name]
        problem = poll_problem(name)
        if problem is not None:
            state, detail = "stopped", problem
        elif name in due:
            state, detail = "active", f"next poll at {due[name].isoformat()}"
        else:
            state, detail = "idle", "no job is being polled"
        if mine and state != "stopped":
            last = mine[0]
            detail += f"; {len(mine)} job(s) stopped, latest: {last.stop_reason}: {last.last_error}"
        rows.append(ProviderPolling(name, state, detail, len(mine)))
    return rows


async def problems(ledger: Ledger, tracker: Tracker | None, now: datetime) -> Problems:
    """Dead-lettered and expired assets, deadline misses, stopped polling and failed fixity
    checks, newest first."""
    found = Problems()
    for state in (JobState.DEAD, JobState.EXPIRED):
        summaries = await ledger.list_jobs(
            JobFilter(state=state.value), before_seq=None, limit=PROBLEMS_LIMIT
        )
        for summary in summaries:
            job = await ledger.job(summary.provider, summary.job_id)
            ended: list[AssetRecord | None] = [
                a for a in (job.assets if job else []) if a.state == state.value
            ]
            for asset in ended or [None]:
                found.items.append(
                    Problem(
                        state.value,
                        summary.provider,
                        summary.job_id,
                        job.updated_at if job else summary.first_seen_at,
                        (asset.error if asset else None) or summary.error or "",
                        asset.n if asset else None,
                    )
                )
    week = await ledger.activity(now - timedelta(days=7))
    for miss in week.misses:
        late = -miss.slack_seconds
        found.items.append(
            Problem(
                "deadline miss",
                miss.provider,
                miss.job_id,
                miss.archived_at,
                f"archived {late:.0f} s after its deadline {miss.deadline.isoformat()}",
                miss.n,
            )
        )
    found.more_misses = week.missed - len(week.misses)
    for tracked in await tracker.stopped(PROBLEMS_LIMIT) if tracker else []:
        found.items.append(_stopped(tracked))
    for failed in await ledger.fixity_failures(PROBLEMS_LIMIT):
        found.items.append(
            Problem(
                "fixity failure",
                failed.provider,
                failed.job_id,
                failed.asset.verified_at,
                failed.asset.fixity_error or "",
                failed.asset.n,
            )
        )
    await _onward(ledger, now, found)
    found.items.sort(key=lambda p: p.at.timestamp() if p.at else 0.0, reverse=True)
    return found


async def _onward(ledger: Ledger, now: datetime, found: Problems) -> None:
    """Endpoints marked failing, and events whose retries to an endpoint ran out (replay them)."""
    status = await ledger.onward_status(now)
    found.failing_endpoints = [e for e in status.endpoints if e.failing]
    for event in await ledger.events(EventFilter(state="failed"), PROBLEMS_LIMIT):
        for send in event.sends:
            if send.state == "failed":
                found.items.append(
                    Problem(
                        "not delivered",
                        event.provider,
                        event.job_id,
                        event.created_at,
                        f"{event.type} {event.id} to {send.endpoint}: retries exhausted after "
                        f"{send.attempts} attempt(s); {send.last_error or 'no error recorded'}",
                    )
                )


def _stopped(tracked: TrackedJob) -> Problem:
    return Problem(
        "polling stopped",
        tracked.provider,
        tracked.job_id,
        tracked.registered_at,
        f"{tracked.stop_reason}: {tracked.last_error or 'no error recorded'}",
    )
