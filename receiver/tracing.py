"""Optional OpenTelemetry tracing: one trace per job, from the webhook through fetch, store and
onward delivery. Off unless switched on; then every span ends through `redacting`, which keeps
URL query strings (signed links) and webhook path tokens out of every attribute.

Switched on by the standard variable ``OTEL_TRACES_EXPORTER`` naming an exporter: ``otlp``
(OTLP over HTTP/protobuf, to ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``..._TRACES_ENDPOINT``) or
``console``; ``OTEL_SDK_DISABLED=true`` turns it off again. An OTLP endpoint alone does not turn
it on: the SDK's own default exporter is ``otlp``, so "on unless told" would make tracing the
default. The SDK reads the rest itself (``OTEL_SERVICE_NAME``, default ``receiver``;
``OTEL_RESOURCE_ATTRIBUTES``; ``OTEL_TRACES_SAMPLER``; ``OTEL_BSP_*``; the OTLP headers).

How a job's trace crosses the queue: the webhook's request span is current while the ledger
records the delivery; `current_traceparent()` gives its W3C ``traceparent``, which the ledger
stores with every archive task the delivery queues (SQLite: a column of ``tasks``; DynamoDB:
an attribute of the task item and a field of the SQS message). The worker that leases the task
starts `job_span` from it, so the copy (fetch, store, manifest) and the onward delivery are
children of the webhook's span in one trace, whichever process or host runs them. A task
without one (tracing was off when it was queued, a poll found the job, the outbox relay re-sent
it) starts a trace of its own, with the job's provider and id as attributes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, Tracer
from opentelemetry.trace import SpanKind as SpanKind  # re-exported: job_span(kind=...)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from receiver.errors import ConfigurationError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from starlette.applications import Starlette

# Scrapes and health checks every few seconds are not worth a trace each (the standard
# variable overrides this).
_EXCLUDED_URLS = "/metrics,/healthz,/readyz"
_PROPAGATOR = TraceContextTextMapPropagator()
_tracer: Tracer = trace.NoOpTracer()
_provider: TracerProvider | None = None


def exporters_wanted(environ: Mapping[str, str]) -> list[str]:
    """The exporters OTEL_TRACES_EXPORTER names (empty: tracing stays off)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",")]
    return [n for n in names if n and n != "none"]


def setup_from_environment(environ: Mapping[str, str] = os.environ) -> bool:
    """`receiver serve` / `worker`: switch tracing on if the environment asks; True if on."""
    wanted = exporters_wanted(environ)
    if not wanted or _provider is not None:
        return _provider is not None
    protocol = environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
    )
    if "otlp" in wanted and protocol not in ("", "http/protobuf"):
        raise ConfigurationError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: receiver sends OTLP over HTTP only; "
            "set it to http/protobuf (or unset it) and point OTEL_EXPORTER_OTLP_ENDPOINT at "
            "the collector's HTTP port (4318)"
        )
    exporters: list[SpanExporter] = []
    for name in wanted:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
        else:
            raise ConfigurationError(
                f"OTEL_TRACES_EXPORTER={name}: receiver supports otlp and console (or none)"
            )
    setup(exporters, batch=True)
    return True


def setup(exporters: Sequence[SpanExporter], *, batch: bool = False) -> TracerProvider:
    """Switch tracing on with these exporters (fed through `redacting`), and instrument httpx
    and botocore. Tests pass an in-memory exporter; `shutdown` undoes it."""
    global _tracer, _provider
    from opentelemetry.instrumentation.botocore import BotocoreInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    shutdown()
    # The SDK reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES itself; "receiver" only when
    # neither names the service.
    named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    resource = Resource.create({} if named else {"service.name": "receiver"})
    provider = TracerProvider(resource=resource)
    for exporter in exporters:
        processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
        provider.add_span_processor(redacting(processor))
    HTTPXClientInstrumentor().instrument(tracer_provider=provider)
    BotocoreInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]
    _provider, _tracer = provider, provider.get_tracer("receiver")
    return provider


def shutdown() -> None:
    """Flush and switch tracing off (a no-op when it is off)."""
    global _tracer, _provider
    if _provider is None:
        return
    from opentelemetry.instrumentation.botocore import BotocoreInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    HTTPXClientInstrumentor().uninstrument()
    BotocoreInstrumentor().uninstrument()  # type: ignore[no-untyped-call]
    _provider.shutdown()
    _provider, _tracer = None, trace.NoOpTracer()


def instrument_app(app: Starlette) -> None:
    """Give every request (but scrapes and health checks) a server span, when tracing is on."""
    if _provider is None:
        return
    os.environ.setdefault("OTEL_PYTHON_STARLETTE_EXCLUDED_URLS", _EXCLUDED_URLS)
    from opentelemetry.instrumentation.starlette import StarletteInstrumentor

    StarletteInstrumentor.instrument_app(app, tracer_provider=_provider)


def current_traceparent() -> str | None:
    """The current span's W3C traceparent, to store with the work it queues (None: off)."""
    if _provider is None or not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent")


@contextmanager
def job_span(
    name: str,
    traceparent: str | None,
    *,
    kind: SpanKind = SpanKind.CONSUMER,
    **attributes: str | int | float | bool | None,
) -> Iterator[Span]:
    """A span continuing the trace `traceparent` names (from `current_traceparent`, stored with
    a task), or a new trace without one. The archive worker opens one per leased task; the
    onward sender one per try, continuing the trace its event was written in (the ledger
    stores `current_traceparent()` with each event, receiver/ledger/events.py), and its httpx
    request becomes a child span by itself.
    A no-op span when tracing is off."""
    if _provider is None:  # off: nothing to start (the no-op tracer costs microseconds)
        yield trace.INVALID_SPAN
        return
    # No traceparent: a new trace, whatever span the caller's context holds.
    parent = _PROPAGATOR.extract({"traceparent": traceparent}) if traceparent else Context()
    with _tracer.start_as_current_span(
        name, context=parent, kind=kind, attributes=_clean(attributes)
    ) as span:
        yield span


@contextmanager
def span(name: str, **attributes: str | int | float | bool | None) -> Iterator[Span]:
    """A child of the current span (fetch, store, record...); a no-op when tracing is off."""
    if _provider is None:
        yield trace.INVALID_SPAN
        return
    with _tracer.start_as_current_span(name, attributes=_clean(attributes)) as current:
        yield current


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {f"receiver.{k}": v for k, v in attributes.items() if v is not None}


# -- redaction: the one place that decides what a span may carry -------------------------------

# A webhook path's secret token (/webhooks/{provider}/{token}), wherever a path or URL shows it.
_PATH_TOKEN = re.compile(r"(/webhooks/[^/?#\s]+/)[^/?#\s]+")
# A query string or fragment in a URL or path: signed links carry their credentials there.
_QUERY = re.compile(r"(?<=[^\s?#])[?#][^\s]*")


def redact(value: Any) -> Any:
    """An attribute value without webhook path tokens and URL query strings."""
    if isinstance(value, str):
        if "/" not in value and "?" not in value:
            return value
        return _QUERY.sub("", _PATH_TOKEN.sub(r"\1{token}", value))
    if isinstance(value, tuple | list):
        return type(value)(redact(v) for v in value)
    return value


def _redacted_attributes(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    redacted = {k: redact(v) for k, v in (attributes or {}).items()}
    # `url.query` / `http.query` hold nothing but the query string: drop the value whole.
    return {k: ("" if k.endswith(".query") and v else v) for k, v in redacted.items()}


def redacting(inner: SpanProcessor) -> SpanProcessor:
    """A span processor that hands `inner` (the exporter's) a copy of each ended span with its
    name and every attribute (the span's, its events' and links') redacted. At the span's end,
    not in the exporter's thread: a batch of 512 copies there held the GIL for milliseconds.
    (Built here, so that the SDK is imported only when tracing is on.)"""
    from opentelemetry.sdk.trace import SpanProcessor

    class Redacting(SpanProcessor):
        def on_start(self, span: Any, parent_context: Any = None) -> None:
            inner.on_start(span, parent_context)

        def on_end(self, span: ReadableSpan) -> None:
            inner.on_end(_redacted(span))

        def shutdown(self) -> None:
            inner.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return inner.force_flush(timeout_millis)

    return Redacting()


def _redacted(span: ReadableSpan) -> ReadableSpan:
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.trace import Link

    return ReadableSpan(
        name=redact(span.name),
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=_redacted_attributes(span.attributes),
        events=[
            Event(e.name, _redacted_attributes(e.attributes), e.timestamp) for e in span.events
        ],
        links=[Link(link.context, _redacted_attributes(link.attributes)) for link in span.links],
        kind=span.kind,
        status=span.status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )
