"""A `receiver worker` killed with SIGKILL mid-copy loses nothing and copies nothing twice."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import make_settings
from tests.crashkit import child_env, count, record_jobs, start, unfinished, wait_for
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
    return count(db, "SELECT COUNT(*) FROM tasks WHERE state = 'leased'")


async def test_sigkill_mid_copy_then_restart_archives_everything_once(
    tmp_path: Path, source_server: SourceServer
) -> None:
    # Slow sources (64 KiB every 30 ms: ~1 s a file) so the kill lands mid-copy.
    urls = [
        source_server.add(f"/o/{i}.mp4", SIZE, trickle=0.03, content_type="video/mp4")
        for i in range(JOBS)
    ]
    settings = make_settings(tmp_path)
    await record_jobs(settings, urls)

    db = tmp_path / "receiver.db"
    env = child_env(settings, dict(os.environ), workers="2")
    first = start(tmp_path, env, "worker")
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

    second = start(tmp_path, env, "worker")
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
