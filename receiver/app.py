"""The app factory: builds the Starlette app from settings and injected parts.

Tests build it with a temporary database and a fake clock; `receiver serve` builds it with the
real ones. Nothing here reads the environment: settings come in already parsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import ssl
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import certifi
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from receiver import tracing
from receiver.archive.fetch import Fetcher, FetchPolicy, Resolver
from receiver.archive.worker import Archiver, RetryPolicy
from receiver.audit.api import AuditApi
from receiver.audit.fixity import FixityLoop
from receiver.audit.lifecycle import PruneReport, RetentionLoop, RetentionPolicy
from receiver.audit.openapi import document
from receiver.backends.sqlite import Database
from receiver.domain import Clock, JobState
from receiver.errors import ConfigurationError, RequestRejected
from receiver.ingest.auth import SignatureVerifier
from receiver.ingest.record import Ingestor
from receiver.ingest.routes import (
    WebhookAuth,
    WebhookEndpoint,
    Webhooks,
    error_payload,
    note_rejection,
)
from receiver.ledger import Ledger
from receiver.ledger.events import EventOutbox, Subscription, Subscriptions
from receiver.ledger.sqlite import SqliteLedger
from receiver.metrics import Metrics
from receiver.onward import Destination
from receiver.onward.http import HttpDestination
from receiver.onward.sender import RetrySchedule, Sender
from receiver.polling.poller import Poller
from receiver.polling.registration import Registrar, Registration, TrackingApi
from receiver.polling.schedule import Tracker
from receiver.polling.schedule.sqlite import TrackedStore
from receiver.providers import REGISTRY
from receiver.settings import PART_SIZE, PARTS_IN_FLIGHT, OnwardEndpoint, Settings
from receiver.store import Store
from receiver.store.local import LocalStore
from receiver.workqueue import WorkQueue
from receiver.workqueue.sqlite import SqliteQueue

if TYPE_CHECKING:
    from receiver.ledger.dynamodb import DynamoLedger
    from receiver.workqueue.sqs import SqsQueue

# The AWS adapters (boto3: about 20 MB) and the console (Jinja2) are imported where they are
# picked, so that a `receiver worker` on the embedded default never loads them.

log = structlog.get_logger(__name__)


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Parts:
    """The running pieces of one process, shared by the HTTP app and the workers."""

    settings: Settings
    db: Database
    ledger: Ledger
    queue: WorkQueue
    store: Store
    ingestor: Ingestor
    archiver: Archiver
    metrics: Metrics
    tracked: Tracker  # the poll schedule (the poller's, the registrar's and the audit's)
    clock: Clock = utc_now
    wall_clock: Callable[[], float] = time.time
    background: list[asyncio.Task[None]] = field(default_factory=list)
    poller: Poller | None = None  # follows tracked jobs; runs beside the archive workers
    sender: Sender | None = None  # onward delivery; runs beside the archive workers

    def start(self, *, workers: int) -> None:
        """Start the database writer and, if asked, `workers` archive loops on this loop."""
        self.db.start()
        if workers:
            self.background.append(asyncio.create_task(self.archiver.run(workers)))
            if self.poller is not None:
                self.background.append(asyncio.create_task(self.poller.run()))
            if self.sender is not None:
                self.background.append(asyncio.create_task(self.sender.run()))
            for loop in lifecycle_loops(self):
                self.background.append(asyncio.create_task(loop))

    async def stop(self) -> None:
        for task in self.background:
            task.cancel()
        for task in self.background:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.background.clear()
        for fetcher in self.archiver.fetchers.values():
            await fetcher.aclose()
        if self.poller is not None:
            await self.poller.aclose()
        if self.sender is not None:
            await self.sender.aclose()
        await self.store.aclose()
        self.db.stop()


def lifecycle_loops(parts: Parts) -> list[Coroutine[Any, Any, None]]:
    """Retention (always) and background fixity (when RECEIVER_FIXITY_PER_HOUR > 0), run beside
    the archive workers of `serve` and `worker`."""
    settings, metrics = parts.settings, parts.metrics

    def pruned(report: PruneReport) -> None:
        metrics.payloads_pruned.inc(report.payloads_removed)
        metrics.jobs_pruned.inc(len(report.jobs_removed))

    loops = [
        RetentionLoop(
            parts.ledger,
            RetentionPolicy.from_days(
                settings.payload_retention_days,
                settings.job_retention_days,
                settings.retention_batch,
            ),
            clock=parts.clock,
            interval=settings.retention_interval_seconds,
            on_pruned=pruned,
        ).run()
    ]
    if settings.fixity_per_hour > 0:
        fixity = FixityLoop(
            parts.ledger,
            parts.store,
            clock=parts.clock,
            fixity_days=settings.fixity_days,
            per_hour=settings.fixity_per_hour,
            on_checked=lambda check: metrics.fixity_checks.labels(check.result).inc(),
        )
        loops.append(fixity.run())
    return loops


def open_store(
    url: str, *, part_size: int = PART_SIZE, parts_in_flight: int = PARTS_IN_FLIGHT
) -> Store:
    """Open the store named by ``url``.

    ``file:///abs/path`` or ``file://./relative/path`` (resolved against the current directory):
    a local folder. ``s3://bucket`` or ``s3://bucket/prefix``: S3 or any S3-compatible endpoint,
    configured the way boto3 always is (``AWS_ENDPOINT_URL``, ``AWS_REGION``, profiles).
    ``part_size`` and ``parts_in_flight`` bound an S3 upload's memory to about
    ``(parts_in_flight + 1) * part_size``.
    """
    parts = urlsplit(url)
    if parts.scheme == "file":
        # "file://./var/archive" puts "." in the netloc; a real host name is not supported.
        if parts.netloc in ("", "localhost"):
            raw_path = unquote(parts.path)
        elif parts.netloc in (".", ".."):
            raw_path = parts.netloc + unquote(parts.path)
        else:
            raise ValueError(
                f"unsupported file URL {url!r}: use file:///absolute/path or file://./relative/path"
            )
        if not raw_path:
            raise ValueError(f"file URL {url!r} names no folder")
        return LocalStore(Path(raw_path).resolve())
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"S3 URL {url!r} names no bucket: use s3://bucket/prefix")
        from receiver.store.s3 import S3Store

        return S3Store(
            parts.netloc,
            unquote(parts.path).strip("/"),
            part_size=part_size,
            parts_in_flight=parts_in_flight,
        )
    raise ValueError(f"unsupported store URL {url!r}: use file://path or s3://bucket/prefix")


def subscriptions(settings: Settings) -> Subscriptions:
    """Who receives which onward event (RECEIVER_ONWARD_ENDPOINTS)."""
    return Subscriptions(tuple(Subscription(e.name, e.events) for e in settings.onward))


def destination(settings: Settings, endpoint: OnwardEndpoint) -> Destination:
    """The destination adapter of one onward endpoint (HTTP(S) or SQS)."""
    if endpoint.kind == "sqs":
        from receiver.onward.sqs import SqsDestination

        return SqsDestination(endpoint.url)
    return HttpDestination(
        endpoint.name,
        endpoint.url,
        endpoint.secrets,
        timeout=settings.onward_timeout_seconds,
        concurrency=settings.onward_concurrency,
    )


def build_sender(
    settings: Settings,
    outbox: EventOutbox,
    *,
    clock: Clock,
    rng: Callable[[], float],
    metrics: Metrics,
) -> Sender | None:
    """The onward sender and a destination per endpoint (None: no endpoint configured)."""
    destinations = {e.name: destination(settings, e) for e in settings.onward}
    if not destinations:
        return None
    return Sender(
        outbox,
        destinations,
        RetrySchedule(settings.onward_retry_delays),
        clock=clock,
        concurrency=settings.onward_concurrency,
        # A try is bounded by its timeout; the lease covers it with room (a dead sender's
        # sends come back when it lapses).
        lease=timedelta(seconds=max(settings.lease_seconds, 2 * settings.onward_timeout_seconds)),
        rng=rng,
        metrics=metrics,
    )


def open_distributed(settings: Settings) -> tuple[DynamoLedger, SqsQueue]:
    """The scale-out pair: the DynamoDB ledger, whose outbox sends through the SQS queue."""
    from receiver.ledger.dynamodb import DynamoLedger
    from receiver.ledger.dynamodb.claims import DynamoTaskClaims
    from receiver.workqueue.sqs import SqsQueue

    queue = SqsQueue.from_url(
        settings.queue_url or "", urgent_window=timedelta(hours=settings.queue_urgent_hours)
    )
    ledger = DynamoLedger.from_url(
        settings.ledger_url,
        publish=queue.publish,
        # Body parts carry the table's TTL: DynamoDB drops them without a prune.
        payload_retention=timedelta(days=settings.payload_retention_days),
        subscriptions=subscriptions(settings),
    )
    queue.relay = ledger.relay_outbox  # workers re-send what a dead sender left in the outbox
    # One copy of an asset at a time, whatever SQS delivers twice: a claim on the task's item.
    queue.claims = DynamoTaskClaims(ledger.table, ledger.ddb)
    queue.on_redriven = functools.partial(end_redriven_task, ledger)
    return ledger, queue


async def end_redriven_task(
    ledger: Ledger, provider: str, job_id: str, n: int, reason: str
) -> bool:
    """A task the queue's redrive policy dead-lettered: end its asset if it is still pending."""
    asset = await ledger.asset_to_copy(provider, job_id, n)
    if asset is None or asset.state != "pending":
        return False
    await ledger.mark_asset_ended(provider, job_id, n, JobState.DEAD, reason, utc_now())
    return True


def fetch_policies(settings: Settings) -> dict[str, FetchPolicy]:
    """Per provider: its documented download hosts plus the operator's additions."""
    return {
        name: FetchPolicy(
            allowed_hosts=spec.download_hosts + settings.provider(name).extra_download_hosts,
            any_host=settings.insecure_dev,
            allow_http=settings.fetch_allow_http,
            allow_networks=settings.allow_networks,
        )
        for name, spec in REGISTRY.items()
    }


def build_parts(
    settings: Settings,
    *,
    clock: Clock = utc_now,
    wall_clock: Callable[[], float] = time.time,
    resolver: Resolver | None = None,
    rng: Callable[[], float] = random.random,
) -> Parts:
    settings.check_queue()
    metrics = Metrics()
    metrics.fixity_max_age.set(settings.fixity_days * 86400)
    db = Database(settings.local_db_path)
    ledger: Ledger
    queue: WorkQueue
    tracked: Tracker
    if settings.distributed:  # dynamodb:// + sqs:// (scale-out)
        from receiver.polling.schedule.dynamodb import DynamoTrackedStore

        dynamo, queue = open_distributed(settings)
        # The poll schedule shares the ledger's table: a job registered on any replica is
        # polled by whichever worker process claims it first.
        ledger, tracked = dynamo, DynamoTrackedStore(dynamo.table, ddb=dynamo.ddb)
    else:
        ledger, queue = SqliteLedger(db, subscriptions(settings)), SqliteQueue(db)
        tracked = TrackedStore(db)
    store = open_store(
        settings.archive_url,
        part_size=settings.part_size,
        parts_in_flight=settings.parts_in_flight,
    )
    tls = ssl.create_default_context(cafile=certifi.where())
    fetchers = {
        name: Fetcher(policy, resolver=resolver, tls=tls)
        for name, policy in fetch_policies(settings).items()
    }
    archiver = Archiver(
        ledger,
        queue,
        store,
        fetchers,
        clock=clock,
        lease_for=timedelta(seconds=settings.lease_seconds),
        retry=RetryPolicy(
            max_attempts=settings.max_attempts,
            min_bytes_per_second=settings.copy_min_bytes_per_second,
            slow_window=settings.copy_slow_window_seconds,
            store_wait_max=settings.store_outage_max_wait_seconds,
        ),
        rng=rng,
        metrics=metrics,
    )
    ingestor = Ingestor(
        ledger,
        REGISTRY,
        deadline_margin=timedelta(seconds=settings.deadline_margin_seconds),
        clock=clock,
        on_queued=archiver.wake.set,
        metrics=metrics,
    )
    parts = Parts(
        settings, db, ledger, queue, store, ingestor, archiver, metrics, tracked, clock, wall_clock
    )
    parts.poller = Poller(
        tracked, ingestor, settings, REGISTRY, clock=clock, rng=rng, metrics=metrics
    )
    parts.sender = build_sender(settings, ledger, clock=clock, rng=rng, metrics=metrics)
    return parts


async def register_offline(settings: Settings, data: Any, *, clock: Clock) -> Registration:
    """`receiver track`: register straight into the database; a running poller picks it up."""
    if settings.distributed:
        # The ledger's table holds the schedule too: any `receiver worker` polls the job.
        from receiver.ledger.dynamodb import DynamoLedger
        from receiver.polling.schedule.dynamodb import DynamoTrackedStore

        # No publisher: a registration writes no archive task, so nothing goes to the queue.
        ledger = DynamoLedger.from_url(settings.ledger_url)
        tracker = DynamoTrackedStore(ledger.table, ddb=ledger.ddb)
        return await Registrar(ledger, tracker, settings, clock=clock).register(data, source="cli")

    db = Database(settings.sqlite_path)
    db.start()
    try:
        registrar = Registrar(SqliteLedger(db), TrackedStore(db), settings, clock=clock)
        return await registrar.register(data, source="cli")
    finally:
        db.stop()


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's own limits for slow or idle clients (`receiver serve`). uvicorn has no timeout
    for request headers: a reverse proxy in front provides one (see the README)."""
    return {
        "timeout_keep_alive": settings.keep_alive_seconds,
        "h11_max_incomplete_event_size": 16 * 1024,  # request line and headers
        # access_log off: webhook paths may carry a provider's secret token.
        "access_log": False,
    }


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


def create_app(parts: Parts, *, workers: int = 0) -> Starlette:
    """The HTTP app; its lifespan starts the parts and `workers` archive loops beside it."""
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
        on_auth_failure=lambda provider: parts.metrics.auth_failures.labels(provider).inc(),
        body_timeout=settings.body_timeout_seconds,
        metrics=parts.metrics,
    )
    api_token = settings.api_token.get_secret_value() if settings.api_token else None
    audit = AuditApi(parts.ledger, parts.store, api_token, parts.tracked)
    audit.payload_retention_days = settings.payload_retention_days
    poller = parts.poller
    registrar = Registrar(
        parts.ledger,
        parts.tracked,
        settings,
        clock=parts.clock,
        provider_problem=poller.problem if poller else lambda provider: None,
        on_registered=poller.wake.set if poller else lambda: None,
    )
    tracking = TrackingApi(registrar, api_token)
    from receiver.audit.console import Console, ConsoleParts

    console = Console(
        ConsoleParts(
            parts.ledger,
            parts.store,
            parts.queue,
            parts.metrics,
            parts.clock,
            api_token,
            tracker=parts.tracked,
            poll_problem=poller.problem if poller else lambda provider: None,
            on_requeued=parts.archiver.wake.set,
            on_replayed=parts.sender.wake.set if parts.sender else lambda: None,
            payload_retention_days=settings.payload_retention_days,
        )
    )
    openapi = document()

    async def metrics(request: Request) -> Response:
        # A failing ledger must still leave a scrape that says so (receiver_ledger_up 0, the
        # rest as last seen), never a 500 that hides every other series with it.
        if await ledger_probe() == "ok":
            with contextlib.suppress(Exception):
                parts.metrics.observe_fixity(await parts.ledger.fixity_status(), parts.clock())
        await store_probe()
        if poller is not None:
            parts.metrics.observe_polling(
                {p: getattr(poller.problems.get(p), "reason", None) for p in poller.limiters}
            )
        try:
            body = await parts.metrics.render(parts.queue, parts.clock())
        except Exception:
            log.warning("metrics_queue_stats_failed", exc_info=True)
            body = generate_latest(parts.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def openapi_json(request: Request) -> JSONResponse:
        return JSONResponse(openapi)

    async def store_probe() -> str:
        """Probe the store and set receiver_store_up; "ok" or what went wrong."""
        try:
            await asyncio.wait_for(parts.store.ping(), timeout=5)
        except Exception as exc:
            parts.metrics.store_up.set(0)
            return f"{type(exc).__name__}: {exc}"
        parts.metrics.store_up.set(1)
        return "ok"

    async def ledger_probe() -> str:
        """Ping the ledger and set receiver_ledger_up; "ok" or what went wrong."""
        try:
            await asyncio.wait_for(parts.ledger.ping(), timeout=5)
        except Exception as exc:
            parts.metrics.ledger_up.set(0)
            return f"{type(exc).__name__}: {exc}"
        parts.metrics.ledger_up.set(1)
        return "ok"

    async def readyz(request: Request) -> JSONResponse:
        # Ready means "can accept webhooks": that needs the ledger only. Ingest never touches
        # the store (workers wait out a store outage), so a store outage must not take replicas
        # out of the load balancer. ?full=1 also checks the store, for people and dashboards.
        checks = {"ledger": await ledger_probe()}
        if request.query_params.get("full") in ("1", "true", "yes"):
            checks["store"] = await store_probe()
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse(
            {"status": "ready" if ready else "not-ready", "checks": checks},
            status_code=200 if ready else 503,
        )

    async def rejected(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestRejected)
        note_rejection(parts.metrics, endpoints, request, exc)  # logged and counted once
        return _closing_if_body(request, await _rejected(request, exc))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        parts.start(workers=workers)
        try:
            yield
        finally:
            await parts.stop()

    routes = [
        *webhooks.routes(),
        *audit.routes(),
        *tracking.routes(),
        *console.routes(),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/openapi.json", openapi_json),
    ]
    application = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            RequestRejected: rejected,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
    )
    tracing.instrument_app(application)  # when tracing is on (OTEL_TRACES_EXPORTER)
    return application


async def _rejected(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestRejected)
    return JSONResponse(exc.body(), status_code=exc.status)


def _closing_if_body(request: Request, response: Response) -> Response:
    """A refused request that came with a body may not have sent all of it (a 401 is answered
    before the body is read; a 408 because it never came): close the connection rather than
    wait for the rest of the body, so a slow or stuck client never keeps its slot."""
    if "content-length" in request.headers or "transfer-encoding" in request.headers:
        response.headers["connection"] = "close"
    return response


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return _closing_if_body(request, error_payload(exc.status_code, code, str(exc.detail)))


async def _unexpected(request: Request, exc: Exception) -> Response:
    # No path in the log line: a webhook path may carry the provider's secret token.
    log.exception("unhandled_error", method=request.method)
    return error_payload(500, "internal_error", "internal error; nothing was acknowledged")
