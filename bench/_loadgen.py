"""A closed-loop HTTP/1.1 load generator for the ingest benchmark (a process of its own).

    python -m bench._loadgen PORT CONNECTIONS WARMUP_S SECONDS unique|duplicate|failed

Like wrk: CONNECTIONS keep-alive connections, each sending its next request as soon as the
previous response has fully arrived. Requests are signed Standard Webhooks deliveries of Apex
``job.completed`` callbacks (secret from ``BENCH_WEBHOOK_SECRET``). ``unique``: every request a
new job id and webhook id (the accept path). ``duplicate``: one body and webhook id again and
again (the redelivery path). ``failed``: every request a new job's ``job.failed`` (each one
writes a ``job.failed`` event for onward delivery). Responses completing during the first
WARMUP_S seconds are not counted; then SECONDS are measured. Prints one JSON line: response
counts by status, latency percentiles (send of the first byte to receipt of the last), and this
process's CPU time.

Requests are built and signed here, per request (an HMAC of half a kilobyte: microseconds), so
that timestamps stay fresh however long the run; the same generator drives both endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import cast

from receiver.ingest.auth import sign
from tests.payloads import apex_completed, apex_failed

_CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")


def request_factory(port: int, mode: str, secret: str) -> Callable[[int], bytes]:
    """Request number ``n`` as raw bytes: a new job each time, or the same delivery each time."""
    template = json.dumps(
        apex_failed("JOB-ID")
        if mode == "failed"
        else apex_completed(
            job_id="JOB-ID",
            job_type="video",
            url="https://cdn.useapexstudio.com/outputs/JOB-ID/output.mp4",
            output_type="video/mp4",
        )
    )
    head = f"POST /webhooks/apex HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
    run = f"{os.getpid()}-{time.time_ns()}"

    def build(n: int) -> bytes:
        body = template.replace("JOB-ID", f"bench-{run}-{n}").encode()
        msg_id = f"msg_{run}_{n}"
        timestamp = int(time.time())
        return (
            f"{head}content-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"webhook-id: {msg_id}\r\nwebhook-timestamp: {timestamp}\r\n"
            f"webhook-signature: {sign(secret, msg_id, timestamp, body)}\r\n\r\n"
        ).encode() + body

    if mode in ("unique", "failed"):
        return build
    fixed_n = 0

    def same(n: int) -> bytes:
        return build(fixed_n)  # same body and webhook id; only the timestamp moves

    return same


class _Connection(asyncio.Protocol):
    def __init__(self, run: _Run) -> None:
        self.run = run
        self.buffer = bytearray()
        self.sent_at = 0.0
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        if self.run.stopping:
            self.transport.close()
            return
        request = self.run.next_request()
        self.sent_at = time.perf_counter()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        length = _CONTENT_LENGTH.search(self.buffer, 0, end + 2)
        total = end + 4 + (int(length.group(1)) if length else 0)
        if len(self.buffer) < total:
            return
        status = int(self.buffer[9:12])
        del self.buffer[:total]
        self.run.record(status, self.sent_at, time.perf_counter())
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class _Run:
    def __init__(self, build: Callable[[int], bytes], measure_from: float) -> None:
        self.build = build
        self.count = 0
        self.stopping = False
        self.measure_from = measure_from
        self.statuses: Counter[int] = Counter()
        self.latencies: list[float] = []

    def next_request(self) -> bytes:
        self.count += 1
        return self.build(self.count)

    def record(self, status: int, sent: float, received: float) -> None:
        if sent >= self.measure_from:
            self.statuses[status] += 1
            self.latencies.append(received - sent)


async def _main(
    port: int, connections: int, warmup: float, seconds: float, mode: str
) -> dict[str, object]:
    build = request_factory(port, mode, os.environ["BENCH_WEBHOOK_SECRET"])
    loop = asyncio.get_running_loop()
    run = _Run(build, time.perf_counter() + warmup)
    conns = [
        (await loop.create_connection(lambda: _Connection(run), "127.0.0.1", port))[1]
        for _ in range(connections)
    ]
    cpu_start = time.process_time()
    await asyncio.sleep(warmup + seconds)
    run.stopping = True
    cpu = time.process_time() - cpu_start
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(10):
            await asyncio.gather(*(c.closed for c in conns))
    latencies = sorted(run.latencies)

    def percentile(p: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))]

    return {
        "seconds": seconds,
        "responses": len(latencies),
        "statuses": {str(k): v for k, v in run.statuses.items()},
        "p50_ms": percentile(0.50),
        "p99_ms": percentile(0.99),
        "max_ms": 1000 * latencies[-1],
        "loadgen_cpu_s": cpu,
    }


def main() -> None:
    port, connections, warmup, seconds, mode = sys.argv[1:]
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    result = asyncio.run(_main(int(port), int(connections), float(warmup), float(seconds), mode))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
