"""Fliki: a completion callback in its status shape (`fileId`, `status`, `download`, `progress`).

Fliki deletes generated files three hours after completion and sends no completion time, so the
window counts from receipt. Its docs do not enumerate status values; we map the common spellings
and refuse others with a 422 that lists what we understand.

`GET /v1/generate/status?fileId=` answers in the same shape, so a missed callback is recovered by
polling it. Its docs insist on exponential backoff ("otherwise ... all consecutive API calls will
fail"): the poller backs off per job, and this module's budget is deliberately small.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from receiver.domain import EventKind, JobEvent, Output, output_name
from receiver.errors import InvalidPayload, UnknownEvent
from receiver.providers.base import (
    JobId,
    ProviderSpec,
    RateBudget,
    StatusApi,
    StatusRequest,
    bearer,
    require_object,
    validate,
)

NAME = "fliki"

STATUSES = {
    **dict.fromkeys(
        ("completed", "complete", "success", "succeeded", "done", "finished", "ready"),
        EventKind.COMPLETED,
    ),
    **dict.fromkeys(
        ("failed", "failure", "error", "errored", "cancelled", "canceled"), EventKind.FAILED
    ),
    **dict.fromkeys(
        ("queued", "pending", "processing", "in_progress", "in-progress", "running", "started"),
        EventKind.PROGRESS,
    ),
}


class Status(BaseModel):
    model_config = ConfigDict(extra="allow")

    fileId: JobId
    status: str = Field(min_length=1, max_length=64)
    progress: float | None = Field(default=None, ge=0, le=100)
    download: str | None = Field(
        default=None, min_length=1, max_length=8192, pattern=r"^[hH][tT][tT][pP][sS]?://"
    )


def parse_status(payload: Any) -> JobEvent:
    """The status shape, from a webhook or from `GET /v1/generate/status`."""
    status = validate(Status, require_object(payload))
    kind = STATUSES.get(status.status.strip().lower())
    if kind is None:
        raise UnknownEvent(
            f"unknown Fliki status {status.status!r}",
            {"status": status.status, "known": sorted(STATUSES)},
        )
    extra = status.model_extra or {}
    if kind is EventKind.COMPLETED:
        if status.download is None:
            raise InvalidPayload(
                "a completed Fliki status must carry its download URL",
                [{"field": "download", "problem": "Field required when status is completed"}],
            )
        return JobEvent(
            provider=NAME,
            job_id=status.fileId,
            kind=kind,
            outputs=(Output(url=status.download, name=output_name(status.download, 0, None)),),
            metadata=extra,
        )
    error = extra.get("error") or extra.get("message")
    return JobEvent(
        provider=NAME,
        job_id=status.fileId,
        kind=kind,
        error=str(error)[:4096] if kind is EventKind.FAILED and error else None,
        metadata={"progress": status.progress} if status.progress is not None else {},
    )


def status_request(job_id: str, tracking: Mapping[str, Any]) -> StatusRequest:
    return StatusRequest("/v1/generate/status", {"fileId": job_id})


def parse_status_response(payload: Any, job_id: str) -> JobEvent:
    """The documented status shape; a `{"data": {...}}` envelope is tolerated."""
    body = require_object(payload)
    if "fileId" not in body and isinstance(body.get("data"), dict):
        body = body["data"]
    event = parse_status(body)
    if event.job_id != job_id:
        raise InvalidPayload(
            "the status answer is about another file",
            [{"field": "fileId", "problem": f"expected {job_id!r}, got {event.job_id!r}"}],
        )
    return event


STATUS_API = StatusApi(
    request=status_request,
    parse=parse_status_response,
    auth_headers=bearer,
    # Undocumented limit, and the docs warn that exceeding it fails *all* later calls: stay low.
    budget=RateBudget(requests=10, per_seconds=60),
)

SPEC = ProviderSpec(
    name=NAME,
    window=timedelta(hours=3),  # "deleted automatically after three hours"
    download_hosts=("*.fliki.ai",),
    default_base_url="https://api.fliki.ai",
    parse_webhook=parse_status,
    status_api=STATUS_API,
)
