"""Streaming helpers of the S3 store: regrouping a stream into parts, and its checksums.

Split from ``s3.py`` (which drives the requests); nothing here does I/O.
"""

from __future__ import annotations

import base64
import hashlib
import io
import zlib
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator


class Digests:
    """A stream's SHA-256, updated chunk by chunk, and its CRC32, updated part by part.

    The CRC32 is only for a multipart upload's completion (``FULL_OBJECT``), so only the parts
    of one go into it, in order (``add_part``): a single PUT, which carries the SHA-256, costs no
    CRC32 pass.
    """

    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()
        self.crc32 = 0

    def update(self, chunk: bytes) -> None:
        self.sha256.update(chunk)

    def add_part(self, part: bytes | bytearray) -> None:
        self.crc32 = zlib.crc32(part, self.crc32)


async def split_parts(
    chunks: AsyncIterable[bytes], part_size: int, digests: Digests
) -> AsyncGenerator[bytearray, None]:
    """Regroup ``chunks`` into parts of exactly ``part_size`` bytes (the last may be shorter).

    Every chunk goes into ``digests`` as it arrives. A short part is only ever yielded at the end
    of the stream, which is how the caller knows a single PUT will do. Nothing is yielded for an
    empty stream.
    """
    # The first buffer grows with the data, so a small object costs only its size. Once a part
    # has filled up the stream is known to be big, and later buffers are allocated at exactly
    # part_size: a growing bytearray over-allocates by up to 1/8, which would add up over the
    # parts in flight.
    buffer = bytearray()
    filled = 0
    async for chunk in chunks:
        digests.update(chunk)
        view = memoryview(chunk)
        while view:
            take = min(part_size - filled, len(view))
            buffer[filled : filled + take] = view[:take]
            filled += take
            view = view[take:]
            if filled == part_size:
                yield buffer
                buffer = bytearray(part_size)
                filled = 0
    if filled:
        del buffer[filled:]
        yield buffer


async def hold_parts(
    parts: AsyncIterator[bytearray], count: int, part_size: int
) -> tuple[list[bytearray], bool]:
    """Read up to ``count`` parts ahead, to learn whether the stream fits in one PUT.

    Returns the parts read and whether the stream ended within ``count`` parts (at most
    ``count * part_size`` bytes: one PUT will do). If it did not, one part more was read
    (``count + 1`` parts, the most a multipart upload holds: ``count`` in flight and the next),
    and they all go into a multipart upload. A short part is the last (see ``split_parts``).
    """
    held: list[bytearray] = []
    while len(held) < count:
        part = await anext(parts, None)
        if part is None:
            return held, True
        held.append(part)
        if len(part) < part_size:
            return held, True
    after = await anext(parts, None)
    if after is None:
        return held, True
    held.append(after)
    return held, False


class PartsBody(io.RawIOBase):
    """Parts read back to back as one request body, without joining them (joining would hold
    the object twice). Seekable, so that botocore can size it and rewind it for a retry."""

    def __init__(self, parts: list[bytearray]) -> None:
        super().__init__()
        self._parts = parts
        self._size = sum(len(p) for p in parts)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = min(max(base + offset, 0), self._size)
        return self._pos

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        out = memoryview(buffer).cast("B")
        written, at = 0, 0
        for part in self._parts:
            if written == len(out):
                break
            end = at + len(part)
            if self._pos < end:
                start = self._pos - at
                take = min(len(part) - start, len(out) - written)
                out[written : written + take] = memoryview(part)[start : start + take]
                written += take
                self._pos += take
            at = end
        return written


def b64(digest: bytes) -> str:
    """Base64, as S3's checksum headers carry digests."""
    return base64.b64encode(digest).decode("ascii")


def crc32_b64(data: bytes | bytearray) -> str:
    """S3's ``x-amz-checksum-crc32`` value for ``data``."""
    return b64(zlib.crc32(data).to_bytes(4, "big"))
