"""Streaming helpers of the S3 store: regrouping a stream into parts, and its checksums.

Split from ``s3.py`` (which drives the requests); nothing here does I/O.
"""

from __future__ import annotations

import base64
import hashlib
import io
import zlib
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator


async def split_parts(
    chunks: AsyncIterable[bytes], part_size: int, sha256: hashlib._Hash
) -> AsyncGenerator[bytearray, None]:
    """Regroup ``chunks`` into parts of exactly ``part_size`` bytes (the last may be shorter).

    Every chunk goes into ``sha256`` as it arrives: the object's full-object checksum (a
    multipart upload's whole-object CRC32 is combined from its parts', see ``crc32_combine``,
    so no byte is CRC32-hashed twice and a single PUT costs no CRC32 pass at all). A short part
    is only ever yielded at the end of the stream, which is how the caller knows a single PUT
    will do. Nothing is yielded for an empty stream.
    """
    # The first buffer grows with the data, so a small object costs only its size. Once a part
    # has filled up the stream is known to be big, and later buffers are allocated at exactly
    # part_size: a growing bytearray over-allocates by up to 1/8, which would add up over the
    # parts in flight.
    buffer = bytearray()
    filled = 0
    async for chunk in chunks:
        sha256.update(chunk)
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


# CRC32 combination: the CRC32 of A + B from crc32(A), crc32(B) and len(B), as zlib's C
# crc32_combine computes it (zlib 1.2.12+), which Python's zlib module does not expose. CRC32 is
# linear over GF(2): appending len(B) zero bytes to A multiplies its CRC by x^(8 * len(B)) modulo
# the CRC polynomial, and B's own CRC is then XORed in. Polynomials are 32-bit ints in CRC32's
# reflected bit order (the x^0 coefficient is the top bit).
_POLY = 0xEDB88320


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC32 polynomial."""
    m = 1 << 31
    product = 0
    while m:
        if a & m:
            product ^= b
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
        m >>= 1
    return product


def _powers() -> tuple[int, ...]:
    """x^(2^k) modulo the polynomial, for k in 0..31 (the powers repeat after 32)."""
    power, powers = 1 << 30, []  # x^1
    for _ in range(32):
        powers.append(power)
        power = _multmodp(power, power)
    return tuple(powers)


_X_2K = _powers()


def _x_8n(n: int) -> int:
    """x^(8n) modulo the polynomial: the factor that appending n zero bytes applies."""
    power, k = 1 << 31, 3  # x^0; 8n = n * 2^3
    while n:
        if n & 1:
            power = _multmodp(_X_2K[k & 31], power)
        n >>= 1
        k += 1
    return power


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """``zlib.crc32(a + b)`` from ``crc1 = zlib.crc32(a)``, ``crc2 = zlib.crc32(b)``, ``len(b)``.

    About 40 µs in Python, however long the parts: a multipart upload's whole-object CRC32 comes
    from its parts' CRC32s instead of a second pass over every byte (0.25 s of CPU per GiB).
    """
    return _multmodp(_x_8n(len2), crc1) ^ crc2
