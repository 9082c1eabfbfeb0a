"""`receiver serve` killed with SIGKILL mid-multipart against SeaweedFS: after a restart every job
is archived once, intact, and no incomplete multipart upload is left in the bucket."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_settings
from tests.crashkit import child_env, count, record_jobs, start, unfinished, wait_for
from tests.s3server import admin_client
from tests.sources import SourceServer, expected_sha256

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

JOBS = 4
SIZE = 16 * 2**20 + 4321  # four parts of 5 MiB, the last one short
PART = 5 * 2**20
IN_FLIGHT = 2  # one PUT up to two parts: SIZE is a multipart upload


def archived(db: Path) -> int:
    return count(db, "SELECT COUNT(*) FROM assets WHERE state = 'archived'")


def uploads(bucket: str) -> list[dict[str, Any]]:
    return list(admin_client().list_multipart_uploads(Bucket=bucket).get("Uploads", []))


async def test_sigkill_mid_multipart_then_restart_leaves_no_upload(
    tmp_path: Path, source_server: SourceServer, s3_bucket: str
) -> None:
    # Trickled sources (64 KiB every 10 ms: ~2.5 s a file) so the kill lands mid-upload.
    urls = [
        source_server.add(f"/o/{i}.mp4", SIZE, trickle=0.01, content_type="video/mp4")
        for i in range(JOBS)
    ]
    settings = make_settings(
        tmp_path,
        archive_url=f"s3://{s3_bucket}/archive",
        part_size=PART,
        parts_in_flight=IN_FLIGHT,
    )
    await record_jobs(settings, urls)

    db = tmp_path / "receiver.db"
    env = child_env(
        settings,
        dict(os.environ),
        part_size=str(PART),
        parts_in_flight=str(IN_FLIGHT),
        apex_webhook_secrets=settings.apex_webhook_secrets.get_secret_value(),
        api_token="operator-token",
        webhook_providers="apex",
        workers="2",
    )
    first = start(tmp_path, env, "serve")
    try:
        # Kill once multipart uploads are under way (a part or more sent, not yet completed).
        wait_for(lambda: len(uploads(s3_bucket)) >= 2, 60, first, tmp_path / "serve.log")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    left_by_the_kill = uploads(s3_bucket)
    assert len(left_by_the_kill) >= 2, "the kill did not land mid-upload"

    second = start(tmp_path, env, "serve")
    try:
        wait_for(
            lambda: archived(db) == JOBS and unfinished(db) == 0,
            120,
            second,
            tmp_path / "serve.log",
        )
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(15)

    # The retried copies aborted the killed attempts' uploads for their keys: none is left.
    assert uploads(s3_bucket) == []
    client = admin_client()
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT job_id, key, sha256 FROM assets ORDER BY job_id").fetchall()
    conn.close()
    for job_id, key, sha256 in rows:
        i = int(job_id.split("-")[1])
        assert sha256 == expected_sha256(f"/o/{i}.mp4", SIZE)
        full = f"archive/{key}"
        body = client.get_object(Bucket=s3_bucket, Key=full)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == sha256
        tags = client.get_object_tagging(Bucket=s3_bucket, Key=full)["TagSet"]
        assert tags == [{"Key": "sha256", "Value": sha256}]
    listed = client.list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert sorted(o["Key"].rsplit("/", 1)[1] for o in listed) == sorted(
        [f"{i}.mp4" for i in range(JOBS)] + ["manifest.json"] * JOBS
    )
