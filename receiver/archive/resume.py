"""Slow copies resume where they were cut, instead of starting over.

The guard (guard.py) cuts a copy whose source stays below the throughput floor, so that a
trickling source cannot hold a copy slot for hours. Starting such a copy over would lose its
file: every attempt is cut after the same window, and the task ends dead after
`max_attempts` although its link was valid for hours and its bytes were arriving. So:

- while a copy has not proven fast (a window at the floor, or a second at twice it: guard.py),
  the bytes it passes to the store are also held here (`Partial`: in memory, spilled to a
  temporary file past 1 MiB). A fast copy drops them then and holds nothing more (a copy that
  turns slow after a fast start therefore starts over when cut: its bytes were not kept, by
  design, so fast copies pay at most a second's bytes of memory);
- a copy cut for slowness that made progress and whose deadline has not passed is given back
  with `queue.requeue`: due at once but behind every task that waits now, and not counted as
  an attempt. Its partial stays in this process (`PartialCopies`, bounded);
- the next lease replays the held bytes into the store and asks the source for the rest with
  `Range` + `If-Match` (fetch.py `ResumeFrom`); a source that answers 200, 412 or 416 instead
  restarts the copy from its first byte. The store sees one whole stream as always, and
  computes the SHA-256 over it.

What ends such a copy: a window with no byte at all (no progress), or the deadline passing;
both are ordinary failed attempts. Held bytes are this process's: a task another worker leases
(SQS mode, or after a restart) starts over, still uncounted while it makes progress.
"""

from __future__ import annotations

import collections
import tempfile
from collections.abc import AsyncIterable, AsyncIterator

import anyio

from receiver.archive.fetch import Download, ResumeFrom
from receiver.archive.guard import CopyGuard

# Held bytes stay in memory up to this size, then spill to an owner-only temporary file.
SPILL_BYTES = 2**20
REPLAY_CHUNK = 2**20


class Partial:
    """The first bytes of one object, held for the copy's next lease."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.size = 0
        self.holding = True  # False: this copy keeps nothing (fast, or cannot resume)
        self._file: tempfile.SpooledTemporaryFile[bytes] | None = None
        self._point: ResumeFrom | None = None

    def bind(self, download: Download) -> None:
        """The copy opened ``download``: keep what came before only if it continues it."""
        if download.offset != self.size:
            self.clear()  # the source started over (the object changed, or no range)
        point = download.resume_point(0)
        if point is None:
            self.clear()
            self.holding = False  # no strong ETag or no ranges: it could never resume
        self._point = point

    @property
    def total(self) -> int | None:
        """The whole object's length, when the source told it (and can resume)."""
        return self._point.size if self._point is not None else None

    def resume_from(self) -> ResumeFrom | None:
        """Where the next copy should ask the source to start (None: from the first byte)."""
        if self._point is None or self.size == 0:
            return None
        return ResumeFrom(offset=self.size, etag=self._point.etag, size=self._point.size)

    def append(self, chunk: bytes) -> None:
        if self._file is None:
            # Closed by close(), which every path out of a copy reaches (worker.py).
            self._file = tempfile.SpooledTemporaryFile(max_size=SPILL_BYTES)  # noqa: SIM115
        self._file.write(chunk)
        self.size += len(chunk)

    def clear(self) -> None:
        """Forget the held bytes (holding again from the first byte)."""
        self.close()
        self.holding = True

    def drop(self) -> None:
        """Hold nothing more for this copy."""
        self.close()
        self.holding = False

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None
        self.size = 0

    async def replay(self) -> AsyncIterator[bytes]:
        """The held bytes, from the first."""
        if self._file is None or self.size == 0:
            return
        file = self._file
        file.seek(0)
        left = self.size
        while left > 0:
            chunk = await anyio.to_thread.run_sync(file.read, min(REPLAY_CHUNK, left))
            if not chunk:
                raise OSError(f"held bytes of {self.key!r} ended {left} bytes early")
            left -= len(chunk)
            yield chunk
        file.seek(0, 2)  # appends continue at the end

    async def stream(self, download: Download, guard: CopyGuard) -> AsyncIterator[bytes]:
        """What the store reads: the held bytes, then the source's (guarded), held as they pass."""
        guard.begin()
        async for chunk in self.replay():
            yield chunk
        async for chunk in self._hold(guard.wrap(download.iter_bytes()), guard):
            yield chunk

    async def _hold(self, chunks: AsyncIterable[bytes], guard: CopyGuard) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            if self.holding:
                if guard.proven_fast:
                    self.drop()
                else:
                    self.append(chunk)
            yield chunk


class PartialCopies:
    """Partials of cut copies by asset key, at most ``limit`` (the oldest are dropped)."""

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self._held: collections.OrderedDict[str, Partial] = collections.OrderedDict()

    def take(self, key: str) -> Partial:
        """The partial held for ``key`` (now the caller's), or an empty one."""
        return self._held.pop(key, None) or Partial(key)

    def keep(self, partial: Partial) -> None:
        old = self._held.pop(partial.key, None)
        if old is not None and old is not partial:
            old.close()
        self._held[partial.key] = partial
        while len(self._held) > self.limit:
            _, evicted = self._held.popitem(last=False)
            evicted.close()

    def holds(self, partial: Partial) -> bool:
        return self._held.get(partial.key) is partial

    def __len__(self) -> int:
        return len(self._held)

    def close(self) -> None:
        for partial in self._held.values():
            partial.close()
        self._held.clear()
