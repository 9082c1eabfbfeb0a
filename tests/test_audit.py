"""Audit API, metrics and OpenAPI: against a ledger filled through the real ingest path."""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import timedelta
from typing import Any

import httpx
import pytest

from tests.conftest import AUTH, LOCAL_SOURCES, Harness, post_signed
from tests.payloads import APEX_SECRET, apex_completed, apex_failed
from tests.sources import SourceServer, expected_sha256

pytestmark = pytest.mark.anyio


@pytest.fixture
async def audit(harness_factory: Any) -> Harness:
    harness: Harness = await harness_factory(**LOCAL_SOURCES)
    return harness


async def archived_job(h: Harness, source: SourceServer, job_id: str, size: int = 5000) -> str:
    url = source.add(f"/o/{job_id}/out.png", size, content_type="image/png")
    signed_url = url + "?X-Amz-Date=20260316T120000Z&X-Amz-Expires=86400&X-Amz-Signature=TOPSECRET"
    response = await post_signed(h, "apex", apex_completed(job_id, url=signed_url), APEX_SECRET)
    assert response.status_code == 202
    assert await h.parts.archiver.run_once()
    return url


@pytest.mark.parametrize("path", ["/jobs", "/jobs/apex/x", "/jobs/apex/x/assets/0"])
@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer wrong"}, {"authorization": "x"}])
async def test_operator_token_required(audit: Harness, path: str, headers: dict[str, str]) -> None:
    response = await audit.client.get(path, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"


async def test_show_archived_job(audit: Harness, source_server: SourceServer) -> None:
    url = await archived_job(audit, source_server, "job-1")
    audit.clock.advance(30)
    dup = await post_signed(
        audit, "apex", apex_completed("job-1", url=url + "?X-Amz-Signature=TOPSECRET2"), APEX_SECRET
    )
    assert dup.status_code == 200

    response = await audit.client.get("/jobs/apex/job-1", headers=AUTH)

    assert response.status_code == 200
    body = response.json()
    assert body["state"] == "archived"
    assert body["received_at"] == "2026-03-16T12:05:00+00:00"
    assert body["completed_at"] == "2026-03-16T12:00:00+00:00"
    assert body["archived_at"] == "2026-03-16T12:05:00+00:00"
    # The signed URL's own 24 h expiry (from 12:00) minus the 10 min margin.
    assert body["deadline"] == "2026-03-17T11:50:00+00:00"
    assert body["archived_with_slack_seconds"] == 23 * 3600 + 45 * 60
    assert [d["outcome"] for d in body["deliveries"]] == ["accepted", "ignored"]
    assert [d["duplicate"] for d in body["deliveries"]] == [False, True]
    assert body["deliveries"][0]["authentication"] == "signature"
    assert body["deliveries"][0]["webhook_id"].startswith("msg_")
    assert body["deliveries"][0]["payload"]["data"]["outputUrl"] == url
    asset = body["assets"][0]
    assert asset["sha256"] == expected_sha256("/o/job-1/out.png", 5000)
    assert (asset["size"], asset["content_type"], asset["source"]) == (5000, "image/png", url)
    assert asset["uri"].startswith("file://")
    assert "TOPSECRET" not in response.text


async def test_failed_apex_job_shows_refund(audit: Harness) -> None:
    await post_signed(audit, "apex", apex_failed("job-f"), APEX_SECRET)
    body = (await audit.client.get("/jobs/apex/job-f", headers=AUTH)).json()
    assert (body["state"], body["error"], body["credits_refunded"]) == (
        "failed",
        "Generation failed",
        250,
    )
    assert body["assets"] == []


async def test_unknown_job_is_404(audit: Harness) -> None:
    response = await audit.client.get("/jobs/apex/nope", headers=AUTH)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


async def test_list_filters_and_stable_pagination(audit: Harness) -> None:
    for i in range(7):
        await post_signed(audit, "apex", apex_completed(f"c{i}", job_type="video"), APEX_SECRET)
        audit.clock.advance(60)
    await post_signed(audit, "apex", apex_failed("f0"), APEX_SECRET)

    first = (await audit.client.get("/jobs?limit=3&state=queued", headers=AUTH)).json()
    assert [j["job_id"] for j in first["jobs"]] == ["c6", "c5", "c4"]
    # New jobs arriving between pages do not shift the next page.
    for i in range(3):
        await post_signed(audit, "apex", apex_completed(f"late{i}"), APEX_SECRET)
    second = (
        await audit.client.get(
            f"/jobs?limit=3&state=queued&cursor={first['next_cursor']}", headers=AUTH
        )
    ).json()
    assert [j["job_id"] for j in second["jobs"]] == ["c3", "c2", "c1"]
    third = (
        await audit.client.get(
            f"/jobs?limit=3&state=queued&cursor={second['next_cursor']}", headers=AUTH
        )
    ).json()
    assert [j["job_id"] for j in third["jobs"]] == ["c0"]
    assert third["next_cursor"] is None

    failed = (await audit.client.get("/jobs?state=failed", headers=AUTH)).json()
    assert [j["job_id"] for j in failed["jobs"]] == ["f0"]
    window = (
        await audit.client.get(
            "/jobs?type=video&since=2026-03-16T12:06:00Z&until=2026-03-16T12:08:00Z", headers=AUTH
        )
    ).json()
    assert [j["job_id"] for j in window["jobs"]] == ["c2", "c1"]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("state=bogus", "state"),
        ("provider=nope", "provider"),
        ("since=yesterday", "since"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("cursor=%%%", "cursor"),
    ],
)
async def test_list_rejects_bad_filters(audit: Harness, query: str, field: str) -> None:
    response = await audit.client.get(f"/jobs?{query}", headers=AUTH)
    assert response.status_code == 422
    assert [d["field"] for d in response.json()["error"]["details"]] == [field]


async def test_concurrent_inserts_during_paging_never_repeat_or_skip(audit: Harness) -> None:
    for i in range(20):
        await post_signed(audit, "apex", apex_completed(f"p{i}"), APEX_SECRET)

    async def writer() -> None:
        for i in range(20):
            await post_signed(audit, "apex", apex_completed(f"new{i}"), APEX_SECRET)

    async def reader() -> list[str]:
        seen: list[str] = []
        cursor = ""
        while True:
            page = (await audit.client.get(f"/jobs?limit=4{cursor}", headers=AUTH)).json()
            seen += [j["job_id"] for j in page["jobs"]]
            if page["next_cursor"] is None:
                return seen
            cursor = f"&cursor={page['next_cursor']}"

    _, seen = await asyncio.gather(writer(), reader())
    old = [s for s in seen if s.startswith("p")]
    assert old == [f"p{i}" for i in reversed(range(20))]
    assert len(seen) == len(set(seen))


async def test_asset_download_from_local_store(audit: Harness, source_server: SourceServer) -> None:
    await archived_job(audit, source_server, "dl", size=70_000)
    response = await audit.client.get("/jobs/apex/dl/assets/0", headers=AUTH)
    assert response.status_code == 200
    assert hashlib.sha256(response.content).hexdigest() == expected_sha256("/o/dl/out.png", 70_000)
    assert response.headers["content-type"] == "image/png"
    assert (await audit.client.get("/jobs/apex/dl/assets/1", headers=AUTH)).status_code == 404


async def test_asset_not_yet_archived_is_409(audit: Harness) -> None:
    await post_signed(audit, "apex", apex_completed("pending"), APEX_SECRET)
    response = await audit.client.get("/jobs/apex/pending/assets/0", headers=AUTH)
    assert response.status_code == 409


async def test_asset_presigned_redirect_from_s3(
    harness_factory: Any, source_server: SourceServer, s3_bucket: str
) -> None:
    harness: Harness = await harness_factory(archive_url=f"s3://{s3_bucket}/a", **LOCAL_SOURCES)
    await archived_job(harness, source_server, "s3job", size=9000)

    redirect = await harness.client.get("/jobs/apex/s3job/assets/0", headers=AUTH)
    as_json = await harness.client.get("/jobs/apex/s3job/assets/0?redirect=false", headers=AUTH)

    assert redirect.status_code == 307
    location = redirect.headers["location"]
    assert as_json.json()["expires_in"] == 300
    body = httpx.get(location).content
    assert hashlib.sha256(body).hexdigest() == expected_sha256("/o/s3job/out.png", 9000)


async def test_metrics(audit: Harness, source_server: SourceServer) -> None:
    await archived_job(audit, source_server, "m1")
    await post_signed(audit, "apex", apex_completed("m2"), APEX_SECRET)
    await post_signed(audit, "apex", apex_completed("m2"), APEX_SECRET)
    await post_signed(
        audit, "apex", apex_completed("bad"), "whsec_" + "d3Jvbmctc2VjcmV0LXdyb25nLXNlY3JldA=="
    )

    text = (await audit.client.get("/metrics")).text

    assert (
        'receiver_deliveries_total{outcome="accepted",provider="apex",source="webhook"} 2.0' in text
    )
    assert (
        'receiver_deliveries_total{outcome="duplicate",provider="apex",source="webhook"} 1.0'
        in text
    )
    assert 'receiver_webhook_auth_failures_total{provider="apex"} 1.0' in text
    assert 'receiver_queue_tasks{state="ready"} 1.0' in text
    assert 'receiver_archived_objects_total{provider="apex"} 1.0' in text
    assert 'receiver_archived_bytes_total{provider="apex"} 5000.0' in text
    # Three webhooks recorded (one accepted, one duplicate for m2, m1's): the refused one is not
    # timed.
    assert 'receiver_webhook_duration_seconds_count{provider="apex"} 3.0' in text
    assert "receiver_ledger_up 1.0" in text
    # No API keys in this harness: polling is stopped for want of settings, not a refused key.
    assert 'receiver_polling_stopped{provider="apex",reason="config"} 1.0' in text
    assert 'receiver_polling_stopped{provider="apex",reason="auth"} 0.0' in text
    waiting = await audit.parts.ledger.job("apex", "m2")
    assert waiting is not None
    assert "receiver_queue_earliest_deadline_timestamp_seconds" in text
    earliest = audit.parts.metrics.value("receiver_queue_earliest_deadline_timestamp_seconds")
    assert earliest == waiting.assets[0].deadline.timestamp()
    assert "receiver_archive_deadline_slack_seconds_count 1.0" in text
    assert "receiver_archive_copy_duration_seconds_count 1.0" in text
    assert "receiver_queue_oldest_task_age_seconds 0.0" in text
    audit.clock.advance(90)
    text = (await audit.client.get("/metrics")).text
    assert "receiver_queue_oldest_task_age_seconds 90.0" in text


async def test_the_earliest_deadline_gauge_counts_only_copies_no_worker_holds(
    audit: Harness,
) -> None:
    """What ReceiverDeadlineAtRisk reads: waiting and lapsed tasks count, held ones do not."""
    name = "receiver_queue_earliest_deadline_timestamp_seconds"

    async def earliest() -> float:
        await audit.client.get("/metrics")
        return audit.parts.metrics.value(name)

    assert await earliest() == 0.0  # nothing waits
    for job_id, completed in (("early", "2026-03-16T11:00:00Z"), ("late", "2026-03-16T12:00:00Z")):
        answer = await post_signed(
            audit, "apex", apex_completed(job_id, completed_at=completed), APEX_SECRET
        )
        assert answer.status_code == 202
    deadlines = {}
    for job_id in ("early", "late"):
        job = await audit.parts.ledger.job("apex", job_id)
        assert job is not None
        deadlines[job_id] = job.assets[0].deadline.timestamp()
    assert deadlines["early"] < deadlines["late"]
    assert await earliest() == deadlines["early"]
    lease = await audit.parts.queue.lease("w", audit.clock(), timedelta(seconds=60))
    assert lease is not None and lease.job_id == "early"
    assert await earliest() == deadlines["late"]  # a worker holds the early one
    audit.clock.advance(61)
    assert await earliest() == deadlines["early"]  # its lease lapsed: nobody holds it


async def test_readyz_reports_an_unreachable_store(harness_factory: Any, moto_s3: str) -> None:
    harness: Harness = await harness_factory(archive_url="s3://no-such-bucket-here/x")
    # Webhooks need only the ledger: a store outage must not take replicas out of rotation.
    ready = await harness.client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"ledger": "ok"}
    response = await harness.client.get("/readyz?full=1")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not-ready"
    assert body["checks"]["ledger"] == "ok"
    assert body["checks"]["store"] != "ok"
    assert "receiver_store_up 0.0" in (await harness.client.get("/metrics")).text


async def test_openapi_document_covers_the_interface(audit: Harness) -> None:
    doc = (await audit.client.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    for path in (
        "/webhooks/{provider}",
        "/webhooks/{provider}/{token}",
        "/jobs",
        "/jobs/{provider}/{job_id}",
        "/jobs/{provider}/{job_id}/assets/{n}",
    ):
        assert path in doc["paths"], path
    json.dumps(doc)


async def test_download_of_an_asset_with_a_non_latin1_name(
    audit: Harness, source_server: SourceServer
) -> None:
    source_server.add("/o/%E5%87%BA%E5%8A%9B.png", 1234, content_type="image/png")
    url = f"http://127.0.0.1:{source_server.port}/o/出力.png"
    response = await post_signed(audit, "apex", apex_completed("cjk", url=url), APEX_SECRET)
    assert response.status_code == 202
    assert await audit.parts.archiver.run_once()

    download = await audit.client.get("/jobs/apex/cjk/assets/0", headers=AUTH)

    assert download.status_code == 200
    assert len(download.content) == 1234
    disposition = download.headers["content-disposition"]
    assert "filename*=UTF-8''%E5%87%BA%E5%8A%9B.png" in disposition


async def test_limit_with_a_non_ascii_digit_is_422(audit: Harness) -> None:
    response = await audit.client.get("/jobs?limit=%C2%B2", headers=AUTH)
    assert response.status_code == 422
