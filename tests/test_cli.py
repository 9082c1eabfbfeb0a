"""The command line as an operator meets it (issue 14): settings files, the ledger guard,
one-line errors, help, tables, --version."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from receiver import settings as settings_module
from receiver.cli import command
from receiver.errors import ConfigurationError
from tests.clirun import RECEIVER, cli, env_without_receiver, fill_ledger, sqlite_settings

pytestmark = pytest.mark.usefixtures("no_receiver_env")


@pytest.fixture
def no_receiver_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("RECEIVER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


# --- --env-file adds to .env ------------------------------------------------------------------


def test_env_file_adds_to_dotenv_and_later_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Path(".env").write_text("RECEIVER_WORKERS=3\nRECEIVER_API_TOKEN=from-dotenv\n")
    first = tmp_path / "first.env"
    first.write_text("RECEIVER_WORKERS=5\nRECEIVER_MAX_ATTEMPTS=2\n")
    second = tmp_path / "second.env"
    second.write_text("RECEIVER_MAX_ATTEMPTS=9\n")

    settings = settings_module.load([first, second])
    assert settings.api_token is not None
    assert settings.api_token.get_secret_value() == "from-dotenv"  # .env still read
    assert settings.workers == 5  # --env-file over .env
    assert settings.max_attempts == 9  # the later file wins
    assert settings_module.sources([first, second])["workers"] == f"--env-file {first}"
    assert settings_module.sources([first, second])["max_attempts"] == f"--env-file {second}"
    assert settings_module.sources([first, second])["api_token"] == ".env"
    assert settings_module.sources([first, second])["lease_seconds"] == "default"

    monkeypatch.setenv("RECEIVER_WORKERS", "7")  # the environment wins over every file
    assert settings_module.load([first, second]).workers == 7
    assert settings_module.sources([first])["workers"] == "environment"


def test_every_env_file_option_is_repeatable_and_goes_through_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    commands = []

    def walk(cmd: object, path: str) -> None:
        for param in getattr(cmd, "params", []):
            if param.name == "env_file":
                commands.append(path)
                assert param.multiple, f"{path}: --env-file must be repeatable"
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(command(), "receiver")
    assert {"receiver serve", "receiver worker", "receiver doctor", "receiver jobs list"} <= set(
        commands
    )

    # Through a real command: .env names the ledger, --env-file the archive; doctor shows both.
    Path(".env").write_text(f"RECEIVER_LEDGER_URL=sqlite:///{tmp_path / 'from-dotenv.db'}\n")
    extra = tmp_path / "extra.env"
    extra.write_text(f"RECEIVER_ARCHIVE_URL=file://{tmp_path / 'from-extra'}\n")
    result = cli(capsys, "doctor", "--json", "--env-file", str(extra))
    rows = {r["variable"]: r for r in __import__("json").loads(result.out)["settings"]}
    assert rows["RECEIVER_LEDGER_URL"]["value"].endswith("from-dotenv.db")
    assert rows["RECEIVER_LEDGER_URL"]["source"] == ".env"
    assert rows["RECEIVER_ARCHIVE_URL"]["value"].endswith("from-extra")
    assert rows["RECEIVER_ARCHIVE_URL"]["source"] == f"--env-file {extra}"


def test_a_missing_env_file_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigurationError, match="no such file"):
        settings_module.load([Path("nope.env")])
    result = cli(capsys, "jobs", "list", "--env-file", "nope.env")
    assert result.code == 2
    assert "--env-file nope.env: no such file" in result.err


def test_rejected_filters_read_as_prose(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    result = cli(capsys, "jobs", "list", "--provider", "nope")
    assert result.code == 2
    assert result.err.startswith("receiver: invalid filter: provider: one of")
    assert "{" not in result.err  # no dict reprs

    settings = sqlite_settings(tmp_path)
    fill_ledger(settings, [])
    monkeypatch.setenv("RECEIVER_LEDGER_URL", settings.ledger_url)
    assert cli(capsys, "jobs", "list").out == "no jobs in the ledger yet\n"
    assert cli(capsys, "jobs", "list", "--state", "dead").out == "no jobs match\n"


def test_invalid_settings_are_one_line_naming_the_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    Path(".env").write_text("RECEIVER_WORKERS=lots\n")
    result = cli(capsys, "jobs", "list")
    assert result.code == 2
    assert "RECEIVER_WORKERS" in result.err
    assert len(result.err.strip().splitlines()) == 1


# --- commands that read the ledger never create one --------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["jobs", "list"],
        ["jobs", "show", "apex/x"],
        ["retry", "apex/x"],
        ["verify"],
        ["track", "flora", "run-1", "--technique", "t"],
    ],
)
def test_ledger_readers_refuse_to_create_a_ledger(
    args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = cli(capsys, *args)
    assert result.code == 2
    assert f"no ledger at {tmp_path / 'var' / 'receiver.db'}" in result.err
    assert "RECEIVER_LEDGER_URL=sqlite:///" in result.err
    assert "--env-file" in result.err
    assert not (tmp_path / "var").exists()


def test_reindex_creates_a_ledger_only_from_manifests(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = cli(capsys, "reindex")  # wrong folder: no archive, nothing to restore
    assert result.code == 2
    assert "no manifests in file://./var/archive, so no ledger was created" in result.err
    assert not (tmp_path / "var" / "receiver.db").exists()


# --- errors: one line with the fix; the traceback only with --debug ---------------------------


def _s3_env(tmp_path: Path, bucket: str) -> Path:
    fill_ledger(sqlite_settings(tmp_path), [])
    env = tmp_path / "s3.env"
    env.write_text(
        f"RECEIVER_LEDGER_URL=sqlite:///{tmp_path / 'receiver.db'}\n"
        f"RECEIVER_ARCHIVE_URL=s3://{bucket}/archive\n"
    )
    return env


def test_missing_bucket_is_one_line_and_debug_shows_the_traceback(
    moto_s3: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = _s3_env(tmp_path, "no-such-bucket-here")
    result = cli(capsys, "reindex", "--env-file", str(env))
    assert result.code == 1
    assert "Traceback" not in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert "does not exist" in result.err
    assert "RECEIVER_ARCHIVE_URL" in result.err

    with pytest.raises(Exception, match="NoSuchBucket"):
        cli(capsys, "--debug", "reindex", "--env-file", str(env))


def test_no_aws_credentials_is_one_line_with_the_fix(
    moto_s3: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = _s3_env(tmp_path, "any-bucket")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    result = cli(capsys, "reindex", "--env-file", str(env))
    assert result.code == 1
    assert result.err.strip().splitlines() == [result.err.strip()]
    assert "no usable AWS credentials" in result.err
    assert "AWS_ACCESS_KEY_ID" in result.err


def test_wrong_aws_credentials_are_one_line_with_the_fix(tmp_path: Path) -> None:
    """moto with authentication on (INITIAL_NO_AUTH_ACTION_COUNT=0) refuses unknown keys."""
    import socket

    from tests.s3server import stop_child, wait_until_serving

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    base = env_without_receiver()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=base | {"INITIAL_NO_AUTH_ACTION_COUNT": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_serving(endpoint, server)  # type: ignore[arg-type]
        env = _s3_env(tmp_path, "some-bucket")
        aws = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG0",
            "AWS_SECRET_ACCESS_KEY": "wrong-secret-key-that-must-not-be-printed",
            "AWS_REGION": "us-east-1",
            "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        done = subprocess.run(
            [RECEIVER, "reindex", "--env-file", str(env)],
            env=base | aws,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        stop_child(server)  # type: ignore[arg-type]
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "AWS rejected the credentials" in done.stderr
    assert "wrong-secret-key" not in done.stderr


# --- help, version, tables ------------------------------------------------------------------


def test_help_texts_are_clean_and_version_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    def paths(cmd: object, prefix: list[str]) -> list[list[str]]:
        found = [prefix]
        for name, sub in getattr(cmd, "commands", {}).items():
            found += paths(sub, [*prefix, name])
        return found

    for args in paths(command(), []):
        result = cli(capsys, *args, "--help")
        assert result.code == 0
        for junk in ("<bool>", "<str>", "<int", "<path>", "list["):
            assert junk not in result.out, f"receiver {' '.join(args)} --help shows {junk}"
    result = cli(capsys, "--version")
    assert result.code == 0
    assert result.out.strip() == "receiver 0.1.0"


def test_job_table_folds_instead_of_truncating_and_counts_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = sqlite_settings(tmp_path)
    ids = [f"00000000-0000-4000-8000-{n:012d}" for n in range(7)]
    fill_ledger(settings, ids)
    monkeypatch.setenv("RECEIVER_LEDGER_URL", settings.ledger_url)
    monkeypatch.setenv("COLUMNS", "80")

    result = cli(capsys, "jobs", "list", "--limit", "3")
    assert result.code == 0, result.err
    assert "…" not in result.out
    shown: list[str] = []  # the job id column, a folded cell's lines joined again
    for line in result.out.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            if cells[0]:
                shown.append("")
            shown[-1] += cells[1]
    assert shown == ids[::-1][:3]  # newest first, every id whole
    assert "showing the newest 3 of 7 jobs" in result.out
    assert "--limit" in result.out

    everything = cli(capsys, "jobs", "list")
    assert everything.out.strip().endswith("7 jobs")
    as_json = cli(capsys, "jobs", "list", "--json", "--limit", "2")
    assert len(__import__("json").loads(as_json.out)) == 2
    assert "of 7 jobs" in as_json.err  # the count goes to stderr, the JSON stays clean


def test_doctor_reports_a_ledger_that_is_not_receivers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE unrelated (x)")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database at all" * 100)
    for path, expected in ((other, "is not receiver's ledger"), (garbage, "not a database")):
        Path(".env").write_text(f"RECEIVER_LEDGER_URL=sqlite:///{path}\n")
        result = cli(capsys, "doctor")
        assert result.code == 1
        line = next(x for x in result.out.splitlines() if " ledger:" in x)
        assert line.lstrip().startswith("FAIL"), line
        assert expected in line
