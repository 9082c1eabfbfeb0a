"""What a provider module declares: its webhook parser, status API, retention window and hosts.

Adding a provider means adding one module that builds a `ProviderSpec`, and listing it in
`receiver.providers`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, Field, ValidationError

from receiver.domain import JobEvent
from receiver.errors import InvalidPayload
from receiver.providers.bounds import MAX_INT, bounded_utc, job_id_problem

M = TypeVar("M", bound=BaseModel)

# A provider's time as aware UTC inside the edge's date range (`bounds.bounded_utc`): a naive
# datetime must never meet the aware ones in deadline arithmetic, and a year-1 time with a +14:00
# offset must be a 422 here rather than an OverflowError later.
UtcDatetime = Annotated[datetime, AfterValidator(bounded_utc)]


def _job_id(value: str) -> str:
    problem = job_id_problem(value)
    if problem is not None:
        raise ValueError(f"{problem} (rule 'job_id')")
    return value


# A provider's job id under the edge's grammar (`bounds.job_id_problem`).
JobId = Annotated[str, AfterValidator(_job_id)]
# A count that fits SQLite's signed 64-bit INTEGER.
Count = Annotated[int, Field(ge=0, le=MAX_INT)]


@dataclass(frozen=True)
class StatusRequest:
    """One status call, relative to the provider's base URL (the key is added by the client)."""

    path: str  # already percent-encoded
    params: dict[str, str]


@dataclass(frozen=True)
class RateBudget:
    """At most `requests` status calls in any `per_seconds` window, for all tracked jobs."""

    requests: int
    per_seconds: float


@dataclass(frozen=True)
class StatusApi:
    """How to ask a provider about one job, and how to read its answer.

    `parse` gets the decoded JSON body and the job id we asked about; it returns a `JobEvent`
    (COMPLETED with every output, FAILED with the error, or PROGRESS) or raises a
    `RequestRejected` (InvalidPayload / UnknownEvent) for a response it cannot trust.
    """

    request: Callable[[str, Mapping[str, Any]], StatusRequest]  # (job id, tracking) -> call
    parse: Callable[[Any, str], JobEvent]
    auth_headers: Callable[[str], dict[str, str]]  # API key -> headers (never logged)
    budget: RateBudget
    needs_technique: bool = False  # FLORA: the run's URL contains its technique slug
    base_url_is_placeholder: bool = False  # the documented base URL must be configured


@dataclass(frozen=True)
class ProviderSpec:
    name: str
    # How long the provider keeps outputs, counted from its completion time when the event
    # carries one, else from when we received it. None: unknown (signed expiry or 24 h applies).
    window: timedelta | None
    download_hosts: tuple[str, ...]  # documented defaults; operators extend them in settings
    default_base_url: str
    parse_webhook: Callable[[Any], JobEvent] | None  # None: the provider has no webhooks
    status_api: StatusApi | None = None  # None: no status endpoint (jobs cannot be polled)


def bearer(key: str) -> dict[str, str]:
    """`Authorization: Bearer <key>`, the scheme Apex, Fliki and FLORA document."""
    return {"Authorization": f"Bearer {key}"}


def validate(model: type[M], data: Any, prefix: str = "") -> M:
    """Validate with pydantic; schema violations become a 422 listing each field path."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        details = [
            {
                "field": ".".join(str(p) for p in (prefix, *err["loc"]) if p != "") or "(body)",
                "problem": err["msg"],
                "type": err["type"],
            }
            for err in exc.errors(include_url=False, include_input=False)
        ]
        raise InvalidPayload("the payload does not match the provider's schema", details) from None


def require_object(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise InvalidPayload(
            "the payload must be a JSON object", [{"field": "(body)", "problem": "not an object"}]
        )
    return data
