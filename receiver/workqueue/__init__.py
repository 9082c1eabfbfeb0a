"""The queue port: archive tasks, leased earliest-deadline-first.

What crosses this line: a worker leases a task (provider, job id, output number, deadline) for a
while, heartbeats to keep it, and ends it with `ack`, `retry` (not before a time), `requeue`
(at once, behind what waits, not counted as an attempt) or `dead_letter`. A lease that is not
renewed expires and the task comes back, so a worker killed at any moment loses nothing. Tasks
carry no URLs: the worker reads the current link from the ledger. Adapters: `sqlite.py`
(embedded; tasks are written by the ledger's own transaction) and `sqs.py` (distributed; tasks
are sent by the DynamoDB ledger's outbox as `TaskMessage`s).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol


@dataclass(frozen=True)
class Lease:
    task_id: int
    provider: str
    job_id: str
    n: int
    deadline: datetime
    attempt: int  # 1 for the first try
    owner: str
    handle: str = ""  # adapter-specific (SQS: the lane and the message's receipt handle)
    # The trace context of the request that queued the task (None: tracing off, or older task):
    # the worker's spans continue that trace (receiver.tracing).
    traceparent: str | None = None


@dataclass(frozen=True)
class QueueStats:
    ready: int
    leased: int
    dead: int
    oldest_ready_at: datetime | None
    # The most urgent copy no worker holds (waiting, retrying later, or a lapsed lease): the
    # "deadline at risk" alert. None when nothing waits, or when the adapter cannot tell (SQS).
    earliest_unleased_deadline: datetime | None = None


@dataclass(frozen=True)
class TaskMessage:
    """One archive task as sent to SQS: which asset, by when. No URL: workers read the ledger."""

    provider: str
    job_id: str
    n: int
    deadline: datetime
    gen: str  # which enqueue of the task this is (the outbox marks that one sent)
    traceparent: str | None = None  # the queuing request's trace context (tracing on)

    def body(self) -> str:
        fields = {
            "provider": self.provider,
            "job_id": self.job_id,
            "n": self.n,
            "deadline": self.deadline.timestamp(),
            "gen": self.gen,
        }
        if self.traceparent:
            fields["traceparent"] = self.traceparent
        return json.dumps(fields)


class WorkQueue(Protocol):
    async def lease(self, owner: str, now: datetime, lease_for: timedelta) -> Lease | None: ...

    async def heartbeat(self, lease: Lease, now: datetime, lease_for: timedelta) -> bool: ...

    async def ack(self, lease: Lease) -> None: ...

    async def retry(self, lease: Lease, not_before: datetime, error: str) -> None: ...

    async def requeue(self, lease: Lease, note: str) -> None:
        """Give the task back, due at once, without counting this lease as an attempt.

        For a copy that made progress but gave its slot up (a slow source, archive/resume.py):
        the task goes behind the tasks that wait now (SQLite: after every ready task's
        deadline; SQS: a fresh message at the back of its lane, so its receive count starts
        again), so it takes a slot again once they have theirs, and later arrivals do not
        starve it.
        """
        ...

    async def dead_letter(self, lease: Lease, error: str) -> None: ...

    async def stats(self, now: datetime) -> QueueStats: ...


class TaskClaims(Protocol):
    """A conditional claim on a task, kept by the ledger (SQS mode: one copy of an asset at once).

    Blocking calls: the SQS queue makes them on its AWS worker threads. Times are epoch seconds.
    """

    def claim(
        self, provider: str, job_id: str, n: int, owner: str, now: float, until: float
    ) -> float | None:
        """Take or renew the claim until `until`; None if ours, else when the live owner's ends."""
        ...

    def release(self, provider: str, job_id: str, n: int, owner: str) -> None:
        """Drop the claim if `owner` still holds it."""
        ...
