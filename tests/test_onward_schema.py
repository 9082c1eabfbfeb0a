"""The onward events' JSON Schema (receiver/onward/schema/events.v1.json) is the contract an
application codes against: it is a valid 2020-12 schema, it has an example of every event
type, it names exactly the types receiver sends, and every event the ledger builds obeys it."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from jsonschema import Draft202012Validator, FormatChecker, ValidationError

from receiver.domain import EventType, JobState
from receiver.ledger.events import SCHEMA_VERSION, EventAsset, EventSubject, build_events
from receiver.onward.schema import event_schema

SCHEMA = event_schema()
VALIDATOR = Draft202012Validator(SCHEMA, format_checker=FormatChecker())


def assert_valid(body: dict[str, Any] | bytes) -> None:
    """Raise with every violation listed (the assertion other tests use on received bodies)."""
    value = json.loads(body) if isinstance(body, bytes) else body
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in VALIDATOR.iter_errors(value)]
    assert not errors, errors


def test_the_schema_is_a_valid_2020_12_schema_for_the_current_version() -> None:
    Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["properties"]["schema_version"] == {"const": SCHEMA_VERSION}
    assert set(SCHEMA["properties"]["type"]["enum"]) == {t.value for t in EventType}


def test_every_event_type_has_an_example_and_every_example_is_valid() -> None:
    for example in SCHEMA["examples"]:
        assert_valid(example)
    assert sorted(e["type"] for e in SCHEMA["examples"]) == sorted(t.value for t in EventType)


NOW = datetime(2026, 12, 6, 10, 0, tzinfo=UTC)


def subject(state: JobState, asset_state: str, **kw: Any) -> EventSubject:
    archived = asset_state in ("archived", "invalid")
    asset = EventAsset(
        n=0,
        name="video",
        state=asset_state,
        key="apex/2026/12/06/j1/0-video.mp4",
        uri="s3://bucket/apex/2026/12/06/j1/0-video.mp4" if archived else None,
        size=10 if archived else None,
        content_type="video/mp4" if archived else None,
        sha256="ab" * 32 if archived else None,
        deadline=NOW + timedelta(hours=3),
        archived_at=NOW if asset_state == "archived" else None,
        error=None if asset_state == "archived" else "why",
    )
    values: dict[str, Any] = {
        "provider": "apex",
        "job_id": "j1",
        "job_type": "video",
        "state": state,
        "metadata": {"order": "A-1"},
        "error": None if state in (JobState.ARCHIVED, JobState.QUEUED) else "why",
        "completed_at": NOW,
        "failed_at": None,
        "credits_refunded": None,
        "assets": (asset,),
    } | kw
    return EventSubject(**values)


@pytest.mark.parametrize(
    ("event_type", "n", "state", "asset_state"),
    [
        (EventType.ASSET_ARCHIVED, 0, JobState.QUEUED, "archived"),
        (EventType.ASSET_INVALID, 0, JobState.QUEUED, "invalid"),
        (EventType.JOB_ARCHIVED, None, JobState.ARCHIVED, "archived"),
        (EventType.JOB_EXPIRED, None, JobState.EXPIRED, "expired"),
        (EventType.JOB_DEAD, None, JobState.DEAD, "dead"),
    ],
)
def test_what_the_ledger_builds_obeys_the_schema(
    event_type: EventType, n: int | None, state: JobState, asset_state: str
) -> None:
    (event,) = build_events(subject(state, asset_state), [(event_type, n)], NOW)
    assert_valid(event.body)


def test_a_failed_job_with_no_outputs_obeys_the_schema() -> None:
    failed = subject(JobState.FAILED, "dead", assets=(), failed_at=NOW, credits_refunded=3)
    (event,) = build_events(failed, [(EventType.JOB_FAILED, None)], NOW)
    assert_valid(event.body)


def test_the_schema_refuses_what_receiver_must_never_send() -> None:
    (event,) = build_events(
        subject(JobState.QUEUED, "archived"), [(EventType.ASSET_ARCHIVED, 0)], NOW
    )
    good = json.loads(event.body)
    # The provider's link is not a field an event can carry; nor is an unknown type or version.
    leaked = copy.deepcopy(good)
    leaked["data"]["asset"]["source_url"] = "https://cdn.example/o.mp4?X-Amz-Signature=s"
    bad_type = copy.deepcopy(good) | {"type": "job.unknown"}
    bad_version = copy.deepcopy(good) | {"schema_version": SCHEMA_VERSION + 1}
    # An asset.* event carries its asset, a job.* event all of them.
    missing = copy.deepcopy(good)
    del missing["data"]["asset"]
    for body in (leaked, bad_type, bad_version, missing):
        with pytest.raises(ValidationError):
            Draft202012Validator(SCHEMA).validate(body)
