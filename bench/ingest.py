"""Ingest: signed ``POST /webhooks/apex`` callbacks per second and acknowledgment latency.

receiver: ``receiver serve --no-workers`` (SQLite ledger in a temporary directory on disk, WAL,
``synchronous=FULL``, group commit; every 202 leaves only after its commit). Baseline: a bare
Starlette endpoint (``bench._bare``) that parses the JSON and answers 202, recording nothing.
Both run under the same uvicorn settings, one process each, and are driven by the same load
generator (``bench._loadgen``, a separate process) at ``BENCH_CONNECTIONS`` (32) keep-alive
connections for ``BENCH_INGEST_SECONDS`` (10) after a 2-second warm-up.

Two paths: ``accept`` (every request a new job, so each is a durable insert of a job, a
delivery, an asset and an archive task) and ``duplicate`` (the same delivery again and again,
which receiver still records in the job's history). Throughput counts only the expected
status (202 for accept, 200 for duplicate); any other status is reported. Afterwards the ledger
is opened to check that every 202 the generator saw is a committed delivery.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

from bench._common import free_port, run_child, server_process, workdir

CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "32"))
SECONDS = float(os.environ.get("BENCH_INGEST_SECONDS", "10"))
WARMUP = 2.0


@dataclass
class Load:
    rate: float  # expected-status responses per second
    p50_ms: float
    p99_ms: float
    unexpected: dict[str, int]  # other statuses, by code


@dataclass
class IngestResult:
    receiver: Load
    bare: Load
    receiver_duplicate: Load
    bare_duplicate: Load


def _load(port: int, mode: str, env: dict[str, str]) -> Load:
    out = run_child(
        [
            sys.executable,
            "-m",
            "bench._loadgen",
            str(port),
            str(CONNECTIONS),
            str(WARMUP),
            str(SECONDS),
            mode,
        ],
        env,
    ).out
    expected = "202" if mode == "unique" else "200"
    statuses = dict(out["statuses"])
    good = statuses.pop(expected, 0)
    return Load(good / out["seconds"], out["p50_ms"], out["p99_ms"], statuses)


def _bare(mode: str, env: dict[str, str]) -> Load:
    port = free_port()
    with server_process([sys.executable, "-m", "bench._bare", str(port)], env, port):
        load = _load(port, mode, env)
    # The bare endpoint answers 202 to everything; score its duplicate run like its accept run.
    if mode == "duplicate":
        load.rate += load.unexpected.pop("202", 0) / SECONDS
    return load


def _receiver(mode: str, env: dict[str, str], tmp: Path) -> Load:
    port = free_port()
    db = tmp / f"{mode}.db"
    server_env = {
        **env,
        "RECEIVER_LEDGER_URL": f"sqlite:///{db}",
        "RECEIVER_ARCHIVE_URL": f"file://{tmp / 'archive'}",
        "RECEIVER_WEBHOOK_PROVIDERS": "apex",
        "RECEIVER_LOG_LEVEL": "warning",
        "RECEIVER_LOG_FORMAT": "json",
    }
    argv = [sys.executable, "-m", "receiver", "serve", "--no-workers", "--port", str(port)]
    with server_process(argv, server_env, port):
        load = _load(port, mode, env)
    if mode == "unique":
        with contextlib.closing(sqlite3.connect(db)) as conn:
            (accepted,) = conn.execute(
                "SELECT COUNT(*) FROM deliveries WHERE outcome = 'accepted'"
            ).fetchone()
        if accepted < load.rate * SECONDS:
            raise RuntimeError(f"{accepted} deliveries committed, fewer than the 202s counted")
    return load


def run() -> IngestResult:
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    env = {
        **os.environ,
        "BENCH_WEBHOOK_SECRET": secret,
        "RECEIVER_APEX_WEBHOOK_SECRETS": secret,
    }
    with workdir() as tmp:
        return IngestResult(
            receiver=_receiver("unique", env, tmp),
            bare=_bare("unique", env),
            receiver_duplicate=_receiver("duplicate", env, tmp),
            bare_duplicate=_bare("duplicate", env),
        )
