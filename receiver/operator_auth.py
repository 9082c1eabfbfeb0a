"""The operator bearer token (`RECEIVER_API_TOKEN`) guarding tracking and audit endpoints."""

from __future__ import annotations

import hmac

from starlette.requests import Request

from receiver.errors import Unauthorized


def require_operator(request: Request, token: str | None) -> None:
    """Raise 401 unless the request carries `Authorization: Bearer <RECEIVER_API_TOKEN>`."""
    if token is None:
        raise Unauthorized(
            "operator endpoints are disabled: set RECEIVER_API_TOKEN to enable them",
            {"header": "Authorization: Bearer <RECEIVER_API_TOKEN>"},
        )
    scheme, _, offered = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        offered.strip().encode(), token.encode()
    ):
        raise Unauthorized(
            "missing or invalid operator token",
            {"header": "Authorization: Bearer <RECEIVER_API_TOKEN>"},
        )
