"""The named errors a request can end in. The HTTP layer maps them to responses in one place."""

from __future__ import annotations

from typing import Any


class RequestRejected(Exception):
    """A request we refuse. Nothing has been written when one of these is raised."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class MalformedJson(RequestRejected):
    status, code = 400, "malformed_json"


class Unauthorized(RequestRejected):
    status, code = 401, "unauthorized"


class NotFound(RequestRejected):
    status, code = 404, "not_found"


class UnsupportedMediaType(RequestRejected):
    status, code = 415, "unsupported_media_type"


class PayloadTooLarge(RequestRejected):
    status, code = 413, "payload_too_large"


class InvalidPayload(RequestRejected):
    """Schema violations; `details` lists each offending field path."""

    status, code = 422, "invalid_payload"


class UnknownEvent(RequestRejected):
    status, code = 422, "unknown_event"


class Conflict(RequestRejected):
    status, code = 409, "conflict"


class Gone(RequestRejected):
    """The job was erased on request (`receiver forget`): only its tombstone is left, and it is
    not recorded or followed again."""

    status, code = 410, "gone"


class RequestTimeout(RequestRejected):
    """The request's body did not arrive within the configured bound."""

    status, code = 408, "request_timeout"


class LedgerUnavailable(RequestRejected):
    """The ledger cannot take writes right now (disk full, I/O error, locked file, no answer in
    time). Nothing was acknowledged; the sender should retry later."""

    status, code = 503, "ledger_unavailable"


class ConfigurationError(Exception):
    """Settings that cannot work; raised at start-up with a message that says how to fix it."""
