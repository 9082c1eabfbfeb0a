"""Prometheus metrics: one registry per process (per app in tests), rendered at `/metrics`."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from receiver.ledger import FixityStatus
from receiver.workqueue import WorkQueue

# Deadline slack at archive time spans "missed by an hour" to "a week early".
SLACK_BUCKETS = (-3600, -600, -60, 0, 60, 600, 1800, 3600, 3 * 3600, 6 * 3600, 86400, 7 * 86400)
COPY_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)
# A recorded webhook takes milliseconds (the 2xx waits for the ledger's commit).
INGEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

_SERIES_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
}


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.deliveries = Counter(
            "receiver_deliveries",
            "Recorded deliveries",
            ["provider", "source", "outcome"],
            registry=r,
        )
        self.auth_failures = Counter(
            "receiver_webhook_auth_failures",
            "Webhooks refused for authentication",
            ["provider"],
            registry=r,
        )
        self.webhook_rejections = Counter(
            "receiver_webhook_rejections",
            "Webhooks answered 4xx, by provider ('unknown' for no such endpoint) and error code",
            ["provider", "code"],
            registry=r,
        )
        self.webhook_seconds = Histogram(
            "receiver_webhook_duration_seconds",
            "Time from a webhook's arrival to its 2xx (authenticated, validated, committed)",
            ["provider"],
            buckets=INGEST_BUCKETS,
            registry=r,
        )
        self.body_mismatches = Counter(
            "receiver_delivery_body_mismatches",
            "Deliveries whose id was seen before with a different body (flagged in the history)",
            ["provider"],
            registry=r,
        )
        self.operator_rejections = Counter(
            "receiver_operator_rejections",
            "Operator calls (POST/GET /jobs...) answered 4xx, by route and error code",
            ["route", "code"],
            registry=r,
        )
        self.queue_tasks = Gauge(
            "receiver_queue_tasks", "Archive tasks by state", ["state"], registry=r
        )
        self.oldest_task_age = Gauge(
            "receiver_queue_oldest_task_age_seconds",
            "Age of the oldest unfinished task",
            registry=r,
        )
        self.earliest_deadline = Gauge(
            "receiver_queue_earliest_deadline_timestamp_seconds",
            "Deadline (Unix time) of the most urgent copy no worker holds (0: none waiting; "
            "always 0 with SQS, which cannot be read by deadline)",
            registry=r,
        )
        self.slack = Histogram(
            "receiver_archive_deadline_slack_seconds",
            "Time left before the deadline when an asset was archived (negative: missed)",
            buckets=SLACK_BUCKETS,
            registry=r,
        )
        self.deadline_misses = Counter(
            "receiver_archive_deadline_misses", "Assets archived after their deadline", registry=r
        )
        self.archived_bytes = Counter(
            "receiver_archived_bytes", "Bytes archived", ["provider"], registry=r
        )
        self.archived_objects = Counter(
            "receiver_archived_objects", "Assets archived", ["provider"], registry=r
        )
        self.copy_seconds = Histogram(
            "receiver_archive_copy_duration_seconds",
            "Duration of successful copies",
            buckets=COPY_BUCKETS,
            registry=r,
        )
        self.retries = Counter("receiver_archive_retries", "Copies scheduled for retry", registry=r)
        self.dead_letters = Counter(
            "receiver_archive_dead_letters", "Assets dead-lettered (gave up)", registry=r
        )
        self.expired = Counter("receiver_archive_expired", "Assets whose link expired", registry=r)
        self.step_failures = Counter(
            "receiver_archive_step_failures",
            "Failed tries of an archive task's steps (copy, mark, manifest, ack)",
            ["step"],
            registry=r,
        )
        self.steps_given_up = Counter(
            "receiver_archive_steps_given_up",
            "Archive tasks ended because one step kept failing, by step",
            ["step"],
            registry=r,
        )
        self.slow_copies_cut = Counter(
            "receiver_archive_slow_copies_cut",
            "Copies cut because the source stayed below the throughput floor",
            registry=r,
        )
        self.slow_copies_resumable = Counter(
            "receiver_archive_slow_copies_requeued",
            "Cut slow copies that made progress, given back to resume later (not an attempt)",
            registry=r,
        )
        self.store_outage_waits = Counter(
            "receiver_archive_store_outage_waits",
            "Times a worker held its task waiting for an unreachable store (not an attempt)",
            registry=r,
        )
        self.store_up = Gauge(
            "receiver_store_up",
            "1 if the archive store answered its last probe or put, 0 if not",
            registry=r,
        )
        self.ledger_up = Gauge(
            "receiver_ledger_up",
            "1 if the ledger answered its last readiness check (/metrics, /readyz), 0 if not",
            registry=r,
        )
        # Content validation (issue 22) counts what it refuses to keep.
        self.archive_invalid = Counter(
            "receiver_archive_invalid",
            "Downloaded outputs refused as invalid content, by provider and reason",
            ["provider", "reason"],
            registry=r,
        )

        # Onward delivery (issue 21): the onward sender increments and sets these.
        self.onward_attempts = Counter(
            "receiver_onward_attempts",
            "Onward deliveries tried, by endpoint and outcome (delivered, retry, failed)",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.onward_oldest_undelivered = Gauge(
            "receiver_onward_oldest_undelivered_seconds",
            "Age of the oldest event not yet delivered onward (0 when nothing waits)",
            registry=r,
        )
        self.onward_endpoint_up = Gauge(
            "receiver_onward_endpoint_up",
            "1 if the onward endpoint took its last delivery, 0 if it is failing",
            ["endpoint"],
            registry=r,
        )
        self.onward_pending = Gauge(
            "receiver_onward_pending", "Events not yet delivered onward", registry=r
        )

        self.status_calls = Counter(
            "receiver_status_calls",
            "Provider status API calls by outcome (polling)",
            ["provider", "outcome"],
            registry=r,
        )
        self.polls_settled_by_webhook = Counter(
            "receiver_polls_settled_by_webhook",
            "Tracked jobs a webhook (or an earlier poll) settled before they were polled",
            ["provider"],
            registry=r,
        )
        self.polling_stopped = Gauge(
            "receiver_polling_stopped",
            "1 while a provider's polling is stopped for this reason: auth (its key was refused "
            "with 401/402/403) or config (no API key or base URL set), else 0",
            ["provider", "reason"],
            registry=r,
        )

        # Data over years (issue 15): retention and fixity.
        self.payloads_pruned = Counter(
            "receiver_retention_payloads_removed", "Raw delivery bodies dropped", registry=r
        )
        self.jobs_pruned = Counter(
            "receiver_retention_jobs_removed",
            "Ledger records of long-ended jobs removed",
            registry=r,
        )
        self.fixity_checks = Counter(
            "receiver_fixity_checks",
            "Fixity checks of archived assets by result (ok, missing, sha256 mismatch...)",
            ["result"],
            registry=r,
        )
        self.fixity_oldest_age = Gauge(
            "receiver_fixity_oldest_check_age_seconds",
            "Age of the oldest fixity check (or archiving, if never checked) of any asset",
            registry=r,
        )
        self.fixity_failing = Gauge(
            "receiver_fixity_failing_assets",
            "Archived assets whose last fixity check failed",
            registry=r,
        )
        self.fixity_max_age = Gauge(
            "receiver_fixity_max_age_seconds",
            "RECEIVER_FIXITY_DAYS in seconds: the oldest check may be at most this old",
            registry=r,
        )

    def observe_fixity(self, status: FixityStatus, now: datetime) -> None:
        """Set the fixity gauges from the ledger's view (before rendering /metrics)."""
        oldest = status.oldest_check
        self.fixity_oldest_age.set((now - oldest).total_seconds() if oldest else 0.0)
        self.fixity_failing.set(status.failing)

    def observe_polling(self, stopped: Mapping[str, str | None]) -> None:
        """Set receiver_polling_stopped from each polling provider's stop reason ("auth",
        "config" or None), before rendering /metrics."""
        for provider, reason in stopped.items():
            for each in ("auth", "config"):
                self.polling_stopped.labels(provider, each).set(1 if reason == each else 0)

    def metric_names(self) -> set[str]:
        """Every series name this registry can export (a counter's _total, a histogram's
        _bucket, _sum and _count), whether or not a labelled series has a sample yet: what
        the alert rules and the dashboard may name (tests/test_monitoring.py)."""
        names: set[str] = set()
        for family in self.registry.collect():
            names.update(family.name + suffix for suffix in _SERIES_SUFFIXES[family.type])
        return names

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (0 when absent): for tests and the CLI."""
        return self.registry.get_sample_value(name, labels) or 0.0

    async def render(self, queue: WorkQueue, now: datetime) -> bytes:
        stats = await queue.stats(now)
        for state, count in (
            ("ready", stats.ready),
            ("leased", stats.leased),
            ("dead", stats.dead),
        ):
            self.queue_tasks.labels(state).set(count)
        age = (now - stats.oldest_ready_at).total_seconds() if stats.oldest_ready_at else 0.0
        self.oldest_task_age.set(age)
        earliest = stats.earliest_unleased_deadline
        self.earliest_deadline.set(earliest.timestamp() if earliest else 0.0)
        return generate_latest(self.registry)
