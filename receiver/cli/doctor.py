"""`receiver doctor`: the effective settings and where each came from, then one check per
configured part (ledger, queue, store, each provider), without changing anything but a probe
object under `_doctor/` in the store, written and deleted again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sqlite3
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from receiver.app import subscriptions
from receiver.cli.explain import explain
from receiver.errors import ConfigurationError
from receiver.ledger import from_ts
from receiver.ledger.events import EndpointHealth
from receiver.onward.http import shown_url
from receiver.polling.status import PollOutcome, StatusClient
from receiver.providers import REGISTRY
from receiver.settings import Settings
from receiver.store import Store
from receiver.store.local import LocalStore
from receiver.store.s3 import S3Store

PROBE_PREFIX = "_doctor/"
LEDGER_TABLES = {"jobs", "deliveries", "assets", "tasks"}


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: not configured, nothing to check
    detail: str

    @property
    def mark(self) -> str:
        return {True: "ok", False: "FAIL", None: "skip"}[self.ok]


@dataclass(frozen=True)
class Setting:
    variable: str
    value: str
    source: str


def mask(value: object) -> str:
    """Secrets never leave: only whether one is set, and how many for a list."""
    if isinstance(value, SecretStr):
        raw = value.get_secret_value()
        if not raw:
            return ""
        count = len([part for part in raw.split(",") if part.strip()])
        return "**** (set)" if count == 1 else f"**** ({count} set)"
    return "" if value is None else str(value)


def effective_settings(settings: Settings, sources: dict[str, str]) -> list[Setting]:
    return [
        Setting(f"RECEIVER_{name.upper()}", mask(getattr(settings, name)), sources[name])
        for name in Settings.model_fields
    ]


# --- checks ---------------------------------------------------------------------------------


def check_ledger(settings: Settings) -> Check:
    """Opens the ledger read-only: a missing SQLite file is reported, never created."""
    if settings.distributed:
        from receiver.ledger.dynamodb import DynamoLedger

        ledger = DynamoLedger.from_url(settings.ledger_url)
        try:
            ledger.ddb.describe_table(TableName=ledger.table)
        except Exception as exc:
            return Check("ledger", False, explain(exc))
        return Check("ledger", True, f"DynamoDB table {ledger.table!r} answers")
    path = settings.sqlite_path
    if not path.exists():
        return Check("ledger", False, missing_ledger(path))
    try:
        with sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
            missing = LEDGER_TABLES - tables
            if missing:
                return Check(
                    "ledger",
                    False,
                    f"{path} is not receiver's ledger (no {', '.join(sorted(missing))} table): "
                    "fix RECEIVER_LEDGER_URL",
                )
            (jobs,) = db.execute("SELECT count(*) FROM jobs").fetchone()
    except sqlite3.DatabaseError as exc:
        return Check("ledger", False, f"{path}: {exc}: fix RECEIVER_LEDGER_URL")
    return Check("ledger", True, f"SQLite {path.resolve()} ({jobs} jobs)")


def check_queue(settings: Settings) -> Check:
    from receiver.errors import ConfigurationError

    try:
        settings.check_queue()
    except ConfigurationError as exc:
        return Check("queue", False, str(exc))
    if not settings.distributed:
        return Check("queue", True, "in the ledger's SQLite file")
    from receiver.workqueue.sqs import SqsQueue

    queue = SqsQueue.from_url(settings.queue_url or "")
    for lane in (*queue.lanes, queue.dlq):
        try:
            queue.sqs.get_queue_url(QueueName=lane)
        except Exception as exc:
            return Check("queue", False, f"{lane}: {explain(exc)}")
    return Check("queue", True, f"SQS {', '.join((*queue.lanes, queue.dlq))} answer")


async def check_store(store: Store, describe: str) -> Check:
    """Write a small probe object under `_doctor/` and delete it again."""
    if isinstance(store, LocalStore) and not store.root.exists():
        # Not created here: a doctor run in the wrong folder must leave nothing behind.
        parent = store.root.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            return Check(
                "store",
                False,
                f"{describe}: {store.root} does not exist and {parent} is not "
                "a writable folder: fix RECEIVER_ARCHIVE_URL or the folder's owner",
            )
        return Check(
            "store",
            True,
            f"{describe}: {store.root} does not exist yet; it is created on the "
            f"first copy ({parent} is writable)",
        )
    try:
        # First the bucket itself: some S3-compatible servers (SeaweedFS) create a missing
        # bucket on the first write, so the probe alone would hide a misspelt bucket name.
        await store.ping()
    except Exception as exc:
        return Check("store", False, f"{describe}: not reachable: {explain(exc)}")
    key = f"{PROBE_PREFIX}probe-{secrets.token_hex(8)}"
    try:
        await store.put_bytes(key, b"receiver doctor probe\n", content_type="text/plain")
    except Exception as exc:
        return Check("store", False, f"{describe}: cannot write: {explain(exc)}")
    try:
        await _delete(store, key)
    except Exception as exc:
        problem = explain(exc)
        return Check("store", False, f"{describe}: wrote {key} but cannot delete it: {problem}")
    return Check("store", True, f"{describe}: wrote and deleted {key}")


async def _delete(store: Store, key: str) -> None:
    # The Store port has no delete (the archive never removes anything); the probe's cleanup is
    # the one place that needs it, so it goes to the adapters directly.
    if isinstance(store, LocalStore):
        for path in (store.root / key, store.root / f"{key}.meta.json"):
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # only if empty: another doctor may be running
            (store.root / PROBE_PREFIX).rmdir()
    elif isinstance(store, S3Store):
        await asyncio.to_thread(
            store._client.delete_object,
            Bucket=store.bucket,
            Key=f"{store.prefix}/{key}" if store.prefix else key,
        )
    else:  # pragma: no cover - a new adapter must be added here
        raise TypeError(f"no probe cleanup for {type(store).__name__}")


def check_webhooks(settings: Settings) -> list[Check]:
    checks = []
    for name in settings.enabled_webhook_providers:
        config = settings.provider(name)
        upper = name.upper()
        ways = []
        if config.webhook_secrets:
            ways.append(f"signatures ({len(config.webhook_secrets)} secret(s))")
        if config.webhook_token:
            ways.append(f"path token (/webhooks/{name}/<token>)")
        if ways:
            checks.append(Check(f"{name} webhooks", True, " and ".join(ways)))
        elif settings.insecure_dev:
            checks.append(
                Check(f"{name} webhooks", True, "UNAUTHENTICATED (insecure-dev): dev only")
            )
        else:
            checks.append(
                Check(
                    f"{name} webhooks",
                    False,
                    f"no authentication: set RECEIVER_{upper}_WEBHOOK_SECRETS=whsec_... (from the "
                    f"provider) or RECEIVER_{upper}_WEBHOOK_TOKEN=<random>",
                )
            )
    return checks


async def check_status_api(settings: Settings, name: str, http: httpx.AsyncClient) -> Check:
    """Ask the provider about a job that does not exist: a 404 means the key was accepted."""
    spec = REGISTRY[name]
    assert spec.status_api is not None
    config = settings.provider(name)
    upper = name.upper()
    label = f"{name} status API"
    polled_only = spec.parse_webhook is None
    if config.base_url is None and spec.status_api.base_url_is_placeholder:
        return Check(
            label,
            False if config.api_key else None,
            f"RECEIVER_{upper}_BASE_URL is not set (the documented URL "
            f"{spec.default_base_url} is a placeholder): set it to your API's base URL"
            + ("" if config.api_key else f" and RECEIVER_{upper}_API_KEY to poll {name} jobs"),
        )
    base_url = config.base_url or spec.default_base_url
    where = f"{base_url} ({'RECEIVER_' + upper + '_BASE_URL' if config.base_url else 'documented'})"
    if config.api_key is None:
        return Check(
            label,
            None,
            f"no RECEIVER_{upper}_API_KEY: {name} jobs cannot be polled"
            + (" (webhooks still work)" if not polled_only else ""),
        )
    client = StatusClient(spec, base_url=base_url, api_key=config.api_key, http=http)
    result = await client.poll("receiver-doctor-probe", {"technique": "receiver-doctor"})
    if result.outcome is PollOutcome.AUTH_ERROR:
        return Check(
            label,
            False,
            f"{where}: the API key was refused ({result.error}): check RECEIVER_{upper}_API_KEY",
        )
    if result.outcome is PollOutcome.REQUEST_FAILED:
        return Check(
            label, False, f"{where}: unreachable ({result.error}): check RECEIVER_{upper}_BASE_URL"
        )
    answer = f"HTTP {result.status_code}" if result.status_code else result.outcome.value
    return Check(label, True, f"{where}: key accepted ({answer} for a made-up job)")


async def run_checks(
    settings: Settings,
    *,
    open_store: Callable[[Settings], Store],
    http: Callable[[], httpx.AsyncClient] | None = None,
) -> list[Check]:
    checks = [check_ledger(settings), check_queue(settings)]
    try:
        store = open_store(settings)
    except ValueError as exc:  # an unusable RECEIVER_ARCHIVE_URL, said by open_store
        checks.append(Check("store", False, f"RECEIVER_ARCHIVE_URL: {exc}"))
        store = None
    except Exception as exc:
        checks.append(Check("store", False, explain(exc)))
        store = None
    if store is not None:
        try:
            checks.append(await check_store(store, settings.archive_url))
        finally:
            await store.aclose()
    checks.extend(await check_onward(settings))
    try:
        checks.extend(check_webhooks(settings))
    except Exception as exc:
        checks.append(Check("webhooks", False, explain(exc)))
    client = (http or (lambda: httpx.AsyncClient(timeout=settings.poll_timeout_seconds)))()
    async with client:
        for name, spec in REGISTRY.items():
            if spec.status_api is not None:
                checks.append(await check_status_api(settings, name, client))
    return checks


async def onward_health(settings: Settings) -> dict[str, EndpointHealth]:
    """Each onward endpoint's health as the ledger keeps it (read-only; {} if unknown yet)."""
    if settings.distributed:
        from receiver.ledger.dynamodb import DynamoLedger

        ledger = DynamoLedger.from_url(settings.ledger_url, subscriptions=subscriptions(settings))
        status = await ledger.onward_status(datetime.now(UTC))
        return {h.name: h for h in status.endpoints}
    path = settings.sqlite_path
    if not path.exists():
        return {}
    with sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True) as db:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'endpoints'").fetchone():
            return {}
        rows = db.execute(
            "SELECT name, consecutive_failures, last_attempt_at, last_success_at, last_error "
            "FROM endpoints"
        ).fetchall()
    return {
        name: EndpointHealth(name, failures, from_ts(attempt), from_ts(success), error)
        for name, failures, attempt, success, error in rows
    }


async def check_onward(settings: Settings) -> list[Check]:
    """Onward endpoints: well-formed settings, and none failing (from the ledger's record)."""
    try:
        endpoints = settings.onward
        settings.onward_retry_delays  # noqa: B018  (validated here, said here)
    except ConfigurationError as exc:
        return [Check("onward", False, str(exc))]
    if not endpoints:
        return [Check("onward", None, "no endpoint configured (RECEIVER_ONWARD_ENDPOINTS)")]
    try:
        health = await onward_health(settings)
    except Exception as exc:
        return [Check("onward", False, f"cannot read the endpoints' health: {explain(exc)}")]
    checks = []
    for e in endpoints:
        where = shown_url(e.url)
        h = health.get(e.name)
        if h is not None and h.failing:
            checks.append(
                Check(
                    f"onward {e.name}",
                    False,
                    f"{where}: FAILING, {h.consecutive_failures} failed attempts in a row "
                    f"(last: {h.last_error}); last success "
                    f"{h.last_success_at.isoformat() if h.last_success_at else 'never'}",
                )
            )
        else:
            last = (
                f", last delivery {h.last_success_at.isoformat()}"
                if h and h.last_success_at
                else ""
            )
            checks.append(Check(f"onward {e.name}", True, f"{where}: {e.kind}{last}"))
    return checks


def report_json(settings: list[Setting], checks: list[Check]) -> dict[str, Any]:
    return {
        "ok": all(c.ok is not False for c in checks),
        "settings": [asdict(s) for s in settings],
        "checks": [{**asdict(c), "status": c.mark} for c in checks],
    }


def missing_ledger(path: Path) -> str:
    return (
        f"no ledger at {path.resolve()} (this command does not create one): run it in the "
        "folder receiver serve runs in, or point at the ledger with "
        "RECEIVER_LEDGER_URL=sqlite:///path/to/receiver.db (or --env-file FILE that sets it)"
    )
