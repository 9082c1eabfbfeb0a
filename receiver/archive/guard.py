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
  source trickling a byte every few seconds could hold a copy slot for hours; cut, it is retried
  later and the slot goes to the next task by deadline.
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
        self._timeout: asyncio.Timeout | None = None

    def stop(self, reason: str) -> None:
        """Cut the copy now (idempotent; the first reason wins)."""
        if self.stopped is None:
            self.stopped = reason
        if self._timeout is not None:
            self._timeout.reschedule(asyncio.get_running_loop().time())

    async def wrap(self, chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        """``chunks`` as they come, unless the guard cuts them (`CopyCut`)."""
        need = self.min_bytes_per_second * self.window
        loop = asyncio.get_running_loop()
        window_start = self.monotonic()
        window_bytes = 0
        source = aiter(chunks)
        try:
            while True:
                if self.stopped is not None:
                    raise CopyCut(self.stopped)
                # The latest moment a chunk may arrive before the copy is too slow: the end of
                # this window if it is short of bytes, else the end of the next one.
                cut_at = window_start + self.window * (1 if window_bytes < need else 2)
                delay = max(0.0, cut_at - self.monotonic()) if need > 0 else None
                when = loop.time() + delay if delay is not None else None
                try:
                    async with asyncio.timeout(when) as self._timeout:
                        chunk = await anext(source)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    if self.stopped is not None:
                        raise CopyCut(self.stopped) from None
                    self.too_slow = True
                    raise self._slow(window_bytes) from None
                finally:
                    self._timeout = None
                now = self.monotonic()
                while now - window_start >= self.window:
                    if window_bytes < need:
                        self.too_slow = True
                        raise self._slow(window_bytes)
                    window_start += self.window
                    window_bytes = 0
                window_bytes += len(chunk)
                yield chunk
        finally:
            closer = getattr(source, "aclose", None)
            if closer is not None:
                await closer()

    def _slow(self, got: int) -> CopyCut:
        return CopyCut(
            f"source too slow: {got} bytes in {self.window:g}s, below the floor of "
            f"{self.min_bytes_per_second:g} bytes/s (RECEIVER_COPY_MIN_BYTES_PER_SECOND); "
            "retried later"
        )
