"""Shared pytest fixtures: a fake clock and the real app on a temporary database."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from receiver.app import Parts, build_parts, create_app
from receiver.settings import Settings
from tests.payloads import APEX_OLD_SECRET, APEX_SECRET, APEX_TOKEN, FLIKI_SECRET, FLIKI_TOKEN

# Fixture modules: the misbehaving HTTP source, moto's S3 server, headless Chromium.
pytest_plugins = ["tests.sources", "tests.s3server", "tests.browser", "tests.app_endpoint"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeClock:
    """Injected time: tests move it instead of sleeping."""

    def __init__(self, start: datetime = datetime(2026, 3, 16, 12, 5, tzinfo=UTC)) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def wall(self) -> float:
        return self.now.timestamp()

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# Settings that let the archive fetch from the tests' own HTTP source on loopback (Apex links).
LOCAL_SOURCES: dict[str, Any] = {
    "fetch_allow_http": True,
    "fetch_allow_networks": "127.0.0.0/8",
    "apex_download_hosts": "127.0.0.1",
}
# The operator token `make_settings` configures, as an Authorization header.
AUTH = {"authorization": "Bearer operator-token"}


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "ledger_url": f"sqlite:///{tmp_path / 'receiver.db'}",
        "archive_url": f"file://{tmp_path / 'archive'}",
        "apex_webhook_secrets": f"{APEX_SECRET},{APEX_OLD_SECRET}",
        "apex_webhook_token": APEX_TOKEN,
        "fliki_webhook_secrets": FLIKI_SECRET,
        "fliki_webhook_token": FLIKI_TOKEN,
        "api_token": "operator-token",
        "log_format": "json",
        **overrides,
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@dataclass
class Harness:
    client: httpx.AsyncClient
    parts: Parts
    clock: FakeClock

    def rows(self, table: str) -> list[sqlite3.Row]:
        conn = sqlite3.connect(self.parts.db.path)
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(f"SELECT * FROM {table}").fetchall()
        finally:
            conn.close()

    def counts(self) -> dict[str, int]:
        return {t: len(self.rows(t)) for t in ("jobs", "deliveries", "assets", "tasks")}


HarnessFactory = Callable[..., Any]


@pytest.fixture
async def harness_factory(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Callable[..., Any]]:
    made: list[Harness] = []

    async def make(**overrides: Any) -> Harness:
        parts = build_parts(
            make_settings(tmp_path, **overrides), clock=clock, wall_clock=clock.wall
        )
        app = create_app(parts)
        parts.db.start()
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://receiver.test"
        )
        harness = Harness(client, parts, clock)
        made.append(harness)
        return harness

    yield make
    for h in made:
        await h.client.aclose()
        await h.parts.stop()


@pytest.fixture
async def harness(harness_factory: Callable[..., Any]) -> Harness:
    result: Harness = await harness_factory()
    return result


async def post_signed(
    harness: Harness,
    provider: str,
    payload: dict[str, Any] | bytes,
    secret: str,
    *,
    msg_id: str | None = None,
    timestamp: int | None = None,
) -> httpx.Response:
    from tests.payloads import signed

    ts = int(harness.clock.wall()) if timestamp is None else timestamp
    body, headers = signed(payload, secret, msg_id=msg_id, timestamp=ts)
    return await harness.client.post(f"/webhooks/{provider}", content=body, headers=headers)
