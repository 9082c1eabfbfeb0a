"""Prometheus metrics: one registry per process (per app in tests), rendered at `/metrics`."""

from __future__ import annotations

from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from receiver.ledger import FixityStatus
from receiver.workqueue import WorkQueue

# Deadline slack at archive time spans "missed by an hour" to "a week early".
SLACK_BUCKETS = (-3600, -600, -60, 0, 60, 600, 1800, 3600, 3 * 3600, 6 * 3600, 86400, 7 * 86400)
COPY_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)


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
        self.slack = Histogram(
            "receiver_archive_deadline_slack_seconds",
            "Time left before the deadline when an asset was archived (negative: missed)",
            buckets=SLACK_BUCKETS,
            registry=r,
        )
        self.deadline_misses = Counter(
            "receiver_archive_deadline_misses", "Assets archived after their deadline", registry=r
        )
        self.archived_bytes = Counter("receiver_archived_bytes", "Bytes archived", registry=r)
        self.archived_objects = Counter("receiver_archived_objects", "Assets archived", registry=r)
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

    def observe_fixity(self, status: FixityStatus, now: datetime) -> None:
        """Set the fixity gauges from the ledger's view (before rendering /metrics)."""
        oldest = status.oldest_check
        self.fixity_oldest_age.set((now - oldest).total_seconds() if oldest else 0.0)
        self.fixity_failing.set(status.failing)

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
        return generate_latest(self.registry)
