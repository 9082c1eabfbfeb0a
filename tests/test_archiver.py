"""The archiver end to end: webhook in, real HTTP source, real store, ledger and queue checked."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import boto3
import pytest

from receiver.domain import JobState
from receiver.ledger import JobRecord
from tests import conftest
from tests.conftest import Harness, post_signed
from tests.payloads import APEX_SECRET, FLIKI_SECRET, apex_completed, apex_failed, fliki_status
from tests.sources import (
    GCS_EXPIRED_XML,
    R2_EXPIRED_XML,
    SourceServer,
    expected_sha256,
)

pytestmark = pytest.mark.anyio

LOCAL_SOURCES = {**conftest.LOCAL_SOURCES, "fliki_download_hosts": "127.0.0.1"}


@pytest.fixture
async def archive(harness_factory: Any) -> Harness:
    harness: Harness = await harness_factory(**LOCAL_SOURCES)
    return harness


async def completed(harness: Harness, job_id: str, url: str, **kw: Any) -> None:
    response = await post_signed(
        harness, "apex", apex_completed(job_id, url=url, **kw), APEX_SECRET
    )
    assert response.status_code == 202, response.text


async def job(harness: Harness, job_id: str, provider: str = "apex") -> JobRecord:
    record = await harness.parts.ledger.job(provider, job_id)
    assert record is not None
    return record


async def test_copy_to_local_store_with_sidecar_and_manifest(
    archive: Harness, source_server: SourceServer, tmp_path: Path
) -> None:
    url = source_server.add("/outputs/j1/output.png", 300_000, content_type="image/png")
    await completed(archive, "j1", url + "?X-Amz-Signature=SECRET-SIG")

    assert await archive.parts.archiver.run_once()

    record = await job(archive, "j1")
    assert record.state == "archived"
    asset = record.assets[0]
    assert asset.sha256 == expected_sha256("/outputs/j1/output.png", 300_000)
    assert asset.size == 300_000
    path = tmp_path / "archive" / "apex/2026/03/16/j1/output.png"
    assert asset.uri == path.as_uri()
    assert path.stat().st_size == 300_000
    manifest = json.loads((path.parent / "manifest.json").read_text())
    assert manifest["job_id"] == "j1"
    assert manifest["assets"][0]["sha256"] == asset.sha256
    assert manifest["deliveries"][0]["payload"]["data"]["metadata"]["model"] == "flux-2-pro"
    assert "SECRET-SIG" not in json.dumps(manifest)
    assert manifest["assets"][0]["source"] == url
    # Nothing left to do: the task was acked.
    assert not await archive.parts.archiver.run_once()


async def test_copy_to_s3_on_seaweedfs_with_metadata_and_checksum(
    harness_factory: Any, source_server: SourceServer, s3_bucket: str
) -> None:
    harness: Harness = await harness_factory(
        archive_url=f"s3://{s3_bucket}/archive",
        part_size=5 * 2**20,
        parts_in_flight=2,  # one PUT up to two parts
        **LOCAL_SOURCES,
    )
    size = 12 * 2**20 + 123  # three parts: multipart
    url = source_server.add("/outputs/v/video.mp4", size, content_type="video/mp4")
    await completed(harness, "vid-1", url, job_type="video", output_type="video/mp4")

    assert await harness.parts.archiver.run_once()

    record = await job(harness, "vid-1")
    assert record.state == "archived", record.assets[0].error
    key = "archive/apex/2026/03/16/vid-1/video.mp4"
    assert record.assets[0].uri == f"s3://{s3_bucket}/{key}"
    s3 = boto3.session.Session().client("s3")
    head = s3.head_object(Bucket=s3_bucket, Key=key, ChecksumMode="ENABLED")
    sha = expected_sha256("/outputs/v/video.mp4", size)
    assert head["ContentLength"] == size
    assert head["ContentType"] == "video/mp4"
    meta = head["Metadata"]
    assert (meta["provider"], meta["job-id"], meta["job-type"]) == ("apex", "vid-1", "video")
    assert meta["source-host"] == "127.0.0.1"
    # Multipart: the server verified a full-object CRC32; the SHA-256 is the object's tag.
    assert head["ChecksumType"] == "FULL_OBJECT" and "ChecksumCRC32" in head
    tags = s3.get_object_tagging(Bucket=s3_bucket, Key=key)["TagSet"]
    assert tags == [{"Key": "sha256", "Value": sha}]
    manifest = json.loads(
        s3.get_object(Bucket=s3_bucket, Key="archive/apex/2026/03/16/vid-1/manifest.json")[
            "Body"
        ].read()
    )
    assert manifest["assets"][0]["sha256"] == sha
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


async def test_earliest_deadline_first(archive: Harness, source_server: SourceServer) -> None:
    url = source_server.add("/o/f.png", 1000)
    for i in range(100):
        await completed(archive, f"apex-{i}", url)
    response = await post_signed(
        archive, "fliki", fliki_status("fliki-late", download=url), FLIKI_SECRET
    )
    assert response.status_code == 202

    assert await archive.parts.archiver.run_once()

    assert (await job(archive, "fliki-late", "fliki")).state == "archived"
    states = {(await job(archive, f"apex-{i}")).state for i in range(100)}
    assert states == {"queued"}


async def test_dropped_connection_resumes_with_range(
    archive: Harness, source_server: SourceServer
) -> None:
    url = source_server.add("/o/big.mp4", 3_000_000, drop_after=1_000_000)
    await completed(archive, "resume", url)

    assert await archive.parts.archiver.run_once()

    record = await job(archive, "resume")
    assert record.state == "archived"
    assert record.assets[0].sha256 == expected_sha256("/o/big.mp4", 3_000_000)
    second = source_server.requests("/o/big.mp4")[1]
    assert second.header("range") == "bytes=1000000-"
    assert second.header("if-match") is not None


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_is_honoured(
    archive: Harness, source_server: SourceServer, status: int
) -> None:
    url = source_server.add("/o/r.png", 5000, fail_times=1, fail_status=status, retry_after="120")
    await completed(archive, "ra", url)

    assert await archive.parts.archiver.run_once()
    assert (await job(archive, "ra")).state == "queued"
    task = archive.rows("tasks")[0]
    assert task["state"] == "ready"
    assert task["not_before"] >= archive.clock.wall() + 120
    assert str(status) in task["last_error"]

    archive.clock.advance(60)
    assert not await archive.parts.archiver.run_once()  # not due yet
    archive.clock.advance(61)
    assert await archive.parts.archiver.run_once()
    assert (await job(archive, "ra")).state == "archived"
    assert archive.parts.metrics.value("receiver_archive_retries_total") == 1


async def test_expired_link_after_the_deadline_ends_the_job_as_expired(
    archive: Harness, source_server: SourceServer
) -> None:
    url = source_server.add("/o/e.png", 100, status=403, error_body=R2_EXPIRED_XML)
    await completed(archive, "exp", url)
    archive.clock.advance(25 * 3600)  # past Apex's 24 h window

    assert await archive.parts.archiver.run_once()

    record = await job(archive, "exp")
    assert record.state == "expired"
    assert record.error is not None
    assert "ExpiredRequest" in record.error
    assert "403" in record.error
    assert archive.rows("tasks")[0]["state"] == "dead"


async def test_gone_before_the_deadline_is_retried_not_expired(
    archive: Harness, source_server: SourceServer
) -> None:
    url = source_server.add("/o/g.png", 100, status=400, error_body=GCS_EXPIRED_XML)
    await completed(archive, "early", url)

    assert await archive.parts.archiver.run_once()

    assert (await job(archive, "early")).state == "queued"
    assert archive.rows("tasks")[0]["state"] == "ready"


async def test_keeps_failing_is_dead_lettered_with_its_last_error(
    harness_factory: Any, source_server: SourceServer
) -> None:
    harness: Harness = await harness_factory(max_attempts=2, **LOCAL_SOURCES)
    url = source_server.add("/o/d.png", 100, fail_times=10, fail_status=500)
    await completed(harness, "dead", url)

    assert await harness.parts.archiver.run_once()
    harness.clock.advance(3600)
    assert await harness.parts.archiver.run_once()

    record = await job(harness, "dead")
    assert record.state == "dead"
    assert record.error is not None
    assert "gave up after 2 attempts" in record.error
    assert "500" in record.error
    task = harness.rows("tasks")[0]
    assert (task["state"], task["attempts"]) == ("dead", 2)


async def test_redirect_to_a_private_address_is_refused_without_retry(
    harness_factory: Any, source_server: SourceServer
) -> None:
    # Loopback is allowed for the source itself here, so redirect to link-local metadata.
    harness: Harness = await harness_factory(**LOCAL_SOURCES)
    url = source_server.add("/o/redir", redirect_to="http://169.254.169.254/latest/meta-data/")
    await completed(harness, "ssrf", url)

    assert await harness.parts.archiver.run_once()

    record = await job(harness, "ssrf")
    assert record.state == "dead"
    assert record.error is not None
    assert "169.254.169.254" in record.error


async def test_host_not_on_the_allowlist_is_refused(
    harness_factory: Any, source_server: SourceServer
) -> None:
    harness: Harness = await harness_factory(
        fetch_allow_http=True, fetch_allow_networks="127.0.0.0/8"
    )
    url = source_server.add("/o/x.png", 100)
    await completed(harness, "host", url)

    assert await harness.parts.archiver.run_once()

    assert (await job(harness, "host")).state == "dead"
    assert source_server.requests("/o/x.png") == []


async def test_wrong_content_length_is_retried(
    archive: Harness, source_server: SourceServer
) -> None:
    url = source_server.add("/o/short.png", 10_000, wrong_content_length=500, ranges=False)
    await completed(archive, "short", url)

    assert await archive.parts.archiver.run_once()

    assert (await job(archive, "short")).state == "queued"
    assert archive.rows("tasks")[0]["last_error"]


async def test_duplicate_webhook_after_archive_does_not_copy_again(
    archive: Harness, source_server: SourceServer, tmp_path: Path
) -> None:
    url = source_server.add("/o/once.png", 1000)
    await completed(archive, "once", url)
    assert await archive.parts.archiver.run_once()

    again = await post_signed(archive, "apex", apex_completed("once", url=url), APEX_SECRET)
    late = await post_signed(archive, "apex", apex_failed("once"), APEX_SECRET)

    assert (again.status_code, late.status_code) == (200, 200)
    # The archiver refreshes the manifest with the late deliveries, and downloads nothing.
    assert await archive.parts.archiver.run_once()
    assert not await archive.parts.archiver.run_once()
    assert len(source_server.requests("/o/once.png")) == 1
    manifest = json.loads((tmp_path / "archive/apex/2026/03/16/once/manifest.json").read_text())
    assert [d["outcome"] for d in manifest["deliveries"]] == ["accepted", "duplicate", "ignored"]
    assert (await job(archive, "once")).state == "archived"


async def test_a_stopping_worker_gives_its_task_back_at_once(
    archive: Harness, source_server: SourceServer
) -> None:
    url = source_server.add("/o/slow.mp4", 2_000_000, trickle=0.05)
    await completed(archive, "slow", url)
    runner = asyncio.create_task(archive.parts.archiver.run(1))
    for _ in range(200):
        if archive.rows("tasks")[0]["state"] == "leased":
            break
        await asyncio.sleep(0.02)
    assert archive.rows("tasks")[0]["state"] == "leased"

    runner.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await runner

    task = archive.rows("tasks")[0]
    assert (task["state"], task["last_error"]) == ("ready", "worker stopped before finishing")
    assert task["not_before"] <= archive.clock.wall()
    assert (await job(archive, "slow")).state == "queued"
    assert (
        list(
            (
                archive.parts.settings.archive_url[7:]
                and Path(archive.parts.settings.archive_url[7:])
            ).rglob("*.mp4")
        )
        == []
    )


async def test_retry_leaves_a_running_copy_of_another_asset_alone(archive: Harness) -> None:
    from datetime import timedelta

    from receiver.domain import EventKind, JobEvent, Output

    outputs = tuple(Output(f"http://127.0.0.1:1/o/{i}.png", f"{i}.png") for i in range(2))
    event = JobEvent(provider="apex", job_id="two", kind=EventKind.COMPLETED, outputs=outputs)
    await archive.parts.ingestor.ingest(
        event, body=b"{}", source="webhook", auth="signature", delivery_id=None
    )
    queue, now = archive.parts.queue, archive.clock()
    first = await queue.lease("w1", now, timedelta(seconds=60))
    running = await queue.lease("w2", now, timedelta(seconds=60))
    assert first is not None and running is not None
    await archive.parts.ledger.mark_asset_ended(
        "apex", "two", first.n, JobState.DEAD, "gave up", now
    )
    await queue.dead_letter(first, "gave up")

    assert await archive.parts.ledger.requeue("apex", "two", now) == 1

    tasks = {t["n"]: t for t in archive.rows("tasks")}
    assert (tasks[first.n]["state"], tasks[first.n]["attempts"]) == ("ready", 0)
    assert (tasks[running.n]["state"], tasks[running.n]["lease_owner"]) == ("leased", "w2")
    assert await queue.heartbeat(running, now, timedelta(seconds=60))


async def test_a_fitted_name_keeps_the_name_the_provider_gave_in_metadata_and_manifest(
    archive: Harness, source_server: SourceServer, tmp_path: Path
) -> None:
    # "x.meta.json" would collide with the local store's sidecars: the key gets a fitted name,
    # the object's metadata and the manifest keep the one the provider gave.
    url = source_server.add("/outputs/j9/frame.meta.json", 1000, content_type="image/png")
    await completed(archive, "j9", url)
    assert await archive.parts.archiver.run_once()
    asset = (await job(archive, "j9")).assets[0]
    assert asset.state == "archived" and asset.key.endswith("/frame.meta_json")
    head = await archive.parts.store.head(asset.key)
    assert head is not None and head.metadata["source-name"] == "frame.meta.json"
    folder = tmp_path / "archive" / asset.key.rsplit("/", 1)[0]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["assets"][0]["source_name"] == "frame.meta.json"
    assert manifest["assets"][0]["name"] == "frame.meta_json"
