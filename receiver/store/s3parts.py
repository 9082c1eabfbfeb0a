"""Streaming helpers of the S3 store: regrouping a stream into parts, and its checksums.

Split from ``s3.py`` (which drives the requests); nothing here does I/O.
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from collections.abc import AsyncGenerator, AsyncIterable


class Digests:
    """The SHA-256 and CRC32 of a stream, updated chunk by chunk."""

    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()
        self.crc32 = 0

    def update(self, chunk: bytes) -> None:
        self.sha256.update(chunk)
        self.crc32 = zlib.crc32(chunk, self.crc32)


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


def b64(digest: bytes) -> str:
    """Base64, as S3's checksum headers carry digests."""
    return base64.b64encode(digest).decode("ascii")


def crc32_b64(data: bytes | bytearray) -> str:
    """S3's ``x-amz-checksum-crc32`` value for ``data``."""
    return b64(zlib.crc32(data).to_bytes(4, "big"))
