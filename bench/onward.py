"""Onward delivery: archive-to-delivery latency, and ingest with onward delivery on vs off.

Latency: ``receiver serve`` (SQLite ledger, local archive folder, the default archive workers)
with one healthy local application endpoint (``tests.app_endpoint``, a threaded HTTP server in
this process that answers 204 at once), a local HTTP source serving ``BENCH_ONWARD_JOBS``
(1,000) small outputs, and as many signed Apex ``job.completed`` webhooks posted over HTTP.
For each ``asset.archived`` event: the time it arrived at the application minus the
``archived_at`` the event itself states (one machine, one wall clock). Every event must arrive
and verify with the official ``standardwebhooks`` package, or the run fails.

Ingest on vs off: the ingest benchmark's load generator (``bench._loadgen``, ``failed`` mode:
every request a new job's ``job.failed``, so each 202 also writes an event and a send) against
``receiver serve`` with its workers, once without an onward endpoint and once with one, in the
same run; the ratio is on's throughput over off's.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx

from bench._common import free_port, run_child, server_process, workdir
from receiver.ingest.auth import sign
from tests.app_endpoint import AppEndpoint
from tests.payloads import apex_completed
from tests.sources import SourceServer

JOBS = int(os.environ.get("BENCH_ONWARD_JOBS", "1000"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "32"))
SECONDS = float(os.environ.get("BENCH_INGEST_SECONDS", "10"))
WARMUP = 2.0
APP_SECRET = "whsec_" + base64.b64encode(b"receiver-bench-onward-secret-32b").decode()


@dataclass
class Latency:
    jobs: int
    p50_s: float
    p99_s: float
    max_s: float
    total_s: float  # first webhook posted to last event received


@dataclass
class IngestLoad:
    rate: float
    p50_ms: float
    p99_ms: float
    delivered: int  # events the application got during the run (on only)


@dataclass
class OnwardResult:
    latency: Latency
    off: IngestLoad
    on: IngestLoad


def _env(tmp: Path, name: str, webhook_secret: str, endpoint: AppEndpoint | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECEIVER_")}
    env |= {
        "RECEIVER_LEDGER_URL": f"sqlite:///{tmp / name}.db",
        "RECEIVER_ARCHIVE_URL": f"file://{tmp / name}-archive",
        "RECEIVER_WEBHOOK_PROVIDERS": "apex",
        "RECEIVER_APEX_WEBHOOK_SECRETS": webhook_secret,
        "RECEIVER_FETCH_ALLOW_HTTP": "true",
        "RECEIVER_FETCH_ALLOW_NETWORKS": "127.0.0.0/8",
        "RECEIVER_APEX_DOWNLOAD_HOSTS": "127.0.0.1",
        "RECEIVER_LOG_LEVEL": "warning",
        "RECEIVER_LOG_FORMAT": "json",
    }
    if endpoint is not None:
        env["RECEIVER_ONWARD_ENDPOINTS"] = json.dumps(
            [{"name": "app", "url": endpoint.url(), "secrets": [APP_SECRET]}]
        )
    return env


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


async def _post_all(port: int, secret: str, urls: list[str]) -> None:
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    limit = asyncio.Semaphore(16)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as client:

        async def post(i: int, url: str) -> None:
            body = json.dumps(
                apex_completed(f"onward-{i}", url=url, output_type="image/png", completed_at=now)
            ).encode()
            msg_id, ts = f"msg_onward_{i}", int(time.time())
            headers = {
                "content-type": "application/json",
                "webhook-id": msg_id,
                "webhook-timestamp": str(ts),
                "webhook-signature": sign(secret, msg_id, ts, body),
            }
            async with limit:
                response = await client.post("/webhooks/apex", content=body, headers=headers)
            if response.status_code != 202:
                raise RuntimeError(f"webhook {i}: HTTP {response.status_code} {response.text}")

        await asyncio.gather(*(post(i, u) for i, u in enumerate(urls)))


def latency(tmp: Path, secret: str) -> Latency:
    source = SourceServer()
    source.start()
    endpoint = AppEndpoint()
    endpoint.up()
    try:
        urls = [source.add(f"/o/{i}.png", 4096, content_type="image/png") for i in range(JOBS)]
        port = free_port()
        argv = [sys.executable, "-m", "receiver", "serve", "--port", str(port)]
        with server_process(argv, _env(tmp, "latency", secret, endpoint), port):
            started = time.time()
            asyncio.run(_post_all(port, secret, urls))
            deadline = time.monotonic() + 300
            while len(endpoint.by_type().get("job.archived", [])) < JOBS:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {len(endpoint.received)} events in 300 s")
                time.sleep(0.1)
        received = endpoint.by_type()["asset.archived"]
        delays = []
        for r in received:
            r.verify(APP_SECRET)  # raises unless the official verifier accepts it
            archived = datetime.fromisoformat(r.payload()["data"]["asset"]["archived_at"])
            delays.append(r.at - archived.timestamp())
        if len({r.event_id for r in received}) != JOBS:
            raise RuntimeError("not every job's asset.archived arrived")
        last = max(r.at for r in endpoint.received)
        return Latency(
            JOBS, _percentile(delays, 0.5), _percentile(delays, 0.99), max(delays), last - started
        )
    finally:
        endpoint.down()
        source.stop()


def _ingest(tmp: Path, name: str, secret: str, endpoint: AppEndpoint | None) -> IngestLoad:
    port = free_port()
    argv = [sys.executable, "-m", "receiver", "serve", "--port", str(port)]
    load_env = {**os.environ, "BENCH_WEBHOOK_SECRET": secret}
    loadgen = [sys.executable, "-m", "bench._loadgen", str(port), str(CONNECTIONS)]
    with server_process(argv, _env(tmp, name, secret, endpoint), port):
        out = run_child([*loadgen, str(WARMUP), str(SECONDS), "failed"], load_env).out
    statuses = dict(out["statuses"])
    return IngestLoad(
        statuses.get("202", 0) / out["seconds"],
        out["p50_ms"],
        out["p99_ms"],
        len(endpoint.received) if endpoint else 0,
    )


def run() -> OnwardResult:
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    with workdir() as tmp:
        lat = latency(tmp, secret)
        off = _ingest(tmp, "off", secret, None)
        endpoint = AppEndpoint()
        endpoint.up()
        try:
            on = _ingest(tmp, "on", secret, endpoint)
        finally:
            endpoint.down()
        return OnwardResult(lat, off, on)


if __name__ == "__main__":
    print(run())
