"""Tracking jobs by polling: `POST /jobs` and `receiver track` put a job on the schedule.

A registration writes twice: `ledger.track` (the job, in state `tracking`, with the caller's
technique and metadata, which end up in the manifest) and an entry in the poller's schedule (a
`Tracker`). Both are idempotent, so registering twice, or retrying after a crash between the two
writes, is harmless. Providers without webhooks are polled at once; Apex and Fliki jobs only
after a grace period, to recover a webhook that never came (reconciliation).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from receiver.domain import Clock
from receiver.errors import (
    Gone,
    InvalidPayload,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from receiver.ingest.routes import read_body_within
from receiver.ledger import Ledger
from receiver.operator_auth import require_operator
from receiver.polling.schedule import Tracker
from receiver.providers import REGISTRY
from receiver.providers.base import JobId, validate
from receiver.providers.bounds import check_value, load_json
from receiver.providers.flora import SLUG_PATTERN
from receiver.settings import Settings

MAX_REQUEST_BYTES = 64 * 1024


class TrackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    provider: str = Field(min_length=1, max_length=32)
    # The edge's job-id grammar (`providers.bounds`): percent-encoded into URLs and keys.
    job_id: JobId
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
        check_value(data)  # `receiver track` arrives here without load_json
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
        if not await self.ledger.track(request.provider, request.job_id, tracking, now):
            # Known already, or erased on request: a forgotten job is never followed again (its
            # answer would be refused anyway), and nothing is written for it.
            stone = await self.ledger.tombstone(request.provider, request.job_id)
            if stone is not None:
                raise Gone(
                    f"{request.provider}/{request.job_id} was erased on request at "
                    f"{stone.forgotten_at.isoformat()}; it is not tracked again"
                )
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
        assert row is not None  # written above (`receiver forget` comes after the tombstone)
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
        body = await read_body_within(
            request, MAX_REQUEST_BYTES, self.registrar.settings.body_timeout_seconds
        )
        data = load_json(body)  # the edge's one rule, as for webhooks
        registration = await self.registrar.register(data, source="api")
        return JSONResponse(
            registration.body(), status_code=201 if registration.outcome == "created" else 200
        )
