"""A `receiver worker` killed with SIGKILL mid-copy loses nothing and copies nothing twice."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from receiver.app import build_parts
from receiver.domain import EventKind, JobEvent, Output
from tests.conftest import make_settings
from tests.sources import SourceServer, expected_sha256

pytestmark = pytest.mark.anyio

JOBS = 10
SIZE = 2 * 2**20


def states(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(db)
    try:
        return dict(conn.execute("SELECT state, COUNT(*) FROM assets GROUP BY state").fetchall())
    finally:
        conn.close()


def leased(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM tasks WHERE state = 'leased'").fetchone()[0])
    finally:
        conn.close()


def unfinished(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM tasks WHERE state != 'done'").fetchone()[0])
    finally:
        conn.close()


def wait_for(condition: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def start_worker(tmp_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "receiver", "worker"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "worker.log", "ab"),
    )


async def test_sigkill_mid_copy_then_restart_archives_everything_once(
    tmp_path: Path, source_server: SourceServer
) -> None:
    # Slow sources (64 KiB every 30 ms: ~1 s a file) so the kill lands mid-copy.
    urls = [
        source_server.add(f"/o/{i}.mp4", SIZE, trickle=0.03, content_type="video/mp4")
        for i in range(JOBS)
    ]
    settings = make_settings(tmp_path)
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
        "RECEIVER_FETCH_ALLOW_HTTP": "true",
        "RECEIVER_FETCH_ALLOW_NETWORKS": "127.0.0.0/8",
        "RECEIVER_APEX_DOWNLOAD_HOSTS": "127.0.0.1",
        "RECEIVER_WORKERS": "2",
        "RECEIVER_LEASE_SECONDS": "5",
        "RECEIVER_LOG_FORMAT": "json",
    }
    first = start_worker(tmp_path, env)
    try:
        # Kill once something is archived and copies are in flight.
        wait_for(lambda: states(db).get("archived", 0) >= 1 and leased(db) >= 1, 120)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    interrupted = leased(db)
    assert interrupted >= 1, "the kill did not land mid-copy"

    second = start_worker(tmp_path, env)
    try:
        # Done means every task acked too: a task whose copy was recorded just before the kill
        # comes back when its lease lapses, and the new worker finishes it (manifest, ack).
        wait_for(lambda: states(db) == {"archived": JOBS} and unfinished(db) == 0, 150)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(15)
    assert second.returncode == 0, (tmp_path / "worker.log").read_text()[-2000:]

    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT job_id, key, sha256, size FROM assets ORDER BY job_id").fetchall()
    assert conn.execute("SELECT DISTINCT state FROM jobs").fetchall() == [("archived",)]
    assert conn.execute("SELECT DISTINCT state FROM tasks").fetchall() == [("done",)]
    conn.close()
    root = tmp_path / "archive"
    for job_id, key, sha256, size in rows:
        i = int(job_id.split("-")[1])
        assert sha256 == expected_sha256(f"/o/{i}.mp4", SIZE)
        assert size == SIZE
        assert hashlib.sha256((root / key).read_bytes()).hexdigest() == sha256
    # Exactly one object per asset (deterministic keys) plus its manifest and sidecars.
    assets = sorted(p.name for p in root.rglob("*.mp4"))
    assert assets == sorted(f"{i}.mp4" for i in range(JOBS))
    assert len(list(root.rglob("manifest.json"))) == JOBS
