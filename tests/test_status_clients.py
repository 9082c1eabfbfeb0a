"""Status clients per provider: requests as documented, answers classified, nothing raised."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from receiver.domain import EventKind
from receiver.polling.status import PollOutcome, PollResult, StatusClient
from receiver.providers import REGISTRY

pytestmark = pytest.mark.anyio

KEY = "sk_live_SECRET-KEY-123"
BASES = {
    "apex": "https://useapexstudio.test",
    "fliki": "https://api.fliki.test",
    "flora": "https://app.flora.test",
    "vividflow": "https://vivid.test/api/v1",
}
TRACKING = {"flora": {"technique": "character-lock"}}


def answer(status: int = 200, body: Any = None, **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.Response(status, content=content, headers=headers)


async def poll(
    provider: str, job_id: str, response: httpx.Response
) -> tuple[PollResult, httpx.Request]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return response

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        client = StatusClient(REGISTRY[provider], base_url=BASES[provider], api_key=KEY, http=http)
        result = await client.poll(job_id, TRACKING.get(provider, {}))
    assert len(seen) == 1
    return result, seen[0]


# --- requests as each provider documents them ---------------------------------------------


async def test_requests_follow_each_providers_documentation() -> None:
    _, apex = await poll("apex", "550e-1", answer(body={"data": {"status": "queued"}}))
    assert str(apex.url) == "https://useapexstudio.test/api/jobs?id=550e-1"
    assert apex.headers["authorization"] == f"Bearer {KEY}"

    _, fliki = await poll("fliki", "f1", answer(body={"fileId": "f1", "status": "queued"}))
    assert str(fliki.url) == "https://api.fliki.test/v1/generate/status?fileId=f1"
    assert fliki.headers["authorization"] == f"Bearer {KEY}"

    _, flora = await poll("flora", "j57/x", answer(body={"runId": "j57/x", "status": "pending"}))
    # Ids are percent-encoded into the path: a slash cannot walk to another endpoint.
    assert flora.url.raw_path == b"/api/v1/techniques/character-lock/runs/j57%2Fx"
    assert flora.headers["authorization"] == f"Bearer {KEY}"

    _, vivid = await poll("vividflow", "c2c6", answer(body={"status": "PROCESSING"}))
    assert str(vivid.url) == "https://vivid.test/api/v1/status/c2c6"
    assert vivid.headers["x-api-key"] == KEY
    assert "authorization" not in vivid.headers


# --- happy paths and failures -------------------------------------------------------------


async def test_apex_completed_and_failed() -> None:
    job = {
        "jobId": "a1",
        "type": "video",
        "status": "completed",
        "outputUrl": "https://cdn.useapexstudio.com/outputs/a1/output.mp4?X-Amz-Signature=s",
        "outputType": "video/mp4",
        "metadata": {"model": "veo-3.1"},
        "completedAt": "2026-03-16T12:00:00Z",
    }
    done, _ = await poll("apex", "a1", answer(body={"data": job}))
    assert done.outcome is PollOutcome.EVENT and done.event is not None
    assert done.event.kind is EventKind.COMPLETED
    assert done.event.outputs[0].name == "output.mp4"
    assert done.event.outputs[0].content_type == "video/mp4"
    assert done.event.completed_at is not None and done.event.job_type == "video"
    assert json.loads(done.body)["data"]["jobId"] == "a1"  # the raw answer, for the ledger

    failed_job = {"jobId": "a2", "type": "video", "status": "failed", "error": "Generation failed"}
    failed_job["creditsRefunded"] = 250
    failed, _ = await poll("apex", "a2", answer(body={"data": failed_job}))
    assert failed.event is not None and failed.event.kind is EventKind.FAILED
    assert (failed.event.error, failed.event.credits_refunded) == ("Generation failed", 250)


async def test_apex_job_list_answer_is_accepted() -> None:
    jobs = [{"jobId": "other", "status": "queued"}, {"jobId": "a3", "status": "processing"}]
    result, _ = await poll("apex", "a3", answer(body={"data": jobs}))
    assert result.event is not None and result.event.kind is EventKind.PROGRESS


async def test_fliki_status_shape_is_the_webhook_shape() -> None:
    body = {"fileId": "f1", "status": "completed", "download": "https://files.fliki.ai/f1.mp4"}
    done, _ = await poll("fliki", "f1", answer(body=body))
    assert done.event is not None and done.event.kind is EventKind.COMPLETED
    assert done.event.outputs[0].url == body["download"]

    failed, _ = await poll("fliki", "f2", answer(body={"fileId": "f2", "status": "failed"}))
    assert failed.event is not None and failed.event.kind is EventKind.FAILED

    running = {"fileId": "f3", "status": "processing", "progress": 40}
    progress, _ = await poll("fliki", "f3", answer(body=running))
    assert progress.event is not None and progress.event.metadata == {"progress": 40}


async def test_flora_run_with_several_outputs() -> None:
    run = {
        "runId": "j57",
        "status": "completed",
        "progress": 100,
        "completedAt": 1710000030000,
        "chargedCost": 5,
        "outputs": [
            {"outputId": "angle_1", "type": "imageUrl", "url": "https://ik.imagekit.io/f/a.png"},
            {"outputId": "angle_2", "type": "imageUrl", "url": "https://ik.imagekit.io/f/b.png"},
            {"outputId": "clip", "type": "videoUrl", "url": "https://media.flora.ai/c.mp4"},
            {"outputId": "caption", "type": "text", "value": "six angles"},
        ],
    }
    result, _ = await poll("flora", "j57", answer(body=run))
    assert result.event is not None and result.event.kind is EventKind.COMPLETED
    assert [o.name for o in result.event.outputs] == ["a.png", "b.png", "c.mp4"]
    assert result.event.completed_at is not None
    assert result.event.completed_at.timestamp() == 1710000030
    assert result.event.metadata["values"] == {"caption": "six angles"}
    assert result.event.metadata["chargedCost"] == 5


async def test_flora_failed_run_carries_code_and_message() -> None:
    run = {"runId": "j58", "status": "failed", "errorCode": "nsfw", "errorMessage": "blocked"}
    result, _ = await poll("flora", "j58", answer(body=run))
    assert result.event is not None and result.event.kind is EventKind.FAILED
    assert result.event.error == "nsfw: blocked"


async def test_vividflow_completed_processing_failed() -> None:
    url = (
        "https://storage.googleapis.com/b/video.mp4?X-Goog-Date=20260316T120000Z&X-Goog-Expires=60"
    )
    done, _ = await poll("vividflow", "v1", answer(body={"status": "COMPLETED", "video_url": url}))
    assert done.event is not None and done.event.kind is EventKind.COMPLETED
    assert done.event.outputs[0].content_type == "video/mp4"
    failed, _ = await poll(
        "vividflow", "v2", answer(body={"job_id": "v2", "status": "FAILED", "error": "no result"})
    )
    assert failed.event is not None and failed.event.error == "no result"


# --- errors: rate limits, auth, not found, malformed --------------------------------------


@pytest.mark.parametrize("provider", sorted(BASES))
async def test_rate_limited_with_retry_after(provider: str) -> None:
    body = {"error": "Too many requests", "code": "RATE_LIMITED"}
    result, _ = await poll(
        provider,
        "j",
        answer(
            429,
            body,
            **{"Retry-After": "7", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1773662710"},
        ),
    )
    assert result.outcome is PollOutcome.RATE_LIMITED
    assert result.retry_after == 7
    assert result.rate.remaining == 0 and result.rate.reset == 1773662710
    assert result.error == "HTTP 429: RATE_LIMITED: Too many requests"


@pytest.mark.parametrize(
    ("provider", "status", "body", "shown"),
    [
        ("apex", 401, {"error": "Missing or invalid API key", "code": "UNAUTHORIZED"}, "UNAUTH"),
        ("apex", 402, {"error": "Insufficient credits", "code": "PAYMENT_REQUIRED"}, "PAYMENT"),
        ("apex", 403, {"error": "Upgrade required", "code": "FORBIDDEN"}, "FORBIDDEN"),
        ("flora", 401, {"error": {"code": "invalid_api_key", "message": "revoked"}}, "revoked"),
        ("flora", 402, {"error": {"code": "insufficient_credits", "message": "x"}}, "insuff"),
        ("vividflow", 401, {"error": "Invalid API key"}, "Invalid API key"),
        ("fliki", 401, b"Unauthorized", "Unauthorized"),
    ],
)
async def test_auth_errors(provider: str, status: int, body: Any, shown: str) -> None:
    result, _ = await poll(provider, "j", answer(status, body))
    assert result.outcome is PollOutcome.AUTH_ERROR
    assert result.error is not None and shown in result.error


@pytest.mark.parametrize("provider", sorted(BASES))
async def test_not_found(provider: str) -> None:
    result, _ = await poll(provider, "j", answer(404, {"error": {"code": "not_found"}}))
    assert result.outcome is PollOutcome.NOT_FOUND


@pytest.mark.parametrize(
    ("provider", "body", "problem"),
    [
        ("apex", b"<html>gateway</html>", "not JSON"),
        ("apex", {"data": {"jobId": "j", "status": "completed"}}, "outputUrl"),
        ("apex", {"data": {"jobId": "j", "status": "exploded"}}, "unknown Apex job status"),
        ("apex", {"data": {"jobId": "someone-else", "status": "queued"}}, "another job"),
        ("apex", {"nodata": True}, "schema"),
        ("fliki", {"fileId": "j", "status": "completed"}, "download"),
        ("fliki", {"fileId": "j", "status": "weird"}, "unknown Fliki status"),
        ("fliki", [1, 2], "JSON object"),
        ("flora", {"runId": "j", "status": "completed", "outputs": []}, "at least one output"),
        ("flora", {"runId": "j", "status": "completed", "outputs": "x"}, "schema"),
        ("flora", {"status": 3}, "schema"),
        ("vividflow", {"status": "COMPLETED"}, "video_url"),
        ("vividflow", {"status": "COMPLETED", "video_url": "ftp://x/y"}, "schema"),
        ("vividflow", b"", "not JSON"),
    ],
)
async def test_malformed_answers_are_classified_not_raised(
    provider: str, body: Any, problem: str
) -> None:
    result, _ = await poll(provider, "j", answer(200, body))
    assert result.outcome is PollOutcome.MALFORMED
    assert result.error is not None and problem in result.error, result.error


async def test_server_errors_and_network_failures_are_request_failures() -> None:
    result, _ = await poll("apex", "j", answer(503, {"error": "down"}, **{"Retry-After": "3"}))
    assert (result.outcome, result.retry_after) == (PollOutcome.REQUEST_FAILED, 3)

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as http:
        client = StatusClient(REGISTRY["apex"], base_url=BASES["apex"], api_key=KEY, http=http)
        failed = await client.poll("j", {})
    assert failed.outcome is PollOutcome.REQUEST_FAILED
    assert failed.error == "ConnectError: connection refused"


async def test_the_key_is_scrubbed_from_errors_echoed_back() -> None:
    result, _ = await poll("vividflow", "j", answer(401, {"error": f"bad key {KEY}"}))
    assert result.error is not None
    assert KEY not in result.error and "***" in result.error


async def test_oversized_status_answers_are_malformed() -> None:
    result, _ = await poll("apex", "j", answer(200, b"x" * (1024 * 1024 + 1)))
    assert result.outcome is PollOutcome.MALFORMED
    assert result.error is not None and "over" in result.error


@pytest.mark.parametrize(
    ("provider", "job_id", "technique"),
    [
        ("flora", "..", "t"),
        ("flora", ".", "t"),
        ("flora", "r1", ".."),
        ("vividflow", "..", None),
        ("vividflow", ".", None),
    ],
)
async def test_dot_segment_ids_never_make_a_request(
    provider: str, job_id: str, technique: str | None
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer(200, {})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        client = StatusClient(REGISTRY[provider], base_url=BASES[provider], api_key=KEY, http=http)
        result = await client.poll(job_id, {"technique": technique})
    assert seen == []  # no request at all, so no other path of the API is asked with our key
    assert result.outcome is PollOutcome.NOT_FOUND
    assert result.error is not None and "not requested" in result.error


async def test_odd_ids_are_one_encoded_path_segment() -> None:
    result, request = await poll("vividflow", "a b%2F?#..", answer(200, {"status": "PROCESSING"}))
    assert request.url.raw_path.decode().endswith("/status/a%20b%252F%3F%23..")
    assert result.outcome is PollOutcome.EVENT
