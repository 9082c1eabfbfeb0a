"""Settings, from `RECEIVER_*` environment variables (and a `.env` file), via pydantic-settings.

The names are part of the external interface (DESIGN.md): operators and our checks rely on them.
S3 endpoint, region and credentials are not here: they come from boto3's own configuration.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from receiver.domain import EventType
from receiver.errors import ConfigurationError

PROVIDERS = ("apex", "fliki", "flora", "vividflow")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


@dataclass(frozen=True)
class ProviderConfig:
    """One provider's settings, gathered from the flat environment variables."""

    name: str
    webhook_secrets: tuple[str, ...]
    webhook_token: str | None
    api_key: str | None
    base_url: str | None
    extra_download_hosts: tuple[str, ...]

    @property
    def authenticated(self) -> bool:
        return bool(self.webhook_secrets or self.webhook_token)


@dataclass(frozen=True)
class OnwardEndpoint:
    """One destination of onward events (RECEIVER_ONWARD_ENDPOINTS): an HTTP(S) URL signed
    with Standard Webhooks secrets, or an SQS queue (`sqs://NAME`)."""

    name: str
    url: str
    secrets: tuple[str, ...] = ()
    events: frozenset[str] | None = None  # None: every event type

    @property
    def kind(self) -> str:
        return "sqs" if self.url.startswith("sqs://") else "http"


_ENDPOINT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
EVENT_TYPES = frozenset(t.value for t in EventType)


def parse_onward_endpoints(text: str) -> tuple[OnwardEndpoint, ...]:
    """RECEIVER_ONWARD_ENDPOINTS: a JSON list of {"name", "url", "secrets", "events"}."""
    if not text.strip():
        return ()
    where = "RECEIVER_ONWARD_ENDPOINTS"
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"{where}: not JSON ({exc.msg} at {exc.pos})") from None
    if not isinstance(raw, list):
        raise ConfigurationError(f"{where}: expected a JSON list of endpoints")
    endpoints: list[OnwardEndpoint] = []
    for k, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ConfigurationError(f"{where}[{k}]: expected an object")
        unknown = set(item) - {"name", "url", "secrets", "events"}
        if unknown:
            raise ConfigurationError(f"{where}[{k}]: unknown field(s) {sorted(unknown)}")
        name, url = item.get("name"), item.get("url")
        if not isinstance(name, str) or not _ENDPOINT_NAME.match(name):
            raise ConfigurationError(
                f"{where}[{k}].name: 1-40 of a-z, 0-9, '-', '_' (it names the endpoint in "
                "metrics, the CLI and the console)"
            )
        if any(e.name == name for e in endpoints):
            raise ConfigurationError(f"{where}[{k}].name: {name!r} is used twice")
        if not isinstance(url, str):
            url = ""
        scheme = urlsplit(url).scheme
        if scheme not in ("https", "http", "sqs") or not urlsplit(url).netloc:
            raise ConfigurationError(
                f"{where}[{k}].url ({name}): expected https://..., http://... or sqs://QUEUE"
            )
        secrets = item.get("secrets", [])
        if isinstance(secrets, str):
            secrets = list(_split(secrets))
        if not isinstance(secrets, list) or not all(
            isinstance(x, str) and x.startswith("whsec_") for x in secrets
        ):
            raise ConfigurationError(
                f"{where}[{k}].secrets ({name}): a list of Standard Webhooks secrets (whsec_...)"
            )
        if scheme != "sqs" and not secrets:
            raise ConfigurationError(
                f"{where}[{k}].secrets ({name}): an HTTP endpoint needs at least one secret"
            )
        events = item.get("events")
        if events is not None and (not isinstance(events, list) or not set(events) <= EVENT_TYPES):
            raise ConfigurationError(
                f"{where}[{k}].events ({name}): a list of {sorted(EVENT_TYPES)}"
            )
        endpoints.append(
            OnwardEndpoint(
                name, url, tuple(secrets), frozenset(events) if events is not None else None
            )
        )
    return tuple(endpoints)


#: Svix's schedule: the seconds before each retry after the first try; the try after the
#: last one that fails ends the series (about a day and a half in all).
ONWARD_RETRY_SCHEDULE = "5,300,1800,7200,18000,36000,36000"


#: An S3 upload's part size and how many parts upload at once: a copy's memory is about
#: (PARTS_IN_FLIGHT + 1) x PART_SIZE, and an object of up to PARTS_IN_FLIGHT parts goes as one
#: PUT (see receiver/store/s3.py). Four parts in flight, not two: with two, SeaweedFS had
#: one core busy of two, and receiver's copy of 1 GiB took 1.18-1.26x boto3's upload_file (ten
#: in flight) and 0.96-0.99x rclone's time; with four, 1.03x and 1.20x, and 0.90x and 0.93x, in
#: two runs (`BENCH_ONLY=large make bench`; single runs here move by tens of percent).
PART_SIZE = 8 * 1024 * 1024
PARTS_IN_FLIGHT = 4


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RECEIVER_", env_file=".env", extra="ignore", frozen=True
    )

    ledger_url: str = "sqlite:///./var/receiver.db"  # or dynamodb://TABLE (scale-out)
    queue_url: str | None = None  # defaults to the ledger's SQLite file; sqs://NAME with DynamoDB
    archive_url: str = "file://./var/archive"

    apex_webhook_secrets: SecretStr = SecretStr("")
    apex_webhook_token: SecretStr | None = None
    apex_api_key: SecretStr | None = None
    apex_base_url: str | None = None
    apex_download_hosts: str = ""

    fliki_webhook_secrets: SecretStr = SecretStr("")
    fliki_webhook_token: SecretStr | None = None
    fliki_api_key: SecretStr | None = None
    fliki_base_url: str | None = None
    fliki_download_hosts: str = ""

    flora_webhook_secrets: SecretStr = SecretStr("")
    flora_webhook_token: SecretStr | None = None
    flora_api_key: SecretStr | None = None
    flora_base_url: str | None = None
    flora_download_hosts: str = ""

    vividflow_webhook_secrets: SecretStr = SecretStr("")
    vividflow_webhook_token: SecretStr | None = None
    vividflow_api_key: SecretStr | None = None
    vividflow_base_url: str | None = None
    vividflow_download_hosts: str = ""

    webhook_providers: str = "apex,fliki"
    api_token: SecretStr | None = None
    fetch_allow_http: bool = False
    fetch_allow_networks: str = ""
    insecure_dev: bool = False
    workers: int = Field(default=4, ge=0, le=256)

    # Beyond the documented interface: tuning knobs with safe defaults.
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    webhook_tolerance_seconds: int = Field(default=300, ge=1)
    deadline_margin_seconds: int = Field(default=600, ge=0)
    part_size: int = Field(default=PART_SIZE, ge=5 * 1024 * 1024)
    parts_in_flight: int = Field(default=PARTS_IN_FLIGHT, ge=1, le=16)
    lease_seconds: int = Field(default=60, ge=5)
    max_attempts: int = Field(default=8, ge=1)
    # A copy slower than this over a whole window is cut (it would hold a copy slot that other
    # tasks need) and resumes later where it stopped (archive/resume.py). 0: no floor.
    copy_min_bytes_per_second: float = Field(default=16 * 1024, ge=0)
    copy_slow_window_seconds: float = Field(default=60.0, gt=0)
    # While the store is unreachable a worker holds its task and probes the store with backoff up
    # to this many seconds apart (the wait is not a copy attempt; the task's deadline bounds it).
    store_outage_max_wait_seconds: float = Field(default=30.0, gt=0)
    # Scale-out (dynamodb:// + sqs://): tasks due within this many hours when queued go to the
    # urgent lane (NAME-urgent), which workers drain first.
    queue_urgent_hours: float = Field(default=3.0, ge=0)
    # With a DynamoDB ledger, the process-local SQLite file (polling tracker state only).
    local_db: str = "./var/local.db"
    # Polling tracked jobs (POST /jobs, `receiver track`). Each job is polled with exponential
    # backoff and jitter from poll_base up to poll_cap seconds; every provider also has a rate
    # budget of its own (its module's StatusApi) that all its jobs share.
    poll_base_seconds: float = Field(default=5.0, gt=0)
    poll_cap_seconds: float = Field(default=300.0, gt=0)
    # Apex/Fliki jobs registered for reconciliation are polled only when their webhook has not
    # arrived this long after registration.
    poll_grace_seconds: float = Field(default=600.0, ge=0)
    poll_timeout_seconds: float = Field(default=15.0, gt=0)
    poll_concurrency: int = Field(default=8, ge=1, le=256)
    # Consecutive 404s before a job is stopped as not found (new jobs can lag behind the API).
    poll_not_found_limit: int = Field(default=5, ge=1)
    poll_give_up_hours: float = Field(default=72.0, gt=0)
    track_metadata_max_bytes: int = Field(default=4096, ge=0, le=65536)
    # Slow clients: a request body (webhook, POST /jobs) must arrive within this many seconds,
    # else 408 and the connection is closed; idle keep-alive connections close after the next.
    body_timeout_seconds: float = Field(default=20.0, gt=0)
    keep_alive_seconds: float = Field(default=5.0, gt=0)
    # Data over years (issue 15; README "Retention, erasure and fixity"). Raw delivery bodies
    # are dropped after payload_retention_days (0: at the next prune); whole ledger records of
    # jobs that ended job_retention_days ago are removed when set (off by default); archived
    # assets are re-verified at least every fixity_days (0: all due), in the background at
    # fixity_per_hour checks per process (0: only `receiver verify --due`).
    payload_retention_days: int = Field(default=30, ge=0)
    job_retention_days: int | None = Field(default=None, ge=1)
    fixity_days: int = Field(default=90, ge=0)
    fixity_per_hour: float = Field(default=0.0, ge=0)
    retention_interval_seconds: float = Field(default=300.0, gt=0)
    retention_batch: int = Field(default=50, ge=1, le=1000)
    # Onward delivery (README "Telling your application"): where receiver's own events go.
    onward_endpoints: SecretStr = SecretStr("")  # JSON list; secrets inside, never logged
    onward_timeout_seconds: float = Field(default=15.0, gt=0, le=300)
    onward_concurrency: int = Field(default=4, ge=1, le=64)  # sends in flight per endpoint
    onward_retry_schedule: str = ONWARD_RETRY_SCHEDULE  # seconds before each retry
    log_format: str = "auto"  # auto (console on a TTY, else JSON) | json | console
    log_level: str = "info"

    def provider(self, name: str) -> ProviderConfig:
        def secret(field: str) -> str | None:
            value = getattr(self, f"{name}_{field}")
            return value.get_secret_value() or None if value is not None else None

        return ProviderConfig(
            name=name,
            webhook_secrets=_split(secret("webhook_secrets") or ""),
            webhook_token=secret("webhook_token"),
            api_key=secret("api_key"),
            base_url=getattr(self, f"{name}_base_url"),
            extra_download_hosts=_split(getattr(self, f"{name}_download_hosts")),
        )

    @property
    def onward(self) -> tuple[OnwardEndpoint, ...]:
        return parse_onward_endpoints(self.onward_endpoints.get_secret_value())

    @property
    def onward_retry_delays(self) -> tuple[float, ...]:
        try:
            delays = tuple(float(x) for x in _split(self.onward_retry_schedule))
        except ValueError:
            delays = (-1.0,)
        if any(d < 0 for d in delays) or len(delays) > 50:
            raise ConfigurationError(
                "RECEIVER_ONWARD_RETRY_SCHEDULE: up to 50 comma-separated seconds, each >= 0 "
                f"(default {ONWARD_RETRY_SCHEDULE})"
            )
        return delays

    @property
    def enabled_webhook_providers(self) -> tuple[str, ...]:
        names = _split(self.webhook_providers)
        unknown = [n for n in names if n not in PROVIDERS]
        if unknown:
            raise ConfigurationError(
                f"RECEIVER_WEBHOOK_PROVIDERS: unknown provider(s) {unknown}; known: {PROVIDERS}"
            )
        return names

    @property
    def allow_networks(self) -> tuple[IPNetwork, ...]:
        try:
            return tuple(ipaddress.ip_network(n) for n in _split(self.fetch_allow_networks))
        except ValueError as exc:
            raise ConfigurationError(f"RECEIVER_FETCH_ALLOW_NETWORKS: {exc}") from exc

    @property
    def sqlite_path(self) -> Path:
        """The SQLite file behind the ledger (and, by default, the queue)."""
        return sqlite_path(self.ledger_url, "RECEIVER_LEDGER_URL")

    @property
    def distributed(self) -> bool:
        """DynamoDB ledger and SQS queue (many replicas) instead of the embedded SQLite file."""
        return self.ledger_url.startswith("dynamodb://")

    @property
    def local_db_path(self) -> Path:
        """This process's SQLite file: the ledger's, or with DynamoDB a local one (polling)."""
        return Path(self.local_db) if self.distributed else self.sqlite_path

    def check_queue(self) -> None:
        sqs = (self.queue_url or "").startswith("sqs://")
        if self.distributed or sqs:
            if not (self.distributed and sqs):
                # The DynamoDB ledger's outbox sends tasks to SQS; the SQLite ledger writes its
                # tasks in its own transaction. Mixed pairs would lose one or the other.
                raise ConfigurationError(
                    "RECEIVER_LEDGER_URL=dynamodb://TABLE and RECEIVER_QUEUE_URL=sqs://NAME go "
                    "together (the infra stack's outputs LedgerUrl and QueueUrl)"
                )
            return
        if self.queue_url is None:
            return
        if sqlite_path(self.queue_url, "RECEIVER_QUEUE_URL") != self.sqlite_path:
            # The ledger writes a completed job and its archive tasks in one transaction.
            raise ConfigurationError(
                "RECEIVER_QUEUE_URL: the SQLite queue lives in the ledger's database; "
                "leave it unset or set it to the same file as RECEIVER_LEDGER_URL"
            )


def sqlite_path(url: str, variable: str) -> Path:
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        raise ConfigurationError(
            f"{variable}={url!r}: expected sqlite:///path (e.g. sqlite:///./var/receiver.db) "
            "or, for the ledger, dynamodb://TABLE with RECEIVER_QUEUE_URL=sqs://NAME"
        )
    return Path(url[len(prefix) :])


# --- where settings come from (issue 14) ---------------------------------------------------

DEFAULT_ENV_FILE = Path(".env")


def load(env_files: Sequence[Path] = (), **overrides: Any) -> Settings:
    """Settings from the environment, `.env` in the working directory, then each of
    `env_files` on top (a later file wins over an earlier one; the environment wins over all).

    An `env_files` entry that does not exist is an error: a mistyped `--env-file` must not
    quietly fall back to defaults.
    """
    for path in env_files:
        if not path.is_file():
            raise ConfigurationError(f"--env-file {path}: no such file")
    files = (DEFAULT_ENV_FILE, *env_files)
    try:
        return Settings(_env_file=files, **overrides)  # type: ignore[call-arg]
    except ValidationError as exc:
        problems = "; ".join(
            f"RECEIVER_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
            for err in exc.errors(include_url=False)
        )
        raise ConfigurationError(f"invalid settings: {problems}") from None


def sources(env_files: Sequence[Path] = (), **overrides: object) -> dict[str, str]:
    """For every setting, where its effective value comes from: "default", ".env",
    "--env-file PATH", "environment" or "command line" (same precedence as `load`)."""
    from dotenv import dotenv_values

    found: dict[str, str] = {}
    for label, path in [(".env", DEFAULT_ENV_FILE)] + [(f"--env-file {p}", p) for p in env_files]:
        if path.is_file():
            for key in dotenv_values(path):
                found[key.upper()] = label
    environ = {key.upper() for key in os.environ}
    result: dict[str, str] = {}
    for name in Settings.model_fields:
        variable = f"RECEIVER_{name.upper()}"
        if name in overrides:
            result[name] = "command line"
        elif variable in environ:
            result[name] = "environment"
        else:
            result[name] = found.get(variable, "default")
    return result
