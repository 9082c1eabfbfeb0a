"""Tracking jobs by polling: `POST /jobs`, `receiver track`, and the `tracked` schedule.

A registration writes twice: `ledger.track` (the job, in state `tracking`, with the caller's
technique and metadata, which end up in the manifest) and an entry in the poller's schedule (a
`Tracker`). Both are idempotent, so registering twice, or retrying after a crash between the two
writes, is harmless. Providers without webhooks are polled at once; Apex and Fliki jobs only
after a grace period, to recover a webhook that never came (reconciliation).

The schedule is a port with two adapters, beside the ledger's: `TrackedStore`, the `tracked`
table in the SQLite file, and `receiver.polling.schedule.dynamodb.DynamoTrackedStore`, items in the
DynamoDB ledger's table, so every replica of a scale-out deployment shares one schedule.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from receiver.errors import (
    InvalidPayload,
    MalformedJson,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from receiver.ingest.record import Clock
from receiver.ledger import Ledger
from receiver.ledger import at_ts as _at
from receiver.operator_auth import require_operator
from receiver.providers import REGISTRY
from receiver.providers.base import validate
from receiver.providers.flora import SLUG_PATTERN
from receiver.settings import Settings
from receiver.sqlite_db import Database

MAX_REQUEST_BYTES = 64 * 1024


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


def _row(row: sqlite3.Row) -> TrackedJob:
    return TrackedJob(
        provider=row["provider"],
        job_id=row["job_id"],
        technique=row["technique"],
        state=row["state"],
        next_poll_at=_at(row["next_poll_at"]),
        polls=row["polls"],
        not_found=row["not_found"],
        last_status=row["last_status"],
        last_error=row["last_error"],
        stop_reason=row["stop_reason"],
        registered_at=_at(row["registered_at"]),
    )


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

    async def resume_stopped(self, reasons: tuple[str, ...], now: datetime) -> int:
        """Jobs stopped for one of `reasons` become active and due now. Returns how many."""
        ...


class TrackedStore:
    """The SQLite tracker: the `tracked` table (see `receiver.sqlite_db.SCHEMA`)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def add(
        self, provider: str, job_id: str, technique: str | None, first_poll: datetime, now: datetime
    ) -> str:
        """Insert (`created`), reactivate a stopped job (`reactivated`) or leave it (`known`)."""

        def write(conn: sqlite3.Connection) -> str:
            created = conn.execute(
                "INSERT INTO tracked (provider, job_id, technique, state, next_poll_at, "
                "registered_at, updated_at) VALUES (?, ?, ?, 'active', ?, ?, ?) "
                "ON CONFLICT (provider, job_id) DO NOTHING",
                (
                    provider,
                    job_id,
                    technique,
                    first_poll.timestamp(),
                    now.timestamp(),
                    now.timestamp(),
                ),
            ).rowcount
            if created:
                return "created"
            # Registering a stopped job again is how an operator says "try again".
            reactivated = conn.execute(
                "UPDATE tracked SET state = 'active', next_poll_at = ?, not_found = 0, "
                "stop_reason = NULL, technique = COALESCE(?, technique), updated_at = ? "
                "WHERE provider = ? AND job_id = ? AND state = 'stopped'",
                (first_poll.timestamp(), technique, now.timestamp(), provider, job_id),
            ).rowcount
            return "reactivated" if reactivated else "known"

        return await self.db.write(write)

    async def get(self, provider: str, job_id: str) -> TrackedJob | None:
        def read(conn: sqlite3.Connection) -> TrackedJob | None:
            row = conn.execute(
                "SELECT * FROM tracked WHERE provider = ? AND job_id = ?", (provider, job_id)
            ).fetchone()
            return _row(row) if row else None

        return await self.db.read(read)

    async def due(self, now: datetime, limit: int, *, provider: str) -> list[TrackedJob]:
        """A provider's active jobs whose time has come, most overdue first."""

        def read(conn: sqlite3.Connection) -> list[TrackedJob]:
            rows = conn.execute(
                "SELECT * FROM tracked WHERE state = 'active' AND provider = ? "
                "AND next_poll_at <= ? ORDER BY next_poll_at LIMIT ?",
                (provider, now.timestamp(), limit),
            ).fetchall()
            return [_row(r) for r in rows]

        return await self.db.read(read)

    async def next_due_by_provider(self) -> dict[str, datetime]:
        def read(conn: sqlite3.Connection) -> dict[str, datetime]:
            return {
                r["provider"]: _at(r["at"])
                for r in conn.execute(
                    "SELECT provider, MIN(next_poll_at) AS at FROM tracked "
                    "WHERE state = 'active' GROUP BY provider"
                )
            }

        return await self.db.read(read)

    async def claim(
        self, jobs: list[TrackedJob], until: datetime, now: datetime
    ) -> set[tuple[str, str]]:
        """Push the chosen jobs' next poll to `until` so another poller process skips them.

        Returns the (provider, job id) pairs actually claimed (another process may be first).
        """

        def write(conn: sqlite3.Connection) -> set[tuple[str, str]]:
            claimed: set[tuple[str, str]] = set()
            for job in jobs:
                if conn.execute(
                    "UPDATE tracked SET next_poll_at = ?, updated_at = ? WHERE provider = ? "
                    "AND job_id = ? AND state = 'active' AND next_poll_at <= ?",
                    (until.timestamp(), now.timestamp(), job.provider, job.job_id, now.timestamp()),
                ).rowcount:
                    claimed.add((job.provider, job.job_id))
            return claimed

        return await self.db.write(write)

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
        """Next poll at `at`; `counted` adds to the poll count that drives the backoff."""
        await self.db.write(
            lambda conn: conn.execute(
                "UPDATE tracked SET next_poll_at = ?, polls = polls + ?, "
                "not_found = CASE WHEN ? THEN not_found + 1 ELSE 0 END, "
                "last_status = COALESCE(?, last_status), last_error = ?, updated_at = ? "
                "WHERE provider = ? AND job_id = ? AND state = 'active'",
                (
                    at.timestamp(),
                    1 if counted else 0,
                    not_found,
                    status,
                    error,
                    now.timestamp(),
                    provider,
                    job_id,
                ),
            )
        )

    async def finish(
        self, provider: str, job_id: str, now: datetime, *, status: str | None, polled: bool
    ) -> None:
        await self.db.write(
            lambda conn: conn.execute(
                "UPDATE tracked SET state = 'done', polls = polls + ?, "
                "last_status = COALESCE(?, last_status), last_error = NULL, updated_at = ? "
                "WHERE provider = ? AND job_id = ?",
                (1 if polled else 0, status, now.timestamp(), provider, job_id),
            )
        )

    async def stop(
        self, provider: str, job_id: str | None, reason: str, error: str, now: datetime
    ) -> int:
        """Stop one job, or (job_id None) every active job of the provider. Returns how many."""
        where, args = "provider = ? AND state = 'active'", [provider]
        if job_id is not None:
            where += " AND job_id = ?"
            args.append(job_id)

        def write(conn: sqlite3.Connection) -> int:
            return conn.execute(
                f"UPDATE tracked SET state = 'stopped', stop_reason = ?, last_error = ?, "  # noqa: S608 (constant clauses)
                f"updated_at = ? WHERE {where}",
                (reason, error, now.timestamp(), *args),
            ).rowcount

        return await self.db.write(write)

    async def resume_stopped(self, reasons: tuple[str, ...], now: datetime) -> int:
        """At start-up: jobs stopped for a configuration or auth reason get one more try."""
        marks = ",".join("?" * len(reasons))

        def write(conn: sqlite3.Connection) -> int:
            return conn.execute(
                f"UPDATE tracked SET state = 'active', stop_reason = NULL, next_poll_at = ?, "  # noqa: S608 (placeholders only)
                f"updated_at = ? WHERE state = 'stopped' AND stop_reason IN ({marks})",
                (now.timestamp(), now.timestamp(), *reasons),
            ).rowcount

        return await self.db.write(write)

    async def counts(self) -> dict[tuple[str, str], int]:
        """(provider, state) -> number of tracked jobs, for metrics and the CLI."""

        def read(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
            return {
                (r["provider"], r["state"]): r["n"]
                for r in conn.execute(
                    "SELECT provider, state, COUNT(*) AS n FROM tracked GROUP BY provider, state"
                )
            }

        return await self.db.read(read)


# --- registration ----------------------------------------------------------------------------


class TrackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    provider: str = Field(min_length=1, max_length=32)
    # Any printable id (it is percent-encoded into URLs); control characters are refused.
    job_id: str = Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")
    technique: str | None = Field(default=None, pattern=SLUG_PATTERN)
    metadata: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class Registration:
    outcome: str  # "created" | "reactivated" | "known"
    provider: str
    job_id: str
    technique: str | None
    job_state: str
    tracked_state: str
    next_poll_at: datetime
    last_error: str | None
    warnings: list[str] = field(default_factory=list)

    def body(self) -> dict[str, Any]:
        return {
            "status": {
                "created": "tracking",
                "reactivated": "reactivated",
                "known": "already_tracked",
            }[self.outcome],
            "provider": self.provider,
            "job_id": self.job_id,
            "technique": self.technique,
            "job_state": self.job_state,
            "tracked_state": self.tracked_state,
            "next_poll_at": self.next_poll_at.isoformat(),
            "last_error": self.last_error,
            "warnings": self.warnings,
        }


class Registrar:
    """Validates and records a registration; shared by `POST /jobs` and `receiver track`."""

    def __init__(
        self,
        ledger: Ledger,
        tracked: Tracker,
        settings: Settings,
        *,
        clock: Clock,
        provider_problem: Callable[[str], str | None] = lambda provider: None,
        on_registered: Callable[[], None] = lambda: None,
    ) -> None:
        self.ledger = ledger
        self.tracked = tracked
        self.settings = settings
        self.clock = clock
        self.provider_problem = provider_problem
        self.on_registered = on_registered

    def check(self, data: Any) -> TrackRequest:
        request = validate(TrackRequest, data)
        spec = REGISTRY.get(request.provider)
        if spec is None or spec.status_api is None:
            known = sorted(n for n, s in REGISTRY.items() if s.status_api is not None)
            raise InvalidPayload(
                f"unknown provider {request.provider!r}",
                [{"field": "provider", "problem": f"must be one of {known}"}],
            )
        if spec.status_api.needs_technique and request.technique is None:
            raise InvalidPayload(
                f"{spec.name} jobs need their technique slug (the run URL contains it)",
                [{"field": "technique", "problem": "Field required for provider " + spec.name}],
            )
        if not spec.status_api.needs_technique and request.technique is not None:
            raise InvalidPayload(
                f"technique applies to FLORA runs only, not to {spec.name} jobs",
                [{"field": "technique", "problem": "not allowed for provider " + spec.name}],
            )
        size = len(json.dumps(request.metadata, separators=(",", ":")).encode())
        limit = self.settings.track_metadata_max_bytes
        if size > limit:
            raise PayloadTooLarge(
                f"metadata is {size} bytes of JSON; the limit is {limit} bytes",
                {"field": "metadata", "size_bytes": size, "limit_bytes": limit},
            )
        return request

    def warnings(self, provider: str) -> list[str]:
        """Why jobs of this provider cannot be polled right now, in words an operator can act on."""
        spec = REGISTRY[provider]
        config = self.settings.provider(provider)
        upper = provider.upper()
        found: list[str] = []
        if config.api_key is None:
            found.append(
                f"RECEIVER_{upper}_API_KEY is not set: {provider} jobs cannot be polled until it "
                "is set and receiver restarted"
            )
        if (
            spec.status_api is not None
            and spec.status_api.base_url_is_placeholder
            and not config.base_url
        ):
            found.append(
                f"RECEIVER_{upper}_BASE_URL is not set: {provider}'s documented base URL is a "
                "placeholder"
            )
        problem = self.provider_problem(provider)
        if problem:
            found.append(problem)
        return found

    async def register(self, data: Any, *, source: str) -> Registration:
        request = self.check(data)
        spec = REGISTRY[request.provider]
        now = self.clock()
        tracking = {
            "technique": request.technique,
            "metadata": request.metadata,
            "registered_at": now.isoformat(),
            "registered_by": source,
        }
        await self.ledger.track(request.provider, request.job_id, tracking, now)
        # Webhook providers: give the webhook its grace period before spending a status call.
        grace = (
            timedelta(seconds=self.settings.poll_grace_seconds)
            if spec.parse_webhook is not None
            else timedelta(0)
        )
        outcome = await self.tracked.add(
            request.provider, request.job_id, request.technique, now + grace, now
        )
        if outcome != "known":
            self.on_registered()
        job = await self.ledger.job(request.provider, request.job_id)
        row = await self.tracked.get(request.provider, request.job_id)
        assert row is not None  # written above; rows are never deleted
        return Registration(
            outcome=outcome,
            provider=request.provider,
            job_id=request.job_id,
            technique=row.technique,
            job_state=job.state.value if job is not None else "tracking",
            tracked_state=row.state,
            next_poll_at=row.next_poll_at,
            last_error=row.last_error,
            warnings=self.warnings(request.provider),
        )


class TrackingApi:
    """`POST /jobs`, guarded by the operator token (`GET /jobs` is the audit API's)."""

    def __init__(self, registrar: Registrar, api_token: str | None) -> None:
        self.registrar = registrar
        self.api_token = api_token

    def routes(self) -> list[Route]:
        return [Route("/jobs", self.register, methods=["POST"])]

    async def register(self, request: Request) -> JSONResponse:
        require_operator(request, self.api_token)
        media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type != "application/json":
            raise UnsupportedMediaType(
                "POST /jobs takes application/json",
                {"content_type": request.headers.get("content-type")},
            )
        body = await _read_body(request)
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MalformedJson("the body is not valid JSON", {"error": str(exc)}) from None
        registration = await self.registrar.register(data, source="api")
        return JSONResponse(
            registration.body(), status_code=201 if registration.outcome == "created" else 200
        )


async def _read_body(request: Request) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_REQUEST_BYTES:
            raise PayloadTooLarge(
                f"body exceeds the {MAX_REQUEST_BYTES}-byte limit",
                {"limit_bytes": MAX_REQUEST_BYTES},
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def register_offline(settings: Settings, data: Any, *, clock: Clock) -> Registration:
    """`receiver track`: register straight into the database; a running poller picks it up."""
    if settings.distributed:
        # The ledger's table holds the schedule too: any `receiver worker` polls the job.
        from receiver.ledger.dynamodb import DynamoLedger
        from receiver.polling.schedule.dynamodb import DynamoTrackedStore

        # No publisher: a registration writes no archive task, so nothing goes to the queue.
        ledger = DynamoLedger.from_url(settings.ledger_url)
        tracker = DynamoTrackedStore(ledger.table, ddb=ledger.ddb)
        return await Registrar(ledger, tracker, settings, clock=clock).register(data, source="cli")

    from receiver.ledger.sqlite import SqliteLedger

    db = Database(settings.sqlite_path)
    db.start()
    try:
        registrar = Registrar(SqliteLedger(db), TrackedStore(db), settings, clock=clock)
        return await registrar.register(data, source="cli")
    finally:
        db.stop()
