"""Single-PUT threshold: up to which size is one PUT better than a multipart upload?

receiver sends an object as one PutObject while it fits in the parts a multipart upload holds
in memory anyway (parts in flight x part size: 32 MiB at the defaults, its parts sent back to
back); beyond that it is a multipart upload (create, parts, complete with the whole object's
CRC32, then the SHA-256 tag): three or four requests more than a single PUT. For objects of a
few parts this compares, against the same server in one process, the time of
``S3Store.put_stream`` as a multipart upload with the default 8 MiB parts, 4 in flight, and as
one PUT of the same parts. Medians of ``BENCH_ROUNDS`` (5).
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


async def _measure(bucket: str, size: int, single_put: bool, rounds: int) -> float:
    from receiver.settings import PART_SIZE, PARTS_IN_FLIGHT
    from receiver.store.s3 import S3Store

    block = os.urandom(MiB)

    async def source() -> AsyncIterator[bytes]:
        for _ in range(size // MiB):
            yield block

    parts = -(-size // PART_SIZE)
    if single_put:  # as many parts as the object has may go as one PUT
        store = S3Store(bucket, "threshold", parts_in_flight=parts, single_put_parts=parts)
    else:  # multipart from the second part on, the default parts in flight
        store = S3Store(bucket, "threshold", parts_in_flight=PARTS_IN_FLIGHT, single_put_parts=1)
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
                multipart = asyncio.run(_measure(bucket, size, False, rounds))
                single = asyncio.run(_measure(bucket, size, True, rounds))
                results.append(ThresholdResult(server, size_mib, multipart, single))
                s3.empty(bucket)
        finally:
            os.environ.clear()
            os.environ.update(saved)
    return results
