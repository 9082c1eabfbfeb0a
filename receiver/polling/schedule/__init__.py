"""The poller's schedule (a port with two adapters): who to poll, when, and why not.

- `sqlite.TrackedStore`: the `tracked` table in the embedded SQLite file;
- `dynamodb.DynamoTrackedStore`: items in the DynamoDB ledger's own table, so every replica of a
  scale-out deployment shares one schedule.

Every write is idempotent or conditional, so several poller processes may share one schedule:
`claim` is the only way to take a due job, and it succeeds for one of them. One contract test
suite (tests/test_tracking_contract.py) runs against both adapters.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol


class TrackState:
    ACTIVE = "active"  # polled when due
    DONE = "done"  # the job reached a state the poller has nothing to add to
    STOPPED = "stopped"  # polling stopped for a reason an operator must see (last_error)


class StopReason:
    AUTH = "auth"  # 401/402/403 from the provider: retried once per process start
    CONFIG = "config"  # no API key / base URL: retried once per process start
    NOT_FOUND = "not_found"  # the provider kept answering 404
    GAVE_UP = "gave_up"  # still unfinished after RECEIVER_POLL_GIVE_UP_HOURS


@dataclass(frozen=True)
class TrackedJob:
    provider: str
    job_id: str
    technique: str | None
    state: str
    next_poll_at: datetime
    polls: int
    not_found: int
    last_status: str | None
    last_error: str | None
    stop_reason: str | None
    registered_at: datetime
    job_state: str | None = None  # the ledger's state, filled in by the poller

    @property
    def tracking(self) -> dict[str, Any]:
        return {"technique": self.technique}


class Tracker(Protocol):
    """The poller's schedule: who to poll, when, and why not (the port; two adapters).

    Every write is idempotent or conditional, so several poller processes may share one
    schedule: `claim` is the only way to take a due job, and it succeeds for one of them.
    """

    async def add(
        self, provider: str, job_id: str, technique: str | None, first_poll: datetime, now: datetime
    ) -> str:
        """Insert (`created`), reactivate a stopped job (`reactivated`) or leave it (`known`)."""
        ...

    async def get(self, provider: str, job_id: str) -> TrackedJob | None: ...

    async def due(self, now: datetime, limit: int, *, provider: str) -> list[TrackedJob]:
        """A provider's active jobs whose time has come, most overdue first."""
        ...

    async def next_due_by_provider(self) -> dict[str, datetime]:
        """Per provider with active jobs: the earliest next poll."""
        ...

    async def claim(
        self, jobs: list[TrackedJob], until: datetime, now: datetime
    ) -> set[tuple[str, str]]:
        """Push the chosen jobs' next poll to `until`; the (provider, job id) pairs claimed."""
        ...

    async def reschedule(
        self,
        provider: str,
        job_id: str,
        at: datetime,
        now: datetime,
        *,
        counted: bool,
        status: str | None = None,
        error: str | None = None,
        not_found: bool = False,
    ) -> None:
        """Next poll of an active job at `at`; `counted` adds to the poll count (backoff)."""
        ...

    async def finish(
        self, provider: str, job_id: str, now: datetime, *, status: str | None, polled: bool
    ) -> None:
        """The job needs no more polls (whatever its tracking state was)."""
        ...

    async def stop(
        self, provider: str, job_id: str | None, reason: str, error: str, now: datetime
    ) -> int:
        """Stop one job, or (job_id None) every active job of the provider. Returns how many."""
        ...

    async def stopped(self, limit: int) -> list[TrackedJob]:
        """Jobs whose polling stopped (each with its reason), latest registered first."""
        ...

    async def resume_stopped(self, reasons: tuple[str, ...], now: datetime) -> int:
        """Jobs stopped for one of `reasons` become active and due now. Returns how many."""
        ...

    async def forget(self, provider: str, job_id: str) -> bool:
        """Remove the job's entry (`receiver forget`); False if there was none. No later write
        (a reschedule, finish or stop of a poll claimed before) creates it again."""
        ...
