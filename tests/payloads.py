"""Builders for provider payloads and signed requests, as the providers document them."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from receiver.ingest.auth import sign

APEX_SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # base64 of 24 bytes
APEX_OLD_SECRET = "whsec_" + "c2VjcmV0LXJvdGF0ZWQtb3V0LTAxMjM0NTY3"
FLIKI_SECRET = "whsec_" + "Zmxpa2ktc2VjcmV0LWZvci10ZXN0cy0wMTIz"
APEX_TOKEN = "apex-path-token-0123456789"
FLIKI_TOKEN = "fliki-path-token-0123456789"


def apex_completed(
    job_id: str = "550e8400-e29b-41d4-a716-446655440000",
    *,
    job_type: str = "image",
    url: str = "https://cdn.useapexstudio.com/outputs/550e/output.png",
    output_type: str = "image/png",
    completed_at: str = "2026-03-16T12:00:00Z",
    **extra: Any,
) -> dict[str, Any]:
    return {
        "event": "job.completed",
        "timestamp": completed_at,
        "data": {
            "jobId": job_id,
            "type": job_type,
            "status": "completed",
            "outputUrl": url,
            "outputType": output_type,
            "metadata": {"model": "flux-2-pro", "width": 1024, "height": 1024},
            "createdAt": "2026-03-16T11:59:50Z",
            "completedAt": completed_at,
            **extra,
        },
    }


def apex_failed(
    job_id: str = "550e8400-e29b-41d4-a716-446655440000", *, job_type: str = "video"
) -> dict[str, Any]:
    return {
        "event": "job.failed",
        "timestamp": "2026-03-16T12:00:00Z",
        "data": {
            "jobId": job_id,
            "type": job_type,
            "status": "failed",
            "error": "Generation failed",
            "creditsRefunded": 250,
            "createdAt": "2026-03-16T11:59:50Z",
            "failedAt": "2026-03-16T12:00:00Z",
        },
    }


def fliki_status(
    file_id: str = "65f0c0ffee",
    status: str = "completed",
    download: str | None = "https://files.fliki.ai/out/65f0c0ffee.mp4",
    progress: float | None = 100,
) -> dict[str, Any]:
    body: dict[str, Any] = {"fileId": file_id, "status": status}
    if download is not None:
        body["download"] = download
    if progress is not None:
        body["progress"] = progress
    return body


def signed(
    payload: dict[str, Any] | bytes,
    secret: str = APEX_SECRET,
    *,
    msg_id: str | None = None,
    timestamp: int | None = None,
) -> tuple[bytes, dict[str, str]]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    timestamp = int(time.time()) if timestamp is None else timestamp
    return body, {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
    }
