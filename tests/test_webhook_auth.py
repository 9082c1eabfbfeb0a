"""Standard Webhooks signature verification and path tokens."""

from __future__ import annotations

import pytest

from receiver.errors import ConfigurationError, Unauthorized
from receiver.ingest.auth import SignatureVerifier, check_token, decode_secret, sign
from tests.payloads import APEX_OLD_SECRET, APEX_SECRET, FLIKI_SECRET

BODY = b'{"event":"job.completed"}'
NOW = 1_773_662_400


def headers(secret: str = APEX_SECRET, *, ts: int = NOW, body: bytes = BODY) -> dict[str, str]:
    return {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(secret, "msg_1", ts, body),
    }


def test_known_vector() -> None:
    # The example from the Standard Webhooks specification's reference implementations.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    assert sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == (
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


def test_valid_and_rotated_secrets() -> None:
    verifier = SignatureVerifier([APEX_SECRET, APEX_OLD_SECRET], 300)
    assert verifier.verify(headers(APEX_SECRET), BODY, NOW).webhook_id == "msg_1"
    assert verifier.verify(headers(APEX_OLD_SECRET), BODY, NOW).method == "signature"


def test_several_signatures_in_one_header() -> None:
    verifier = SignatureVerifier([APEX_OLD_SECRET], 300)
    h = headers(APEX_SECRET)
    h["webhook-signature"] = (
        "v1,bogus "
        + h["webhook-signature"]
        + " v2,ignored "
        + (sign(APEX_OLD_SECRET, "msg_1", NOW, BODY))
    )
    assert verifier.verify(h, BODY, NOW).method == "signature"


@pytest.mark.parametrize(
    ("h", "body", "now", "message"),
    [
        (headers(FLIKI_SECRET), BODY, NOW, "no valid signature"),
        (headers(), BODY + b" ", NOW, "no valid signature"),
        (headers(ts=NOW - 301), BODY, NOW, "tolerance"),
        (headers(), BODY, NOW + 301, "tolerance"),
        ({**headers(), "webhook-timestamp": "yesterday"}, BODY, NOW, "unix timestamp"),
        ({"webhook-id": "msg_1"}, BODY, NOW, "missing"),
        ({**headers(), "webhook-signature": "v1,"}, BODY, NOW, "no valid signature"),
        ({**headers(), "webhook-id": "msg_2"}, BODY, NOW, "no valid signature"),
    ],
    ids=["wrong-secret", "tampered", "expired", "future", "bad-ts", "missing", "empty", "id"],
)
def test_rejections(h: dict[str, str], body: bytes, now: int, message: str) -> None:
    with pytest.raises(Unauthorized, match=message):
        SignatureVerifier([APEX_SECRET], 300).verify(h, body, now)


def test_within_tolerance_edges_pass() -> None:
    verifier = SignatureVerifier([APEX_SECRET], 300)
    assert verifier.verify(headers(ts=NOW - 300), BODY, NOW).method == "signature"


@pytest.mark.parametrize(
    "secret", ["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_%%%", "whsec_c2hvcnQ="]
)
def test_bad_secrets_are_configuration_errors(secret: str) -> None:
    with pytest.raises(ConfigurationError):
        decode_secret(secret)


def test_tokens() -> None:
    assert check_token("s3cret-token", "s3cret-token").method == "token"
    with pytest.raises(Unauthorized):
        check_token("s3cret-token", "s3cret-tokem")


def test_the_signature_covers_the_timestamp_text_as_sent() -> None:
    verifier = SignatureVerifier([APEX_SECRET], 300)
    text = "0" + str(NOW)  # the same instant, written differently
    as_sent = {
        "webhook-id": "msg_1",
        "webhook-timestamp": text,
        "webhook-signature": sign(APEX_SECRET, "msg_1", text, BODY),
    }
    assert verifier.verify(as_sent, BODY, NOW).method == "signature"
    # A signature over the re-rendered number is not a signature over what was sent.
    rerendered = {**as_sent, "webhook-signature": sign(APEX_SECRET, "msg_1", NOW, BODY)}
    with pytest.raises(Unauthorized, match="no valid signature"):
        verifier.verify(rerendered, BODY, NOW)


@pytest.mark.parametrize(
    "text", ["+1773662400", " 1773662400", "1_773_662_400", "\u0661\u0667", "9" * 13]
)
def test_timestamps_that_are_not_plain_digits_are_refused(text: str) -> None:
    verifier = SignatureVerifier([APEX_SECRET], 300)
    h = {
        "webhook-id": "msg_1",
        "webhook-timestamp": text,
        "webhook-signature": sign(APEX_SECRET, "msg_1", text, BODY),
    }
    with pytest.raises(Unauthorized, match="not a unix timestamp"):
        verifier.verify(h, BODY, NOW)
