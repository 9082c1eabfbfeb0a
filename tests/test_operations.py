"""CLI and operations: jobs list/show, retry, verify and reindex against real ingest + archive."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from receiver.app import build_parts, create_app
from receiver.audit.api import job_json
from receiver.cli import app as cli
from tests.conftest import FakeClock, make_settings
from tests.payloads import APEX_SECRET, apex_completed, apex_failed, signed
from tests.sources import SourceServer

SETTINGS = {
    "fetch_allow_http": True,
    "fetch_allow_networks": "127.0.0.0/8",
    "apex_download_hosts": "127.0.0.1",
}


def env_for(tmp_path: Path) -> dict[str, str]:
    settings = make_settings(tmp_path, **SETTINGS)
    return {
        "RECEIVER_LEDGER_URL": settings.ledger_url,
        "RECEIVER_ARCHIVE_URL": settings.archive_url,
        "RECEIVER_LOG_FORMAT": "json",
    }


def populate(tmp_path: Path, source: SourceServer, jobs: dict[str, Any]) -> None:
    """Deliver webhooks through the real app and run the archiver until idle."""
    import httpx

    async def go() -> None:
        clock = FakeClock()
        parts = build_parts(make_settings(tmp_path, **SETTINGS), clock=clock, wall_clock=clock.wall)
        app = create_app(parts)
        parts.start(workers=0)
        try:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://r"
            ) as client:
                for payload in jobs.values():
                    body, headers = signed(payload, APEX_SECRET, timestamp=int(clock.wall()))
                    response = await client.post("/webhooks/apex", content=body, headers=headers)
                    assert response.status_code == 202
                    clock.advance(60)
            while await parts.archiver.run_once():
                pass
        finally:
            await parts.stop()

    asyncio.run(go())


def invoke(tmp_path: Path, *args: str) -> Any:
    return CliRunner().invoke(cli, list(args), env=env_for(tmp_path))


@pytest.fixture
def archive(tmp_path: Path, source_server: SourceServer) -> Path:
    jobs = {}
    for i in range(3):
        url = source_server.add(f"/o/{i}/v.mp4", 4000 + i, content_type="video/mp4")
        jobs[f"j{i}"] = apex_completed(
            f"j{i}", url=url + "?X-Amz-Signature=SECRET", job_type="video", output_type="video/mp4"
        )
    jobs["failed"] = apex_failed("failed")
    populate(tmp_path, source_server, jobs)
    return tmp_path / "archive"


def test_jobs_list_and_show(tmp_path: Path, archive: Path) -> None:
    listed = invoke(tmp_path, "jobs", "list", "--json")
    assert listed.exit_code == 0, listed.output
    assert [j["job_id"] for j in json.loads(listed.output)] == ["failed", "j2", "j1", "j0"]
    table = invoke(tmp_path, "jobs", "list", "--state", "archived")
    assert table.exit_code == 0
    assert "j0" in table.output and "failed" not in table.output

    shown = invoke(tmp_path, "jobs", "show", "apex/j1", "--json")
    body = json.loads(shown.output)
    assert body["state"] == "archived"
    assert body["assets"][0]["size"] == 4001
    assert "SECRET" not in shown.output
    human = invoke(tmp_path, "jobs", "show", "apex/j1")
    assert human.exit_code == 0 and "deliveries" in human.output

    assert invoke(tmp_path, "jobs", "show", "apex/nope").exit_code == 2
    assert invoke(tmp_path, "jobs", "show", "no-slash").exit_code == 2
    assert invoke(tmp_path, "jobs", "list", "--state", "bogus").exit_code == 2


def test_verify_passes_then_catches_corruption_and_deletion(tmp_path: Path, archive: Path) -> None:
    clean = invoke(tmp_path, "verify", "--json")
    assert clean.exit_code == 0, clean.output
    assert json.loads(clean.output)["ok"] == 3

    day = archive / "apex/2026/03/16"
    corrupt = day / "j0/v.mp4"
    data = bytearray(corrupt.read_bytes())
    data[100] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    (day / "j2/v.mp4").unlink()

    result = invoke(tmp_path, "verify", "--json")
    assert result.exit_code == 1
    report = json.loads(result.output)
    problems = {(f["job_id"], f["problem"]) for f in report["findings"]}
    assert problems == {("j0", "sha256 mismatch"), ("j2", "missing")}
    assert report["ok"] == 1
    human = invoke(tmp_path, "verify", "--provider", "apex")
    assert human.exit_code == 1 and "sha256 mismatch" in human.output


def test_reindex_reproduces_the_audit_answers_from_storage_alone(
    tmp_path: Path, archive: Path
) -> None:
    before = {
        j: json.loads(invoke(tmp_path, "jobs", "show", f"apex/{j}", "--json").output)
        for j in ("j0", "j1", "j2")
    }
    order = json.loads(invoke(tmp_path, "jobs", "list", "--state", "archived", "--json").output)
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"receiver.db{suffix}").unlink(missing_ok=True)

    result = invoke(tmp_path, "reindex", "--json")

    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["restored"] == 4  # the provider-failed job too
    after = {
        j: json.loads(invoke(tmp_path, "jobs", "show", f"apex/{j}", "--json").output)
        for j in ("j0", "j1", "j2")
    }
    assert after == before
    listed = invoke(tmp_path, "jobs", "list", "--state", "archived", "--json").output
    assert json.loads(listed) == order
    # The provider-failed job comes back too: it has a manifest of its own.
    failed = json.loads(invoke(tmp_path, "jobs", "show", "apex/failed", "--json").output)
    assert (failed["state"], failed["error"]) == ("failed", "Generation failed")
    assert invoke(tmp_path, "verify").exit_code == 0
    again = json.loads(invoke(tmp_path, "reindex", "--json").output)
    assert (again["restored"], again["already_known"]) == (0, 4)


def test_retry_requeues_a_dead_job(tmp_path: Path, source_server: SourceServer) -> None:
    # Real time throughout: the CLI in between runs on the real clock.
    url = source_server.add("/o/flaky.png", 1000, fail_times=1, fail_status=404)

    async def first_attempt() -> None:
        parts = build_parts(make_settings(tmp_path, max_attempts=1, **SETTINGS))
        parts.start(workers=0)
        try:
            await parts.ingestor.ingest(
                _event("flaky", url),
                body=b"{}",
                source="webhook",
                auth="signature",
                delivery_id=None,
            )
            assert await parts.archiver.run_once()
            record = await parts.ledger.job("apex", "flaky")
            assert record is not None and record.state == "expired"
        finally:
            await parts.stop()

    asyncio.run(first_attempt())
    assert invoke(tmp_path, "retry", "apex/flaky").exit_code == 0
    assert invoke(tmp_path, "retry", "apex/flaky").exit_code == 2  # nothing left to retry

    async def second_attempt() -> dict[str, Any]:
        parts = build_parts(make_settings(tmp_path, **SETTINGS))
        parts.start(workers=0)
        try:
            assert await parts.archiver.run_once()
            record = await parts.ledger.job("apex", "flaky")
            assert record is not None
            return job_json(record)
        finally:
            await parts.stop()

    body = asyncio.run(second_attempt())
    assert body["state"] == "archived"
    assert body["error"] is None


def _event(job_id: str, url: str) -> Any:
    from receiver.domain import EventKind, JobEvent, Output

    return JobEvent(
        provider="apex",
        job_id=job_id,
        kind=EventKind.COMPLETED,
        outputs=(Output(url, "f.png", "image/png"),),
    )


def test_reindexed_assets_that_were_never_copied_come_back_dead() -> None:
    from receiver.audit.operations import UNRECOVERABLE, job_from_manifest

    asset = {
        "n": 0,
        "name": "a.png",
        "key": "k",
        "uri": None,
        "state": "pending",
        "size": None,
        "sha256": None,
        "content_type": None,
        "source": "https://ik.imagekit.io/a.png",
        "deadline": "2026-03-16T12:00:00+00:00",
        "archived_at": None,
        "error": None,
    }
    archived = {
        **asset,
        "n": 1,
        "state": "archived",
        "uri": "file:///x",
        "size": 1,
        "sha256": "ab" * 32,
        "archived_at": "2026-03-16T12:00:00+00:00",
    }
    manifest = {
        "schema": "receiver.manifest/1",
        "provider": "flora",
        "job_id": "r",
        "job": {
            "state": "queued",
            "type": None,
            "first_seen_at": "2026-03-16T11:00:00+00:00",
            "completed_at": None,
            "failed_at": None,
            "archived_at": None,
            "error": None,
            "credits_refunded": None,
            "metadata": {},
        },
        "deliveries": [],
        "assets": [asset, archived],
    }
    job = job_from_manifest(manifest)
    assert job.state == "dead"
    assert job.error == UNRECOVERABLE
    assert [(a.state, a.error) for a in job.assets] == [("dead", UNRECOVERABLE), ("archived", None)]
