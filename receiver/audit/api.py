"""Audit lookups for support, finance and operators: what arrived, when, and what was archived.

Everything shown here is safe to paste into a ticket: URLs lose their query strings (signed
URLs are credentials) and payloads are redacted the same way as in the archive's manifests.
The JSON shapes are shared with the CLI (`receiver jobs show --json`).
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from receiver.archive.fetch import redact_url
from receiver.archive.manifest import redact, redacted_payload
from receiver.domain import JobState, scrub_secrets
from receiver.errors import Conflict, InvalidPayload, NotFound
from receiver.ledger import JobFilter, JobRecord, JobSummary, Ledger
from receiver.operator_auth import require_operator
from receiver.polling.schedule import TrackedJob, Tracker
from receiver.providers import REGISTRY
from receiver.providers.bounds import check_limit
from receiver.store import Store

PRESIGN_SECONDS = 300
MAX_LIMIT = 500


def _ascii_name(name: str) -> str:
    return name.encode("ascii", "replace").decode().replace("?", "_").replace('"', "_")


def _scrubbed(text: str | None) -> str | None:
    # Errors quote providers and sources: no signing parameter may reach a ticket.
    return scrub_secrets(text) if text is not None else None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def polling_json(tracked: TrackedJob | None) -> dict[str, Any] | None:
    """Where polling stands for a tracked job: support must see when and why it stopped."""
    if tracked is None:
        return None
    return {
        "state": tracked.state,
        "polls": tracked.polls,
        "next_poll_at": _iso(tracked.next_poll_at) if tracked.state == "active" else None,
        "last_status": tracked.last_status,
        "last_error": _scrubbed(tracked.last_error),
        "stop_reason": tracked.stop_reason,
    }


def payload_note(retention_days: int | None) -> str:
    """What the audit says where a delivery's payload was dropped by retention."""
    if retention_days is None:
        return "payload removed by the retention policy"
    return f"payload removed after {retention_days} days"


def job_json(
    job: JobRecord,
    tracked: TrackedJob | None = None,
    *,
    payload_retention_days: int | None = None,
) -> dict[str, Any]:
    deadlines = [a.deadline for a in job.assets]
    slacks = [
        (a.deadline - a.archived_at).total_seconds()
        for a in job.assets
        if a.archived_at is not None
    ]
    return {
        "provider": job.provider,
        "job_id": job.job_id,
        "state": job.state.value,
        "type": job.job_type,
        "received_at": _iso(job.first_seen_at),
        "updated_at": _iso(job.updated_at),
        "completed_at": _iso(job.completed_at),
        "failed_at": _iso(job.failed_at),
        "archived_at": _iso(job.archived_at),
        "deadline": _iso(min(deadlines)) if deadlines else None,
        "archived_with_slack_seconds": min(slacks) if slacks else None,
        "error": _scrubbed(job.error),
        "credits_refunded": job.credits_refunded,
        "metadata": redact(job.metadata),
        "tracking": redact(job.tracking),
        "polling": polling_json(tracked),
        "deliveries": [
            {
                "received_at": _iso(d.received_at),
                "webhook_id": d.delivery_id,
                "source": d.source,
                "authentication": d.auth,
                "event": d.event,
                "outcome": d.outcome,
                "duplicate": d.outcome != "accepted",
                # The same webhook id arrived earlier with a different body: a provider bug or a
                # replay with altered content. Recorded, never trusted silently.
                "body_mismatch": d.body_mismatch,
                "payload_sha256": d.payload_sha256,
                "payload": None if d.payload_removed else redacted_payload(d.body),
                "payload_removed": (
                    payload_note(payload_retention_days) if d.payload_removed else None
                ),
            }
            for d in job.deliveries
        ],
        "assets": [
            {
                "n": a.n,
                "name": a.name,
                "state": a.state,
                "uri": a.uri,
                "size": a.size,
                "content_type": a.content_type,
                "sha256": a.sha256,
                "source": redact_url(a.source_url),
                "deadline": _iso(a.deadline),
                "archived_at": _iso(a.archived_at),
                "slack_seconds": (
                    (a.deadline - a.archived_at).total_seconds() if a.archived_at else None
                ),
                "error": _scrubbed(a.error),
                "fixity": {
                    "verified_at": _iso(a.verified_at),
                    "verified_by": a.verified_by,
                    "ok": None if a.verified_at is None else a.fixity_error is None,
                    "problem": _scrubbed(a.fixity_error),
                },
            }
            for a in job.assets
        ],
    }


def summary_json(job: JobSummary) -> dict[str, Any]:
    return {
        "provider": job.provider,
        "job_id": job.job_id,
        "state": job.state.value,
        "type": job.job_type,
        "received_at": _iso(job.first_seen_at),
        "completed_at": _iso(job.completed_at),
        "archived_at": _iso(job.archived_at),
        "deadline": _iso(job.deadline),
        "error": _scrubbed(job.error),
    }


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, number = text.partition(":")
        # At most 18 digits: a sequence number SQLite's 64-bit INTEGER can compare against.
        if prefix != "seq" or not (number.isascii() and number.isdigit()) or len(number) > 18:
            raise ValueError(cursor)
        return int(number)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidPayload(
            "invalid cursor", [{"field": "cursor", "problem": "not a cursor from this API"}]
        ) from None


def parse_time(field: str, value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidPayload(
            f"invalid {field}", [{"field": field, "problem": "expected an ISO 8601 time"}]
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def job_filter(
    provider: str | None = None,
    state: str | None = None,
    job_type: str | None = None,
    since: str | None = None,
    until: str | None = None,
) -> JobFilter:
    """Validated filters, shared by the HTTP API and the CLI."""
    problems = []
    if provider is not None and provider not in REGISTRY:
        problems.append({"field": "provider", "problem": f"one of {sorted(REGISTRY)}"})
    states = [s.value for s in JobState]
    if state is not None and state not in states:
        problems.append({"field": "state", "problem": f"one of {states}"})
    if problems:
        raise InvalidPayload("invalid filter", problems)
    return JobFilter(
        provider=provider,
        state=state,
        job_type=job_type,
        since=parse_time("since", since) if since else None,
        until=parse_time("until", until) if until else None,
    )


class AuditApi:
    def __init__(
        self, ledger: Ledger, store: Store, api_token: str | None, tracker: Tracker | None = None
    ) -> None:
        self.ledger = ledger
        self.store = store
        self.api_token = api_token
        self.tracker = tracker
        self.payload_retention_days: int | None = None  # for "payload removed after N days"

    def routes(self) -> list[Route]:
        return [
            Route("/jobs", self.list_jobs, methods=["GET"]),
            Route("/jobs/{provider}/{job_id}", self.show_job, methods=["GET"]),
            Route("/jobs/{provider}/{job_id}/assets/{n}", self.asset, methods=["GET"]),
        ]

    async def list_jobs(self, request: Request) -> JSONResponse:
        require_operator(request, self.api_token)
        q = request.query_params
        where = job_filter(
            q.get("provider") or None,
            q.get("state") or None,
            q.get("type") or None,
            q.get("since") or None,
            q.get("until") or None,
        )
        limit = check_limit(q.get("limit", "50"), MAX_LIMIT)
        cursor = q.get("cursor")
        before = decode_cursor(cursor) if cursor else None
        # One extra row tells whether another page exists.
        rows = await self.ledger.list_jobs(where, before_seq=before, limit=limit + 1)
        page = rows[:limit]
        more = len(rows) > limit
        return JSONResponse(
            {
                "jobs": [summary_json(j) for j in page],
                "next_cursor": encode_cursor(page[-1].seq) if more else None,
            }
        )

    async def _job(self, request: Request) -> JobRecord:
        require_operator(request, self.api_token)
        provider, job_id = request.path_params["provider"], request.path_params["job_id"]
        job = await self.ledger.job(provider, job_id)
        if job is None:
            stone = await self.ledger.tombstone(provider, job_id)
            if stone is not None:
                raise NotFound(
                    f"job {job_id!r} for provider {provider!r} was erased on request at "
                    f"{stone.forgotten_at.isoformat()}"
                )
            raise NotFound(f"no job {job_id!r} for provider {provider!r}")
        return job

    async def show_job(self, request: Request) -> JSONResponse:
        job = await self._job(request)
        tracked = await self.tracker.get(job.provider, job.job_id) if self.tracker else None
        return JSONResponse(
            job_json(job, tracked, payload_retention_days=self.payload_retention_days)
        )

    async def asset(self, request: Request) -> Response:
        job = await self._job(request)
        raw = request.path_params["n"]
        asset = next((a for a in job.assets if str(a.n) == raw), None)
        if asset is None:
            raise NotFound(f"job has no asset {raw!r}", {"assets": [a.n for a in job.assets]})
        if asset.state != "archived":
            raise Conflict(f"asset {asset.n} is not archived (state: {asset.state})")
        url = await self.store.presign_get(asset.key, PRESIGN_SECONDS)
        if url is not None:
            if request.query_params.get("redirect", "true").lower() == "false":
                return JSONResponse({"url": url, "expires_in": PRESIGN_SECONDS})
            return RedirectResponse(url, status_code=307)
        return StreamingResponse(
            self.store.read(asset.key),
            media_type=asset.content_type or "application/octet-stream",
            headers={
                "content-length": str(asset.size),
                # HTTP headers are Latin-1: an ASCII fallback plus the RFC 6266 UTF-8 form.
                "content-disposition": (
                    f'attachment; filename="{_ascii_name(asset.name)}"; '
                    f"filename*=UTF-8''{quote(asset.name)}"
                ),
                "x-content-sha256": asset.sha256 or "",
            },
        )
