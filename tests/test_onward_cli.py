"""`receiver events list | show | replay`, `send-test --endpoint` and doctor's onward checks,
run through the real entry point against a real ledger and a real application endpoint."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.app_endpoint import AppEndpoint
from tests.clirun import cli, fill_ledger, sqlite_settings
from tests.test_onward import NEW, OLD


@pytest.fixture
def env_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, app_endpoint: AppEndpoint
) -> Iterator[Path]:
    import os

    for name in list(os.environ):
        if name.startswith("RECEIVER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "240")  # event ids whole on one line of the tables
    endpoints = json.dumps(
        [
            {"name": "app", "url": app_endpoint.url(), "secrets": [NEW, OLD]},
            {
                "name": "billing",
                "url": app_endpoint.url("/billing"),
                "secrets": [NEW],
                "events": ["job.archived"],
            },
        ]
    )
    path = tmp_path / "onward.env"
    path.write_text(
        f"RECEIVER_LEDGER_URL=sqlite:///{tmp_path / 'receiver.db'}\n"
        f"RECEIVER_ARCHIVE_URL=file://{tmp_path / 'archive'}\n"
        f"RECEIVER_ONWARD_ENDPOINTS='{endpoints}'\n"
    )
    yield path


def fill(tmp_path: Path, env_file: Path, job_ids: list[str]) -> None:
    from receiver import settings as settings_module

    settings = settings_module.load([env_file])
    fill_ledger(sqlite_settings(tmp_path, onward_endpoints=settings.onward_endpoints), job_ids)


def test_list_show_and_replay(
    tmp_path: Path, env_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(tmp_path, env_file, ["a", "b"])
    listed = cli(capsys, "events", "list", "--json", "--env-file", str(env_file))
    assert listed.code == 0, listed.err
    rows = json.loads(listed.out)
    assert [(r["type"], r["job_id"]) for r in rows] == [("job.failed", "b"), ("job.failed", "a")]
    # billing takes job.archived only: each job.failed has one send, to app, pending.
    assert all(
        [(s["endpoint"], s["state"]) for s in r["sends"]] == [("app", "pending")] for r in rows
    )

    table = cli(capsys, "events", "list", "--state", "pending", "--env-file", str(env_file))
    assert table.code == 0 and rows[0]["id"] in table.out and "2 event(s)" in table.out
    none = cli(capsys, "events", "list", "--state", "delivered", "--env-file", str(env_file))
    assert "no events match" in none.out

    shown = cli(capsys, "events", "show", rows[0]["id"], "--json", "--env-file", str(env_file))
    body = json.loads(shown.out)
    assert body["body"]["type"] == "job.failed" and body["body"]["data"]["job_id"] == "b"

    # Mark the sends delivered (as a sender would), then replay one: pending again, same bytes.
    with sqlite3.connect(tmp_path / "receiver.db") as db:
        db.execute("UPDATE event_sends SET state = 'delivered', attempts = 1")
        before = db.execute("SELECT body FROM events WHERE id = ?", (rows[1]["id"],)).fetchone()
    replayed = cli(capsys, "events", "replay", rows[1]["id"], "--env-file", str(env_file))
    assert replayed.code == 0, replayed.err
    assert replayed.out.splitlines() == [rows[1]["id"], "1 event(s) queued to send again"]
    with sqlite3.connect(tmp_path / "receiver.db") as db:
        states = dict(
            db.execute(
                "SELECT e.id, s.state FROM event_sends s JOIN events e ON e.seq = s.event_seq"
            )
        )
        after = db.execute("SELECT body FROM events WHERE id = ?", (rows[1]["id"],)).fetchone()
    assert states == {rows[1]["id"]: "pending", rows[0]["id"]: "delivered"}
    assert before == after

    window = cli(
        capsys,
        "events",
        "replay",
        "--since",
        "2000-01-01T00:00:00Z",
        "--endpoint",
        "billing",
        "--env-file",
        str(env_file),
    )
    assert window.code == 0 and "2 event(s) queued" in window.out


def test_bad_input_is_named(
    tmp_path: Path, env_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(tmp_path, env_file, ["a"])
    bad = cli(capsys, "events", "list", "--state", "lost", "--env-file", str(env_file))
    assert bad.code != 0 and "state" in bad.err and "pending" in bad.err
    unnamed = cli(capsys, "events", "replay", "--env-file", str(env_file))
    assert unnamed.code != 0 and "--since" in unnamed.err
    unknown = cli(
        capsys,
        "events",
        "replay",
        "--since",
        "2000-01-01",
        "--endpoint",
        "nope",
        "--env-file",
        str(env_file),
    )
    assert unknown.code != 0 and "nope" in unknown.err
    missing = cli(
        capsys, "events", "show", "evt_01ARZ3NDEKTSV4RRFFQ69G5FAV", "--env-file", str(env_file)
    )
    assert missing.code != 0 and "no event" in missing.err
    # Nothing was replayed by any of them.
    with sqlite3.connect(tmp_path / "receiver.db") as db:
        assert db.execute("SELECT state, attempts FROM event_sends").fetchall() == [("pending", 0)]


def test_send_test_to_an_endpoint_is_signed_and_verifiable(
    tmp_path: Path, env_file: Path, app_endpoint: AppEndpoint, capsys: pytest.CaptureFixture[str]
) -> None:
    sent = cli(
        capsys,
        "send-test",
        "--endpoint",
        "app",
        "--event",
        "asset.archived",
        "--env-file",
        str(env_file),
    )
    assert sent.code == 0, sent.err
    [received] = app_endpoint.received
    assert received.verify(OLD)["type"] == "asset.archived"
    assert received.payload()["data"]["metadata"]["test"] is True
    assert received.event_id in sent.out and "HTTP 204" in sent.out

    app_endpoint.default = (410, {}, 0.0)
    refused = cli(capsys, "send-test", "--endpoint", "app", "--env-file", str(env_file))
    assert refused.code == 1 and "HTTP 410" in refused.out and "failed" in refused.out


def test_doctor_reports_a_failing_endpoint(
    tmp_path: Path, env_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(tmp_path, env_file, ["a"])
    healthy = cli(capsys, "doctor", "--json", "--env-file", str(env_file))
    checks = {c["name"]: c for c in json.loads(healthy.out)["checks"]}
    assert checks["onward app"]["ok"] is True
    # The endpoints' secrets (inside RECEIVER_ONWARD_ENDPOINTS) are masked like any secret.
    assert NEW[6:] not in healthy.out and OLD[6:] not in healthy.out
    with sqlite3.connect(tmp_path / "receiver.db") as db:
        db.execute(
            "INSERT INTO endpoints (name, consecutive_failures, last_attempt_at, last_error) "
            "VALUES ('app', 5, 0, 'HTTP 503')"
        )
    failing = cli(capsys, "doctor", "--json", "--env-file", str(env_file))
    assert failing.code == 1
    checks = {c["name"]: c for c in json.loads(failing.out)["checks"]}
    assert checks["onward app"]["ok"] is False and "HTTP 503" in checks["onward app"]["detail"]
    assert checks["onward billing"]["ok"] is True
