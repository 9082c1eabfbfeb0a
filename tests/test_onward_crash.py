"""`receiver serve` killed with SIGKILL at random points while it archives 500 jobs and tells a
real application about them: afterwards every archived job's events were delivered at least
once, none is lost, and no event id ever arrived with two different bodies."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from tests.app_endpoint import AppEndpoint
from tests.conftest import make_settings
from tests.crashkit import child_env, count, record_jobs, start, wait_for
from tests.sources import SourceServer
from tests.test_onward import NEW

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

JOBS = int(os.environ.get("ONWARD_CRASH_JOBS", "500"))
KILLS = int(os.environ.get("ONWARD_CRASH_KILLS", "5"))


def ledger_events(db: Path) -> dict[str, bytes]:
    conn = sqlite3.connect(db)
    try:
        return {row[0]: bytes(row[1]) for row in conn.execute("SELECT id, body FROM events")}
    finally:
        conn.close()


@pytest.mark.timeout(600)
async def test_sigkill_at_random_points_loses_no_event_and_never_changes_one(
    tmp_path: Path, source_server: SourceServer, app_endpoint: AppEndpoint
) -> None:
    urls = [source_server.add(f"/o/{i}.mp4", 2048, content_type="video/mp4") for i in range(JOBS)]
    endpoints = json.dumps([{"name": "app", "url": app_endpoint.url(), "secrets": [NEW]}])
    settings = make_settings(tmp_path, onward_endpoints=endpoints)
    await record_jobs(settings, urls)
    # The application answers a little slowly, so kills land with sends in flight.
    app_endpoint.default = (204, {}, 0.01)

    db = tmp_path / "receiver.db"
    env = child_env(
        settings,
        dict(os.environ),
        workers="4",
        onward_endpoints=endpoints,
        onward_timeout_seconds="2",
        onward_retry_schedule="1,1,1,1,1,1,1,1",
        apex_webhook_token="crash-token",
        fliki_webhook_token="crash-token",
    )
    rng = random.Random(21)
    log = tmp_path / "serve.log"
    kills = 0
    progress = "SELECT COUNT(*) FROM assets WHERE state = 'archived'"
    for _ in range(KILLS):
        child = start(tmp_path, env, "serve")
        try:
            # Once this run has made progress, at a random point of its work.
            before = count(db, progress)
            wait_for(lambda b=before: count(db, progress) > b, 60, child, log)
            time.sleep(rng.uniform(0.0, 1.0))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(10)
        kills += 1
    archived_before_end = count(db, "SELECT COUNT(*) FROM assets WHERE state = 'archived'")
    assert archived_before_end > 0, "no kill landed after the first copies"

    final = start(tmp_path, env, "serve")
    try:
        # Until every job has ended (archived, or dead with a reason) and every send is done.
        wait_for(
            lambda: (
                count(db, "SELECT COUNT(*) FROM jobs WHERE state IN ('archived', 'dead')") == JOBS
                and count(db, "SELECT COUNT(*) FROM event_sends WHERE state != 'delivered'") == 0
            ),
            300,
            final,
            log,
        )
    finally:
        final.send_signal(signal.SIGTERM)
        final.wait(15)
    with sqlite3.connect(db) as c:
        ended = c.execute("SELECT job_id, error FROM assets WHERE state != 'archived'").fetchall()
    assert ended == [], f"kills must not cost a file: {ended}"

    stored = ledger_events(db)
    # Every archived job said asset.archived then job.archived, once each in the ledger.
    types = sorted(json.loads(b)["type"] for b in stored.values())
    assert types == ["asset.archived"] * JOBS + ["job.archived"] * JOBS
    bodies: dict[str, set[bytes]] = {}
    for r in app_endpoint.received:
        bodies.setdefault(r.event_id, set()).add(r.body)
        assert r.verify(NEW)["id"] == r.event_id
    # None lost: each of the ledger's events arrived at least once ...
    assert set(bodies) == set(stored)
    # ... and no id ever arrived with a body other than the one the ledger keeps.
    assert all(seen == {stored[event_id]} for event_id, seen in bodies.items())
    # Order per job held through the kills: job.archived never before its asset.archived.
    first_seen: dict[tuple[str, str], int] = {}
    for k, r in enumerate(app_endpoint.received):
        p = r.payload()
        first_seen.setdefault((p["data"]["job_id"], p["type"]), k)
    for i in range(JOBS):
        job = f"crash-{i}"
        assert first_seen[(job, "asset.archived")] < first_seen[(job, "job.archived")]
    duplicates = len(app_endpoint.received) - len(bodies)
    print(f"\n{kills} kills, {len(bodies)} events, {duplicates} delivered more than once")
