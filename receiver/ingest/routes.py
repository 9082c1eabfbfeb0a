"""Webhook routes: authenticate, validate, record durably, then acknowledge.

Checks run cheapest-first and nothing is written until all have passed: unknown provider (404),
content type (415), size (413, from Content-Length before reading, else while reading),
authentication (401), JSON (400), schema (422). The 2xx leaves only after the ledger commit.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from receiver.domain import DeliveryOutcome, scrub_secrets
from receiver.errors import (
    NotFound,
    PayloadTooLarge,
    RequestRejected,
    RequestTimeout,
    Unauthorized,
    UnsupportedMediaType,
)
from receiver.ingest.auth import SignatureVerifier, Verified, check_token
from receiver.ingest.record import Ingestor
from receiver.metrics import Metrics
from receiver.providers.base import ProviderSpec
from receiver.providers.bounds import check_delivery_id, load_json

log = structlog.get_logger(__name__)

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


@dataclass(frozen=True)
class WebhookAuth:
    """A provider's configured schemes. Both unset means insecure-dev (checked at start-up)."""

    signature: SignatureVerifier | None
    token: str | None


@dataclass(frozen=True)
class WebhookEndpoint:
    spec: ProviderSpec
    auth: WebhookAuth


class Webhooks:
    def __init__(
        self,
        ingestor: Ingestor,
        endpoints: dict[str, WebhookEndpoint],
        *,
        max_body_bytes: int,
        wall_clock: Callable[[], float] = time.time,
        on_auth_failure: Callable[[str], None] = lambda provider: None,
        body_timeout: float = 20.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.body_timeout = body_timeout
        self.ingestor = ingestor
        self.endpoints = endpoints
        self.max_body_bytes = max_body_bytes
        self.wall_clock = wall_clock
        self.on_auth_failure = on_auth_failure

    def routes(self) -> list[Route]:
        return [
            Route("/webhooks/{provider}", self.receive, methods=["POST"]),
            Route("/webhooks/{provider}/{token}", self.receive, methods=["POST"]),
        ]

    async def receive(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        provider = request.path_params["provider"]
        endpoint = self.endpoints.get(provider)
        if endpoint is None:
            raise NotFound(
                f"no webhook endpoint for provider {provider!r}",
                {"providers": sorted(self.endpoints)},
            )
        _check_content_type(request.headers.get("content-type"))
        body = await read_body_within(request, self.max_body_bytes, self.body_timeout)
        try:
            verified = self._authenticate(request, endpoint.auth, body)
        except Unauthorized:
            self.on_auth_failure(provider)  # logged once, with every rejection: note_rejection
            raise
        # The edge's one rule (numbers, depth, strings, ids, dates): `providers.bounds`.
        payload = load_json(body)
        delivery_id = check_delivery_id(verified.webhook_id)
        assert endpoint.spec.parse_webhook is not None  # only webhook providers get endpoints
        event = endpoint.spec.parse_webhook(payload)
        result = await self.ingestor.ingest(
            event,
            body=body,
            source="webhook",
            auth=verified.method,
            delivery_id=delivery_id,
        )
        log.info(
            "webhook_recorded",
            provider=provider,
            job_id=event.job_id,
            delivery_id=delivery_id,
            kind=event.kind.value,
            outcome=result.outcome.value,
        )
        accepted = result.outcome is DeliveryOutcome.ACCEPTED
        self.metrics.webhook_seconds.labels(provider).observe(time.perf_counter() - started)
        return JSONResponse(
            {
                # "forgotten": erased on request (`receiver forget`); acknowledged, not kept.
                "status": "accepted"
                if accepted
                else "forgotten"
                if result.outcome is DeliveryOutcome.FORGOTTEN
                else "duplicate",
                "outcome": result.outcome.value,
                "provider": provider,
                "job_id": event.job_id,
                "job_state": result.job_state.value,
                "tasks_queued": result.tasks_queued,
            },
            status_code=202 if accepted else 200,
        )

    def _authenticate(self, request: Request, auth: WebhookAuth, body: bytes) -> Verified:
        token = request.path_params.get("token")
        if token is not None:
            if auth.token is None:
                raise Unauthorized("path tokens are not configured for this provider")
            verified = check_token(auth.token, token)
            return Verified(verified.method, request.headers.get("webhook-id"))
        if auth.signature is not None:
            return auth.signature.verify(request.headers, body, self.wall_clock())
        if auth.token is not None:
            raise Unauthorized("this provider authenticates with a path token: /webhooks/P/TOKEN")
        return Verified("insecure-dev", request.headers.get("webhook-id"))


def _check_content_type(value: str | None) -> None:
    media_type = (value or "").split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        raise UnsupportedMediaType(
            "webhooks must be sent as application/json",
            {"content_type": value, "expected": "application/json"},
        )


async def read_body_within(request: Request, limit: int, seconds: float) -> bytes:
    """The whole body, at most `limit` bytes, within `seconds` (else 408): a client trickling
    its body cannot hold a connection and a request slot for ever."""
    try:
        async with asyncio.timeout(seconds):
            return await _read_body(request, limit)
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {seconds:g} s", {"timeout_seconds": seconds}
        ) from None


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestRejected(
                "invalid Content-Length header", {"content_length": declared}
            ) from None
        if size > limit:
            raise PayloadTooLarge(
                f"body of {size} bytes exceeds the {limit}-byte limit", {"limit_bytes": limit}
            )
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise PayloadTooLarge(f"body exceeds the {limit}-byte limit", {"limit_bytes": limit})
        chunks.append(chunk)
    return b"".join(chunks)


def error_payload(status: int, code: str, message: str, details: Any = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message, "details": details}}, status_code=status
    )


def note_rejection(
    metrics: Metrics, webhook_providers: Collection[str], request: Request, exc: RequestRejected
) -> None:
    """Log and count one 4xx of a webhook or an operator call (the app's error handler calls it
    once per rejection). Only provider, status, code and our own reason: never the path (it may
    hold the provider's token), the body, a signature or a header."""
    if exc.status >= 500:
        return  # 503s are the ledger's: logged by the writer, not a caller's mistake
    # Our own words only: values quoted from the request ('...' / "...") are elided.
    reason = _QUOTED.sub("'…'", scrub_secrets(" ".join(exc.message.split())))[:200]
    path = request.url.path
    if path.startswith("/webhooks/"):
        named = str(request.path_params.get("provider", ""))
        provider = named if named in webhook_providers else "unknown"  # bounded label values
        metrics.webhook_rejections.labels(provider, exc.code).inc()
        log.warning(
            "webhook_rejected", provider=provider, status=exc.status, code=exc.code, reason=reason
        )
    elif path == "/jobs" or path.startswith("/jobs/"):
        route = f"{request.method} /jobs" if path == "/jobs" else f"{request.method} /jobs/..."
        metrics.operator_rejections.labels(route, exc.code).inc()
        log.warning(
            "operator_call_rejected", route=route, status=exc.status, code=exc.code, reason=reason
        )
