"""The one rule at the edge (`receiver.providers.bounds`), rejections made visible, and the
scrubbing of secrets from text we show: through the real app and the real SQLite ledger."""

from __future__ import annotations

import json
from typing import Any

import pytest
from structlog.testing import capture_logs

from receiver.domain import scrub_secrets
from receiver.providers.bounds import check_value, job_id_problem, load_json
from tests.conftest import Harness, post_signed
from tests.payloads import APEX_SECRET, APEX_TOKEN, FLIKI_SECRET, apex_completed, apex_failed

pytestmark = pytest.mark.anyio

NOTHING = {"jobs": 0, "deliveries": 0, "assets": 0, "tasks": 0}
OPERATOR = {"Authorization": "Bearer operator-token"}

# Bodies a signing provider could send that broke later steps before (issue 12), each with the
# rule that now refuses it at the edge.
ODD_BODIES: list[tuple[str, bytes, str]] = [
    ("nan", b'{"event":"job.completed","data":{"metadata":{"x":NaN}}}', "number_finite"),
    ("infinity", b'{"event":"job.completed","extra":-Infinity}', "number_finite"),
    ("1e999", b'{"event":"job.completed","extra":1e999}', "number_magnitude"),
    ("4301 digits", b'{"event":"job.completed","extra":' + b"9" * 4301 + b"}", "number_magnitude"),
    ("2^63", b'{"event":"job.failed","data":{"creditsRefunded":9223372036854775808}}', "number"),
    ("depth 900", b'{"event":"job.completed","m":' + b"[" * 900 + b"]" * 900 + b"}", "max_depth"),
    ("lone surrogate", b'{"event":"job.completed","m":"\\ud800"}', "unicode"),
    # In a key, the surrogate is also in the path the 422 names (found by test_edge_property).
    ("lone surrogate key", b'{"event":"job.completed","m":{"\\udd7d":1}}', "unicode"),
    ("long key", b'{"event":"job.completed","' + b"k" * 300 + b'":1}', "key_length"),
]


@pytest.mark.parametrize(("case", "body", "rule"), ODD_BODIES, ids=[c[0] for c in ODD_BODIES])
async def test_odd_signed_bodies_are_a_422_naming_the_rule(
    harness: Harness, case: str, body: bytes, rule: str
) -> None:
    response = await post_signed(harness, "apex", body, APEX_SECRET)
    assert response.status_code == 422, response.text
    assert rule in response.text
    assert harness.counts() == NOTHING


@pytest.mark.parametrize(
    ("job_id", "problem"),
    [
        (".", "path segment"),
        ("..", "path segment"),
        ("a/b", "'/'"),
        ("a\x00b", "U+0000"),
        ("a\u202eb", "U+202E"),  # right-to-left override: a format character
        ("x" * 129, "limit 128"),
    ],
)
async def test_job_ids_outside_the_grammar_are_a_422_naming_the_rule(
    harness: Harness, job_id: str, problem: str
) -> None:
    for provider, payload, secret in (
        ("apex", apex_completed(job_id), APEX_SECRET),
        (
            "fliki",
            {"fileId": job_id, "status": "completed", "download": "https://a.fliki.ai/v"},
            FLIKI_SECRET,
        ),
    ):
        response = await post_signed(harness, provider, payload, secret)
        assert response.status_code == 422, response.text
        assert "job_id" in response.text and problem in response.text
    assert harness.counts() == NOTHING


async def test_credits_beyond_64_bits_are_refused_by_the_schema(harness: Harness) -> None:
    payload = apex_failed("f")
    payload["data"]["creditsRefunded"] = 1e19  # a float, past the JSON rule's integer check
    response = await post_signed(harness, "apex", payload, APEX_SECRET)
    assert response.status_code == 422, response.text
    assert harness.counts() == NOTHING


@pytest.mark.parametrize(
    "body",
    [
        b'{"provider":"apex","job_id":"x","metadata":{"v":NaN}}',
        b'{"provider":"apex","job_id":"x","metadata":{"v":' + b"1" * 5000 + b"}}",
        b'{"provider":"apex","job_id":"x","metadata":' + b'{"a":' * 40 + b"1" + b"}" * 41,
        b'{"provider":"apex","job_id":"x","metadata":{"v":9223372036854775808}}',
        b'{"provider":"flora","job_id":"..","technique":"t"}',
    ],
)
async def test_post_jobs_applies_the_same_rule(harness: Harness, body: bytes) -> None:
    response = await harness.client.post(
        "/jobs", content=body, headers=OPERATOR | {"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert harness.counts() == NOTHING


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=" + "9" * 5000, "limit"),
        ("limit=0", "limit"),
        ("cursor=" + "c2VxOjkyMjMzNzIwMzY4NTQ3NzU4MDg", "cursor"),  # seq:9223372036854775808
        ("cursor=" + "c2VxOj" + "k5" * 3000, "cursor"),
    ],
)
async def test_list_limit_and_cursor_are_bounded(harness: Harness, query: str, field: str) -> None:
    response = await harness.client.get(f"/jobs?{query}", headers=OPERATOR)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0]["field"] == field


def test_bounds_accept_ordinary_values() -> None:
    value = load_json(json.dumps({"a": [1, 2.5, -(2**63) + 1, "出力", None, True]}).encode())
    assert value["a"][3] == "出力"
    check_value({"deep": [[[[1]]]]})
    assert job_id_problem("550e8400-e29b-41d4-a716-446655440000") is None
    assert job_id_problem("j57abc") is None


async def test_every_rejection_is_logged_once_and_counted(harness: Harness) -> None:
    ok_body = json.dumps(apex_completed("r")).encode()
    json_headers = {"content-type": "application/json"}
    with capture_logs() as logged:
        answers = [
            await harness.client.post("/webhooks/nope", content=ok_body, headers=json_headers),
            await harness.client.post("/webhooks/apex", content=ok_body, headers={}),
            await harness.client.post(
                "/webhooks/apex/wrong-token-123", content=ok_body, headers=json_headers
            ),
            await harness.client.post(
                f"/webhooks/apex/{APEX_TOKEN}", content=b"{not json", headers=json_headers
            ),
            await harness.client.post(
                f"/webhooks/apex/{APEX_TOKEN}", content=b'{"event":"x"}', headers=json_headers
            ),
            await harness.client.post(
                f"/webhooks/apex/{APEX_TOKEN}",
                content=b"x" * (2 * 1024 * 1024),
                headers=json_headers,
            ),
            await harness.client.get("/jobs?limit=0", headers=OPERATOR),
        ]
    assert [a.status_code for a in answers] == [404, 415, 401, 400, 422, 413, 422]
    events = [e for e in logged if e["event"] in ("webhook_rejected", "operator_call_rejected")]
    assert len(events) == 7  # once each
    assert [(e.get("provider"), e["status"]) for e in events[:6]] == [
        ("unknown", 404),
        ("apex", 415),
        ("apex", 401),
        ("apex", 400),
        ("apex", 422),
        ("apex", 413),
    ]
    assert APEX_TOKEN not in repr(logged) and "wrong-token" not in repr(logged)
    assert "not json" not in repr(logged)
    assert "'x'" not in repr(logged)  # the unknown event's name came from the body: elided
    metrics = (await harness.client.get("/metrics")).text
    for provider, code in [
        ("unknown", "not_found"),
        ("apex", "unsupported_media_type"),
        ("apex", "unauthorized"),
        ("apex", "malformed_json"),
        ("apex", "unknown_event"),
        ("apex", "payload_too_large"),
    ]:
        line = f'receiver_webhook_rejections_total{{code="{code}",provider="{provider}"}} 1.0'
        assert line in metrics, line
    assert 'receiver_operator_rejections_total{code="invalid_payload",route="GET /jobs"} 1.0' in (
        metrics
    )


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("403 for /o/a.png X-Amz-Signature=abc123def&X-Amz-Credential=AKIA%2Fx", "abc123def"),
        ("403 for /o/a.png X-Amz-Signature=abc123def&X-Amz-Credential=AKIA%2Fx", "AKIA"),
        ("denied: X-Goog-Signature=feedface0001 expired", "feedface0001"),
        ("Signature=Zm9vYmFy~ Key-Pair-Id=APKAEXAMPLE Policy=eyJhbGc", "APKAEXAMPLE"),
        ("Signature=Zm9vYmFy~ Key-Pair-Id=APKAEXAMPLE Policy=eyJhbGc", "Zm9vYmFy"),
        ('{"token": "tok_secret_1"}', "tok_secret_1"),
        ("https://x/a?sig=1&token=qwerty99", "qwerty99"),
        ("Authorization: Bearer sk_live_0123456789", "sk_live_0123456789"),
    ],
)
def test_signing_parameters_are_scrubbed_wherever_they_appear(text: str, secret: str) -> None:
    assert secret not in scrub_secrets(text)


def test_source_error_text_without_a_question_mark_is_scrubbed() -> None:
    from receiver.archive.fetch import _error_code

    body = (
        b"<Error><Code>AccessDenied</Code><Message>Request for /o/a.png with "
        b"X-Amz-Signature=deadbeefcafe and X-Amz-Credential=AKIAEXAMPLE denied</Message></Error>"
    )
    code, excerpt = _error_code(body)
    assert code == "AccessDenied"
    assert "deadbeefcafe" not in excerpt and "AKIAEXAMPLE" not in excerpt
    assert "X-Amz-Signature=…" in excerpt


async def test_the_audit_api_scrubs_errors(harness: Harness) -> None:
    payload = apex_failed("leaky")
    payload["data"]["error"] = "upstream said: X-Amz-Signature=s3cr3tsig denied"
    assert (await post_signed(harness, "apex", payload, APEX_SECRET)).status_code == 202
    shown = await harness.client.get("/jobs/apex/leaky", headers=OPERATOR)
    assert shown.status_code == 200
    assert "s3cr3tsig" not in shown.text


def test_log_lines_are_scrubbed() -> None:
    from receiver.logs import scrub_event

    event: dict[str, Any] = {"event": "x", "error": "GET https://h/a?X-Amz-Signature=zzz9 failed"}
    assert "zzz9" not in repr(scrub_event(None, "info", event))


async def test_same_delivery_id_with_another_body_is_flagged_in_audit_and_metrics(
    harness: Harness,
) -> None:
    first = apex_completed("m1")
    altered = apex_completed("m1", url="https://cdn.useapexstudio.com/outputs/other.png")
    assert (
        await post_signed(harness, "apex", first, APEX_SECRET, msg_id="msg_m")
    ).status_code == 202
    again = await post_signed(harness, "apex", altered, APEX_SECRET, msg_id="msg_m")
    assert again.status_code == 200 and again.json()["outcome"] == "duplicate"

    shown = (await harness.client.get("/jobs/apex/m1", headers=OPERATOR)).json()
    assert [d["body_mismatch"] for d in shown["deliveries"]] == [False, True]
    assert shown["deliveries"][1]["payload"]["data"]["outputUrl"].endswith("/other.png")
    metrics = (await harness.client.get("/metrics")).text
    assert 'receiver_delivery_body_mismatches_total{provider="apex"} 1.0' in metrics
    # The flag is part of the record of years: in the manifest, and back from it by reindex.
    from receiver.archive.manifest import build_manifest
    from receiver.audit.operations import job_from_manifest

    job = await harness.parts.ledger.job("apex", "m1")
    assert job is not None
    manifest = json.loads(json.dumps(build_manifest(job)))
    assert [d["body_mismatch"] for d in manifest["deliveries"]] == [False, True]
    restored = job_from_manifest(manifest)
    assert [d.body_mismatch for d in restored.deliveries] == [False, True]
