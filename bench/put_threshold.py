"""Single-PUT threshold: is a bigger single PUT worth a second upload path?

receiver sends an object as one PutObject only while it fits in one part (8 MiB); beyond that it
is a multipart upload (create, parts, complete with the whole object's CRC32, then the SHA-256
tag): two or three requests more than a single PUT. For objects of a few parts this compares,
against the same server in one process, the time of ``S3Store.put_stream`` with the default
8 MiB parts (multipart) and with a part size above the object's size (one PUT of the whole object
held in memory, the best case a larger threshold could give). Medians of ``BENCH_ROUNDS`` (5).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from bench._common import MiB, s3_server

SIZES_MIB = (9, 16, 32, 64)


@dataclass
class ThresholdResult:
    server: str
    size_mib: int
    multipart_s: float
    single_put_s: float


async def _measure(bucket: str, size: int, part_size: int, rounds: int) -> float:
    from receiver.store.s3 import S3Store

    block = os.urandom(MiB)

    async def source() -> AsyncIterator[bytes]:
        for _ in range(size // MiB):
            yield block

    store = S3Store(bucket, "threshold", part_size=part_size)
    times = []
    try:
        await store.put_stream(uuid.uuid4().hex, source(), content_type="x/y", metadata={})
        for _ in range(rounds):
            started = time.perf_counter()
            await store.put_stream(uuid.uuid4().hex, source(), content_type="x/y", metadata={})
            times.append(time.perf_counter() - started)
    finally:
        await store.aclose()
    return statistics.median(times)


def run(server: str) -> list[ThresholdResult]:
    rounds = int(os.environ.get("BENCH_ROUNDS", "5"))
    results = []
    with s3_server(server) as s3:
        saved = dict(os.environ)
        os.environ.update(s3.env)
        try:
            bucket = s3.bucket()
            for size_mib in SIZES_MIB:
                size = size_mib * MiB
                multipart = asyncio.run(_measure(bucket, size, 8 * MiB, rounds))
                single = asyncio.run(_measure(bucket, size, size + 1, rounds))
                results.append(ThresholdResult(server, size_mib, multipart, single))
                s3.empty(bucket)
        finally:
            os.environ.clear()
            os.environ.update(saved)
    return results
