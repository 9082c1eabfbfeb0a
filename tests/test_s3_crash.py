"""`receiver serve` killed with SIGKILL mid-multipart against SeaweedFS: after a restart every job
is archived once, intact, and no incomplete multipart upload is left in the bucket."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from receiver.app import build_parts
from receiver.domain import EventKind, JobEvent, Output
from tests.conftest import make_settings
from tests.s3server import admin_client
from tests.sources import SourceServer, expected_sha256

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

JOBS = 4
SIZE = 16 * 2**20 + 4321  # four parts of 5 MiB, the last one short
PART = 5 * 2**20


def archived(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        row = conn.execute("SELECT COUNT(*) FROM assets WHERE state = 'archived'").fetchone()
        return int(row[0])
    finally:
        conn.close()


def unfinished(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM tasks WHERE state != 'done'").fetchone()[0])
    finally:
        conn.close()


def uploads(bucket: str) -> list[dict[str, Any]]:
    return list(admin_client().list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def wait_for(condition: Any, timeout: float, child: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if child.poll() is not None:
            raise AssertionError(f"receiver serve exited: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def start_serve(tmp_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return subprocess.Popen(
        [sys.executable, "-m", "receiver", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "serve.log", "ab"),
    )


async def test_sigkill_mid_multipart_then_restart_leaves_no_upload(
    tmp_path: Path, source_server: SourceServer, s3_bucket: str
) -> None:
    # Trickled sources (64 KiB every 10 ms: ~2.5 s a file) so the kill lands mid-upload.
    urls = [
        source_server.add(f"/o/{i}.mp4", SIZE, trickle=0.01, content_type="video/mp4")
        for i in range(JOBS)
    ]
    settings = make_settings(tmp_path, archive_url=f"s3://{s3_bucket}/archive", part_size=PART)
    parts = build_parts(settings)
    parts.start(workers=0)
    try:
        for i, url in enumerate(urls):
            event = JobEvent(
                provider="apex",
                job_id=f"crash-{i}",
                kind=EventKind.COMPLETED,
                job_type="video",
                outputs=(Output(url, f"{i}.mp4", "video/mp4"),),
            )
            await parts.ingestor.ingest(
                event, body=b"{}", source="webhook", auth="signature", delivery_id=f"d{i}"
            )
    finally:
        await parts.stop()

    db = tmp_path / "receiver.db"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RECEIVER_")},
        "RECEIVER_LEDGER_URL": settings.ledger_url,
        "RECEIVER_ARCHIVE_URL": settings.archive_url,
        "RECEIVER_PART_SIZE": str(PART),
        "RECEIVER_FETCH_ALLOW_HTTP": "true",
        "RECEIVER_FETCH_ALLOW_NETWORKS": "127.0.0.0/8",
        "RECEIVER_APEX_DOWNLOAD_HOSTS": "127.0.0.1",
        "RECEIVER_APEX_WEBHOOK_SECRETS": settings.apex_webhook_secrets.get_secret_value(),
        "RECEIVER_API_TOKEN": "operator-token",
        "RECEIVER_WEBHOOK_PROVIDERS": "apex",
        "RECEIVER_WORKERS": "2",
        "RECEIVER_LEASE_SECONDS": "5",
        "RECEIVER_LOG_FORMAT": "json",
    }
    first = start_serve(tmp_path, env)
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

    second = start_serve(tmp_path, env)
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
