"""The copy guard: the one place a running copy's source stream is cut short.

A copy is cut, never the store's put: the guard raises inside the chunk iterator the store
consumes, so the store sees its input fail and cleans up its own attempt (aborts its multipart
upload, removes its temp file) without touching an object another attempt completed. A put that
is already past its input (completing the upload) runs to its end, and its answer (stored, or
`ObjectExists`) decides what happened. Two reasons to cut:

- **stop**: the lease was lost, or the worker is stopping (`stop(reason)`), at once, even while
  the source is stalled between chunks;
- **too slow**: fewer than `min_bytes_per_second * window` bytes arrived in a window of
  `window` seconds. httpx's read timeout bounds the gap between two chunks, not throughput, so a
  source trickling a byte every few seconds could hold a copy slot for hours; cut, the slot goes
  to the tasks that wait, and the copy resumes where it stopped (resume.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable

from receiver.archive.fetch import FetchError


class CopyCut(FetchError):
    """The guard cut the copy: its lease was lost, the worker is stopping, or it was too slow."""

    retryable = True


class CopyGuard:
    def __init__(
        self,
        *,
        min_bytes_per_second: float,
        window: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.min_bytes_per_second = min_bytes_per_second
        self.window = window
        self.monotonic = monotonic
        self.stopped: str | None = None
        self.too_slow = False
        self.started = False  # the store began reading: from now on only the source is cut
        # The source ran at the floor or above (`_fast`): resume.py stops holding its bytes.
        self.proven_fast = min_bytes_per_second * window <= 0
        self._need = min_bytes_per_second * window
        self._window_start = 0.0
        self._window_bytes = 0
        self._cut: CopyCut | None = None
        # Set while the consumer's task waits for the next chunk: the only moment at which the
        # guard may interrupt it (a cancel then lands in the source's read, never in the store).
        self._reader: asyncio.Task[object] | None = None
        self._interrupted = False

    def stop(self, reason: str) -> None:
        """Cut the copy now (idempotent; the first reason wins)."""
        if self.stopped is None:
            self.stopped = reason
        self._decide(CopyCut(reason))

    def begin(self) -> None:
        """The store begins reading (bytes held from an earlier copy may come first)."""
        self.started = True

    async def wrap(self, chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        """``chunks`` as they come, unless the guard cuts them (`CopyCut`)."""
        self.begin()
        loop = asyncio.get_running_loop()
        self._window_start = self.monotonic()
        self._window_bytes = 0
        # One timer a tick, not one per chunk: chunks can be small and many.
        tick = min(1.0, self.window / 4)
        watchdog: asyncio.TimerHandle | None = None

        def watch() -> None:
            nonlocal watchdog
            slow = self._roll(self.monotonic())
            if slow is not None:
                self._decide(slow)
            else:
                watchdog = loop.call_later(tick, watch)

        if self._need > 0:
            watchdog = loop.call_later(tick, watch)
        if self.stopped is not None:
            self._cut = CopyCut(self.stopped)
        source = aiter(chunks)
        task = asyncio.current_task()
        try:
            while True:
                if self._cut is not None:
                    raise self._cut
                self._reader = task
                try:
                    chunk = await anext(source)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if not self._interrupted or task is None:
                        raise
                    self._interrupted = False
                    if task.uncancel() > 0:
                        raise  # cancelled from outside too: that wins
                    assert self._cut is not None
                    raise self._cut from None
                finally:
                    self._reader = None
                now = self.monotonic()
                slow = self._roll(now)
                if slow is not None:
                    raise slow
                self._window_bytes += len(chunk)
                if not self.proven_fast:
                    self.proven_fast = self._fast(now)
                yield chunk
        finally:
            if watchdog is not None:
                watchdog.cancel()
            closer = getattr(source, "aclose", None)
            if closer is not None:
                await closer()

    def _roll(self, now: float) -> CopyCut | None:
        """Close the windows that ended by ``now``; the cut if one of them was short of bytes."""
        if self._need <= 0:
            return None
        while now - self._window_start >= self.window:
            if self._window_bytes < self._need:
                self.too_slow = True
                return self._slow(self._window_bytes)
            self._window_start += self.window
            self._window_bytes = 0
        return None

    def _fast(self, now: float) -> bool:
        """This window reached the floor, or ran at twice it for a second (or the window)."""
        if self._window_bytes >= self._need:
            return True
        elapsed = now - self._window_start
        return elapsed >= min(1.0, self.window) and (
            self._window_bytes >= 2 * self.min_bytes_per_second * elapsed
        )

    def _decide(self, cut: CopyCut) -> None:
        if self._cut is None:
            self._cut = cut
        if self._reader is not None and not self._interrupted:
            self._interrupted = True
            self._reader.cancel()

    def _slow(self, got: int) -> CopyCut:
        return CopyCut(
            f"source too slow: {got} bytes in {self.window:g}s, below the floor of "
            f"{self.min_bytes_per_second:g} bytes/s (RECEIVER_COPY_MIN_BYTES_PER_SECOND); "
            "retried later"
        )
