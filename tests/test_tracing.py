"""Tracing (issue 23): off by default; on, one trace per job from the webhook's request through
the record, the copy (fetch, store) and its S3 calls, across the queue; and no span carries a
URL's query string or a webhook path token. Spans are caught by the SDK's in-memory exporter,
behind the same redaction as a real exporter."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from receiver import tracing
from receiver.errors import ConfigurationError
from tests.conftest import LOCAL_SOURCES, Harness
from tests.payloads import APEX_TOKEN, apex_completed
from tests.sources import SourceServer
from tests.test_poller import (  # noqa: F401 (fixtures)
    Polling,
    flora_run,
    polling,
    polling_factory,
    tracker_backend,
)

pytestmark = pytest.mark.anyio

SECRETS = ("TOPSECRET", "X-Amz-Signature", "X-Amz-Credential", "AKIDSECRET", APEX_TOKEN)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.setup([exporter])
    try:
        yield exporter
    finally:
        tracing.shutdown()


def signed_source(source: SourceServer, path: str) -> str:
    url = source.add(path, 5000, content_type="image/png")
    return (
        url + "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDSECRET%2F20260316"
        "&X-Amz-Date=20260316T120000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host"
        "&X-Amz-Signature=TOPSECRET"
    )


async def webhook_and_copy(h: Harness, source: SourceServer, job_id: str) -> None:
    payload = apex_completed(job_id, url=signed_source(source, f"/o/{job_id}/out.png"))
    answer = await h.client.post(f"/webhooks/apex/{APEX_TOKEN}", json=payload)
    assert answer.status_code == 202, answer.text
    assert await h.parts.archiver.run_once()
    job = await h.parts.ledger.job("apex", job_id)
    assert job is not None
    assert job.state == "archived", job


def every_text(span: ReadableSpan) -> list[str]:
    """Everything a span would send: its name and every attribute value (events, links too)."""
    texts = [span.name]
    attributes: list[Any] = [span.attributes or {}]
    attributes += [e.attributes or {} for e in span.events]
    attributes += [link.attributes or {} for link in span.links]
    for mapping in attributes:
        for key, value in mapping.items():
            texts += [key, *(value if isinstance(value, tuple | list) else [value])]
    return [str(t) for t in texts]


def assert_no_secrets(finished: tuple[ReadableSpan, ...]) -> None:
    for span in finished:
        for text in every_text(span):
            for secret in SECRETS:
                assert secret not in text, f"{secret!r} in span {span.name!r}: {text!r}"
            assert "?" not in text, f"a query string in span {span.name!r}: {text!r}"


def by_name(finished: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    found = [s for s in finished if s.name == name]
    assert found, f"no {name!r} span among {sorted({s.name for s in finished})}"
    return found[0]


async def test_one_trace_from_the_webhook_through_fetch_and_store_without_secrets(
    spans: InMemorySpanExporter, harness_factory: Any, source_server: SourceServer
) -> None:
    h: Harness = await harness_factory(**LOCAL_SOURCES)
    await webhook_and_copy(h, source_server, "traced-local")
    finished = spans.get_finished_spans()

    request = by_name(finished, "POST /webhooks/{provider}/{token}")
    trace_id = request.context.trace_id
    record = by_name(finished, "receiver.record")
    archive = by_name(finished, "receiver.archive")
    copy = by_name(finished, "receiver.copy")
    store = by_name(finished, "receiver.store")
    fetch = by_name(finished, "GET")  # httpx's span of the download
    for span in (record, archive, copy, store, fetch):
        assert span.context.trace_id == trace_id, span.name
    # The worker's span continues the request's, across the queue (the task's traceparent).
    assert archive.parent is not None
    assert archive.parent.span_id in {s.context.span_id for s in finished if s is not archive}
    assert copy.parent is not None and copy.parent.span_id == archive.context.span_id
    assert store.parent is not None and store.parent.span_id == copy.context.span_id
    assert archive.attributes is not None
    assert archive.attributes["receiver.job_id"] == "traced-local"
    assert record.attributes is not None and record.attributes["receiver.outcome"] == "accepted"
    # The path, as a span shows it: the route's shape, never the token.
    paths = [t for s in finished for t in every_text(s) if "/webhooks/apex/" in t]
    assert paths and all(t.endswith("/webhooks/apex/{token}") for t in paths), paths
    assert any("127.0.0.1" in t for t in every_text(fetch))  # the source's host, kept
    assert_no_secrets(finished)


async def test_s3_calls_join_the_job_s_trace(
    spans: InMemorySpanExporter,
    harness_factory: Any,
    source_server: SourceServer,
    s3_bucket: str,
) -> None:
    h: Harness = await harness_factory(**LOCAL_SOURCES, archive_url=f"s3://{s3_bucket}/archive")
    await webhook_and_copy(h, source_server, "traced-s3")
    finished = spans.get_finished_spans()
    archive = by_name(finished, "receiver.archive")
    # The copy's S3 calls (the fixture's CreateBucket came before, in a trace of its own).
    s3_calls = [s for s in finished if s.name.startswith("S3.") and s.name != "S3.CreateBucket"]
    assert {"S3.PutObject"} <= {s.name for s in s3_calls}, sorted(s.name for s in finished)
    assert all(s.context.trace_id == archive.context.trace_id for s in s3_calls)
    assert_no_secrets(finished)


async def test_tracing_is_off_by_default(harness_factory: Any, source_server: SourceServer) -> None:
    assert not tracing.setup_from_environment({})
    assert not tracing.setup_from_environment({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert not tracing.setup_from_environment({"OTEL_TRACES_EXPORTER": "none"})
    assert not tracing.setup_from_environment(
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}
    )
    h: Harness = await harness_factory(**LOCAL_SOURCES)
    await webhook_and_copy(h, source_server, "untraced")
    tasks = h.rows("tasks")
    assert [row["traceparent"] for row in tasks] == [None]


def test_the_environment_switches_it_on_and_names_what_it_cannot_do() -> None:
    try:
        assert tracing.setup_from_environment({"OTEL_TRACES_EXPORTER": "console"})
    finally:
        tracing.shutdown()
    with pytest.raises(ConfigurationError, match="otlp and console"):
        tracing.setup_from_environment({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(ConfigurationError, match="http/protobuf"):
        tracing.setup_from_environment(
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
        )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/webhooks/apex/s3cr3t", "/webhooks/apex/{token}"),
        ("http://h:8000/webhooks/fliki/s3cr3t?x=1", "http://h:8000/webhooks/fliki/{token}"),
        ("https://cdn.example/o/a.png?X-Amz-Signature=abc#frag", "https://cdn.example/o/a.png"),
        ("/jobs?cursor=abc", "/jobs"),
        ("POST /webhooks/{provider}/{token}", "POST /webhooks/{provider}/{token}"),
        ("no url here", "no url here"),
        (("a?b", "c"), ("a", "c")),
        (3, 3),
    ],
)
def test_redact(value: Any, expected: Any) -> None:
    assert tracing.redact(value) == expected


async def test_a_polled_job_s_trace_starts_with_its_poll_and_crosses_to_the_copy(
    spans: InMemorySpanExporter,
    polling: Polling,  # noqa: F811 (the fixture, imported above)
    source_server: SourceServer,
) -> None:
    url = source_server.add("/flora/t/angle.png", 2000, content_type="image/png")
    outputs = [{"outputId": "o0", "type": "imageUrl", "url": url + "?tr=w-1024&sig=TOPSECRET"}]
    polling.apis.script(
        "flora",
        "run-t",
        flora_run("run-t", "completed", completedAt=1773662430000, outputs=outputs),
    )
    await polling.register("flora", "run-t", technique="character-lock")
    await polling.poller.tick()
    assert await polling.harness.parts.archiver.run_once()
    assert await polling.state("flora", "run-t") == "archived"
    finished = spans.get_finished_spans()
    poll = by_name(finished, "receiver.poll")
    assert poll.parent is None  # a trace of its own, not the registration request's
    for name in ("receiver.record", "receiver.archive", "receiver.copy", "receiver.store"):
        assert by_name(finished, name).context.trace_id == poll.context.trace_id, name
    assert_no_secrets(finished)
