"""What the real-process fault tests share (SIGKILL, SIGSTOP): jobs recorded straight into a
ledger, the environment of a `receiver` child pointed at it, starting the child, reading the
ledger file from outside, and waiting with a bound."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from receiver.app import build_parts
from receiver.domain import EventKind, JobEvent, Output
from receiver.settings import Settings


async def record_jobs(settings: Settings, urls: list[str], *, prefix: str = "crash") -> None:
    """One completed Apex job per URL (`{prefix}-{i}`, output `{i}.mp4`), through the ingestor."""
    parts = build_parts(settings)
    parts.start(workers=0)
    try:
        for i, url in enumerate(urls):
            event = JobEvent(
                provider="apex",
                job_id=f"{prefix}-{i}",
                kind=EventKind.COMPLETED,
                job_type="video",
                outputs=(Output(url, f"{i}.mp4", "video/mp4"),),
            )
            await parts.ingestor.ingest(
                event, body=b"{}", source="webhook", auth="signature", delivery_id=f"d{i}"
            )
    finally:
        await parts.stop()


def child_env(settings: Settings, environ: dict[str, str], **extra: str) -> dict[str, str]:
    """A child's environment: this one without RECEIVER_*, then the ledger and archive of
    `settings`, local sources allowed, a 5 s lease, JSON logs, and `extra` (RECEIVER_ names)."""
    return {
        **{k: v for k, v in environ.items() if not k.startswith("RECEIVER_")},
        "RECEIVER_LEDGER_URL": settings.ledger_url,
        "RECEIVER_ARCHIVE_URL": settings.archive_url,
        "RECEIVER_FETCH_ALLOW_HTTP": "true",
        "RECEIVER_FETCH_ALLOW_NETWORKS": "127.0.0.0/8",
        "RECEIVER_APEX_DOWNLOAD_HOSTS": "127.0.0.1",
        "RECEIVER_LEASE_SECONDS": "5",
        "RECEIVER_LOG_FORMAT": "json",
        **{f"RECEIVER_{name.upper()}": value for name, value in extra.items()},
    }


def start(tmp_path: Path, env: dict[str, str], command: str) -> subprocess.Popen[bytes]:
    """`receiver worker`, or `receiver serve` on a free port; its log in `<command>.log`."""
    args = [sys.executable, "-m", "receiver", command]
    if command == "serve":
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            args += ["--host", "127.0.0.1", "--port", str(probe.getsockname()[1])]
    with (tmp_path / f"{command}.log").open("ab") as log:
        return subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=log)


def count(db: Path, sql: str) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()


def unfinished(db: Path) -> int:
    return count(db, "SELECT COUNT(*) FROM tasks WHERE state != 'done'")


def wait_for(
    condition: Callable[[], Any],
    timeout: float,
    child: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    """Poll `condition` until true; fail after `timeout`, or at once if `child` exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if child is not None and child.poll() is not None:
            tail = log.read_text()[-2000:] if log is not None else ""
            raise AssertionError(f"the receiver child exited: {tail}")
        time.sleep(0.05)
    raise AssertionError("condition not met in time")
