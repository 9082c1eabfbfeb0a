"""`receiver send-test`: one correctly authenticated sample callback to a running receiver.

The samples are the providers' documented "job failed" payloads (Apex Studio's webhook docs,
Fliki's status shape) under a fresh job id: they go through authentication, validation and the
ledger like a real callback, and, being failures, send no archive worker to a made-up URL.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from receiver.errors import ConfigurationError
from receiver.ingest.auth import sign
from receiver.settings import ProviderConfig


def apex_sample(job_id: str, now: datetime) -> dict[str, Any]:
    """Apex Studio's documented `job.failed` webhook payload."""
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "event": "job.failed",
        "timestamp": stamp,
        "data": {
            "jobId": job_id,
            "type": "video",
            "status": "failed",
            "error": "Generation failed (receiver send-test)",
            "creditsRefunded": 0,
            "createdAt": stamp,
            "failedAt": stamp,
        },
    }


def fliki_sample(job_id: str, now: datetime) -> dict[str, Any]:
    """Fliki's callback, which has the shape of its status answer."""
    return {"fileId": job_id, "status": "failed", "error": "receiver send-test"}


SAMPLES = {"apex": apex_sample, "fliki": fliki_sample}


@dataclass(frozen=True)
class Prepared:
    url: str  # where to post (may contain the path token)
    shown_url: str  # the same without the token, for printing
    headers: dict[str, str]
    body: bytes
    job_id: str
    auth: str


def prepare(
    provider: str,
    config: ProviderConfig,
    base_url: str,
    *,
    now: datetime | None = None,
    use_token: bool = False,
) -> Prepared:
    if provider not in SAMPLES:
        raise ConfigurationError(
            f"send-test knows the webhook providers {sorted(SAMPLES)}, not {provider!r} "
            "(FLORA and Vivid Flow have no webhooks: use `receiver track`)"
        )
    now = now or datetime.now(UTC)
    job_id = str(uuid.uuid4()) if provider == "apex" else f"send-test-{uuid.uuid4().hex[:12]}"
    body = json.dumps(SAMPLES[provider](job_id, now)).encode()
    headers = {"content-type": "application/json"}
    endpoint = f"{base_url.rstrip('/')}/webhooks/{provider}"
    upper = provider.upper()
    msg_id = f"msg_sendtest_{uuid.uuid4().hex}"
    if config.webhook_secrets and not use_token:
        timestamp = int(now.timestamp() if now else time.time())
        headers |= {
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(config.webhook_secrets[0], msg_id, timestamp, body),
        }
        return Prepared(endpoint, endpoint, headers, body, job_id, "signature")
    if config.webhook_token:
        headers["webhook-id"] = msg_id
        return Prepared(
            f"{endpoint}/{config.webhook_token}",
            f"{endpoint}/<RECEIVER_{upper}_WEBHOOK_TOKEN>",
            headers,
            body,
            job_id,
            "path token",
        )
    raise ConfigurationError(
        f"no RECEIVER_{upper}_WEBHOOK_SECRETS or RECEIVER_{upper}_WEBHOOK_TOKEN to authenticate "
        f"with: use the receiver's settings (e.g. --env-file var/dev.env)"
    )


def post(prepared: Prepared, *, timeout: float = 10.0) -> httpx.Response:
    # Same limits as a provider's: Apex expects a 2xx within 10 seconds.
    return httpx.post(
        prepared.url, content=prepared.body, headers=prepared.headers, timeout=timeout
    )
