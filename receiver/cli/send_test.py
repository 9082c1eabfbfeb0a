"""`receiver send-test`: one correctly authenticated sample callback to a running receiver.

The samples are the providers' documented "job failed" payloads (Apex Studio's webhook docs,
Fliki's status shape) under a fresh job id: they go through authentication, validation and the
ledger like a real callback, and, being failures, send no archive worker to a made-up URL.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from receiver.errors import ConfigurationError
from receiver.ingest.auth import sign
from receiver.ledger.events import PendingSend
from receiver.settings import ProviderConfig, Settings


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


# --- the onward side: a sample event to the team's application -------------------------------


@dataclass(frozen=True)
class SampleAnswer:
    ok: bool
    line: str


def sample_event(event_type: str, now: datetime) -> PendingSend:
    """A signed-as-real sample of `event_type`: a made-up Apex job (`data.metadata.test`)."""
    from receiver.domain import EventType, JobState
    from receiver.ledger.events import EventAsset, EventSubject, event_body, new_event_id

    kind = EventType(event_type)
    job_id = f"send-test-{uuid.uuid4().hex[:12]}"
    key = f"apex/{now:%Y/%m/%d}/{job_id}/output.png"
    asset = EventAsset(
        n=0,
        name="output.png",
        state="archived",
        key=key,
        uri=f"file:///sample/{key}",
        size=0,
        content_type="image/png",
        sha256="e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        deadline=now,
        archived_at=now,
        error=None,
    )
    subject = EventSubject(
        provider="apex",
        job_id=job_id,
        job_type="image",
        state=JobState.FAILED if kind is EventType.JOB_FAILED else JobState.ARCHIVED,
        metadata={"test": True, "sent_by": "receiver send-test"},
        error="sample" if kind is not EventType.JOB_ARCHIVED else None,
        completed_at=now,
        failed_at=now if kind is EventType.JOB_FAILED else None,
        credits_refunded=None,
        assets=(asset,),
    )
    event_id = new_event_id(now)
    n = 0 if event_type.startswith("asset.") else None
    body = event_body(kind, subject, event_id=event_id, at=now, n=n)
    return PendingSend(event_id, "", event_type, "apex", job_id, body, 0, now)


def send_sample_event(settings: Settings, endpoint: str, event_type: str) -> SampleAnswer:
    """Post one sample event to `endpoint` as the sender would (not through the outbox)."""
    import asyncio

    from receiver.app import destination
    from receiver.onward.sender import outcome_of

    known = {e.name: e for e in settings.onward}
    if endpoint not in known:
        raise ConfigurationError(
            f"no endpoint {endpoint!r} in RECEIVER_ONWARD_ENDPOINTS (known: {sorted(known)})"
        )
    try:
        send = sample_event(event_type, datetime.now(UTC))
    except ValueError:
        raise ConfigurationError(f"--event {event_type!r}: not an onward event type") from None
    send = dataclasses.replace(send, endpoint=endpoint)

    async def go() -> SampleAnswer:
        target = destination(settings, known[endpoint])
        try:
            answer = await target.send(send)
        finally:
            await target.aclose()
        outcome = outcome_of(answer)
        status = f"HTTP {answer.status}" if answer.status is not None else "no answer"
        detail = f": {answer.error}" if answer.error else ""
        return SampleAnswer(
            outcome == "delivered",
            f"{event_type} {send.event_id} to {endpoint}: {status}, {outcome}{detail}",
        )

    return asyncio.run(go())
