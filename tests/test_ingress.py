"""Webhook ingest through the real ASGI app and the real SQLite ledger."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from structlog.testing import capture_logs

from receiver.errors import ConfigurationError
from tests.conftest import Harness, post_signed
from tests.payloads import (
    APEX_OLD_SECRET,
    APEX_SECRET,
    APEX_TOKEN,
    FLIKI_SECRET,
    FLIKI_TOKEN,
    apex_completed,
    apex_failed,
    fliki_status,
    signed,
)

pytestmark = pytest.mark.anyio

NOTHING = {"jobs": 0, "deliveries": 0, "assets": 0, "tasks": 0}

APEX_TYPES = [
    ("image", "image/png", {"model": "flux-2-pro", "width": 1024, "height": 1024}),
    ("video", "video/mp4", {"model": "veo-3.1", "durationSeconds": 8, "resolution": "1080p"}),
    ("voice", "audio/wav", {"model": "kokoro", "durationSeconds": 12, "language": "en"}),
    (
        "avatar",
        "video/mp4",
        {"model": "omnihuman-1.5", "durationSeconds": 30, "resolution": "720p"},
    ),
    ("clip", "video/mp4", {"clipCount": 3, "viralScores": [8.1, 7.4, 6.9]}),
    ("commercial", "video/mp4", {"sceneClips": ["a", "b"], "platform": "tiktok", "duration": 30}),
    ("translate", "video/mp4", {"outputLanguage": "de", "durationSeconds": 42}),
    ("instant-ad", "video/mp4", {"variationCount": 2, "platform": "instagram", "format": "video"}),
    (
        "photoshoot",
        "image/png",
        {"photoCount": 4, "background": "studio-white", "lighting": "soft"},
    ),
]


@pytest.mark.parametrize(("job_type", "output_type", "metadata"), APEX_TYPES)
async def test_apex_completed_every_job_type_is_recorded_with_a_task(
    harness: Harness, job_type: str, output_type: str, metadata: dict[str, Any]
) -> None:
    payload = apex_completed(f"job-{job_type}", job_type=job_type, output_type=output_type)
    payload["data"]["metadata"] = metadata
    response = await post_signed(harness, "apex", payload, APEX_SECRET)

    assert response.status_code == 202, response.text
    assert response.json()["status"] == "accepted"
    assert response.json()["tasks_queued"] == 1
    job = await harness.parts.ledger.job("apex", f"job-{job_type}")
    assert job is not None
    assert job.state == "queued"
    assert job.job_type == job_type
    assert job.metadata == metadata
    assert job.assets[0].content_type == output_type
    # Apex: 24 h from completedAt (2026-03-16T12:00Z) minus the 10 min margin.
    assert job.assets[0].deadline.isoformat() == "2026-03-17T11:50:00+00:00"
    assert job.assets[0].key == f"apex/2026/03/16/job-{job_type}/output.png"


async def test_unknown_extra_fields_are_kept_not_rejected(harness: Harness) -> None:
    payload = apex_completed("job-extra", newField={"nested": True})
    payload["apiVersion"] = "2026-10"
    response = await post_signed(harness, "apex", payload, APEX_SECRET)

    assert response.status_code == 202
    job = await harness.parts.ledger.job("apex", "job-extra")
    assert job is not None
    stored = json.loads(job.deliveries[0].body)
    assert stored["apiVersion"] == "2026-10"
    assert stored["data"]["newField"] == {"nested": True}


async def test_apex_signed_url_expiry_caps_the_deadline(harness: Harness) -> None:
    url = (
        "https://acct.r2.cloudflarestorage.com/out/v.mp4?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Date=20260316T120000Z&X-Amz-Expires=3600&X-Amz-Signature=abc"
    )
    response = await post_signed(harness, "apex", apex_completed("j", url=url), APEX_SECRET)
    assert response.status_code == 202
    job = await harness.parts.ledger.job("apex", "j")
    assert job is not None
    assert job.deadline is not None
    assert job.deadline.isoformat() == "2026-03-16T12:50:00+00:00"  # 1 h expiry - 10 min


async def test_apex_failed_records_failure_and_refund_and_queues_nothing(harness: Harness) -> None:
    response = await post_signed(harness, "apex", apex_failed("job-f"), APEX_SECRET)

    assert response.status_code == 202
    job = await harness.parts.ledger.job("apex", "job-f")
    assert job is not None
    assert (job.state, job.error, job.credits_refunded) == ("failed", "Generation failed", 250)
    # No output to copy; the one task writes the failed job's manifest (reindex restores it).
    assert harness.counts() == {"jobs": 1, "deliveries": 1, "assets": 0, "tasks": 1}
    assert response.json()["tasks_queued"] == 0


async def test_fliki_completed_maps_to_the_same_event_with_a_three_hour_window(
    harness: Harness,
) -> None:
    response = await post_signed(harness, "fliki", fliki_status("f1"), FLIKI_SECRET)

    assert response.status_code == 202, response.text
    job = await harness.parts.ledger.job("fliki", "f1")
    assert job is not None
    assert job.state == "queued"
    # From receipt (the fake clock: 12:05) + 3 h - 10 min margin.
    assert job.deadline is not None
    assert job.deadline.isoformat() == "2026-03-16T14:55:00+00:00"
    assert job.assets[0].source_url == "https://files.fliki.ai/out/65f0c0ffee.mp4"


async def test_fliki_progress_then_completed(harness: Harness) -> None:
    progress = fliki_status("f2", status="processing", download=None, progress=40)
    first = await post_signed(harness, "fliki", progress, FLIKI_SECRET)
    assert first.status_code == 202
    assert first.json()["job_state"] == "processing"
    assert harness.counts()["tasks"] == 0

    done = await post_signed(harness, "fliki", fliki_status("f2"), FLIKI_SECRET)
    assert done.status_code == 202
    assert done.json()["job_state"] == "queued"
    assert harness.counts()["tasks"] == 1


async def test_fliki_failed(harness: Harness) -> None:
    payload = fliki_status("f3", status="failed", download=None, progress=None)
    payload["error"] = "render error"
    response = await post_signed(harness, "fliki", payload, FLIKI_SECRET)
    assert response.status_code == 202
    job = await harness.parts.ledger.job("fliki", "f3")
    assert job is not None
    assert (job.state, job.error) == ("failed", "render error")


# --- idempotency ------------------------------------------------------------------------------


async def test_redelivery_with_the_same_webhook_id_is_a_duplicate(harness: Harness) -> None:
    payload = apex_completed("job-dup")
    first = await post_signed(harness, "apex", payload, APEX_SECRET, msg_id="msg_1")
    again = await post_signed(harness, "apex", payload, APEX_SECRET, msg_id="msg_1")

    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["status"] == "duplicate"
    assert again.json()["tasks_queued"] == 0
    assert harness.counts() == {"jobs": 1, "deliveries": 2, "assets": 1, "tasks": 1}
    outcomes = [r["outcome"] for r in harness.rows("deliveries")]
    assert outcomes == ["accepted", "duplicate"]


async def test_same_callback_with_a_new_webhook_id_is_still_a_duplicate(harness: Harness) -> None:
    payload = apex_completed("job-dup2")
    await post_signed(harness, "apex", payload, APEX_SECRET)
    again = await post_signed(harness, "apex", payload, APEX_SECRET)
    assert again.status_code == 200
    assert harness.counts()["tasks"] == 1


async def test_fifty_concurrent_deliveries_make_one_job_and_one_task(harness: Harness) -> None:
    body, headers = signed(
        apex_completed("job-50"), APEX_SECRET, timestamp=int(harness.clock.wall())
    )

    responses = await asyncio.gather(
        *(harness.client.post("/webhooks/apex", content=body, headers=headers) for _ in range(50))
    )

    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 49 + [202]
    assert harness.counts() == {"jobs": 1, "deliveries": 50, "assets": 1, "tasks": 1}
    # Group commit: 50 concurrent writes did not need 50 transactions.
    assert harness.parts.db.groups_committed < 50


# --- out-of-order pairs -------------------------------------------------------------------------


async def test_failed_after_completed_keeps_the_job_and_records_the_delivery(
    harness: Harness,
) -> None:
    await post_signed(harness, "apex", apex_completed("job-x"), APEX_SECRET)
    late = await post_signed(harness, "apex", apex_failed("job-x"), APEX_SECRET)

    assert late.status_code == 200
    assert late.json()["outcome"] == "ignored"
    job = await harness.parts.ledger.job("apex", "job-x")
    assert job is not None
    assert job.state == "queued"
    assert [d.outcome for d in job.deliveries] == ["accepted", "ignored"]
    assert harness.counts()["tasks"] == 1


async def test_completed_after_failed_queues_the_output(harness: Harness) -> None:
    await post_signed(harness, "apex", apex_failed("job-y"), APEX_SECRET)
    later = await post_signed(harness, "apex", apex_completed("job-y"), APEX_SECRET)

    assert later.status_code == 202
    job = await harness.parts.ledger.job("apex", "job-y")
    assert job is not None
    assert job.state == "queued"
    assert job.credits_refunded == 250  # the failure stays in the record
    assert [d.event for d in job.deliveries] == ["failed", "completed"]
    # One output task, beside the manifest-only task (n = -1) the failure queued.
    assert sorted(t["n"] for t in harness.rows("tasks")) == [-1, 0]


async def test_second_completed_with_a_new_url_refreshes_a_pending_copy(harness: Harness) -> None:
    await post_signed(harness, "apex", apex_completed("job-z"), APEX_SECRET)
    fresh = "https://cdn.useapexstudio.com/outputs/550e/output.png?v=2"
    second = await post_signed(harness, "apex", apex_completed("job-z", url=fresh), APEX_SECRET)

    assert second.status_code == 200
    assert second.json()["outcome"] == "refreshed"
    job = await harness.parts.ledger.job("apex", "job-z")
    assert job is not None
    assert job.assets[0].source_url == fresh
    assert harness.counts() == {"jobs": 1, "deliveries": 2, "assets": 1, "tasks": 1}


async def test_second_completed_with_a_new_url_never_rearchives(harness: Harness) -> None:
    from receiver.ledger import ArchivedAsset

    await post_signed(harness, "apex", apex_completed("job-a"), APEX_SECRET)
    await harness.parts.ledger.mark_archived(
        "apex",
        "job-a",
        0,
        ArchivedAsset("file:///x", "k", 3, "ab" * 32, "image/png"),
        harness.clock(),
    )
    other = "https://cdn.useapexstudio.com/outputs/other.png"
    second = await post_signed(harness, "apex", apex_completed("job-a", url=other), APEX_SECRET)

    assert second.status_code == 200
    assert second.json()["outcome"] == "ignored"
    job = await harness.parts.ledger.job("apex", "job-a")
    assert job is not None
    assert job.state == "archived"
    assert job.assets[0].source_url != other
    assert harness.counts()["tasks"] == 1


# --- authentication -----------------------------------------------------------------------------


async def test_rotated_secret_is_accepted(harness: Harness) -> None:
    response = await post_signed(harness, "apex", apex_completed("rot"), APEX_OLD_SECRET)
    assert response.status_code == 202


@pytest.mark.parametrize(
    "case", ["wrong_secret", "expired", "future", "tampered", "missing", "other_provider"]
)
async def test_authentication_failures_are_401_and_write_nothing(
    harness: Harness, case: str
) -> None:
    now = int(harness.clock.wall())
    secret, ts = APEX_SECRET, now
    if case == "wrong_secret":
        secret = "whsec_" + "d3Jvbmctc2VjcmV0LXdyb25nLXNlY3JldA=="
    elif case == "expired":
        ts = now - 301
    elif case == "future":
        ts = now + 301
    elif case == "other_provider":
        secret = FLIKI_SECRET
    body, headers = signed(apex_completed(), secret, timestamp=ts)
    if case == "tampered":
        body = body.replace(b"output.png", b"evil.png")
    if case == "missing":
        del headers["webhook-signature"]

    with capture_logs() as logged:
        response = await harness.client.post("/webhooks/apex", content=body, headers=headers)

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert harness.counts() == NOTHING
    assert [e["event"] for e in logged] == ["webhook_rejected"]  # once, with what failed
    assert (logged[0]["provider"], logged[0]["status"]) == ("apex", 401)
    assert secret[6:] not in repr(logged)
    if "webhook-signature" in headers:
        assert headers["webhook-signature"][3:] not in repr(logged)


async def test_path_token_authenticates(harness: Harness) -> None:
    body = json.dumps(fliki_status("tok")).encode()
    ok = await harness.client.post(
        f"/webhooks/fliki/{FLIKI_TOKEN}", content=body, headers={"content-type": "application/json"}
    )
    bad = await harness.client.post(
        "/webhooks/fliki/not-the-token", content=body, headers={"content-type": "application/json"}
    )
    assert ok.status_code == 202
    assert bad.status_code == 401
    assert harness.counts()["deliveries"] == 1


async def test_apex_token_is_not_valid_for_fliki_and_is_never_logged(harness: Harness) -> None:
    with capture_logs() as logged:
        response = await harness.client.post(
            f"/webhooks/fliki/{APEX_TOKEN}",
            content=json.dumps(fliki_status()).encode(),
            headers={"content-type": "application/json"},
        )
    assert response.status_code == 401
    assert logged
    assert APEX_TOKEN not in repr(logged)


async def test_unauthenticated_provider_refused_at_startup(harness_factory: Any) -> None:
    with pytest.raises(ConfigurationError, match="RECEIVER_FLIKI_WEBHOOK_SECRETS"):
        await harness_factory(fliki_webhook_secrets="", fliki_webhook_token=None)


async def test_insecure_dev_flag_accepts_unauthenticated(harness_factory: Any) -> None:
    harness = await harness_factory(
        fliki_webhook_secrets="", fliki_webhook_token=None, insecure_dev=True
    )
    response = await harness.client.post(
        "/webhooks/fliki",
        content=json.dumps(fliki_status("dev")).encode(),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 202
    assert harness.rows("deliveries")[0]["auth"] == "insecure-dev"


# --- validation ---------------------------------------------------------------------------------


def _error(response: Any) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    error: dict[str, Any] = body["error"]
    return error


async def test_malformed_json_is_400(harness: Harness) -> None:
    response = await post_signed(harness, "apex", b'{"event": "job.completed",', APEX_SECRET)
    assert response.status_code == 400
    assert _error(response)["code"] == "malformed_json"
    assert harness.counts() == NOTHING


async def test_wrong_content_type_is_415(harness: Harness) -> None:
    body, headers = signed(apex_completed(), APEX_SECRET, timestamp=int(harness.clock.wall()))
    headers["content-type"] = "text/plain"
    response = await harness.client.post("/webhooks/apex", content=body, headers=headers)
    assert response.status_code == 415
    assert _error(response)["code"] == "unsupported_media_type"
    assert harness.counts() == NOTHING


async def test_body_over_the_limit_is_413(harness_factory: Any) -> None:
    harness = await harness_factory(max_body_bytes=2048)
    payload = apex_completed("big")
    payload["data"]["metadata"] = {"pad": "x" * 4096}
    response = await post_signed(harness, "apex", payload, APEX_SECRET)
    assert response.status_code == 413
    assert _error(response)["details"] == {"limit_bytes": 2048}
    assert harness.counts() == NOTHING


async def test_chunked_body_over_the_limit_is_413_without_content_length(
    harness_factory: Any,
) -> None:
    harness = await harness_factory(max_body_bytes=2048)

    async def chunks() -> Any:
        for _ in range(10):
            yield b"x" * 1024

    response = await harness.client.post(
        "/webhooks/apex", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert harness.counts() == NOTHING


async def test_schema_violations_are_422_listing_each_field(harness: Harness) -> None:
    payload = apex_completed()
    del payload["data"]["outputUrl"]
    payload["data"]["completedAt"] = "yesterday-ish"
    payload["data"]["jobId"] = ""
    response = await post_signed(harness, "apex", payload, APEX_SECRET)

    assert response.status_code == 422
    error = _error(response)
    assert error["code"] == "invalid_payload"
    fields = sorted(d["field"] for d in error["details"])
    assert fields == ["data.completedAt", "data.jobId", "data.outputUrl"]
    assert harness.counts() == NOTHING


async def test_failed_payload_schema_violation(harness: Harness) -> None:
    payload = apex_failed()
    payload["data"]["creditsRefunded"] = -5
    response = await post_signed(harness, "apex", payload, APEX_SECRET)
    assert response.status_code == 422
    assert [d["field"] for d in _error(response)["details"]] == ["data.creditsRefunded"]


async def test_unknown_event_is_422(harness: Harness) -> None:
    payload = apex_completed()
    payload["event"] = "job.exploded"
    response = await post_signed(harness, "apex", payload, APEX_SECRET)
    assert response.status_code == 422
    assert _error(response)["code"] == "unknown_event"
    assert harness.counts() == NOTHING


async def test_fliki_unknown_status_and_missing_download(harness: Harness) -> None:
    weird = await post_signed(harness, "fliki", fliki_status(status="teleported"), FLIKI_SECRET)
    missing = await post_signed(harness, "fliki", fliki_status(download=None), FLIKI_SECRET)
    assert (weird.status_code, missing.status_code) == (422, 422)
    assert _error(weird)["code"] == "unknown_event"
    assert [d["field"] for d in _error(missing)["details"]] == ["download"]
    assert harness.counts() == NOTHING


async def test_non_object_json_is_422(harness: Harness) -> None:
    response = await post_signed(harness, "apex", b"[1, 2]", APEX_SECRET)
    assert response.status_code == 422
    assert harness.counts() == NOTHING


async def test_unknown_provider_and_method(harness: Harness) -> None:
    unknown = await harness.client.post("/webhooks/nope", json={})
    flora = await harness.client.post("/webhooks/flora", json={})
    get = await harness.client.get("/webhooks/apex")
    assert (unknown.status_code, flora.status_code, get.status_code) == (404, 404, 405)
    assert _error(get)["code"] == "method_not_allowed"
    assert harness.counts() == NOTHING


async def test_health_and_readiness(harness: Harness) -> None:
    assert (await harness.client.get("/healthz")).json() == {"status": "ok"}
    ready = await harness.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"


async def test_time_without_offset_is_utc_and_huge_expiry_is_ignored(harness: Harness) -> None:
    signed_url = (
        "https://acct.r2.cloudflarestorage.com/o/v.mp4?X-Amz-Date=20260316T120000Z"
        "&X-Amz-Expires=3600"
    )
    naive = apex_completed("naive", url=signed_url, completed_at="2026-03-16T12:00:00")
    huge = apex_completed(
        "huge",
        url=signed_url.replace("3600", "99999999999999"),
        completed_at="2099-12-31T23:00:00Z",
    )
    first = await post_signed(harness, "apex", naive, APEX_SECRET)
    second = await post_signed(harness, "apex", huge, APEX_SECRET)

    assert (first.status_code, second.status_code) == (202, 202), second.text
    job = await harness.parts.ledger.job("apex", "naive")
    assert job is not None and job.deadline is not None
    assert job.deadline.isoformat() == "2026-03-16T12:50:00+00:00"
    late = await harness.parts.ledger.job("apex", "huge")
    assert late is not None and late.deadline is not None
    assert late.deadline.isoformat() == "2100-01-01T22:50:00+00:00"  # the window, not the link


@pytest.mark.parametrize(
    "when", ["9999-12-31T23:00:00Z", "0001-01-01T00:00:00+14:00", "1999-12-31T23:59:59Z"]
)
async def test_dates_outside_the_edge_range_are_a_422_naming_the_rule(
    harness: Harness, when: str
) -> None:
    failed = apex_failed("f")
    failed["data"]["failedAt"] = when
    for payload in (apex_completed("c", completed_at=when), failed):
        response = await post_signed(harness, "apex", payload, APEX_SECRET)
        assert response.status_code == 422, response.text
        assert "date_range" in response.text
    assert harness.counts() == NOTHING


async def test_deeply_nested_json_is_a_422_naming_the_rule(harness: Harness) -> None:
    for depth in (33, 900, 100_000):
        body = b"[" * depth + b"]" * depth
        response = await post_signed(harness, "apex", body, APEX_SECRET)
        assert response.status_code == 422, depth
        assert response.json()["error"]["details"][0]["rule"] == "max_depth"
    assert harness.counts() == NOTHING


def test_output_names_never_share_a_key() -> None:
    from datetime import UTC, datetime, timedelta

    from receiver.domain import EventKind, JobEvent, Output
    from receiver.ingest.record import plan_outputs
    from receiver.providers import REGISTRY

    outputs = tuple(
        Output(f"https://ik.imagekit.io/{i}", n)
        for i, n in enumerate(["a.png", "2-a.png", "a.png", "manifest.json", "a.png"])
    )
    event = JobEvent(provider="flora", job_id="r", kind=EventKind.COMPLETED, outputs=outputs)
    plan = plan_outputs(event, REGISTRY["flora"], datetime(2026, 3, 16, tzinfo=UTC), timedelta())
    keys = [p.key for p in plan]
    assert len(set(keys)) == len(keys) == 5
    assert not any(k.endswith("/manifest.json") for k in keys)


async def test_a_refreshed_fliki_link_keeps_the_original_deadline(harness: Harness) -> None:
    await post_signed(harness, "fliki", fliki_status("f-refresh"), FLIKI_SECRET)
    harness.clock.advance(3600)
    fresh = fliki_status("f-refresh", download="https://files.fliki.ai/out/f-refresh.mp4?v=2")
    second = await post_signed(harness, "fliki", fresh, FLIKI_SECRET)

    assert second.json()["outcome"] == "refreshed"
    job = await harness.parts.ledger.job("fliki", "f-refresh")
    assert job is not None
    # Still 3 h from the first receipt (12:05) minus the margin, not from the refresh (13:05).
    assert job.assets[0].deadline.isoformat() == "2026-03-16T14:55:00+00:00"
    assert job.assets[0].source_url.endswith("?v=2")
    task = harness.rows("tasks")[0]
    assert task["deadline"] == job.assets[0].deadline.timestamp()
