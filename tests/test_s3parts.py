"""The S3 store's streaming helpers (``receiver.store.s3parts``), without a server."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import pytest

from receiver.store.s3parts import Digests, PartsBody, hold_parts, split_parts

DATA = bytes(range(256)) * 40  # 10,240 bytes
PART = 1024


async def _parts(data: bytes, size: int = PART) -> AsyncIterator[bytearray]:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 300):
            yield data[i : i + 300]

    async for part in split_parts(chunks(), size, Digests()):
        yield part


@pytest.mark.parametrize("block", [1, 7, 1000, 1024, 4096, 100_000])
def test_parts_body_reads_the_parts_back_to_back(block: int) -> None:
    parts = [bytearray(DATA[i : i + 3000]) for i in range(0, len(DATA), 3000)]
    body = PartsBody(parts)
    read = b"".join(iter(lambda: body.read(block), b""))
    assert read == DATA
    assert body.tell() == len(DATA) and body.read(10) == b""


def test_parts_body_seeks_for_sizing_and_rewinding() -> None:
    body = PartsBody([bytearray(b"abc"), bytearray(b"defg")])
    assert (body.seekable(), body.readable()) == (True, True)
    assert body.seek(0, io.SEEK_END) == 7  # how botocore sizes a stream
    assert body.seek(2) == 2 and body.read(3) == b"cde"
    assert body.seek(-1, io.SEEK_CUR) == 4 and body.read() == b"efg"
    body.seek(0)  # a retry rewinds
    assert body.read() == b"abcdefg"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("size", "held", "ended"),
    [
        (0, 0, True),
        (PART - 1, 1, True),  # a short first part
        (PART, 1, True),
        (3 * PART, 3, True),  # exactly `count` parts: the read past them finds the end
        (3 * PART - 5, 3, True),
        (3 * PART + 1, 4, False),  # one part more was read: multipart
        (10 * PART, 4, False),
    ],
)
async def test_hold_parts_reads_ahead_at_most_one_part_past_count(
    size: int, held: int, ended: bool
) -> None:
    data = DATA * 3
    parts = _parts(data[:size])
    got, done = await hold_parts(parts, 3, PART)
    assert (len(got), done) == (held, ended)
    rest = [bytes(p) async for p in parts]
    assert b"".join([*map(bytes, got), *rest]) == data[:size]


def test_digests_crc32_counts_only_the_parts_added_in_order() -> None:
    """A single PUT (SHA-256 only) costs no CRC32 pass; a multipart upload adds its parts."""
    import hashlib
    import zlib

    digests = Digests()
    for i in range(0, len(DATA), 300):
        digests.update(DATA[i : i + 300])
    assert (digests.sha256.hexdigest(), digests.crc32) == (hashlib.sha256(DATA).hexdigest(), 0)
    for i in range(0, len(DATA), PART):
        digests.add_part(bytearray(DATA[i : i + PART]))
    assert digests.crc32 == zlib.crc32(DATA)
