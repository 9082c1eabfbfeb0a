"""Archive, many: ``BENCH_MANY_COUNT`` (1,000) objects of 1 MiB, callback to archived.

receiver: ``receiver serve`` with its default ``RECEIVER_WORKERS`` (4) archive workers in the
same process, archiving to an S3 server (SeaweedFS or moto, ``BENCH_S3``). The clock starts
before the first signed callback is posted (32 at a time) and stops when the ledger shows
every job archived and every task acknowledged: each output fetched from the file source,
stored with its SHA-256 (a single PUT at this size), recorded, and its manifest written.
Baseline: boto3 ``upload_file`` of the same files from disk, in a thread pool as wide as
receiver's worker count, in a child process of its own.

``BENCH_MANY_ROUNDS`` (3) rounds, each the baseline then receiver on a fresh bucket and ledger;
the ratio is the median of the rounds' own ratios (a slower minute on a shared machine slows
both sides of a round). Reported beside the times, for where the time goes: the CPU time of
receiver's process, of the S3 server, of the benchmark's own process (the file source and the
callbacks) and of boto3's process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import sqlite3
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench._common import (
    CHILD,
    S3,
    MiB,
    cpu_seconds,
    file_server,
    free_port,
    run_child,
    s3_server,
    server_process,
    wait_http,
    workdir,
    write_random_file,
)
from receiver.ingest.auth import sign
from tests.payloads import apex_completed

COUNT = int(os.environ.get("BENCH_MANY_COUNT", "1000"))
ROUNDS = int(os.environ.get("BENCH_MANY_ROUNDS", "3"))
WORKERS = 4  # RECEIVER_WORKERS' default
TIMEOUT = 900.0


@dataclass
class ManyRound:
    receiver_s: float
    floor_s: float
    receiver_s3_cpu_s: float  # the S3 server's CPU time during each side's run
    floor_s3_cpu_s: float
    receiver_cpu_s: float  # receiver's process
    bench_cpu_s: float  # this process meanwhile: the file source and the callbacks
    floor_cpu_s: float  # boto3's process
    source_connections: int  # connections receiver opened to the file source
    copy_s: float  # sum of receiver_archive_copy_duration_seconds: lease to marked archived


@dataclass
class ManyResult:
    server: str
    count: int
    workers: int
    rounds: list[ManyRound]

    def median(self, field: str) -> float:
        return float(statistics.median(getattr(r, field) for r in self.rounds))

    @property
    def ratio(self) -> float:
        """The median of the rounds' own ratios."""
        return statistics.median(r.receiver_s / r.floor_s for r in self.rounds)


async def _post_all(port: int, base: str, secret: str) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as client:
        gate = asyncio.Semaphore(32)

        async def post(i: int) -> None:
            payload = apex_completed(
                job_id=f"many-{i}",
                job_type="video",
                url=f"{base}/f{i:05d}.mp4",
                output_type="video/mp4",
            )
            body, msg_id, timestamp = json.dumps(payload).encode(), f"msg_{i}", int(time.time())
            headers = {
                "content-type": "application/json",
                "webhook-id": msg_id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": sign(secret, msg_id, timestamp, body),
            }
            async with gate:
                response = await client.post("/webhooks/apex", content=body, headers=headers)
            if response.status_code != 202:
                raise RuntimeError(f"callback {i}: HTTP {response.status_code} {response.text}")

        await asyncio.gather(*(post(i) for i in range(COUNT)))


def _wait_archived(db: Path, started: float) -> float:
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        while True:
            (done,) = conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'archived'").fetchone()
            (acked,) = conn.execute("SELECT COUNT(*) FROM tasks WHERE state = 'done'").fetchone()
            if done == COUNT and acked == COUNT:  # archived, manifest written, task acked
                return time.perf_counter() - started
            (ended,) = conn.execute(
                "SELECT COUNT(*) FROM jobs WHERE state IN ('expired', 'dead')"
            ).fetchone()
            if ended or time.perf_counter() - started > TIMEOUT:
                raise RuntimeError(f"{done} of {COUNT} archived, {ended} ended otherwise")
            time.sleep(0.02)


def _copy_seconds(port: int) -> float:
    """Total time the workers spent in copies (fetch, store, mark archived), from /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", trust_env=False, timeout=30).text
    for line in text.splitlines():
        if line.startswith("receiver_archive_copy_duration_seconds_sum"):
            return float(line.split()[-1])
    raise RuntimeError("no receiver_archive_copy_duration_seconds_sum in /metrics")


def _receiver(
    s3: S3, bucket: str, files: Path, tmp: Path
) -> tuple[float, int, float, float, float, float]:
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    db = tmp / "many.db"
    for stale in tmp.glob("many.db*"):
        stale.unlink()
    env = {
        **s3.env,
        "RECEIVER_LEDGER_URL": f"sqlite:///{db}",
        "RECEIVER_ARCHIVE_URL": f"s3://{bucket}/many",
        "RECEIVER_WEBHOOK_PROVIDERS": "apex",
        "RECEIVER_APEX_WEBHOOK_SECRETS": secret,
        "RECEIVER_APEX_DOWNLOAD_HOSTS": "127.0.0.1",
        "RECEIVER_FETCH_ALLOW_HTTP": "true",
        "RECEIVER_FETCH_ALLOW_NETWORKS": "127.0.0.0/8",
        "RECEIVER_WORKERS": str(WORKERS),
        "RECEIVER_LOG_LEVEL": "warning",
        "RECEIVER_LOG_FORMAT": "json",
    }
    port = free_port()
    argv = [sys.executable, "-m", "receiver", "serve", "--port", str(port)]
    with file_server(files) as source, server_process(argv, env, port) as proc:
        base = f"http://127.0.0.1:{source.server_address[1]}"
        wait_http(f"http://127.0.0.1:{port}/readyz")
        cpu_before, bench_before = cpu_seconds(proc.pid), time.process_time()
        s3_before = s3.cpu_seconds()
        started = time.perf_counter()
        asyncio.run(_post_all(port, base, secret))
        elapsed = _wait_archived(db, started)
        cpu = cpu_seconds(proc.pid) - cpu_before
        bench_cpu = time.process_time() - bench_before
        # The S3 server's CPU over the timed run only: not receiver's start, nor the emptying
        # of the bucket afterwards (2,000 deletes are not part of archiving).
        s3_cpu = s3.cpu_seconds() - s3_before
        connections = source.connections
        copy_s = _copy_seconds(port)
    return elapsed, connections, copy_s, cpu, bench_cpu, s3_cpu


def run(server: str) -> ManyResult:
    rounds: list[ManyRound] = []
    with workdir() as tmp, s3_server(server) as s3:
        files = tmp / "files"
        files.mkdir()
        for i in range(COUNT):
            write_random_file(files / f"f{i:05d}.mp4", MiB)
        for _ in range(ROUNDS):
            bucket = s3.bucket()
            before = s3.cpu_seconds()
            floor = run_child([*CHILD, "boto3-many", str(files), bucket, str(WORKERS)], s3.env)
            floor_s3_cpu = s3.cpu_seconds() - before
            s3.empty(bucket)
            bucket = s3.bucket()
            ours, connections, copy_s, cpu, bench_cpu, receiver_s3_cpu = _receiver(
                s3, bucket, files, tmp
            )
            s3.empty(bucket)
            rounds.append(
                ManyRound(
                    receiver_s=ours,
                    floor_s=floor.out["seconds"],
                    receiver_s3_cpu_s=receiver_s3_cpu,
                    floor_s3_cpu_s=floor_s3_cpu,
                    receiver_cpu_s=cpu,
                    bench_cpu_s=bench_cpu,
                    floor_cpu_s=floor.cpu_s,
                    source_connections=connections,
                    copy_s=copy_s,
                )
            )
    return ManyResult(server, COUNT, WORKERS, rounds)
