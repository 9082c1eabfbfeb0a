"""FLORA: no webhooks ("async polling only"); ImageKit outputs, "long-lived but not permanent".

A run is polled at `GET /api/v1/techniques/{slug}/runs/{runId}` (Bearer key): `pending`,
`running` (with `progress`), `completed` with an `outputs[]` array (one technique may produce
several files, each archived as its own asset), or `failed` with `errorCode`/`errorMessage`.
Errors are `{"error": {"code", "message"}}`. The run URL contains the technique slug, so FLORA
jobs are registered with their technique.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from receiver.domain import EventKind, JobEvent, Output, output_name
from receiver.errors import InvalidPayload, UnknownEvent
from receiver.providers.base import (
    ProviderSpec,
    RateBudget,
    StatusApi,
    StatusRequest,
    bearer,
    require_object,
    validate,
)
from receiver.providers.bounds import bounded_utc, path_segment

NAME = "flora"
STATUSES = {
    "pending": EventKind.PROGRESS,
    "running": EventKind.PROGRESS,
    "completed": EventKind.COMPLETED,
    "failed": EventKind.FAILED,
}
# A technique slug is URL-safe by definition; we refuse anything else before it reaches a URL.
SLUG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class RunOutput(_Model):
    outputId: str | None = Field(default=None, max_length=256)
    type: str | None = Field(default=None, max_length=64)
    url: str | None = Field(
        default=None, min_length=1, max_length=8192, pattern=r"^[hH][tT][tT][pP][sS]?://"
    )
    value: Any = None


class Run(_Model):
    runId: str | None = Field(default=None, max_length=256)
    status: str = Field(min_length=1, max_length=64)
    progress: float | None = Field(default=None, ge=0, le=100)
    createdAt: int | None = None  # milliseconds since the epoch
    completedAt: int | None = None
    chargedCost: float | None = None
    outputs: list[RunOutput] = Field(default_factory=list, max_length=256)
    errorCode: str | None = Field(default=None, max_length=256)
    errorMessage: str | None = Field(default=None, max_length=4096)


def _from_millis(value: int | None) -> datetime | None:
    if value is None:
        return None
    try:
        # Outside the edge's date range it is as good as absent (receipt time applies).
        return bounded_utc(datetime.fromtimestamp(value / 1000, tz=UTC))
    except (OverflowError, OSError, ValueError):
        return None


def status_request(job_id: str, tracking: Mapping[str, Any]) -> StatusRequest:
    slug = str(tracking.get("technique") or "")
    return StatusRequest(f"/api/v1/techniques/{path_segment(slug)}/runs/{path_segment(job_id)}", {})


def parse_status_response(payload: Any, job_id: str) -> JobEvent:
    run = validate(Run, require_object(payload))
    if run.runId is not None and run.runId != job_id:
        raise InvalidPayload(
            "the status answer is about another run",
            [{"field": "runId", "problem": f"expected {job_id!r}, got {run.runId!r}"}],
        )
    kind = STATUSES.get(run.status.strip().lower())
    if kind is None:
        raise UnknownEvent(
            f"unknown FLORA run status {run.status!r}",
            {"status": run.status, "known": sorted(STATUSES)},
        )
    if kind is EventKind.PROGRESS:
        progress = {"progress": run.progress} if run.progress is not None else {}
        return JobEvent(provider=NAME, job_id=job_id, kind=kind, metadata=progress)
    if kind is EventKind.FAILED:
        error = ": ".join(p for p in (run.errorCode, run.errorMessage) if p) or None
        return JobEvent(
            provider=NAME,
            job_id=job_id,
            kind=kind,
            failed_at=_from_millis(run.completedAt),
            error=error,
        )
    files = [o for o in run.outputs if o.url is not None]
    if not files:
        # Recording a completion with nothing to copy would end the job with no asset: refuse
        # it as malformed instead, so the job stays tracked and the error is visible.
        raise InvalidPayload(
            "a completed FLORA run must list at least one output with a url",
            [{"field": "outputs", "problem": "no output with a url"}],
        )
    outputs = tuple(
        Output(url=o.url, name=output_name(o.url, n, None))
        for n, o in enumerate(files)
        if o.url is not None
    )
    metadata: dict[str, Any] = {"outputs": [o.outputId for o in files]}
    if run.chargedCost is not None:
        metadata["chargedCost"] = run.chargedCost
    values = {o.outputId or str(n): o.value for n, o in enumerate(run.outputs) if o.url is None}
    if values:
        metadata["values"] = values
    return JobEvent(
        provider=NAME,
        job_id=job_id,
        kind=kind,
        outputs=outputs,
        completed_at=_from_millis(run.completedAt),
        metadata=metadata,
    )


STATUS_API = StatusApi(
    request=status_request,
    parse=parse_status_response,
    auth_headers=bearer,
    # No documented limit; the docs suggest polling a run every 2-5 s. One request a second
    # across all runs stays polite while keeping a handful of runs on that cadence.
    budget=RateBudget(requests=60, per_seconds=60),
    needs_technique=True,
)

SPEC = ProviderSpec(
    name=NAME,
    # Undocumented lifetime: we assume a week from completion and archive as soon as we can.
    window=timedelta(days=7),
    download_hosts=("ik.imagekit.io", "media.flora.ai"),
    default_base_url="https://app.flora.ai",
    parse_webhook=None,
    status_api=STATUS_API,
)
