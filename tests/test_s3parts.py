"""The S3 store's streaming helpers (``receiver.store.s3parts``), without a server."""

from __future__ import annotations

import hashlib
import io
import random
import zlib
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from receiver.store.s3parts import PartsBody, crc32_combine, hold_parts, split_parts

DATA = bytes(range(256)) * 40  # 10,240 bytes
PART = 1024


async def _parts(data: bytes, size: int = PART) -> AsyncIterator[bytearray]:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 300):
            yield data[i : i + 300]

    async for part in split_parts(chunks(), size, hashlib.sha256()):
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


@pytest.mark.anyio
async def test_split_parts_hashes_the_stream_as_it_splits_it() -> None:
    sha256 = hashlib.sha256()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(DATA), 300):
            yield DATA[i : i + 300]

    parts = [bytes(p) async for p in split_parts(chunks(), PART, sha256)]
    assert b"".join(parts) == DATA
    assert sha256.hexdigest() == hashlib.sha256(DATA).hexdigest()


@pytest.mark.parametrize(
    ("first", "second"),
    [(0, 0), (0, 1), (1, 0), (1, 1), (5, 3), (1024, 8 * 2**20), (8 * 2**20 + 7, 2**20 - 1)],
)
def test_crc32_combine_matches_zlib_over_the_concatenation(first: int, second: int) -> None:
    a, b = random.Random(first).randbytes(first), random.Random(second).randbytes(second)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=600), max_size=12))
def test_crc32_folded_over_any_split_is_the_whole_streams(pieces: list[bytes]) -> None:
    """What a multipart completion sends: the parts' CRC32s folded in order, never re-read."""
    crc = 0
    for piece in pieces:
        crc = crc32_combine(crc, zlib.crc32(piece), len(piece))
    assert crc == zlib.crc32(b"".join(pieces))


def test_crc32_combine_is_right_for_a_part_much_larger_than_the_table_steps() -> None:
    zeros = bytes(2**27 + 3)  # 128 MiB: the length's bits up to 2^27 all take part
    assert crc32_combine(zlib.crc32(b"head"), zlib.crc32(zeros), len(zeros)) == zlib.crc32(
        b"head" + zeros
    )


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**38),
    st.integers(0, 2**38),
)
def test_crc32_combine_is_associative_for_lengths_past_4_gib(
    a: int, b: int, c: int, len_b: int, len_c: int
) -> None:
    """An archived object may be up to 20 GiB, past 2^32 bytes, where the powers of x wrap
    around (x^(2^32) = x); combining (a, b) then c must equal a then (b, c) whatever the
    lengths, which fails for a wrongly indexed or truncated power."""
    left = crc32_combine(crc32_combine(a, b, len_b), c, len_c)
    right = crc32_combine(a, crc32_combine(b, c, len_c), len_b + len_c)
    assert left == right
