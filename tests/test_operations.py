"""CLI and operations: jobs list/show, retry, verify and reindex against real ingest + archive."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from receiver.app import build_parts, create_app
from receiver.audit.api import job_json
from receiver.cli import app as cli
from tests.conftest import FakeClock, make_settings
from tests.payloads import APEX_SECRET, apex_completed, apex_failed, signed
from tests.s3server import admin_client
from tests.sources import SourceServer

SETTINGS = {
    "fetch_allow_http": True,
    "fetch_allow_networks": "127.0.0.0/8",
    "apex_download_hosts": "127.0.0.1",
}


def env_for(tmp_path: Path, **overrides: Any) -> dict[str, str]:
    settings = make_settings(tmp_path, **SETTINGS, **overrides)
    return {
        "RECEIVER_LEDGER_URL": settings.ledger_url,
        "RECEIVER_ARCHIVE_URL": settings.archive_url,
        "RECEIVER_LOG_FORMAT": "json",
        "RECEIVER_LEASE_SECONDS": str(settings.lease_seconds),
    }


def populate(tmp_path: Path, source: SourceServer, jobs: dict[str, Any], **overrides: Any) -> None:
    """Deliver webhooks through the real app and run the archiver until idle."""
    import httpx

    async def go() -> None:
        clock = FakeClock()
        settings = make_settings(tmp_path, **SETTINGS, **overrides)
        parts = build_parts(settings, clock=clock, wall_clock=clock.wall)
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


def invoke(tmp_path: Path, *args: str, **overrides: Any) -> Any:
    return CliRunner().invoke(cli, list(args), env=env_for(tmp_path, **overrides))


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
    # The bytes disagree with all three records of j0's SHA-256.
    assert problems == {
        ("j0", "sha256 mismatch"),
        ("j0", "manifest mismatch"),
        ("j0", "object record mismatch"),
        ("j2", "missing"),
    }
    assert report["ok"] == 1
    human = invoke(tmp_path, "verify", "--provider", "apex")
    assert human.exit_code == 1 and "sha256 mismatch" in human.output


def test_verify_catches_a_missing_manifest_or_object_record(tmp_path: Path, archive: Path) -> None:
    day = archive / "apex/2026/03/16"
    (day / "j0/manifest.json").unlink()
    (day / "j1/v.mp4.meta.json").unlink()  # the local object's own record
    (day / "j2/v.mp4.meta.json").write_text("{not json")

    result = invoke(tmp_path, "verify", "--json")
    assert result.exit_code == 1
    report = json.loads(result.output)
    problems = {(f["job_id"], f["problem"]) for f in report["findings"]}
    assert problems == {
        ("j0", "manifest missing"),
        ("j1", "object record missing"),
        ("j2", "object record unreadable"),
    }
    assert report["ok"] == 0

    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"receiver.db{suffix}").unlink(missing_ok=True)
    reindexed = json.loads(invoke(tmp_path, "reindex", "--json").output)
    assert reindexed["restored"] == 3  # j1, j2 and the failed job; j0's manifest is gone
    j1, j2 = sorted(reindexed["mismatches"])
    assert j1.startswith("apex/2026/03/16/j1/v.mp4: manifest says sha256 ")
    assert j1.endswith(", the object records None")
    assert j2.startswith("apex/2026/03/16/j2/v.mp4: object record unreadable: ")


def test_reindex_reports_an_archived_object_that_is_gone(tmp_path: Path, archive: Path) -> None:
    (archive / "apex/2026/03/16/j1/v.mp4").unlink()
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"receiver.db{suffix}").unlink(missing_ok=True)
    result = invoke(tmp_path, "reindex", "--json")
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["restored"] == 4  # j0-j2 and the failed job: j1's manifest still describes it
    assert report["mismatches"] == ["apex/2026/03/16/j1/v.mp4: object missing"]


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


# --- on a real S3 server (SeaweedFS) ---------------------------------------------------------

MiB = 2**20


@pytest.fixture
def s3_archive(
    tmp_path: Path, source_server: SourceServer, s3_bucket: str
) -> tuple[str, dict[str, str]]:
    """Three archived jobs in s3://bucket/archive: two single PUTs and one multipart object.

    Returns the bucket and the settings overrides that point the CLI at it. Before archiving, an
    incomplete upload is left under the prefix, as a worker killed mid-copy would leave it.
    """
    # One part in flight: one PUT only up to one part, so 6 MiB is a multipart object.
    overrides = {
        "archive_url": f"s3://{s3_bucket}/archive",
        "part_size": 5 * MiB,
        "parts_in_flight": 1,
    }
    admin_client().create_multipart_upload(Bucket=s3_bucket, Key="archive/apex/killed/v.mp4")
    jobs = {}
    for i, size in enumerate([4000, 5000, 6 * MiB]):
        url = source_server.add(f"/o/{i}/v.mp4", size, content_type="video/mp4")
        jobs[f"j{i}"] = apex_completed(f"j{i}", url=url, job_type="video", output_type="video/mp4")
    populate(tmp_path, source_server, jobs, **overrides)
    return s3_bucket, overrides


def asset_key(job_id: str) -> str:
    return f"archive/apex/2026/03/16/{job_id}/v.mp4"


def test_verify_on_s3_compares_ledger_manifest_and_object_record(
    tmp_path: Path, s3_archive: tuple[str, dict[str, str]]
) -> None:
    bucket, overrides = s3_archive
    client = admin_client()

    def verify() -> dict[str, Any]:
        result = invoke(tmp_path, "verify", "--json", **overrides)
        report: dict[str, Any] = json.loads(result.output)
        report["exit_code"] = result.exit_code
        return report

    clean = verify()
    assert (clean["exit_code"], clean["ok"], clean["findings"]) == (0, 3, [])
    tags = client.get_object_tagging(Bucket=bucket, Key=asset_key("j2"))["TagSet"]
    assert tags[0]["Key"] == "sha256"  # the multipart object's record is a tag

    # 1. The object's own record disagrees (a tag rewritten by hand).
    client.put_object_tagging(
        Bucket=bucket,
        Key=asset_key("j2"),
        Tagging={"TagSet": [{"Key": "sha256", "Value": "0" * 64}]},
    )
    # 2. The manifest disagrees.
    manifest_key = "archive/apex/2026/03/16/j1/manifest.json"
    manifest = json.loads(client.get_object(Bucket=bucket, Key=manifest_key)["Body"].read())
    manifest["assets"][0]["sha256"] = "1" * 64
    client.put_object(Bucket=bucket, Key=manifest_key, Body=json.dumps(manifest).encode())
    # 3. The ledger disagrees.
    conn = sqlite3.connect(tmp_path / "receiver.db")
    with conn:
        conn.execute("UPDATE assets SET sha256 = ? WHERE job_id = 'j0'", ("2" * 64,))
    conn.close()

    report = verify()
    assert report["exit_code"] == 1
    problems = {(f["job_id"], f["problem"], f["expected"]) for f in report["findings"]}
    assert problems == {
        ("j2", "object record mismatch", "0" * 64),
        ("j1", "manifest mismatch", "1" * 64),
        ("j0", "sha256 mismatch", "2" * 64),
    }


def test_verify_lists_stale_uploads_and_repair_aborts_them(
    tmp_path: Path, s3_archive: tuple[str, dict[str, str]]
) -> None:
    bucket, overrides = s3_archive
    client = admin_client()
    lease = 5  # the shortest lease settings allow; the killed upload must be older than it
    stale = client.list_multipart_uploads(Bucket=bucket)["Uploads"]
    assert [u["Key"] for u in stale] == ["archive/apex/killed/v.mp4"]
    age = (datetime.now(UTC) - stale[0]["Initiated"]).total_seconds()
    time.sleep(max(0.0, lease + 0.5 - age))
    # An upload younger than the lease may be a live worker's: never listed, never aborted.
    client.create_multipart_upload(Bucket=bucket, Key="archive/apex/live/v.mp4")

    listed = invoke(tmp_path, "verify", **overrides, lease_seconds=lease)
    assert listed.exit_code == 1, listed.output
    assert "incomplete upload of apex/killed/v.mp4" in listed.output
    assert "left in place" in listed.output and "apex/live" not in listed.output
    assert len(client.list_multipart_uploads(Bucket=bucket)["Uploads"]) == 2

    repaired = invoke(tmp_path, "verify", "--repair", "--json", **overrides, lease_seconds=lease)
    assert repaired.exit_code == 0, repaired.output
    report = json.loads(repaired.output)
    assert [(u["key"], u["aborted"]) for u in report["stale_uploads"]] == [
        ("apex/killed/v.mp4", True)
    ]
    left = client.list_multipart_uploads(Bucket=bucket)["Uploads"]
    assert [u["Key"] for u in left] == ["archive/apex/live/v.mp4"]
    assert invoke(tmp_path, "verify", **overrides, lease_seconds=lease).exit_code == 0


def test_reindex_on_s3_reads_sha256_from_the_object_record(
    tmp_path: Path, s3_archive: tuple[str, dict[str, str]]
) -> None:
    bucket, overrides = s3_archive
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"receiver.db{suffix}").unlink(missing_ok=True)
    result = invoke(tmp_path, "reindex", "--json", **overrides)
    assert result.exit_code == 0, result.output
    assert (json.loads(result.output)["restored"], json.loads(result.output)["mismatches"]) == (
        3,
        [],
    )

    admin_client().put_object_tagging(
        Bucket=bucket,
        Key=asset_key("j2"),
        Tagging={"TagSet": [{"Key": "sha256", "Value": "0" * 64}]},
    )
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"receiver.db{suffix}").unlink(missing_ok=True)
    again = invoke(tmp_path, "reindex", **overrides)
    assert again.exit_code == 1
    assert "apex/2026/03/16/j2/v.mp4: manifest says sha256" in again.output
    assert "the object records " + "0" * 64 in again.output
