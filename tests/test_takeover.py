"""SIGSTOP takeover: a real `receiver worker` paused while its upload completes, past its lease.

Worker A talks to moto's S3 (versioned bucket) through a small proxy that, as soon as moto has
completed A's upload of the asset, stops A with SIGSTOP before A reads the answer: A is frozen
"while its upload was completing". Its lease lapses; worker B takes the task over and archives
the asset; then A is resumed with SIGCONT and finds its lease gone. Before the fix, A's put was
cancelled on the lost lease and its clean-up deleted the object by key: a delete marker on a
versioned bucket, while the ledger and the manifest said archived.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from receiver.app import build_parts
from receiver.domain import EventKind, JobEvent, Output
from tests.conftest import make_settings
from tests.s3server import admin_client
from tests.sources import SourceServer, expected_sha256

SIZE = 12 * 2**20 + 5  # three 5 MiB parts: a multipart upload
SUFFIX = "/takeover/video.mp4"  # the date in the key is the real one (real clock)


class _StopOnComplete(BaseHTTPRequestHandler):
    """Forward to moto; freeze the client right after moto completed the asset's upload."""

    server: _Proxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""

    def _forward(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else None
        upstream = http.client.HTTPConnection(self.server.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
        upstream.request(self.command, self.path, body=body, headers=headers)
        answer = upstream.getresponse()
        data = answer.read()
        path, _, query = self.path.partition("?")
        completes = (self.command == "POST" and "uploadId=" in query) or (
            self.command == "PUT"
            and "partNumber=" not in query
            and "tagging" not in query  # the SHA-256 tag set after completing
            and "x-amz-copy-source" not in {k.lower() for k in self.headers}
        )
        if completes and path.endswith(SUFFIX) and answer.status == 200 and self.server.victim:
            os.kill(self.server.victim, signal.SIGSTOP)
            self.server.victim = 0  # once: A is frozen at its completion, not at later requests
            self.server.frozen.set()
        self.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        upstream.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward


class _Proxy(ThreadingHTTPServer):
    daemon_threads = True
    upstream = ""
    victim = 0
    frozen: threading.Event


@dataclass
class Outcome:
    versions: list[dict[str, Any]]
    delete_markers: list[dict[str, Any]]
    uploads: list[dict[str, Any]]
    body_sha256: str | None
    rows: list[tuple[Any, ...]]
    tasks: list[tuple[Any, ...]]
    logs: str
    notes: dict[str, Any] = field(default_factory=dict)


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _query(db: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def takeover(moto_s3: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outcome]:
    tmp = tmp_path_factory.mktemp("takeover")
    s3 = admin_client()
    bucket = "takeover-versioned"
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    source = SourceServer()
    source.start()
    proxy = _Proxy(("127.0.0.1", 0), _StopOnComplete)
    proxy.upstream = urlsplit(moto_s3).netloc
    proxy.frozen = threading.Event()
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    workers: list[subprocess.Popen[bytes]] = []
    files = contextlib.ExitStack()
    try:
        # Slow enough that the copy spans a few heartbeats (lease 5 s).
        url = source.add("/o/video.mp4", SIZE, trickle=0.01, content_type="video/mp4")
        settings = make_settings(
            tmp, archive_url=f"s3://{bucket}/archive", part_size=5 * 2**20, parts_in_flight=2
        )
        _ingest(settings, url)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RECEIVER_")},
            "RECEIVER_LEDGER_URL": settings.ledger_url,
            "RECEIVER_ARCHIVE_URL": settings.archive_url,
            "RECEIVER_PART_SIZE": str(5 * 2**20),
            "RECEIVER_PARTS_IN_FLIGHT": "2",  # one PUT up to two parts: SIZE is multipart
            "RECEIVER_FETCH_ALLOW_HTTP": "true",
            "RECEIVER_FETCH_ALLOW_NETWORKS": "127.0.0.0/8",
            "RECEIVER_APEX_DOWNLOAD_HOSTS": "127.0.0.1",
            "RECEIVER_WORKERS": "1",
            "RECEIVER_LEASE_SECONDS": "5",
            "RECEIVER_LOG_FORMAT": "json",
        }
        log = files.enter_context((tmp / "workers.log").open("ab"))
        first = subprocess.Popen(
            [sys.executable, "-m", "receiver", "worker"],
            cwd=tmp,
            env={**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.server_address[1]}"},
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        workers.append(first)
        proxy.victim = first.pid
        assert proxy.frozen.wait(120), "worker A never completed its upload"
        db = tmp / "receiver.db"
        time.sleep(6)  # past A's 5 s lease, A still frozen
        second = subprocess.Popen(
            [sys.executable, "-m", "receiver", "worker"],
            cwd=tmp,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        workers.append(second)
        _wait(
            lambda: _query(db, "SELECT state FROM tasks") == [("done",)],
            120,
            "worker B to finish the task",
        )
        os.kill(first.pid, signal.SIGCONT)
        time.sleep(4)  # A wakes up: its heartbeat finds the lease gone
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wait(20)
        key = "archive/" + _query(db, "SELECT key FROM assets")[0][0]
        listing = s3.list_object_versions(Bucket=bucket, Prefix=key)
        try:
            body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            digest: str | None = hashlib.sha256(body).hexdigest()
        except Exception:
            digest = None
        yield Outcome(
            versions=listing.get("Versions", []),
            delete_markers=listing.get("DeleteMarkers", []),
            uploads=s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []),
            body_sha256=digest,
            rows=_query(db, "SELECT state, sha256, key FROM assets"),
            tasks=_query(db, "SELECT state, attempts FROM tasks"),
            logs=(tmp / "workers.log").read_text(),
        )
    finally:
        for worker in workers:
            if worker.poll() is None:
                with contextlib.suppress(OSError):
                    os.kill(worker.pid, signal.SIGCONT)
                worker.kill()
                worker.wait(10)
        files.close()
        proxy.shutdown()
        source.stop()


def _ingest(settings: Any, url: str) -> None:
    import asyncio

    async def run() -> None:
        parts = build_parts(settings)
        parts.start(workers=0)
        try:
            event = JobEvent(
                provider="apex",
                job_id="takeover",
                kind=EventKind.COMPLETED,
                job_type="video",
                outputs=(Output(url, "video.mp4", "video/mp4"),),
            )
            await parts.ingestor.ingest(
                event, body=b"{}", source="webhook", auth="signature", delivery_id="d1"
            )
        finally:
            await parts.stop()

    asyncio.run(run())


def test_the_object_survives_the_resumed_worker(takeover: Outcome) -> None:
    sha = expected_sha256("/o/video.mp4", SIZE)
    assert takeover.delete_markers == [], takeover.logs[-3000:]
    assert takeover.body_sha256 == sha
    assert [(state, digest) for state, digest, _ in takeover.rows] == [("archived", sha)]
    assert takeover.tasks[0][0] == "done"
    assert takeover.uploads == []


def test_the_takeover_leaves_one_version(takeover: Outcome) -> None:
    # Needs the store's conditional create (If-None-Match on the completion) and no in-place
    # CopyObject: worker B's put finds A's object and records it instead of writing another.
    assert len(takeover.versions) == 1, [v["VersionId"] for v in takeover.versions]
