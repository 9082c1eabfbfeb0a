"""Apex Studio: `job.completed` / `job.failed` webhooks; outputs are signed R2 URLs valid 24 h.

Its status endpoint, `GET /api/jobs?id=<jobId>` (`{"data": {...job}}`, the webhook's `data`
shape), recovers a webhook that never arrived. Reads are limited to 20 requests per 10 s.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from receiver.domain import EventKind, JobEvent, Output, output_name
from receiver.errors import InvalidPayload, UnknownEvent
from receiver.providers.base import (
    Count,
    JobId,
    ProviderSpec,
    RateBudget,
    StatusApi,
    StatusRequest,
    UtcDatetime,
    bearer,
    require_object,
    validate,
)

NAME = "apex"
# Job types from the webhook documentation's table; others are accepted (Apex adds types).
JOB_TYPES = (
    "image",
    "video",
    "voice",
    "avatar",
    "clip",
    "commercial",
    "translate",
    "instant-ad",
    "photoshoot",
)
EVENTS = ("job.completed", "job.failed")


class _Model(BaseModel):
    # Unknown extra fields are kept (they land in the stored raw body and in metadata).
    model_config = ConfigDict(extra="allow")


class CompletedData(_Model):
    jobId: JobId
    type: str = Field(min_length=1, max_length=64)
    status: Literal["completed"] = "completed"
    outputUrl: str = Field(min_length=1, max_length=8192, pattern=r"^[hH][tT][tT][pP][sS]?://")
    outputType: str | None = Field(default=None, max_length=255)
    metadata: dict[str, Any] = Field(default_factory=dict)
    createdAt: UtcDatetime | None = None
    completedAt: UtcDatetime


class FailedData(_Model):
    jobId: JobId
    type: str = Field(min_length=1, max_length=64)
    status: Literal["failed"] = "failed"
    error: str | None = Field(default=None, max_length=4096)
    creditsRefunded: Count | None = None
    createdAt: UtcDatetime | None = None
    failedAt: UtcDatetime


class Completed(_Model):
    event: Literal["job.completed"]
    timestamp: UtcDatetime | None = None
    data: CompletedData


class Failed(_Model):
    event: Literal["job.failed"]
    timestamp: UtcDatetime | None = None
    data: FailedData


def parse_webhook(payload: Any) -> JobEvent:
    body = require_object(payload)
    event = body.get("event")
    if event is None:
        raise InvalidPayload(
            "the payload has no event", [{"field": "event", "problem": "Field required"}]
        )
    if event not in EVENTS:
        raise UnknownEvent(f"unknown Apex event {event!r}", {"event": event, "known": EVENTS})
    if event == "job.completed":
        done = validate(Completed, body).data
        return JobEvent(
            provider=NAME,
            job_id=done.jobId,
            kind=EventKind.COMPLETED,
            job_type=done.type,
            outputs=(
                Output(
                    url=done.outputUrl,
                    name=output_name(done.outputUrl, 0, done.outputType),
                    content_type=done.outputType,
                ),
            ),
            completed_at=done.completedAt,
            metadata=done.metadata,
        )
    failed = validate(Failed, body).data
    return JobEvent(
        provider=NAME,
        job_id=failed.jobId,
        kind=EventKind.FAILED,
        job_type=failed.type,
        failed_at=failed.failedAt,
        error=failed.error,
        credits_refunded=failed.creditsRefunded,
    )


# Job statuses before the end; the docs show "queued" and the final pair, the rest are guesses
# that mean the same thing (an unknown status is refused as malformed, never guessed final).
PENDING_STATUSES = ("queued", "pending", "processing", "running", "in_progress", "started")


class StatusJob(_Model):
    status: str = Field(min_length=1, max_length=64)
    jobId: str | None = Field(default=None, max_length=256)
    id: str | None = Field(default=None, max_length=256)
    type: str | None = Field(default=None, max_length=64)
    outputUrl: str | None = Field(
        default=None, min_length=1, max_length=8192, pattern=r"^[hH][tT][tT][pP][sS]?://"
    )
    outputType: str | None = Field(default=None, max_length=255)
    metadata: dict[str, Any] = Field(default_factory=dict)
    error: str | None = Field(default=None, max_length=4096)
    creditsRefunded: Count | None = None
    completedAt: UtcDatetime | None = None
    failedAt: UtcDatetime | None = None


def status_request(job_id: str, tracking: Mapping[str, Any]) -> StatusRequest:
    return StatusRequest("/api/jobs", {"id": job_id})


def parse_status_response(payload: Any, job_id: str) -> JobEvent:
    """`{"data": {...}}` from `GET /api/jobs?id=`; a one-job list is accepted too."""
    data = require_object(payload).get("data")
    if isinstance(data, list):
        # The list endpoint filtered by id: pick our job (by jobId or id).
        data = next(
            (j for j in data if isinstance(j, dict) and job_id in (j.get("jobId"), j.get("id"))),
            None,
        )
        if data is None:
            raise InvalidPayload(
                f"the job list has no job {job_id!r}", [{"field": "data", "problem": "missing"}]
            )
    job = validate(StatusJob, data, prefix="data")
    reported = job.jobId or job.id
    if reported is not None and reported != job_id:
        raise InvalidPayload(
            "the status answer is about another job",
            [{"field": "data.jobId", "problem": f"expected {job_id!r}, got {reported!r}"}],
        )
    status = job.status.strip().lower()
    if status == "completed":
        if job.outputUrl is None:
            raise InvalidPayload(
                "a completed Apex job must carry its outputUrl",
                [{"field": "data.outputUrl", "problem": "Field required when completed"}],
            )
        return JobEvent(
            provider=NAME,
            job_id=job_id,
            kind=EventKind.COMPLETED,
            job_type=job.type,
            outputs=(
                Output(
                    url=job.outputUrl,
                    name=output_name(job.outputUrl, 0, job.outputType),
                    content_type=job.outputType,
                ),
            ),
            completed_at=job.completedAt,
            metadata=job.metadata,
        )
    if status == "failed":
        return JobEvent(
            provider=NAME,
            job_id=job_id,
            kind=EventKind.FAILED,
            job_type=job.type,
            failed_at=job.failedAt,
            error=job.error,
            credits_refunded=job.creditsRefunded,
        )
    if status in PENDING_STATUSES:
        return JobEvent(provider=NAME, job_id=job_id, kind=EventKind.PROGRESS, job_type=job.type)
    raise UnknownEvent(
        f"unknown Apex job status {job.status!r}",
        {"status": job.status, "known": ["completed", "failed", *PENDING_STATUSES]},
    )


STATUS_API = StatusApi(
    request=status_request,
    parse=parse_status_response,
    auth_headers=bearer,
    # Documented: 20 read requests per 10 s per key. We keep 4 in reserve for the operator's
    # own tools sharing the key; X-RateLimit-* headers and 429s pause us further.
    budget=RateBudget(requests=16, per_seconds=10),
)

SPEC = ProviderSpec(
    name=NAME,
    window=timedelta(hours=24),  # "Signed URLs valid for 24 hours"
    download_hosts=("cdn.useapexstudio.com", "*.r2.cloudflarestorage.com", "*.r2.dev"),
    default_base_url="https://useapexstudio.com",
    parse_webhook=parse_webhook,
    status_api=STATUS_API,
)
