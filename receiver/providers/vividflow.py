"""Vivid Flow: a status endpoint only; videos are Google Cloud Storage links.

`GET {base}/status/{job_id}` with `X-API-Key`: `PROCESSING`, `COMPLETED` with `video_url`, or
`FAILED` with `error`. The documented base URL is a placeholder (`your-app-domain.com`), so
operators must set `RECEIVER_VIVIDFLOW_BASE_URL` before its jobs can be polled.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from receiver.domain import EventKind, JobEvent, Output, output_name
from receiver.errors import InvalidPayload, UnknownEvent
from receiver.providers.base import (
    ProviderSpec,
    RateBudget,
    StatusApi,
    StatusRequest,
    require_object,
    validate,
)
from receiver.providers.bounds import path_segment

NAME = "vividflow"
STATUSES = {
    # The docs show PROCESSING only; a queued spelling means the same.
    "PENDING": EventKind.PROGRESS,
    "QUEUED": EventKind.PROGRESS,
    "PROCESSING": EventKind.PROGRESS,
    "COMPLETED": EventKind.COMPLETED,
    "FAILED": EventKind.FAILED,
}


class Status(BaseModel):
    model_config = ConfigDict(extra="allow")

    job_id: str | None = Field(default=None, max_length=256)
    status: str = Field(min_length=1, max_length=64)
    video_url: str | None = Field(
        default=None, min_length=1, max_length=8192, pattern=r"^[hH][tT][tT][pP][sS]?://"
    )
    error: str | None = Field(default=None, max_length=4096)


def status_request(job_id: str, tracking: Mapping[str, Any]) -> StatusRequest:
    return StatusRequest(f"/status/{path_segment(job_id)}", {})


def api_key_header(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def parse_status_response(payload: Any, job_id: str) -> JobEvent:
    status = validate(Status, require_object(payload))
    if status.job_id is not None and status.job_id != job_id:
        raise InvalidPayload(
            "the status answer is about another job",
            [{"field": "job_id", "problem": f"expected {job_id!r}, got {status.job_id!r}"}],
        )
    kind = STATUSES.get(status.status.strip().upper())
    if kind is None:
        raise UnknownEvent(
            f"unknown Vivid Flow status {status.status!r}",
            {"status": status.status, "known": sorted(STATUSES)},
        )
    if kind is EventKind.COMPLETED:
        if status.video_url is None:
            raise InvalidPayload(
                "a COMPLETED Vivid Flow job must carry its video_url",
                [{"field": "video_url", "problem": "Field required when status is COMPLETED"}],
            )
        return JobEvent(
            provider=NAME,
            job_id=job_id,
            kind=kind,
            job_type="video",
            outputs=(
                Output(
                    url=status.video_url,
                    name=output_name(status.video_url, 0, "video/mp4"),
                    content_type="video/mp4",
                ),
            ),
        )
    if kind is EventKind.FAILED:
        return JobEvent(
            provider=NAME, job_id=job_id, kind=kind, job_type="video", error=status.error
        )
    return JobEvent(provider=NAME, job_id=job_id, kind=kind, job_type="video")


STATUS_API = StatusApi(
    request=status_request,
    parse=parse_status_response,
    auth_headers=api_key_header,
    # A 429 is documented but not its limit: one request every two seconds, paused by 429s.
    budget=RateBudget(requests=30, per_seconds=60),
    base_url_is_placeholder=True,
)

SPEC = ProviderSpec(
    name=NAME,
    # Undocumented lifetime: the GCS signed URL's own X-Goog-Expires applies when present.
    window=None,
    download_hosts=("storage.googleapis.com", "*.storage.googleapis.com"),
    # The documented base URL is a placeholder ("your-app-domain.com"): operators must set it.
    default_base_url="https://your-app-domain.com/api/v1",
    parse_webhook=None,
    status_api=STATUS_API,
)
