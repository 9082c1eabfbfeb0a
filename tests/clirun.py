"""Helpers for command-line tests: `receiver` in this process (fast), or as a real child
process (serve, simulate), plus a ledger filled through the real ingest path."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest

from receiver.app import build_parts
from receiver.cli import main
from receiver.providers import REGISTRY
from receiver.settings import Settings
from tests.payloads import apex_failed

RECEIVER = str(Path(sys.executable).parent / "receiver")


@dataclass
class Result:
    code: int
    out: str
    err: str


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> Result:
    """Run `receiver ARGS` through `main` (the entry point, with its error handling)."""
    capsys.readouterr()
    with mock.patch.object(sys, "argv", ["receiver", *args]):
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def sqlite_settings(folder: Path, **values: Any) -> Settings:
    return Settings(  # type: ignore[call-arg]
        _env_file=None,
        ledger_url=f"sqlite:///{folder / 'receiver.db'}",
        archive_url=f"file://{folder / 'archive'}",
        **values,
    )


def fill_ledger(settings: Settings, job_ids: list[str]) -> None:
    """Record one failed Apex job per id through the real ingest path."""

    async def go() -> None:
        parts = build_parts(settings)
        parts.start(workers=0)
        try:
            for job_id in job_ids:
                event = REGISTRY["apex"].parse_webhook(apex_failed(job_id))  # type: ignore[misc]
                body = json.dumps(apex_failed(job_id)).encode()
                await parts.ingestor.ingest(
                    event, body=body, source="webhook", auth="signature", delivery_id=None
                )
        finally:
            await parts.stop()

    asyncio.run(go())


def env_without_receiver() -> dict[str, str]:
    """This environment minus RECEIVER_* (a developer's own settings must not leak in)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RECEIVER_")}


@dataclass
class Served:
    child: subprocess.Popen[str]
    url: str
    listening: dict[str, Any]
    stderr: list[str]


def start_serve(cwd: Path, *args: str, port: int = 0, timeout: float = 30) -> Served:
    """`receiver serve --port PORT ARGS` in `cwd`; returns once it logged "listening"."""
    env = env_without_receiver() | {"RECEIVER_LOG_FORMAT": "json"}
    child = subprocess.Popen(
        [RECEIVER, "serve", "--port", str(port), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = child.stderr.readline()
        if not line:
            break
        lines.append(line)
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("event") == "listening":
            served = Served(child, entry["url"], entry, lines)
            wait_http(served.url + "/healthz")
            return served
    stop(child)
    raise AssertionError("receiver serve did not log `listening`:\n" + "".join(lines))


def wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def stop(child: subprocess.Popen[str]) -> None:
    child.terminate()
    try:
        child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(timeout=10)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
