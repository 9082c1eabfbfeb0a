"""The manifest written beside each job's assets, and URL redaction for everything we show.

The archive is self-describing without the database: `manifest.json` holds the job, every
delivery's payload (URL query strings removed: signed URLs are credentials) and the assets with
size and SHA-256. `receiver reindex` can rebuild the ledger from these files alone.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from receiver.archive.fetch import redact_url
from receiver.domain import MANIFEST_NAME, manifest_key, scrub_secrets, source_name

__all__ = ["MANIFEST_NAME", "build_manifest", "encode", "manifest_key", "redact"]
from receiver.ledger import JobRecord

SCHEMA = "receiver.manifest/1"


def redact(value: Any) -> Any:
    """A JSON value with every URL's query string, fragment and userinfo removed."""
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str) and value[:8].lower().startswith(("http://", "https://")):
        return redact_url(value)
    if isinstance(value, str):
        return scrub_secrets(value)  # signing parameters inside any text, not only in URLs
    return value


def redacted_payload(body: bytes) -> Any:
    try:
        return redact(json.loads(body))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None  # every recorded body was valid JSON; this is only defensive


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _kept_payloads(previous: dict[str, Any] | None) -> dict[tuple[Any, Any], Any]:
    """The payloads an earlier manifest holds, by (received at, payload SHA-256)."""
    if not previous:
        return {}
    return {
        (d.get("received_at"), d.get("payload_sha256")): d.get("payload")
        for d in previous.get("deliveries", [])
        if isinstance(d, dict)
    }


def build_manifest(job: JobRecord, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of `job`. Deliveries whose raw body the payload retention dropped keep the
    redacted payload `previous` (the manifest this one replaces) holds for them."""
    kept = _kept_payloads(previous)
    return {
        "schema": SCHEMA,
        "provider": job.provider,
        "job_id": job.job_id,
        "job": {
            "state": job.state.value,
            "type": job.job_type,
            "first_seen_at": _iso(job.first_seen_at),
            "updated_at": _iso(job.updated_at),
            "completed_at": _iso(job.completed_at),
            "failed_at": _iso(job.failed_at),
            "archived_at": _iso(job.archived_at),
            "error": job.error,
            "credits_refunded": job.credits_refunded,
            "metadata": redact(job.metadata),
            "tracking": redact(job.tracking),
        },
        "deliveries": [
            {
                "received_at": _iso(d.received_at),
                "delivery_id": d.delivery_id,
                "source": d.source,
                "auth": d.auth,
                "event": d.event,
                "outcome": d.outcome,
                "payload_sha256": d.payload_sha256,
                # The same webhook id arrived earlier with another body (flagged, kept).
                "body_mismatch": d.body_mismatch,
                "payload": (
                    kept.get((_iso(d.received_at), d.payload_sha256))
                    if d.payload_removed
                    else redacted_payload(d.body)
                ),
            }
            for d in job.deliveries
        ],
        "assets": [
            {
                "n": a.n,
                "name": a.name,
                "key": a.key,
                "uri": a.uri,
                "state": a.state,
                "size": a.size,
                "sha256": a.sha256,
                "content_type": a.content_type,
                "source": redact_url(a.source_url),
                "source_name": source_name(a.source_url),  # as given; `name` may be fitted
                "deadline": _iso(a.deadline),
                "archived_at": _iso(a.archived_at),
                "error": a.error,
            }
            for a in job.assets
        ],
    }


def encode(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=2, sort_keys=True).encode()
