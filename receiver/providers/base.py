"""What a provider module declares: its webhook parser, retention window and download hosts.

Adding a provider means adding one module that builds a `ProviderSpec`, and listing it in
`receiver.providers`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from receiver.domain import JobEvent
from receiver.errors import InvalidPayload

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class ProviderSpec:
    name: str
    # How long the provider keeps outputs, counted from its completion time when the event
    # carries one, else from when we received it. None: unknown (signed expiry or 24 h applies).
    window: timedelta | None
    download_hosts: tuple[str, ...]  # documented defaults; operators extend them in settings
    default_base_url: str
    parse_webhook: Callable[[Any], JobEvent] | None  # None: the provider has no webhooks


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
