"""Turning a parsed event into a durable record: plan each output's key and deadline, then record.

Webhooks and status polls both come through here, so both get the same idempotency, the same
deadlines and the same archive tasks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import datetime, timedelta

import structlog

from receiver import tracing
from receiver.domain import (
    RESERVED_NAMES,
    Clock,
    JobEvent,
    archive_key,
    compute_deadline,
    fit_name,
)
from receiver.ledger import IncomingDelivery, Ledger, PlannedOutput, RecordResult
from receiver.metrics import Metrics
from receiver.providers.base import ProviderSpec

log = structlog.get_logger(__name__)


def plan_outputs(
    event: JobEvent, spec: ProviderSpec, received_at: datetime, margin: timedelta
) -> list[PlannedOutput]:
    """Each output's object key (dated by completion) and its copy deadline."""
    window_start = event.completed_at or received_at
    plan: list[PlannedOutput] = []
    used: set[str] = set(RESERVED_NAMES)
    for n, output in enumerate(event.outputs):
        # Fitted first (reserved names, length), so the key's last segment is the asset's name.
        base = fit_name(output.name) or f"output-{n}"
        name = base
        prefix = n
        while name.lower() in used:  # each output needs a key of its own (any file system)
            name = fit_name(f"{prefix}-{base}")
            prefix += 1
        used.add(name.lower())
        plan.append(
            PlannedOutput(
                n=n,
                url=output.url,
                name=name,
                key=archive_key(
                    prefix="",
                    provider=event.provider,
                    job_id=event.job_id,
                    completed_at=window_start,
                    name=name,
                ),
                content_type=output.content_type,
                deadline=compute_deadline(
                    window=spec.window, window_start=window_start, url=output.url, margin=margin
                ),
            )
        )
    return plan


class Ingestor:
    def __init__(
        self,
        ledger: Ledger,
        specs: dict[str, ProviderSpec],
        *,
        deadline_margin: timedelta,
        clock: Clock,
        on_queued: Callable[[], None] = lambda: None,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.on_queued = on_queued  # wakes in-process workers; others find the task by polling
        self.ledger = ledger
        self.specs = specs
        self.margin = deadline_margin
        self.clock = clock

    async def ingest(
        self,
        event: JobEvent,
        *,
        body: bytes,
        source: str,
        auth: str,
        delivery_id: str | None,
    ) -> RecordResult:
        received_at = self.clock()
        delivery = IncomingDelivery(
            received_at=received_at,
            source=source,
            auth=auth,
            body=body,
            payload_sha256=hashlib.sha256(body).hexdigest(),
            delivery_id=delivery_id,
            # The webhook's (or poll's) trace goes with the tasks this queues (receiver.tracing).
            traceparent=tracing.current_traceparent(),
        )
        plan = plan_outputs(event, self.specs[event.provider], received_at, self.margin)
        with tracing.span(
            "receiver.record", provider=event.provider, job_id=event.job_id, source=source
        ) as span:
            result = await self.ledger.record(event, delivery, plan)
            span.set_attribute("receiver.outcome", result.outcome.value)
            span.set_attribute("receiver.tasks_queued", result.tasks_queued)
        self.metrics.deliveries.labels(event.provider, source, result.outcome.value).inc()
        if result.body_mismatch:
            self.metrics.body_mismatches.labels(event.provider).inc()
            log.warning(
                "delivery_id_reused_with_another_body",
                provider=event.provider,
                job_id=event.job_id,
                delivery_id=delivery_id,
                payload_sha256=delivery.payload_sha256,
            )
        if result.tasks_queued:
            self.on_queued()
        return result
