"""Webhook authentication: Standard Webhooks signatures and secret path tokens.

Standard Webhooks (standardwebhooks.com): `webhook-id`, `webhook-timestamp`, `webhook-signature`
headers; the signature is base64(HMAC-SHA256(secret, f"{id}.{timestamp}.{body}")), prefixed `v1,`;
several space-separated signatures may be sent and several secrets may be active (rotation).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from receiver.errors import ConfigurationError, Unauthorized

SECRET_PREFIX = "whsec_"  # noqa: S105 (a format prefix, not a secret)


def decode_secret(secret: str) -> bytes:
    """`whsec_<base64>` to key bytes; a clear start-up error for anything else."""
    if not secret.startswith(SECRET_PREFIX):
        raise ConfigurationError(
            "webhook secrets must look like whsec_<base64> (Standard Webhooks); "
            "generate one with `receiver dev-env` or `openssl rand -base64 32`"
        )
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except binascii.Error as exc:
        raise ConfigurationError("a webhook secret after whsec_ is not valid base64") from exc
    if len(key) < 16:
        raise ConfigurationError("a webhook secret must decode to at least 16 bytes")
    return key


def sign(secret: str, msg_id: str, timestamp: int | str, body: bytes) -> str:
    """The `webhook-signature` header value for one secret (used by tests and the simulator);
    `timestamp` is signed as the header's text."""
    mac = hmac.new(decode_secret(secret), f"{msg_id}.{timestamp}.".encode() + body, "sha256")
    return "v1," + base64.b64encode(mac.digest()).decode()


@dataclass(frozen=True)
class Verified:
    """How a delivery was authenticated; stored with the delivery for the audit trail."""

    method: str  # "signature" | "token" | "insecure-dev"
    webhook_id: str | None = None


class SignatureVerifier:
    def __init__(self, secrets: Sequence[str], tolerance_seconds: int) -> None:
        self._keys = [decode_secret(s) for s in secrets]
        self._tolerance = tolerance_seconds

    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> Verified:
        msg_id = headers.get("webhook-id")
        timestamp = headers.get("webhook-timestamp")
        signatures = headers.get("webhook-signature")
        if not (msg_id and timestamp and signatures):
            raise Unauthorized(
                "missing Standard Webhooks headers",
                {"required": ["webhook-id", "webhook-timestamp", "webhook-signature"]},
            )
        # Plain ASCII digits only (int() also takes "+1", " 1", "1_0" and other scripts' digits),
        # and few of them. The signature below covers the header's text exactly as sent.
        if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
            raise Unauthorized("webhook-timestamp is not a unix timestamp")
        sent_at = int(timestamp)
        if abs(now - sent_at) > self._tolerance:
            # Outside the window a captured request could be replayed at will.
            raise Unauthorized(
                "webhook-timestamp outside the tolerance window",
                {"tolerance_seconds": self._tolerance},
            )
        # Standard Webhooks signs the header's text exactly as sent, not a re-rendered number.
        signed = f"{msg_id}.{timestamp}.".encode() + body
        offered = [
            part[3:] for part in signatures.split() if part.startswith("v1,") and len(part) > 3
        ]
        for key in self._keys:
            expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest())
            # Compare against every offered signature without an early exit on a match position.
            if any(hmac.compare_digest(expected, sig.encode()) for sig in offered):
                return Verified("signature", msg_id)
        raise Unauthorized("no valid signature for this provider's secrets")


def check_token(expected: str, offered: str) -> Verified:
    if not hmac.compare_digest(expected.encode(), offered.encode()):
        raise Unauthorized("invalid webhook token")
    return Verified("token")
