"""Tracing (issue 23): off by default; on, one trace per job from the webhook's request through
the record, the copy (fetch, store) and its S3 calls, across the queue; and no span carries a
URL's query string or a webhook path token. Spans are caught by the SDK's in-memory exporter,
behind the same redaction as a real exporter."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from receiver import tracing
from receiver.errors import ConfigurationError
from tests.app_endpoint import AppEndpoint
from tests.clirun import RECEIVER, env_without_receiver, free_port, wait_http
from tests.conftest import LOCAL_SOURCES, Harness
from tests.crashkit import count
from tests.payloads import APEX_TOKEN, apex_completed
from tests.sources import SourceServer
from tests.test_onward import NEW
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


async def test_onward_sends_join_the_trace_of_the_change_they_report(
    spans: InMemorySpanExporter,
    harness_factory: Any,
    source_server: SourceServer,
    app_endpoint: AppEndpoint,
) -> None:
    # The endpoint's URL carries a query (an application's own token): never in a span.
    url = app_endpoint.url("/hooks/receiver?token=TOPSECRET")
    h: Harness = await harness_factory(
        **LOCAL_SOURCES,
        onward_endpoints=json.dumps([{"name": "app", "url": url, "secrets": [NEW]}]),
    )
    await webhook_and_copy(h, source_server, "traced-onward")
    assert h.parts.sender is not None
    await h.parts.sender.drain()
    finished = spans.get_finished_spans()

    trace_id = by_name(finished, "POST /webhooks/{provider}/{token}").context.trace_id
    delivers = [s for s in finished if s.name == "receiver.onward.deliver"]
    assert sorted(str((s.attributes or {})["receiver.event_type"]) for s in delivers) == [
        "asset.archived",
        "job.archived",
    ]
    archive = by_name(finished, "receiver.archive")
    for deliver in delivers:
        # In the job's trace, a child of the copy's span that wrote the event.
        assert deliver.context.trace_id == trace_id
        assert deliver.parent is not None
        assert deliver.parent.span_id in {
            s.context.span_id for s in finished if s.context.trace_id == trace_id
        }
        post = [
            s
            for s in finished
            if s.name == "POST"
            and s.parent is not None
            and s.parent.span_id == deliver.context.span_id
        ]
        assert len(post) == 1  # httpx's span of the try, beneath it
    assert archive.context.trace_id == trace_id
    assert len(app_endpoint.received) == 2
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


def test_a_real_receiver_serve_exports_one_trace_per_job_when_the_environment_asks(
    tmp_path: Path, source_server: SourceServer
) -> None:
    """`receiver serve` with OTEL_TRACES_EXPORTER=console: the CLI's switch, the app's
    instrumentation and the worker in one real process; spans printed on exit, none secret."""
    db = tmp_path / "receiver.db"
    env = {
        **env_without_receiver(),
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "RECEIVER_LEDGER_URL": f"sqlite:///{db}",
        "RECEIVER_ARCHIVE_URL": f"file://{tmp_path / 'archive'}",
        "RECEIVER_WEBHOOK_PROVIDERS": "apex",
        "RECEIVER_APEX_WEBHOOK_TOKEN": APEX_TOKEN,
        "RECEIVER_FETCH_ALLOW_HTTP": "true",
        "RECEIVER_FETCH_ALLOW_NETWORKS": "127.0.0.0/8",
        "RECEIVER_APEX_DOWNLOAD_HOSTS": "127.0.0.1",
        "RECEIVER_WORKERS": "1",
    }
    port = free_port()
    out = (tmp_path / "stdout").open("wb")
    child = subprocess.Popen(
        [RECEIVER, "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=out,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        payload = apex_completed("real-traced", url=signed_source(source_server, "/o/r/out.png"))
        payload["data"]["completedAt"] = payload["timestamp"] = datetime.now(UTC).isoformat()
        answer = httpx.post(
            f"http://127.0.0.1:{port}/webhooks/apex/{APEX_TOKEN}", json=payload, timeout=30
        )
        assert answer.status_code == 202, answer.text
        deadline = time.monotonic() + 30
        while count(db, "SELECT COUNT(*) FROM assets WHERE state = 'archived'") < 1:
            assert time.monotonic() < deadline, "the asset was not archived"
            time.sleep(0.2)
        time.sleep(0.5)  # the manifest and ack finish after the asset is recorded
    finally:
        child.terminate()  # the SDK flushes its last spans at exit
        child.wait(timeout=30)
        out.close()
    text = (tmp_path / "stdout").read_text()
    printed = []
    decoder, at = json.JSONDecoder(), text.find("{")
    while at != -1:
        span, end = decoder.raw_decode(text, at)
        printed.append(span)
        at = text.find("{", end)
    names = {s["name"]: s["context"]["trace_id"] for s in printed}
    request = names.get("POST /webhooks/{provider}/{token}")
    assert request, sorted(names)
    for name in ("receiver.record", "receiver.archive", "receiver.copy", "receiver.store", "GET"):
        assert names.get(name) == request, (name, sorted(names))
    for secret in SECRETS:
        assert secret not in text
