"""Apex Studio: `job.completed` / `job.failed` webhooks; outputs are signed R2 URLs valid 24 h."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from receiver.domain import EventKind, JobEvent, Output, output_name
from receiver.errors import InvalidPayload, UnknownEvent
from receiver.providers.base import ProviderSpec, require_object, validate

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
    jobId: str = Field(min_length=1, max_length=256)
    type: str = Field(min_length=1, max_length=64)
    status: Literal["completed"] = "completed"
    outputUrl: str = Field(min_length=1, max_length=8192, pattern=r"^[hH][tT][tT][pP][sS]?://")
    outputType: str | None = Field(default=None, max_length=255)
    metadata: dict[str, Any] = Field(default_factory=dict)
    createdAt: datetime | None = None
    completedAt: datetime


class FailedData(_Model):
    jobId: str = Field(min_length=1, max_length=256)
    type: str = Field(min_length=1, max_length=64)
    status: Literal["failed"] = "failed"
    error: str | None = Field(default=None, max_length=4096)
    creditsRefunded: int | None = Field(default=None, ge=0)
    createdAt: datetime | None = None
    failedAt: datetime


class Completed(_Model):
    event: Literal["job.completed"]
    timestamp: datetime | None = None
    data: CompletedData


class Failed(_Model):
    event: Literal["job.failed"]
    timestamp: datetime | None = None
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


SPEC = ProviderSpec(
    name=NAME,
    window=timedelta(hours=24),  # "Signed URLs valid for 24 hours"
    download_hosts=("cdn.useapexstudio.com", "*.r2.cloudflarestorage.com", "*.r2.dev"),
    default_base_url="https://useapexstudio.com",
    parse_webhook=parse_webhook,
)
