"""The app factory: builds the Starlette app from settings and injected parts.

Tests build it with a temporary database and a fake clock; `receiver serve` builds it with the
real ones. Nothing here reads the environment: settings come in already parsed.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from receiver.errors import ConfigurationError, RequestRejected
from receiver.ingest import Clock, Ingestor
from receiver.ingress import WebhookAuth, WebhookEndpoint, Webhooks, error_payload
from receiver.ledger.sqlite import SqliteLedger
from receiver.providers import REGISTRY
from receiver.settings import Settings
from receiver.sqlite_db import Database
from receiver.webhook_auth import SignatureVerifier

log = structlog.get_logger(__name__)


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Parts:
    """The running pieces of one process, shared by the HTTP app and the workers."""

    settings: Settings
    db: Database
    ledger: SqliteLedger
    ingestor: Ingestor
    clock: Clock = utc_now
    wall_clock: Callable[[], float] = time.time
    background: list[Any] = field(default_factory=list)


def build_parts(
    settings: Settings, *, clock: Clock = utc_now, wall_clock: Callable[[], float] = time.time
) -> Parts:
    settings.check_queue()
    db = Database(settings.sqlite_path)
    ledger = SqliteLedger(db)
    ingestor = Ingestor(
        ledger,
        REGISTRY,
        deadline_margin=timedelta(seconds=settings.deadline_margin_seconds),
        clock=clock,
    )
    return Parts(settings, db, ledger, ingestor, clock, wall_clock)


def webhook_endpoints(settings: Settings) -> dict[str, WebhookEndpoint]:
    """The enabled webhook providers; an unauthenticated one stops start-up (unless dev mode)."""
    endpoints: dict[str, WebhookEndpoint] = {}
    for name in settings.enabled_webhook_providers:
        spec = REGISTRY[name]
        if spec.parse_webhook is None:
            raise ConfigurationError(
                f"RECEIVER_WEBHOOK_PROVIDERS: {name} has no webhooks; track its jobs with "
                "POST /jobs (polling) instead"
            )
        config = settings.provider(name)
        if not config.authenticated and not settings.insecure_dev:
            upper = name.upper()
            raise ConfigurationError(
                f"webhooks for {name} have no authentication. Set "
                f"RECEIVER_{upper}_WEBHOOK_SECRETS=whsec_... (Standard Webhooks signatures; "
                f"comma-separate several for rotation) or RECEIVER_{upper}_WEBHOOK_TOKEN=<random> "
                f"(then use /webhooks/{name}/<token>); or drop {name} from "
                "RECEIVER_WEBHOOK_PROVIDERS. For local development only: --insecure-dev."
            )
        signature = (
            SignatureVerifier(config.webhook_secrets, settings.webhook_tolerance_seconds)
            if config.webhook_secrets
            else None
        )
        endpoints[name] = WebhookEndpoint(spec, WebhookAuth(signature, config.webhook_token))
    return endpoints


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


def create_app(parts: Parts, *, on_startup: list[Callable[[], Any]] | None = None) -> Starlette:
    settings = parts.settings
    endpoints = webhook_endpoints(settings)
    if settings.insecure_dev:
        log.warning(
            "insecure_dev_mode",
            message="RECEIVER_INSECURE_DEV is on: unauthenticated webhooks are accepted. "
            "Never run like this in production.",
        )
    webhooks = Webhooks(
        parts.ingestor,
        endpoints,
        max_body_bytes=settings.max_body_bytes,
        wall_clock=parts.wall_clock,
    )

    async def readyz(request: Request) -> JSONResponse:
        try:
            await parts.ledger.ping()
        except Exception as exc:
            return JSONResponse(
                {"status": "not-ready", "checks": {"ledger": str(exc)}}, status_code=503
            )
        return JSONResponse({"status": "ready", "checks": {"ledger": "ok"}})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        parts.db.start()
        for hook in on_startup or []:
            await hook()
        try:
            yield
        finally:
            for task in parts.background:
                task.cancel()
            parts.db.stop()

    routes = [
        *webhooks.routes(),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            RequestRejected: _rejected,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
    )


async def _rejected(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestRejected)
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_payload(exc.status_code, code, str(exc.detail))


async def _unexpected(request: Request, exc: Exception) -> Response:
    # No path in the log line: a webhook path may carry the provider's secret token.
    log.exception("unhandled_error", method=request.method)
    return error_payload(500, "internal_error", "internal error; nothing was acknowledged")
