"""A copy slot starts its next copy while the last task's manifest and ack finish (its tail).

What must hold: the tail overlaps the next copy, at most one tail per slot is unfinished, and a
tail cut short by a stop leaves its task to come back for exactly the missing steps (no second
copy). Sources are the real HTTP server; the store is the real local one, wrapped to hold a
manifest write until the test lets it go.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, Mapping
from typing import Any

import pytest

from receiver.store import Store, StoredObject
from tests.conftest import Harness
from tests.sources import SourceServer
from tests.test_archiver import LOCAL_SOURCES, completed, job
from tests.test_worker_faults import ConditionalStore

pytestmark = pytest.mark.anyio


class HeldManifests(ConditionalStore):
    """The real store (a conditional create, as in test_worker_faults) whose manifest writes
    wait for `release`; it logs what happens, in order."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.release = asyncio.Event()
        self.events: list[str] = []

    async def put_stream(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        *,
        content_type: str,
        metadata: Mapping[str, str],
    ) -> StoredObject:
        self.events.append(f"copy {metadata['job-id']}")
        return await super().put_stream(key, chunks, content_type=content_type, metadata=metadata)

    async def put_bytes(self, key: str, data: bytes, **kw: Any) -> StoredObject:
        job_id = key.rsplit("/", 2)[-2]
        self.events.append(f"manifest {job_id} held")
        await self.release.wait()
        stored = await super().put_bytes(key, data, **kw)
        self.events.append(f"manifest {job_id} written")
        return stored


async def _until(predicate: Any, what: str) -> None:
    for _ in range(400):
        if await predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
async def held(harness_factory: Any) -> tuple[Harness, HeldManifests]:
    harness: Harness = await harness_factory(**LOCAL_SOURCES)
    store = HeldManifests(harness.parts.store)
    harness.parts.archiver.store = store
    return harness, store


async def test_the_next_copy_runs_while_the_last_manifest_is_written(
    held: tuple[Harness, HeldManifests], source_server: SourceServer
) -> None:
    harness, store = held
    # Earlier completion, earlier deadline: p-0 is leased first, then p-1, then p-2.
    for i in range(3):
        url = source_server.add(f"/o/p-{i}.png", 20_000)
        await completed(harness, f"p-{i}", url, completed_at=f"2026-03-16T1{i}:00:00Z")
    runner = asyncio.create_task(harness.parts.archiver.run(1))
    try:
        # One slot: p-0's manifest is held, and p-1 is copied meanwhile.
        await _until(lambda: _true("copy p-1" in store.events), "the second copy")
        assert store.events[:3] == ["copy p-0", "manifest p-0 held", "copy p-1"]
        assert (await job(harness, "p-0")).state == "archived"
        # At most one unfinished tail per slot: p-2 waits until p-0's tail is done.
        await _until(lambda: _true("manifest p-1 held" in store.events), "p-1's tail")
        await asyncio.sleep(0.2)
        assert "copy p-2" not in store.events
        assert {t["job_id"]: t["state"] for t in harness.rows("tasks")} == {
            "p-0": "leased",
            "p-1": "leased",
            "p-2": "ready",
        }
        store.release.set()
        await _until(
            lambda: _true({t["state"] for t in harness.rows("tasks")} == {"done"}), "all done"
        )
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
    for i in range(3):
        assert (await job(harness, f"p-{i}")).state == "archived"
        assert f"manifest p-{i} written" in store.events
    assert store.puts == 3


async def test_a_stop_during_a_tail_leaves_the_task_to_come_back_for_its_manifest(
    held: tuple[Harness, HeldManifests], source_server: SourceServer
) -> None:
    harness, store = held
    await completed(harness, "cut", source_server.add("/o/cut.png", 20_000))
    runner = asyncio.create_task(harness.parts.archiver.run(1))
    await _until(lambda: _true("manifest cut held" in store.events), "the held manifest")
    runner.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await runner
    # The copy is recorded; the manifest and the ack are not: the task is still leased.
    assert (await job(harness, "cut")).state == "archived"
    assert harness.rows("tasks")[0]["state"] == "leased"
    assert "manifest cut written" not in store.events

    store.release.set()
    harness.clock.advance(3600)  # the lease lapses; the task comes back to its missing steps
    assert await harness.parts.archiver.run_once()
    assert "manifest cut written" in store.events
    assert harness.rows("tasks")[0]["state"] == "done"
    assert store.puts == 1  # recorded as archived: nothing copied again


async def _true(value: bool) -> bool:
    return value
