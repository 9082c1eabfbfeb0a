"""The archive worker under faults: taken keys, failing later steps, slow sources, store outages.

Sources are the real misbehaving HTTP server; the store is the real local store, wrapped only to
play the agreed conditional-create answer (`ObjectExists`) or to fail one step on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import time
from collections.abc import AsyncIterable, Mapping
from pathlib import Path
from typing import Any

import pytest

from receiver.store import ObjectExists, Store, StoredObject
from tests.conftest import Harness
from tests.sources import SourceServer, expected_sha256
from tests.test_archiver import LOCAL_SOURCES, completed, job

pytestmark = pytest.mark.anyio

KEY = "apex/2026/03/16/{}/{}"


class ConditionalStore:
    """The agreed behaviour of `put_stream` (a conditional create) over a real store."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.manifest_failures = 0  # fail this many manifest writes
        self.conditional_bytes = False  # put_bytes refuses to replace, too
        self.puts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def put_stream(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        *,
        content_type: str,
        metadata: Mapping[str, str],
    ) -> StoredObject:
        self.puts += 1
        existing = await self.inner.head(key)
        if existing is None:
            return await self.inner.put_stream(
                key, chunks, content_type=content_type, metadata=metadata
            )
        digest = hashlib.sha256()
        async for chunk in chunks:
            digest.update(chunk)
        raise ObjectExists(key, digest.hexdigest(), existing)

    async def put_bytes(self, key: str, data: bytes, **kw: Any) -> StoredObject:
        if key.endswith("manifest.json") and self.manifest_failures:
            self.manifest_failures -= 1
            raise RecursionError("maximum recursion depth exceeded while encoding a JSON object")
        existing = await self.inner.head(key) if self.conditional_bytes else None
        if existing is not None:
            raise ObjectExists(key, hashlib.sha256(data).hexdigest(), existing)
        return await self.inner.put_bytes(key, data, **kw)


@pytest.fixture
async def wrapped(harness_factory: Any) -> tuple[Harness, ConditionalStore]:
    harness: Harness = await harness_factory(max_attempts=3, **LOCAL_SOURCES)
    store = ConditionalStore(harness.parts.store)
    harness.parts.archiver.store = store
    return harness, store


def archive_path(harness: Harness, key: str) -> Path:
    return Path(harness.parts.settings.archive_url.removeprefix("file://")) / key


async def test_object_another_attempt_completed_is_recorded_quietly(
    wrapped: tuple[Harness, ConditionalStore], source_server: SourceServer
) -> None:
    harness, store = wrapped
    url = source_server.add("/o/dup/out.png", 50_000)
    await completed(harness, "dup", url)
    # Another attempt (lost lease, duplicate message) finished the copy but never recorded it.
    body = b"".join([c async for c in _source(source_server, "/o/dup/out.png", 50_000)])
    key = KEY.format("dup", "out.png")
    await store.inner.put_bytes(key, body, content_type="image/png")
    before = archive_path(harness, key).stat()

    assert await harness.parts.archiver.run_once()

    record = await job(harness, "dup")
    assert record.state == "archived"
    assert record.assets[0].sha256 == expected_sha256("/o/dup/out.png", 50_000)
    after = archive_path(harness, key).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert harness.rows("tasks")[0]["state"] == "done"
    assert harness.parts.metrics.value("receiver_archive_dead_letters_total") == 0
    assert (archive_path(harness, key).parent / "manifest.json").exists()


async def test_a_different_object_at_the_key_is_never_overwritten(
    wrapped: tuple[Harness, ConditionalStore], source_server: SourceServer
) -> None:
    harness, store = wrapped
    url = source_server.add("/o/other/out.png", 50_000)
    await completed(harness, "other", url)
    key = KEY.format("other", "out.png")
    await store.inner.put_bytes(key, b"something else entirely", content_type="image/png")

    assert await harness.parts.archiver.run_once()

    record = await job(harness, "other")
    assert record.state == "dead"
    assert record.assets[0].error is not None
    assert "a different object is already stored" in record.assets[0].error
    assert "not overwritten" in record.assets[0].error
    assert archive_path(harness, key).read_bytes() == b"something else entirely"
    assert harness.rows("tasks")[0]["state"] == "dead"
    text = (await harness.client.get("/metrics")).text
    assert 'receiver_archive_steps_given_up_total{step="copy"} 1.0' in text


async def test_a_manifest_that_keeps_failing_ends_the_task_and_the_asset_stays_archived(
    wrapped: tuple[Harness, ConditionalStore], source_server: SourceServer
) -> None:
    harness, store = wrapped
    store.manifest_failures = 1000
    url = source_server.add("/o/poison/out.png", 10_000)
    await completed(harness, "poison", url)

    rounds = 0
    while await harness.parts.archiver.run_once():
        rounds += 1
        assert rounds <= 3, "the task keeps coming back"
        harness.clock.advance(3600)

    assert rounds == 3  # max_attempts leases, then it ended
    record = await job(harness, "poison")
    assert record.state == "archived"  # the copy is never undone
    asset = record.assets[0]
    assert asset.state == "archived"
    assert asset.sha256 == expected_sha256("/o/poison/out.png", 10_000)
    assert asset.error is not None and "manifest gave up after 3 attempts" in asset.error
    assert "RecursionError" in asset.error
    assert harness.rows("tasks")[0]["state"] == "dead"
    assert len(source_server.requests("/o/poison/out.png")) == 1  # copied once
    text = (await harness.client.get("/metrics")).text
    assert 'receiver_archive_steps_given_up_total{step="manifest"} 1.0' in text
    assert 'receiver_archive_step_failures_total{step="manifest"} 9.0' in text
    shown = (
        await harness.client.get(
            "/jobs/apex/poison", headers={"authorization": "Bearer operator-token"}
        )
    ).json()
    assert "manifest gave up" in shown["assets"][0]["error"]


async def test_a_manifest_that_fails_once_is_retried_within_the_lease(
    wrapped: tuple[Harness, ConditionalStore], source_server: SourceServer
) -> None:
    harness, store = wrapped
    store.manifest_failures = 1
    url = source_server.add("/o/once/out.png", 10_000)
    await completed(harness, "once", url)

    assert await harness.parts.archiver.run_once()

    assert (await job(harness, "once")).state == "archived"
    assert harness.rows("tasks")[0]["state"] == "done"
    assert archive_path(harness, KEY.format("once", "manifest.json")).exists()


class FlakyQueue:
    """The real queue, whose `ack` fails a number of times."""

    def __init__(self, inner: Any, ack_failures: int) -> None:
        self.inner = inner
        self.ack_failures = ack_failures

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def ack(self, lease: Any) -> None:
        if self.ack_failures:
            self.ack_failures -= 1
            raise ConnectionError("queue unreachable")
        await self.inner.ack(lease)


async def test_ack_failing_after_mark_does_not_copy_again(
    harness_factory: Any, source_server: SourceServer
) -> None:
    harness: Harness = await harness_factory(lease_seconds=5, **LOCAL_SOURCES)
    archiver = harness.parts.archiver
    archiver.queue = FlakyQueue(harness.parts.queue, ack_failures=3)
    url = source_server.add("/o/ack/out.png", 10_000)
    await completed(harness, "ack", url)

    assert await archiver.run_once()
    assert (await job(harness, "ack")).state == "archived"
    assert harness.rows("tasks")[0]["state"] == "leased"  # the ack never landed
    harness.clock.advance(6)  # the lease lapses
    assert await archiver.run_once()

    assert harness.rows("tasks")[0]["state"] == "done"
    assert len(source_server.requests("/o/ack/out.png")) == 1
    assert harness.parts.metrics.value("receiver_archive_step_failures_total", step="ack") == 3


class FlakyLedger:
    def __init__(self, inner: Any, mark_failures: int) -> None:
        self.inner = inner
        self.mark_failures = mark_failures

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def mark_archived(self, *args: Any) -> Any:
        if self.mark_failures:
            self.mark_failures -= 1
            raise OSError("disk I/O error")
        return await self.inner.mark_archived(*args)


async def test_mark_failing_in_one_lease_leaves_the_copy_for_the_next_to_record(
    wrapped: tuple[Harness, ConditionalStore], source_server: SourceServer
) -> None:
    harness, store = wrapped
    archiver = harness.parts.archiver
    archiver.ledger = FlakyLedger(harness.parts.ledger, mark_failures=3)
    url = source_server.add("/o/mark/out.png", 10_000)
    await completed(harness, "mark", url)

    assert await archiver.run_once()
    assert (await job(harness, "mark")).state == "queued"
    task = harness.rows("tasks")[0]
    assert task["state"] == "ready" and "mark" in task["last_error"]
    harness.clock.advance(3600)
    assert await archiver.run_once()

    record = await job(harness, "mark")
    assert record.state == "archived"
    # The second attempt found the first one's object (same digest) and recorded it.
    assert record.assets[0].sha256 == expected_sha256("/o/mark/out.png", 10_000)
    assert store.puts == 2
    assert harness.rows("tasks")[0]["state"] == "done"


async def test_slow_sources_do_not_hold_the_copy_slots(
    harness_factory: Any, source_server: SourceServer
) -> None:
    workers = 4
    harness: Harness = await harness_factory(
        copy_min_bytes_per_second=64 * 1024,
        copy_slow_window_seconds=1.0,
        workers=workers,
        **LOCAL_SOURCES,
    )
    # A byte every 0.2 s: forever for a 1 MB file, and never a read timeout.
    for i in range(workers):
        url = source_server.add(f"/o/trickle-{i}.bin", 1_000_000, trickle=0.2, chunk_size=1)
        await completed(harness, f"trickle-{i}", url, completed_at="2026-03-16T11:00:00Z")
    ordinary = [source_server.add(f"/o/ok-{i}.png", 200_000) for i in range(5)]
    started = time.monotonic()
    runner = asyncio.create_task(harness.parts.archiver.run(workers))
    try:
        await asyncio.sleep(0.3)  # the trickling tasks (earlier deadlines) hold every slot
        assert {t["state"] for t in harness.rows("tasks")} == {"leased"}
        for i, url in enumerate(ordinary):
            await completed(harness, f"ok-{i}", url)
        while True:
            states = [(await job(harness, f"ok-{i}")).state for i in range(5)]
            if set(states) == {"archived"}:
                break
            assert time.monotonic() - started < 10, states
            await asyncio.sleep(0.1)
        waited = time.monotonic() - started
        metrics = harness.parts.metrics
        for _ in range(30):  # every trickling copy is cut within a window or two
            if metrics.value("receiver_archive_slow_copies_cut_total") >= workers:
                break
            await asyncio.sleep(0.1)
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
    print(f"ordinary jobs archived {waited:.2f}s after start behind {workers} trickling sources")
    assert waited < 5
    slow = (await job(harness, "trickle-0")).assets[0]
    assert slow.state == "pending"
    assert harness.parts.metrics.value("receiver_archive_slow_copies_cut_total") >= workers


async def test_a_slow_but_finite_source_resumes_and_is_archived_without_holding_others_up(
    harness_factory: Any, source_server: SourceServer
) -> None:
    # Issue 24.2: a source at a quarter of the floor used to be cut after the window on every
    # attempt, start over each time, and end dead after max_attempts.
    floor = 4 * 2**20
    harness: Harness = await harness_factory(
        copy_min_bytes_per_second=floor,
        copy_slow_window_seconds=0.5,
        max_attempts=3,
        workers=2,
        **LOCAL_SOURCES,
    )
    size = 4 * 2**20
    # 16 KiB every 1/64 s: at most 1 MiB/s, a quarter of the floor (sleeps only make it slower).
    slow_url = source_server.add("/o/slow.mp4", size, chunk_size=16 * 1024, trickle=1 / 64)
    await completed(harness, "slow", slow_url, completed_at="2026-03-16T11:00:00Z")
    runner = asyncio.create_task(harness.parts.archiver.run(2))
    waits: list[float] = []
    try:
        others = 0
        started = time.monotonic()
        while (await job(harness, "slow")).state not in ("archived", "dead", "expired"):
            assert time.monotonic() - started < 60, "the slow copy never ended"
            # Other jobs keep arriving (later deadlines): each must get a slot promptly.
            url = source_server.add(f"/o/other-{others}.png", 100_000)
            await completed(harness, f"other-{others}", url)
            sent = time.monotonic()
            while (await job(harness, f"other-{others}")).state != "archived":
                assert time.monotonic() - sent < 10, f"other-{others} held up"
                await asyncio.sleep(0.02)
            waits.append(time.monotonic() - sent)
            others += 1
            harness.clock.advance(10)  # backoffs come due (the old code's retries did)
            await asyncio.sleep(0.2)
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
    record = await job(harness, "slow")
    asset = record.assets[0]
    requests = source_server.requests("/o/slow.mp4")
    resumed = [r.header("range") for r in requests if r.header("range")]
    metrics = harness.parts.metrics
    print(
        f"slow: {len(requests)} requests, {len(resumed)} resumed; {others} other jobs, "
        f"longest wait {max(waits):.2f}s"
    )
    assert (asset.state, asset.error) == ("archived", None)
    assert asset.sha256 == expected_sha256("/o/slow.mp4", size)
    # It resumed where it stopped, from further on each time, anchored to the same object.
    starts = [int(r.removeprefix("bytes=").rstrip("-")) for r in resumed]
    assert len(starts) >= 2 and starts == sorted(starts) and starts[0] > 0
    assert all(r.header("if-match") for r in requests if r.header("range"))
    assert metrics.value("receiver_archive_slow_copies_requeued_total") == len(resumed)
    assert metrics.value("receiver_archive_slow_copies_cut_total") >= len(resumed)
    # Those cuts were not attempts: the task ended on its first counted lease.
    task = next(t for t in harness.rows("tasks") if t["job_id"] == "slow")
    assert (task["state"], task["attempts"]) == ("done", 1)
    assert others >= 3 and max(waits) < 10
    assert len(harness.parts.archiver.partials) == 0  # nothing held once it is archived


async def test_a_slow_copy_that_makes_no_progress_still_ends(
    harness_factory: Any, source_server: SourceServer
) -> None:
    # The other half of the rule: a window without a single byte is a failed attempt.
    harness: Harness = await harness_factory(
        copy_min_bytes_per_second=64 * 1024,
        copy_slow_window_seconds=0.3,
        max_attempts=2,
        **LOCAL_SOURCES,
    )
    url = source_server.add("/o/stuck.mp4", 1_000_000, stall_after=0, fault_times=99)
    await completed(harness, "stuck", url)
    archiver = harness.parts.archiver
    for _ in range(2):
        assert await archiver.run_once()
        harness.clock.advance(3600)
    asset = (await job(harness, "stuck")).assets[0]
    assert asset.state == "dead"
    assert "too slow" in (asset.error or "")
    assert harness.parts.metrics.value("receiver_archive_slow_copies_requeued_total") == 0


async def test_an_unreachable_store_is_waited_out_without_using_attempts(
    harness_factory: Any, source_server: SourceServer, tmp_path: Path
) -> None:
    harness: Harness = await harness_factory(max_attempts=2, **LOCAL_SOURCES)
    archiver = harness.parts.archiver
    archiver.retry = type(archiver.retry)(max_attempts=2, store_wait_first=0.05, store_wait_max=0.2)
    root = archive_path(harness, "")
    # The store's folder goes away: a plain file where the folder should be (ENOTDIR, as root too).
    shutil.rmtree(root, ignore_errors=True)
    root.write_bytes(b"not a folder")
    url = source_server.add("/o/outage.png", 30_000)
    await completed(harness, "outage", url)
    runner = asyncio.create_task(archiver.run(1))
    try:
        for _ in range(200):
            if harness.parts.metrics.value("receiver_archive_store_outage_waits_total") >= 3:
                break
            await asyncio.sleep(0.05)
        assert harness.parts.metrics.value("receiver_archive_store_outage_waits_total") >= 3
        task = harness.rows("tasks")[0]
        assert (task["state"], task["attempts"]) == ("leased", 1)
        assert "receiver_store_up 0.0" in (await harness.client.get("/metrics")).text
        ready = await harness.client.get("/readyz")
        assert ready.status_code == 200  # webhooks are still accepted
        assert (await harness.client.get("/readyz?full=1")).status_code == 503
        os.unlink(root)  # the store comes back
        for _ in range(200):
            if (await job(harness, "outage")).state == "archived":
                break
            await asyncio.sleep(0.05)
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
    assert (await job(harness, "outage")).state == "archived"
    task = harness.rows("tasks")[0]
    assert (task["state"], task["attempts"]) == ("done", 1)
    assert harness.parts.metrics.value("receiver_archive_retries_total") == 0
    assert "receiver_store_up 1.0" in (await harness.client.get("/metrics")).text


async def test_a_store_outage_past_the_deadline_counts_as_an_attempt(
    harness_factory: Any, source_server: SourceServer
) -> None:
    harness: Harness = await harness_factory(**LOCAL_SOURCES)
    root = archive_path(harness, "")
    shutil.rmtree(root, ignore_errors=True)
    root.write_bytes(b"not a folder")
    url = source_server.add("/o/late.png", 1000)
    await completed(harness, "late", url)
    harness.clock.advance(25 * 3600)  # past the deadline: no waiting

    assert await harness.parts.archiver.run_once()

    task = harness.rows("tasks")[0]
    assert task["state"] == "ready"
    assert "local store" in task["last_error"]


async def test_losing_the_lease_cuts_the_source_and_leaves_the_task_alone(
    harness_factory: Any, source_server: SourceServer
) -> None:
    harness: Harness = await harness_factory(lease_seconds=5, **LOCAL_SOURCES)
    archiver = harness.parts.archiver
    url = source_server.add("/o/lost.mp4", 20_000_000, trickle=0.05)
    await completed(harness, "lost", url)
    run = asyncio.create_task(archiver.run_once("w-old"))
    for _ in range(100):
        if harness.rows("tasks")[0]["state"] == "leased":
            break
        await asyncio.sleep(0.02)
    # Another worker took the task over (as after a pause past the lease).
    import sqlite3

    conn = sqlite3.connect(harness.parts.db.path)
    conn.execute("UPDATE tasks SET lease_owner = 'w-new'")
    conn.commit()
    conn.close()
    started = time.monotonic()
    assert await asyncio.wait_for(run, 10)
    assert time.monotonic() - started < 4  # cut at the next heartbeat, not at the source's end
    task = harness.rows("tasks")[0]
    assert (task["state"], task["lease_owner"]) == ("leased", "w-new")  # untouched
    assert (await job(harness, "lost")).state == "queued"
    assert list(archive_path(harness, "").rglob("*.mp4")) == []


async def _source(server: SourceServer, path: str, size: int) -> Any:
    from tests.sources import content

    yield content(path, size)


async def test_a_provider_failed_job_gets_a_manifest_that_reindex_restores(
    harness_factory: Any, tmp_path: Path
) -> None:
    from receiver.audit.operations import reindex
    from receiver.backends.sqlite import Database
    from receiver.ledger.sqlite import SqliteLedger
    from tests.conftest import post_signed
    from tests.payloads import APEX_SECRET, apex_failed

    harness: Harness = await harness_factory(**LOCAL_SOURCES)
    response = await post_signed(harness, "apex", apex_failed("gone-wrong"), APEX_SECRET)
    assert response.status_code == 202
    assert response.json()["tasks_queued"] == 0  # nothing to copy

    assert await harness.parts.archiver.run_once()
    assert not await harness.parts.archiver.run_once()

    manifests = list(archive_path(harness, "").rglob("manifest.json"))
    assert [p.parent.name for p in manifests] == ["gone-wrong"]
    assert harness.rows("tasks")[0]["state"] == "done"
    fresh = Database(tmp_path / "fresh.db")
    fresh.start()
    try:
        ledger = SqliteLedger(fresh)
        report = await reindex(ledger, harness.parts.store)
        assert (report.restored, report.unreadable) == (1, [])
        job_record = await ledger.job("apex", "gone-wrong")
        assert job_record is not None
        assert (job_record.state, job_record.error) == ("failed", "Generation failed")
    finally:
        fresh.stop()


async def test_an_s3_server_that_stops_and_comes_back_costs_no_attempt(
    harness_factory: Any, source_server: SourceServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket
    import subprocess
    import sys

    from tests.s3server import _client_for, point_boto3_at, stop_child, wait_until_serving

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"

    def start() -> subprocess.Popen[bytes]:
        child = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until_serving(endpoint, child)
        _client_for(endpoint).create_bucket(Bucket="outage")
        return child

    point_boto3_at(monkeypatch, endpoint)
    server = start()
    try:
        harness: Harness = await harness_factory(archive_url="s3://outage/a", **LOCAL_SOURCES)
        archiver = harness.parts.archiver
        archiver.retry = type(archiver.retry)(store_wait_first=0.1, store_wait_max=0.5)
        stop_child(server)  # the S3 server goes away before the copy
        url = source_server.add("/o/s3-outage.png", 40_000)
        await completed(harness, "s3-outage", url)
        runner = asyncio.create_task(archiver.run(1))
        try:
            metrics = harness.parts.metrics
            for _ in range(300):
                if metrics.value("receiver_archive_store_outage_waits_total") >= 2:
                    break
                await asyncio.sleep(0.05)
            assert metrics.value("receiver_archive_store_outage_waits_total") >= 2
            assert harness.rows("tasks")[0]["attempts"] == 1
            server = start()  # back (empty: moto keeps nothing), the bucket made again
            for _ in range(300):
                if (await job(harness, "s3-outage")).state == "archived":
                    break
                await asyncio.sleep(0.05)
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        record = await job(harness, "s3-outage")
        assert record.state == "archived"
        assert record.assets[0].sha256 == expected_sha256("/o/s3-outage.png", 40_000)
        task = harness.rows("tasks")[0]
        assert (task["state"], task["attempts"]) == ("done", 1)
        assert metrics.value("receiver_archive_retries_total") == 0
    finally:
        stop_child(server)


async def test_a_worker_stopping_while_it_waits_for_the_store_gives_the_task_back(
    harness_factory: Any, source_server: SourceServer
) -> None:
    harness: Harness = await harness_factory(**LOCAL_SOURCES)
    archiver = harness.parts.archiver
    archiver.retry = type(archiver.retry)(store_wait_first=0.05, store_wait_max=0.2)
    root = archive_path(harness, "")
    shutil.rmtree(root, ignore_errors=True)
    root.write_bytes(b"not a folder")
    await completed(harness, "stop-wait", source_server.add("/o/stop-wait.png", 1000))
    runner = asyncio.create_task(archiver.run(1))
    for _ in range(200):
        if harness.parts.metrics.value("receiver_archive_store_outage_waits_total") >= 1:
            break
        await asyncio.sleep(0.05)
    runner.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await runner

    task = harness.rows("tasks")[0]
    assert (task["state"], task["last_error"]) == ("ready", "worker stopped before finishing")
    assert task["not_before"] <= harness.clock.wall()


async def test_a_manifest_the_store_refuses_to_replace_is_a_failed_step_not_a_silent_skip(
    wrapped: tuple[Harness, ConditionalStore], source_server: SourceServer
) -> None:
    from tests.conftest import post_signed
    from tests.payloads import APEX_SECRET, apex_completed

    harness, store = wrapped
    store.conditional_bytes = True
    url = source_server.add("/o/man/out.png", 1000)
    await completed(harness, "man", url)
    assert await harness.parts.archiver.run_once()
    manifest = archive_path(harness, KEY.format("man", "manifest.json"))
    first = manifest.read_bytes()
    # The same manifest again (nothing new): the bytes there are as good as written.
    asset = await harness.parts.ledger.asset_to_copy("apex", "man", 0)
    assert asset is not None
    await harness.parts.archiver._write_manifest(asset)
    # A late delivery changes the manifest; a store that will not replace it fails the step.
    await post_signed(harness, "apex", apex_completed("man", url=url), APEX_SECRET)
    assert await harness.parts.archiver.run_once()

    assert manifest.read_bytes() == first
    task = harness.rows("tasks")[0]
    assert task["state"] == "ready"
    assert "manifest" in task["last_error"] and "already exists" in task["last_error"]
    assert (await job(harness, "man")).state == "archived"
