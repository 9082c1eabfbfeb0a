"""The state machine and deadline arithmetic (pure; no I/O, no clock)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from receiver.domain import (
    MANIFEST_TASK,
    Decision,
    DeliveryOutcome,
    EventKind,
    JobEvent,
    JobState,
    ManifestWork,
    Output,
    archive_key,
    completion_time,
    compute_deadline,
    decide,
    manifest_work,
    output_name,
    settle,
    settled_error,
    signed_url_expiry,
)

URL = "https://cdn.useapexstudio.com/o/a.png"
T0 = datetime(2026, 3, 16, 12, 0, tzinfo=UTC)


def event(kind: EventKind, url: str = URL) -> JobEvent:
    outputs = (Output(url, "a.png"),) if kind is EventKind.COMPLETED else ()
    return JobEvent(provider="apex", job_id="j", kind=kind, outputs=outputs)


C, F, P = EventKind.COMPLETED, EventKind.FAILED, EventKind.PROGRESS
S = JobState
D = DeliveryOutcome


@pytest.mark.parametrize(
    ("current", "urls", "kind", "url", "expected"),
    [
        (None, (), C, URL, (D.ACCEPTED, S.QUEUED, True, False)),
        (None, (), F, URL, (D.ACCEPTED, S.FAILED, False, False)),
        (None, (), P, URL, (D.ACCEPTED, S.PROCESSING, False, False)),
        (S.TRACKING, (), C, URL, (D.ACCEPTED, S.QUEUED, True, False)),
        (S.PROCESSING, (), F, URL, (D.ACCEPTED, S.FAILED, False, False)),
        (S.QUEUED, (URL,), C, URL, (D.DUPLICATE, S.QUEUED, False, False)),
        (S.QUEUED, (URL,), C, URL + "?v=2", (D.REFRESHED, S.QUEUED, False, True)),
        (S.ARCHIVED, (URL,), C, URL, (D.DUPLICATE, S.ARCHIVED, False, False)),
        (S.ARCHIVED, (URL,), C, URL + "?v=2", (D.IGNORED, S.ARCHIVED, False, False)),
        (S.EXPIRED, (URL,), C, URL + "?v=2", (D.IGNORED, S.EXPIRED, False, False)),
        (S.QUEUED, (URL,), F, URL, (D.IGNORED, S.QUEUED, False, False)),
        (S.ARCHIVED, (URL,), F, URL, (D.IGNORED, S.ARCHIVED, False, False)),
        (S.FAILED, (), F, URL, (D.DUPLICATE, S.FAILED, False, False)),
        (S.FAILED, (), C, URL, (D.ACCEPTED, S.QUEUED, True, False)),
        (S.QUEUED, (URL,), P, URL, (D.IGNORED, S.QUEUED, False, False)),
        (S.FAILED, (), P, URL, (D.IGNORED, S.FAILED, False, False)),
    ],
)
def test_state_machine(
    current: JobState | None,
    urls: tuple[str, ...],
    kind: EventKind,
    url: str,
    expected: tuple[DeliveryOutcome, JobState, bool, bool],
) -> None:
    d = decide(current, urls, event(kind, url), seen_id=False)
    assert (d.outcome, d.state, d.queue_outputs, d.refresh_outputs) == expected


def test_a_replayed_delivery_id_is_a_duplicate_whatever_it_says() -> None:
    d = decide(S.QUEUED, (URL,), event(C, URL + "?other"), seen_id=True)
    assert (d.outcome, d.queue_outputs, d.refresh_outputs) == (D.DUPLICATE, False, False)


def test_sigv4_expiry() -> None:
    url = "https://a.r2.cloudflarestorage.com/x?X-Amz-Date=20260316T120000Z&X-Amz-Expires=86400"
    assert signed_url_expiry(url) == T0 + timedelta(days=1)


def test_google_expiry_case_insensitive() -> None:
    url = "https://storage.googleapis.com/b/v.mp4?x-goog-date=20260316T120000Z&x-goog-expires=900"
    assert signed_url_expiry(url) == T0 + timedelta(minutes=15)


def test_cloudfront_expires() -> None:
    url = f"https://d1.cloudfront.net/v.mp4?Expires={int(T0.timestamp())}&Signature=x&Key-Pair-Id=K"
    assert signed_url_expiry(url) == T0


@pytest.mark.parametrize(
    "url",
    [
        "https://cdn.useapexstudio.com/o/a.png",
        "https://x/y?X-Amz-Date=garbage&X-Amz-Expires=10",
        "https://x/y?X-Amz-Date=20260316T120000Z&X-Amz-Expires=ten",
        "https://x/y?Expires=soon",
        "https://x/y?Expires=99999999999999999999",
    ],
)
def test_urls_without_a_usable_expiry(url: str) -> None:
    assert signed_url_expiry(url) is None


def test_deadline_is_the_earlier_of_window_and_signed_expiry_minus_margin() -> None:
    signed = "https://x/y?X-Amz-Date=20260316T120000Z&X-Amz-Expires=3600"
    margin = timedelta(minutes=10)
    window = timedelta(hours=24)
    assert compute_deadline(window=window, window_start=T0, url=signed, margin=margin) == (
        T0 + timedelta(minutes=50)
    )
    assert compute_deadline(window=window, window_start=T0, url=URL, margin=margin) == (
        T0 + timedelta(hours=23, minutes=50)
    )
    fliki = compute_deadline(window=timedelta(hours=3), window_start=T0, url=URL, margin=margin)
    assert fliki == T0 + timedelta(hours=2, minutes=50)


def test_keys_are_deterministic_and_safe() -> None:
    key = archive_key(
        prefix="arch/", provider="apex", job_id="a/../b", completed_at=T0, name="o.png"
    )
    assert key == "arch/apex/2026/03/16/a%2F..%2Fb/o.png"
    keys = {
        archive_key(prefix="", provider="p", job_id=j, completed_at=T0, name="o")
        for j in ("a/b", "a:b", "a_b", "..", ".", "出力")
    }
    assert len(keys) == 6
    assert all(k.isascii() and "/../" not in k and "/./" not in k for k in keys)
    assert archive_key(prefix="", provider="fliki", job_id="f", completed_at=T0, name="v.mp4") == (
        "fliki/2026/03/16/f/v.mp4"
    )


def test_output_names() -> None:
    assert output_name("https://x/outputs/550e/output.png?sig=1", 0, None) == "output.png"
    assert output_name("https://x/", 2, "video/mp4") == "output-2.mp4"
    assert output_name("https://x/..%2F..", 0, None) == "2F.."
    assert output_name("https://x/../", 1, None) == "output-1"


@pytest.mark.parametrize(
    "job_id",
    ["x" * 256, "出" * 128, "%" * 128, "a" * 199 + "é", "ok-id"],
)
@pytest.mark.parametrize("name", ["v.mp4", "x" * 300 + ".mp4", "出" * 128 + ".png", "a.meta.json"])
def test_keys_always_fit_every_store(job_id: str, name: str) -> None:
    from receiver.domain import MAX_KEY_BYTES, fit_name

    key = archive_key(prefix="p", provider="apex", job_id=job_id, completed_at=T0, name=name)
    assert key == archive_key(
        prefix="p", provider="apex", job_id=job_id, completed_at=T0, name=name
    )
    assert len(key.encode()) <= MAX_KEY_BYTES
    assert all(0 < len(seg.encode()) <= 255 for seg in key.split("/"))
    last = key.rsplit("/", 1)[1]
    assert not last.endswith(".meta.json") and last == fit_name(name)
    if len(name) < 100 and not name.endswith(".meta.json"):
        assert last == name  # short, ordinary names are kept as they are
    if name.endswith(".mp4"):
        assert last.endswith(".mp4")  # the extension survives the shortening


def test_long_ids_keep_a_readable_prefix_and_stay_distinct() -> None:
    a = archive_key(prefix="", provider="apex", job_id="x" * 300, completed_at=T0, name="o")
    b = archive_key(prefix="", provider="apex", job_id="x" * 301, completed_at=T0, name="o")
    assert a != b
    assert a.split("/")[4].startswith("x" * 100) and "~" in a.split("/")[4]
    # No percent escape is cut in half by the shortening.
    c = archive_key(prefix="", provider="apex", job_id="é" * 200, completed_at=T0, name="o")
    segment = c.split("/")[4]
    assert re.fullmatch(r"(%[0-9A-F]{2})+~[0-9a-f]{16}", segment), segment


@pytest.mark.parametrize(
    ("name", "fitted"),
    [("a.meta.json", "a.meta_json"), ("manifest.json", "manifest_json"), (".hidden", "hidden")],
)
def test_reserved_names_are_renamed(name: str, fitted: str) -> None:
    from receiver.domain import fit_name

    assert fit_name(name) == fitted
    assert output_name(f"https://x/{name}", 0, None) == fitted


@pytest.mark.anyio
async def test_long_and_odd_keys_are_accepted_by_the_local_store(tmp_path: Any) -> None:
    from receiver.store.local import LocalStore

    store = LocalStore(tmp_path)
    for job_id in ("x" * 256, "出" * 128):
        key = archive_key(
            prefix="",
            provider="apex",
            job_id=job_id,
            completed_at=T0,
            name="y" * 300 + ".meta.json",
        )
        stored = await store.put_bytes(key, b"data", content_type="text/plain")
        assert stored.size == 4


# --- the job-state rules both ledgers apply ---------------------------------------------------


@pytest.mark.parametrize(
    ("current", "assets", "expected"),
    [
        (JobState.QUEUED, ["archived", "archived"], JobState.ARCHIVED),
        (JobState.QUEUED, ["archived", "pending"], None),
        (JobState.QUEUED, ["archived", "expired", "dead"], JobState.EXPIRED),
        (JobState.QUEUED, ["archived", "dead"], JobState.DEAD),
        (JobState.ARCHIVED, ["archived"], None),  # already ended: never moved again
        (JobState.DEAD, ["archived"], None),
    ],
)
def test_settle(current: JobState, assets: list[str], expected: JobState | None) -> None:
    assert settle(current, assets) is expected


def test_settled_error_keeps_the_previous_one_when_no_asset_has_one() -> None:
    assert settled_error(["a", None, "b"], "old") == "a; b"
    assert settled_error([None], "old") == "old"
    assert settled_error([], None) is None


def _decision(current: JobState | None, kind: EventKind, urls: tuple[str, ...] = ()) -> Decision:
    outputs = (Output("https://x/y.mp4", "y.mp4"),) if kind is EventKind.COMPLETED else ()
    return decide(current, urls, JobEvent("apex", "j", kind, outputs=outputs), seen_id=False)


def test_manifest_work_per_state() -> None:
    # A job that just failed gets a new manifest-only task.
    failed = _decision(JobState.PROCESSING, EventKind.FAILED)
    assert manifest_work(JobState.PROCESSING, failed) == ManifestWork(MANIFEST_TASK, new=True)
    # Later news for an ended job hands its manifest task back.
    late = _decision(JobState.ARCHIVED, EventKind.FAILED)
    assert manifest_work(JobState.ARCHIVED, late) == ManifestWork(0, new=False)
    dup = _decision(JobState.FAILED, EventKind.FAILED)
    assert manifest_work(JobState.FAILED, dup) == ManifestWork(MANIFEST_TASK, new=False)
    # A completion after a failure queues outputs, which write their manifest when copied.
    revived = _decision(JobState.FAILED, EventKind.COMPLETED)
    assert revived.queue_outputs and manifest_work(JobState.FAILED, revived) is None
    # Nothing for a job still in flight.
    assert manifest_work(None, _decision(None, EventKind.COMPLETED)) is None


def test_completion_time_falls_back_to_the_receipt() -> None:
    at = datetime(2026, 3, 1, tzinfo=UTC)
    done = datetime(2026, 2, 28, tzinfo=UTC)
    assert completion_time(JobEvent("fliki", "j", EventKind.COMPLETED), at) == at
    assert (
        completion_time(JobEvent("apex", "j", EventKind.COMPLETED, completed_at=done), at) == done
    )
