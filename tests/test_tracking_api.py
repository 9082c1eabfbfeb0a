"""`POST /jobs` and `receiver track`: operator auth, validation, idempotency, the schedule."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from receiver.backends.sqlite import Database
from receiver.cli import app as cli
from receiver.polling.poller import RateLimiter
from receiver.polling.schedule.sqlite import TrackedStore
from receiver.providers.base import RateBudget
from tests.conftest import Harness

pytestmark = pytest.mark.anyio

OPERATOR = {"Authorization": "Bearer operator-token"}
KEYS = {f"{p}_api_key": "k" for p in ("apex", "fliki", "flora", "vividflow")}


@pytest.fixture
async def api(harness_factory: Any) -> Harness:
    harness: Harness = await harness_factory(
        **KEYS, vividflow_base_url="https://vivid.test/api/v1", poll_grace_seconds=600
    )
    return harness


async def post(harness: Harness, body: Any, headers: dict[str, str] | None = None) -> Any:
    return await harness.client.post("/jobs", json=body, headers=OPERATOR | (headers or {}))


async def test_operator_token_is_required(api: Harness) -> None:
    body = {"provider": "vividflow", "job_id": "v"}
    missing = await api.client.post("/jobs", json=body)
    wrong = await api.client.post("/jobs", json=body, headers={"Authorization": "Bearer nope"})
    basic = await api.client.post("/jobs", json=body, headers={"Authorization": "Basic b3A="})
    for response in (missing, wrong, basic):
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
    assert api.counts()["jobs"] == 0


async def test_without_a_configured_token_the_error_says_what_to_set(
    harness_factory: Any,
) -> None:
    harness: Harness = await harness_factory(api_token=None)
    response = await post(harness, {"provider": "vividflow", "job_id": "v"})
    assert response.status_code == 401
    assert "set RECEIVER_API_TOKEN" in response.json()["error"]["message"]


async def test_register_flora_then_again_is_idempotent(api: Harness) -> None:
    body = {
        "provider": "flora",
        "job_id": "j57abc",
        "technique": "portrait-enhancer",
        "metadata": {"customer": 42, "tags": ["a"]},
    }
    first = await post(api, body)
    second = await post(api, body)

    assert first.status_code == 201, first.text
    assert first.json() == {
        "status": "tracking",
        "provider": "flora",
        "job_id": "j57abc",
        "technique": "portrait-enhancer",
        "job_state": "tracking",
        "tracked_state": "active",
        "next_poll_at": api.clock().isoformat(),  # no webhooks: polled at once
        "last_error": None,
        "warnings": [],
    }
    assert second.status_code == 200
    assert second.json()["status"] == "already_tracked"
    job = await api.parts.ledger.job("flora", "j57abc")
    assert job is not None and job.state.value == "tracking"
    assert job.tracking is not None
    assert job.tracking["metadata"] == {"customer": 42, "tags": ["a"]}
    assert job.tracking["technique"] == "portrait-enhancer"
    assert job.tracking["registered_by"] == "api"
    assert len(api.rows("tracked")) == 1


async def test_webhook_providers_wait_for_the_grace_period(api: Harness) -> None:
    response = await post(api, {"provider": "apex", "job_id": "550e"})
    assert response.status_code == 201
    row = await TrackedStore(api.parts.db).get("apex", "550e")
    assert row is not None
    assert (row.next_poll_at - api.clock()).total_seconds() == 600


async def test_registering_a_job_a_webhook_already_completed(api: Harness) -> None:
    from tests.conftest import post_signed
    from tests.payloads import FLIKI_SECRET, fliki_status

    await post_signed(api, "fliki", fliki_status("f9"), FLIKI_SECRET)
    response = await post(api, {"provider": "fliki", "job_id": "f9", "metadata": {"x": 1}})
    assert response.status_code == 201
    assert response.json()["job_state"] == "queued"
    job = await api.parts.ledger.job("fliki", "f9")
    assert job is not None and job.tracking is not None and job.tracking["metadata"] == {"x": 1}


@pytest.mark.parametrize(
    ("body", "field", "problem"),
    [
        ({"provider": "midjourney", "job_id": "x"}, "provider", "must be one of"),
        ({"provider": "flora", "job_id": "x"}, "technique", "required"),
        ({"provider": "apex", "job_id": "x", "technique": "t"}, "technique", "not allowed"),
        ({"provider": "flora", "job_id": "x", "technique": "../etc"}, "technique", "pattern"),
        ({"provider": "apex", "job_id": ""}, "job_id", "empty"),
        ({"provider": "apex", "job_id": "a\nb"}, "job_id", "rule 'job_id'"),
        ({"provider": "flora", "job_id": "..", "technique": "t"}, "job_id", "path segment"),
        ({"provider": "vividflow", "job_id": "."}, "job_id", "path segment"),
        ({"provider": "apex", "job_id": "a/b"}, "job_id", "'/'"),
        ({"provider": "apex", "job_id": "x" * 129}, "job_id", "limit 128"),
        ({"provider": "apex", "job_id": "a\u200bb"}, "job_id", "u+200b"),
        ({"provider": "apex"}, "job_id", "required"),
        ({"provider": "apex", "job_id": "x", "metadata": [1]}, "metadata", "dictionary"),
        ({"provider": "apex", "job_id": "x", "extra": 1}, "extra", "not permitted"),
    ],
)
async def test_invalid_registrations_list_the_field(
    api: Harness, body: dict[str, Any], field: str, problem: str
) -> None:
    response = await post(api, body)
    assert response.status_code == 422, response.text
    details = response.json()["error"]["details"]
    assert any(d["field"] == field and problem in d["problem"].lower() for d in details), details
    assert api.counts()["jobs"] == 0


async def test_metadata_is_size_limited(api: Harness) -> None:
    body = {"provider": "apex", "job_id": "x", "metadata": {"blob": "x" * 5000}}
    response = await post(api, body)
    assert response.status_code == 413
    error = response.json()["error"]
    assert "limit is 4096 bytes" in error["message"]
    assert error["details"]["field"] == "metadata"
    assert api.counts()["jobs"] == 0


async def test_body_errors(api: Harness) -> None:
    bad_json = await api.client.post(
        "/jobs", content=b"{nope", headers=OPERATOR | {"content-type": "application/json"}
    )
    assert bad_json.status_code == 400
    form = await api.client.post("/jobs", data={"provider": "apex"}, headers=OPERATOR)
    assert form.status_code == 415
    huge = await api.client.post(
        "/jobs",
        content=b'{"a": "' + b"x" * 70_000 + b'"}',
        headers=OPERATOR | {"content-type": "application/json"},
    )
    assert huge.status_code == 413


async def test_warnings_when_the_provider_cannot_be_polled(harness_factory: Any) -> None:
    harness: Harness = await harness_factory()  # no API keys, no Vivid Flow base URL
    response = await post(harness, {"provider": "vividflow", "job_id": "v"})
    assert response.status_code == 201
    warnings = response.json()["warnings"]
    assert any("RECEIVER_VIVIDFLOW_API_KEY is not set" in w for w in warnings)
    assert any("RECEIVER_VIVIDFLOW_BASE_URL is not set" in w for w in warnings)


def test_cli_track(tmp_path: Path) -> None:
    env = {
        "RECEIVER_LEDGER_URL": f"sqlite:///{tmp_path / 'r.db'}",
        "RECEIVER_ARCHIVE_URL": f"file://{tmp_path / 'archive'}",
        "RECEIVER_FLORA_API_KEY": "k",
    }
    runner = CliRunner()
    refused = runner.invoke(cli, ["track", "flora", "run-0", "--technique", "t"], env=env)
    assert refused.exit_code == 2 and "no ledger at" in refused.output  # never created here
    db = Database(tmp_path / "r.db")  # the ledger `receiver serve` made
    db.start()
    db.stop()
    args = ["track", "flora", "run-1", "--technique", "mugshot", "--metadata", '{"a": 1}']
    first = runner.invoke(cli, args, env=env)
    again = runner.invoke(cli, args, env=env)
    missing = runner.invoke(cli, ["track", "flora", "run-2"], env=env)
    bad_json = runner.invoke(cli, [*args[:5], "--metadata", "{"], env=env)

    assert first.exit_code == 0, first.output
    assert first.output.startswith("tracking: flora/run-1")
    assert again.exit_code == 0 and again.output.startswith("already_tracked")
    assert missing.exit_code == 2 and "technique" in missing.output
    assert bad_json.exit_code == 2 and "not valid JSON" in bad_json.output
    import sqlite3

    conn = sqlite3.connect(tmp_path / "r.db")
    try:
        tracking = conn.execute("SELECT tracking FROM jobs WHERE job_id = 'run-1'").fetchone()[0]
        assert json.loads(tracking)["metadata"] == {"a": 1}
        assert json.loads(tracking)["registered_by"] == "cli"
        assert conn.execute("SELECT state FROM tracked").fetchall() == [("active",)]
    finally:
        conn.close()
    assert "RECEIVER_FLORA_API_KEY" not in os.environ


def test_rate_limiter_sliding_window_and_server_hints() -> None:
    limiter = RateLimiter(RateBudget(requests=3, per_seconds=10))
    assert [limiter.acquire(t) for t in (0, 1, 2, 3)] == [True, True, True, False]
    assert limiter.next_free(3) == 10
    assert limiter.acquire(10) and not limiter.acquire(10.5)
    limiter.pause(30)
    assert limiter.available(20) == 0 and limiter.next_free(20) == 30
    assert limiter.available(30) == 3
    from receiver.polling.status import RateHeaders

    limiter.observe(RateHeaders(limit=20, remaining=1, reset=9), 31)  # delta: until 40
    assert limiter.acquire(31) and not limiter.acquire(32)
    assert limiter.next_free(32) == 40
    limiter.observe(RateHeaders(limit=20, remaining=0, reset=5), 50)  # a delta, not a time
    assert limiter.next_free(50) == 55
