"""The copy guard: cuts a source that stalls, trickles, or whose copy must stop; nothing else."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from receiver.archive.guard import CopyCut, CopyGuard

pytestmark = pytest.mark.anyio


async def chunks(n: int, size: int, pause: float = 0.0) -> AsyncIterator[bytes]:
    for i in range(n):
        if pause:
            await asyncio.sleep(pause)
        yield bytes([i % 256]) * size


async def stalled() -> AsyncIterator[bytes]:
    yield b"first"
    await asyncio.sleep(3600)
    yield b"never"


async def test_a_fast_source_passes_through_unchanged() -> None:
    guard = CopyGuard(min_bytes_per_second=1000, window=0.2)
    got = [c async for c in guard.wrap(chunks(100, 4096))]
    assert b"".join(got) == b"".join([c async for c in chunks(100, 4096)])
    assert not guard.too_slow


async def test_a_trickle_is_cut_after_one_window() -> None:
    guard = CopyGuard(min_bytes_per_second=1000, window=0.4)
    started = time.monotonic()
    with pytest.raises(CopyCut, match="too slow"):
        async for _ in guard.wrap(chunks(1000, 1, pause=0.05)):
            pass
    assert guard.too_slow
    assert time.monotonic() - started < 1.5


async def test_a_stalled_source_is_cut_by_the_watchdog() -> None:
    guard = CopyGuard(min_bytes_per_second=1000, window=0.4)
    started = time.monotonic()
    with pytest.raises(CopyCut, match="too slow"):
        async for _ in guard.wrap(stalled()):
            pass
    assert time.monotonic() - started < 1.5


async def test_stop_interrupts_a_stalled_read_at_once() -> None:
    guard = CopyGuard(min_bytes_per_second=0, window=60)  # no floor: only stop can cut
    seen: list[bytes] = []

    async def consume() -> None:
        async for chunk in guard.wrap(stalled()):
            seen.append(chunk)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.1)
    assert guard.started
    guard.stop("lease lost")
    with pytest.raises(CopyCut, match="lease lost"):
        await asyncio.wait_for(task, 1)
    assert seen == [b"first"]


async def test_stop_while_the_consumer_is_busy_cuts_at_the_next_chunk() -> None:
    guard = CopyGuard(min_bytes_per_second=0, window=60)
    got = 0
    with pytest.raises(CopyCut, match="stopping"):
        async for _ in guard.wrap(chunks(10, 10)):
            got += 1
            guard.stop("stopping")  # the consumer (the store) is not interrupted
            await asyncio.sleep(0)
    assert got == 1


async def test_an_outside_cancellation_stays_a_cancellation() -> None:
    guard = CopyGuard(min_bytes_per_second=1000, window=60)

    async def consume() -> None:
        async for _ in guard.wrap(stalled()):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_the_guard_costs_little_per_chunk() -> None:
    n = 20_000
    started = time.perf_counter()
    async for _ in chunks(n, 16):
        pass
    bare = time.perf_counter() - started
    guard = CopyGuard(min_bytes_per_second=1, window=60)
    started = time.perf_counter()
    async for _ in guard.wrap(chunks(n, 16)):
        pass
    guarded = time.perf_counter() - started
    per_chunk = (guarded - bare) / n
    print(f"guard overhead: {per_chunk * 1e6:.2f} us per chunk")
    assert per_chunk < 20e-6  # a 16 KiB chunk takes far longer to move than this


async def test_a_source_above_the_floor_is_proven_fast_within_a_second() -> None:
    # resume.py holds a copy's bytes only until then, so fast copies pay (almost) nothing.
    now = [0.0]

    def clock() -> float:
        return now[0]

    async def at_rate(per_second: int, seconds: float) -> AsyncIterator[bytes]:
        for _ in range(int(seconds * 10)):
            now[0] += 0.1
            yield b"x" * (per_second // 10)

    fast = CopyGuard(min_bytes_per_second=10_000, window=60, monotonic=clock)
    seen = 0
    async for chunk in fast.wrap(at_rate(40_000, 3)):
        seen += len(chunk)
        if fast.proven_fast:
            break
    # Four times the floor: known after a second's bytes, long before a window's (600,000).
    assert fast.proven_fast and seen <= 44_000

    now[0] = 0.0
    slow = CopyGuard(min_bytes_per_second=10_000, window=60, monotonic=clock)
    async for _ in slow.wrap(at_rate(15_000, 5)):  # above the floor, below twice it
        pass
    assert not slow.proven_fast and not slow.too_slow
