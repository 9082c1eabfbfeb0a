"""`receiver doctor`: every check passes on a healthy set-up, and each one fails on its own
fault with a line that says what to fix (issue 14)."""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from receiver.simulator import Simulator
from tests.clirun import Result, cli, fill_ledger, sqlite_settings
from tests.payloads import APEX_SECRET, FLIKI_TOKEN
from tests.s3server import admin_client

KEYS = {p: f"doctor-{p}-key" for p in ("apex", "fliki", "flora", "vividflow")}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("RECEIVER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    simulator = Simulator(api_keys=dict(KEYS))
    simulator.start()
    try:
        yield simulator
    finally:
        simulator.stop()


def healthy(tmp_path: Path, sim: Simulator, **changes: str) -> Path:
    """A settings file for a working receiver (ledger made), with `changes` on top."""
    fill_ledger(sqlite_settings(tmp_path), [])
    values = {
        "LEDGER_URL": f"sqlite:///{tmp_path / 'receiver.db'}",
        "ARCHIVE_URL": f"file://{tmp_path / 'archive'}",
        "APEX_WEBHOOK_SECRETS": APEX_SECRET,
        "FLIKI_WEBHOOK_TOKEN": FLIKI_TOKEN,
        "API_TOKEN": "operator-token-do-not-print",
    }
    for name, key in KEYS.items():
        values[f"{name.upper()}_API_KEY"] = key
        values[f"{name.upper()}_BASE_URL"] = sim.base_url(name)
    values.update(changes)
    path = tmp_path / "receiver.env"
    path.write_text("".join(f"RECEIVER_{k}={v}\n" for k, v in values.items() if v is not None))
    return path


def doctor(capsys: pytest.CaptureFixture[str], env: Path) -> tuple[Result, dict[str, Any]]:
    as_json = cli(capsys, "doctor", "--json", "--env-file", str(env))
    report = json.loads(as_json.out)
    plain = cli(capsys, "doctor", "--env-file", str(env))
    assert plain.code == as_json.code
    return plain, report


def check(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in report["checks"] if c["name"] == name)


def test_a_healthy_receiver_passes_every_check_and_no_secret_is_shown(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    plain, report = doctor(capsys, healthy(tmp_path, sim))
    assert plain.code == 0, plain.out
    assert report["ok"] is True
    # Everything configured passes; onward delivery is optional and says it is not set up.
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses.pop("onward") == "skip"
    assert set(statuses.values()) == {"ok"}
    assert "no endpoint configured" in check(report, "onward")["detail"]
    names = [c["name"] for c in report["checks"]]
    assert names == [
        "ledger",
        "queue",
        "store",
        "onward",
        "apex webhooks",
        "fliki webhooks",
        "apex status API",
        "fliki status API",
        "flora status API",
        "vividflow status API",
    ]
    assert "key accepted (HTTP 404" in check(report, "flora status API")["detail"]
    assert "path token" in check(report, "fliki webhooks")["detail"]
    # One line per check in the plain output, and the probe object is gone again.
    lines = plain.out.splitlines()
    assert sum(1 for line in lines if line.startswith("  ok ")) == len(names) - 1
    assert sum(1 for line in lines if line.startswith("  skip ")) == 1
    assert "all checks passed" in plain.out
    assert not any((tmp_path / "archive").rglob("probe-*"))
    # Secrets are masked; where each value came from is shown.
    for secret in (APEX_SECRET, FLIKI_TOKEN, "operator-token-do-not-print", *KEYS.values()):
        assert secret not in plain.out
        assert secret not in json.dumps(report)
    rows = {r["variable"]: r for r in report["settings"]}
    assert rows["RECEIVER_APEX_WEBHOOK_SECRETS"]["value"] == "**** (set)"
    assert rows["RECEIVER_APEX_WEBHOOK_SECRETS"]["source"].startswith("--env-file ")
    assert rows["RECEIVER_WORKERS"] == {
        "variable": "RECEIVER_WORKERS",
        "value": "4",
        "source": "default",
    }


@pytest.mark.parametrize(
    ("changes", "failing", "expected"),
    [
        # ledger: named but missing (never created)
        ({"LEDGER_URL": "sqlite:///{tmp}/elsewhere/receiver.db"}, "ledger", "no ledger at"),
        # queue: an SQS queue beside an SQLite ledger
        ({"QUEUE_URL": "sqs://tasks"}, "queue", "go together"),
        # store: the archive folder would have to live under a file
        ({"ARCHIVE_URL": "file://{tmp}/a-file/archive"}, "store", "not a writable folder"),
        # store: a URL open_store cannot use
        ({"ARCHIVE_URL": "ftp://somewhere/archive"}, "store", "RECEIVER_ARCHIVE_URL: unsupported"),
        # webhooks: neither a secret nor a token
        ({"APEX_WEBHOOK_SECRETS": ""}, "apex webhooks", "RECEIVER_APEX_WEBHOOK_SECRETS"),
        # status API: the provider refuses the key
        ({"FLORA_API_KEY": "wrong"}, "flora status API", "the API key was refused"),
        # status API: nothing answers at the base URL
        ({"APEX_BASE_URL": "http://127.0.0.1:{closed}/apex"}, "apex status API", "unreachable"),
        # polling provider without its base URL (the documented one is a placeholder)
        ({"VIVIDFLOW_BASE_URL": None}, "vividflow status API", "RECEIVER_VIVIDFLOW_BASE_URL"),
    ],
)
def test_each_check_fails_on_its_own_fault(
    changes: dict[str, str | None],
    failing: str,
    expected: str,
    tmp_path: Path,
    sim: Simulator,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    filled: dict[str, Any] = {
        k: (v.format(tmp=tmp_path, closed=closed) if v is not None else None)
        for k, v in changes.items()
    }
    plain, report = doctor(capsys, healthy(tmp_path, sim, **filled))
    assert plain.code == 1
    assert report["ok"] is False
    failed = [c for c in report["checks"] if c["status"] == "FAIL"]
    assert [c["name"] for c in failed] == [failing]
    assert expected in failed[0]["detail"]
    line = next(x for x in plain.out.splitlines() if x.startswith(f"  FAIL {failing}:"))
    assert expected in line
    assert "1 check(s) failed" in plain.out


def test_invalid_settings_fail_the_doctor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = tmp_path / "bad.env"
    env.write_text("RECEIVER_PARTS_IN_FLIGHT=0\n")
    result = cli(capsys, "doctor", "--json", "--env-file", str(env))
    assert result.code == 1
    report = json.loads(result.out)
    assert report["checks"][0]["name"] == "settings"
    assert "RECEIVER_PARTS_IN_FLIGHT" in report["checks"][0]["detail"]


def test_s3_store_probe_is_written_and_deleted(
    moto_s3: str, s3_bucket: str, tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    env = healthy(tmp_path, sim, ARCHIVE_URL=f"s3://{s3_bucket}/archive")
    plain, report = doctor(capsys, env)
    assert plain.code == 0, plain.out
    assert "wrote and deleted _doctor/probe-" in check(report, "store")["detail"]
    assert admin_client().list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0

    missing = healthy(tmp_path, sim, ARCHIVE_URL=f"s3://missing-{uuid.uuid4().hex[:8]}/a")
    plain, report = doctor(capsys, missing)
    assert plain.code == 1
    assert check(report, "store")["status"] == "FAIL"
    assert "does not exist" in check(report, "store")["detail"]


def test_dynamodb_ledger_and_sqs_queue_are_checked(
    moto_s3: str, tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"doctor-{uuid.uuid4().hex[:8]}"
    env = healthy(
        tmp_path,
        sim,
        LEDGER_URL=f"dynamodb://{name}",
        QUEUE_URL=f"sqs://{name}",
        LOCAL_DB=str(tmp_path / "local.db"),
    )
    _, report = doctor(capsys, env)
    assert check(report, "ledger")["status"] == "FAIL"
    assert "DynamoDB table was not found" in check(report, "ledger")["detail"]
    assert check(report, "queue")["status"] == "FAIL"
    assert "SQS queue was not found" in check(report, "queue")["detail"]

    ddb = boto3.client("dynamodb")
    ddb.create_table(
        TableName=name,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    sqs = boto3.client("sqs")
    for queue in (f"{name}-urgent", name, f"{name}-dlq"):
        sqs.create_queue(QueueName=queue)
    plain, report = doctor(capsys, env)
    assert check(report, "ledger")["status"] == "ok", check(report, "ledger")
    assert check(report, "queue")["status"] == "ok", check(report, "queue")
    assert plain.code == 0, plain.out
