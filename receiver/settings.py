"""Settings, from `RECEIVER_*` environment variables (and a `.env` file), via pydantic-settings.

The names are part of the external interface (DESIGN.md): operators and our checks rely on them.
S3 endpoint, region and credentials are not here: they come from boto3's own configuration.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

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
    part_size: int = Field(default=8 * 1024 * 1024, ge=5 * 1024 * 1024)
    parts_in_flight: int = Field(default=2, ge=1, le=16)
    lease_seconds: int = Field(default=60, ge=5)
    max_attempts: int = Field(default=8, ge=1)
    # A copy slower than this over a whole window is cut and retried later (it would hold a copy
    # slot that tasks closer to their deadline need). 0 switches the floor off.
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
