"""What a provider module declares: its webhook parser, status API, retention window and hosts.

Adding a provider means adding one module that builds a `ProviderSpec`, and listing it in
`receiver.providers`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ValidationError

from receiver.domain import JobEvent
from receiver.errors import InvalidPayload

M = TypeVar("M", bound=BaseModel)


def _assume_utc(value: datetime) -> datetime:
    # Providers document UTC ("...Z"); a time sent without an offset means the same, and a
    # naive datetime must never meet the aware ones in deadline arithmetic.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


UtcDatetime = Annotated[datetime, AfterValidator(_assume_utc)]


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
