"""Archive, many: ``BENCH_MANY_COUNT`` (1,000) objects of 1 MiB, callback to archived.

receiver: ``receiver serve`` with its default ``RECEIVER_WORKERS`` (4) archive workers in the
same process, archiving to an S3 server (SeaweedFS or moto, ``BENCH_S3``). The clock starts
before the first signed callback is posted (32 at a time) and stops when the ledger shows
every job archived: each output fetched from the file source, stored with its SHA-256 (a
single PUT at this size), recorded, and its manifest written. Baseline: boto3 ``upload_file``
of the same files from disk, in a thread pool as wide as receiver's worker count, in a child
process of its own.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import sqlite3
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench._common import (
    CHILD,
    S3,
    MiB,
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
WORKERS = 4  # RECEIVER_WORKERS' default
TIMEOUT = 900.0


@dataclass
class ManyResult:
    server: str
    count: int
    workers: int
    receiver_s: float
    floor_s: float
    receiver_s3_cpu_s: float  # the S3 server's CPU time during each side's run
    floor_s3_cpu_s: float
    source_connections: int  # connections receiver opened to the file source
    copy_s: float  # sum of receiver_archive_copy_duration_seconds: lease to marked archived


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


def _receiver(s3: S3, files: Path, tmp: Path) -> tuple[float, int, float]:
    bucket = s3.bucket()
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    db = tmp / "many.db"
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
    with file_server(files) as source, server_process(argv, env, port):
        base = f"http://127.0.0.1:{source.server_address[1]}"
        wait_http(f"http://127.0.0.1:{port}/readyz")
        started = time.perf_counter()
        asyncio.run(_post_all(port, base, secret))
        elapsed = _wait_archived(db, started)
        connections = source.connections
        copy_s = _copy_seconds(port)
    s3.empty(bucket)
    return elapsed, connections, copy_s


def run(server: str) -> ManyResult:
    with workdir() as tmp, s3_server(server) as s3:
        files = tmp / "files"
        files.mkdir()
        for i in range(COUNT):
            write_random_file(files / f"f{i:05d}.mp4", MiB)
        bucket = s3.bucket()
        before = s3.cpu_seconds()
        floor = run_child([*CHILD, "boto3-many", str(files), bucket, str(WORKERS)], s3.env)
        floor_cpu = s3.cpu_seconds() - before
        s3.empty(bucket)
        before = s3.cpu_seconds()
        ours, connections, copy_s = _receiver(s3, files, tmp)
        ours_cpu = s3.cpu_seconds() - before
    return ManyResult(
        server, COUNT, WORKERS, ours, floor.out["seconds"], ours_cpu, floor_cpu, connections, copy_s
    )
