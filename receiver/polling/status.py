"""Status clients: ask a provider's status API about one job and classify the answer.

One generic HTTP client drives every provider; what differs (path, query, auth header, response
shape) is declared by each provider module's `StatusApi`. The client never raises for a
provider's answer: every response becomes a `PollResult` the poller can act on (an event, a rate
limit, an auth error, not found, malformed, or a failed request). API keys travel only in
headers and are scrubbed from any error text we keep or log.
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from receiver.domain import JobEvent, scrub_secrets
from receiver.errors import RequestRejected
from receiver.providers.base import ProviderSpec, StatusApi
from receiver.providers.bounds import is_safe_path, load_json

MAX_STATUS_BYTES = 1024 * 1024  # a status document is a few hundred bytes; refuse floods
MAX_ERROR_CHARS = 300
# An error text is scrubbed whole and then cut to MAX_ERROR_CHARS (a cut value could escape the
# rule, or our own key half-match); the scrubbing reads at most this much of it.
SCRUB_WINDOW = 64 * 1024


class PollOutcome(enum.StrEnum):
    EVENT = "event"  # a parsed JobEvent (progress, completed or failed)
    RATE_LIMITED = "rate_limited"  # 429: pause the provider
    AUTH_ERROR = "auth_error"  # 401/402/403: stop polling the provider
    NOT_FOUND = "not_found"  # 404: wrong id (or not visible yet)
    MALFORMED = "malformed"  # 200 with a body we cannot trust
    REQUEST_FAILED = "request_failed"  # network error, timeout, 5xx, other 4xx


@dataclass(frozen=True)
class RateHeaders:
    """`X-RateLimit-*` as Apex documents them (reset: unix seconds)."""

    limit: int | None = None
    remaining: int | None = None
    reset: float | None = None


@dataclass(frozen=True)
class PollResult:
    outcome: PollOutcome
    event: JobEvent | None = None
    body: bytes = b""  # the raw response, recorded as the delivery's body
    status_code: int | None = None
    error: str | None = None
    details: Any = None
    retry_after: float | None = None  # seconds, from Retry-After
    rate: RateHeaders = RateHeaders()


class StatusClient:
    """One provider's status API at a configured base URL with its API key."""

    def __init__(
        self,
        spec: ProviderSpec,
        *,
        base_url: str,
        api_key: str,
        http: httpx.AsyncClient,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if spec.status_api is None:
            raise ValueError(f"{spec.name} has no status API")
        self.spec = spec
        self.api: StatusApi = spec.status_api
        self.base_url = base_url.rstrip("/")
        self._key = api_key
        self.http = http
        self.wall_clock = wall_clock

    async def poll(self, job_id: str, tracking: Mapping[str, Any]) -> PollResult:
        try:
            call = self.api.request(job_id, tracking)
            if not is_safe_path(call.path):
                raise ValueError(f"unsafe status path for job {job_id!r}")
        except ValueError as exc:
            # A dot segment would make the client or the provider resolve another path of its
            # API, with our key: never sent. Counted as "not found", which ends the tracking.
            return PollResult(PollOutcome.NOT_FOUND, error=f"not requested: {exc}")
        headers = {"Accept": "application/json", **self.api.auth_headers(self._key)}
        try:
            async with self.http.stream(
                "GET", self.base_url + call.path, params=call.params, headers=headers
            ) as response:
                body = await _read_capped(response)
        except _TooLarge:
            return PollResult(
                PollOutcome.MALFORMED, error=f"status response over {MAX_STATUS_BYTES} bytes"
            )
        except httpx.HTTPError as exc:
            # The exception text can hold the URL (job id only: the key is in a header).
            return PollResult(
                PollOutcome.REQUEST_FAILED, error=f"{type(exc).__name__}: {self._scrub(str(exc))}"
            )
        return self._classify(response, body, job_id)

    def _classify(self, response: httpx.Response, body: bytes, job_id: str) -> PollResult:
        status = response.status_code
        rate = _rate_headers(response.headers)
        common: dict[str, Any] = {"body": body, "status_code": status, "rate": rate}
        if status == 200:
            try:
                payload = load_json(body)
            except RequestRejected as exc:
                return PollResult(
                    PollOutcome.MALFORMED,
                    error=(
                        "status response is not JSON under our rules: "
                        f"{self._scrub(exc.message)[:MAX_ERROR_CHARS]}"
                    ),
                    details=exc.details,
                    **common,
                )
            try:
                event = self.api.parse(payload, job_id)
            except RequestRejected as exc:
                return PollResult(
                    PollOutcome.MALFORMED,
                    error=self._scrub(exc.message)[:MAX_ERROR_CHARS],
                    details=exc.details,
                    **common,
                )
            return PollResult(PollOutcome.EVENT, event=event, **common)
        error = f"HTTP {status}: {self._scrub(_error_text(body))[:MAX_ERROR_CHARS]}".rstrip(": ")
        if status == 429:
            return PollResult(
                PollOutcome.RATE_LIMITED,
                error=error,
                retry_after=_retry_after(response.headers.get("retry-after"), self.wall_clock()),
                **common,
            )
        if status in (401, 402, 403):
            return PollResult(PollOutcome.AUTH_ERROR, error=error, **common)
        if status in (404, 410):
            return PollResult(PollOutcome.NOT_FOUND, error=error, **common)
        return PollResult(
            PollOutcome.REQUEST_FAILED,
            error=error,
            retry_after=_retry_after(response.headers.get("retry-after"), self.wall_clock()),
            **common,
        )

    def _scrub(self, text: str) -> str:
        """The provider's text without our key or any signing parameter; cut it afterwards."""
        return scrub_secrets(text.replace(self._key, "***") if self._key else text)


class _TooLarge(Exception):
    pass


async def _read_capped(response: httpx.Response) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_STATUS_BYTES:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _error_text(body: bytes) -> str:
    """The provider's error, from any of the documented error shapes, not yet scrubbed or cut
    (at most SCRUB_WINDOW characters).

    FLORA `{"error": {"code", "message"}}`; Apex `{"error": "...", "code": "..."}`;
    Vivid Flow `{"error": "..."}`; anything else: the start of the body.
    """
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return body[:SCRUB_WINDOW].decode("utf-8", "replace").strip()
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict):
            parts = [error.get("code"), error.get("message")]
        else:
            parts = [payload.get("code"), error, payload.get("message")]
        text = ": ".join(str(p) for p in parts if p)
        if text:
            return text[:SCRUB_WINDOW]
    return json.dumps(payload)[:SCRUB_WINDOW]


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value.strip())
    except ValueError:
        return None


def _rate_headers(headers: httpx.Headers) -> RateHeaders:
    limit = _number(headers.get("x-ratelimit-limit"))
    remaining = _number(headers.get("x-ratelimit-remaining"))
    return RateHeaders(
        limit=int(limit) if limit is not None else None,
        remaining=int(remaining) if remaining is not None else None,
        reset=_number(headers.get("x-ratelimit-reset")),
    )


def _retry_after(value: str | None, now: float) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date."""
    if value is None:
        return None
    seconds = _number(value)
    if seconds is not None:
        return max(0.0, seconds)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError):
        return None
