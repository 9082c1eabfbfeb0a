"""An operator's first hour against real processes (issue 14): `receiver serve` says where it
listens, `receiver send-test` gets a callback through it, and the README's simulator recipe
works as written."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.clirun import (
    RECEIVER,
    Served,
    cli,
    env_without_receiver,
    free_port,
    start_serve,
    stop,
)
from tests.payloads import APEX_SECRET, APEX_TOKEN, FLIKI_TOKEN


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("RECEIVER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    env = tmp_path / "receiver.env"
    env.write_text(
        f"RECEIVER_APEX_WEBHOOK_SECRETS={APEX_SECRET}\n"
        f"RECEIVER_APEX_WEBHOOK_TOKEN={APEX_TOKEN}\n"
        f"RECEIVER_FLIKI_WEBHOOK_TOKEN={FLIKI_TOKEN}\n"
        "RECEIVER_WORKERS=0\n"
    )
    running = start_serve(tmp_path, "--env-file", str(env))
    try:
        yield running
    finally:
        stop(running.child)


def test_serve_logs_where_it_listens_without_tokens(served: Served) -> None:
    line = served.listening
    assert line["url"].startswith("http://127.0.0.1:")
    assert line["webhooks"] == [
        f"{served.url}/webhooks/apex",
        f"{served.url}/webhooks/apex/<RECEIVER_APEX_WEBHOOK_TOKEN>",
        f"{served.url}/webhooks/fliki/<RECEIVER_FLIKI_WEBHOOK_TOKEN>",
    ]
    logged = "".join(served.stderr)
    for token in (APEX_TOKEN, FLIKI_TOKEN, APEX_SECRET):
        assert token not in logged


def test_send_test_gets_an_authenticated_callback_recorded(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = str(tmp_path / "receiver.env")
    recorded = []
    for args, auth in (
        (["apex"], "signature"),
        (["apex", "--token"], "token"),
        (["fliki"], "token"),
    ):
        result = cli(capsys, "send-test", *args, "--url", served.url, "--env-file", env)
        assert result.code == 0, result.out + result.err
        assert "HTTP 202" in result.out
        assert '"status":"accepted"' in result.out.replace(" ", "")
        for secret in (APEX_TOKEN, FLIKI_TOKEN):
            assert secret not in result.out
        job = result.out.split(", job ", 1)[1].split()[0]
        recorded.append((job, auth))
    for job, auth in recorded:
        shown = cli(capsys, "jobs", "show", job, "--json", "--env-file", env)
        assert shown.code == 0, shown.err
        body = json.loads(shown.out)
        assert body["state"] == "failed"
        assert [d["authentication"] for d in body["deliveries"]] == [auth]


def test_send_test_reports_a_refusal_and_an_unreachable_receiver(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = tmp_path / "wrong.env"
    wrong.write_text("RECEIVER_APEX_WEBHOOK_SECRETS=whsec_" + "d3JvbmctYnV0LWxvbmctZW5vdWdoLTAx\n")
    refused = cli(capsys, "send-test", "apex", "--url", served.url, "--env-file", str(wrong))
    assert refused.code == 1
    assert "HTTP 401" in refused.out

    nobody = f"http://127.0.0.1:{free_port()}"
    env = str(tmp_path / "receiver.env")
    unreachable = cli(capsys, "send-test", "apex", "--url", nobody, "--env-file", env)
    assert unreachable.code == 1
    assert f"cannot reach {nobody}" in unreachable.err
    assert len(unreachable.err.strip().splitlines()) == 1

    unsigned = cli(capsys, "send-test", "apex", "--url", served.url)
    assert unsigned.code == 2
    assert "RECEIVER_APEX_WEBHOOK_SECRETS" in unsigned.err
    polled = cli(capsys, "send-test", "flora", "--url", served.url, "--env-file", env)
    assert polled.code == 2
    assert "no webhooks" in polled.err


def test_the_readme_simulator_recipe_archives_jobs(tmp_path: Path) -> None:
    """README "Demo": simulate --write-env, then make run ENV_FILE=... (serve with both files),
    then add jobs to the simulator and track the FLORA one."""
    env = env_without_receiver()
    receiver_port, sim_port = free_port(), free_port()
    subprocess.run([RECEIVER, "dev-env", "var/dev.env"], cwd=tmp_path, env=env, check=True)
    sim = subprocess.Popen(
        [
            RECEIVER,
            "simulate",
            "--port",
            str(sim_port),
            "--receiver-url",
            f"http://127.0.0.1:{receiver_port}",
            "--write-env",
            "var/simulator.env",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    served = None
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "var/simulator.env").exists():
            assert time.monotonic() < deadline, "simulate wrote no settings"
            assert sim.poll() is None, sim.communicate()[0]
            time.sleep(0.05)
        written = (tmp_path / "var/simulator.env").read_text()
        for provider in ("APEX", "FLIKI", "FLORA", "VIVIDFLOW"):  # never a real provider
            assert f"RECEIVER_{provider}_BASE_URL=http://127.0.0.1:{sim_port}/" in written
        assert oct((tmp_path / "var/simulator.env").stat().st_mode & 0o777) == "0o600"

        # `make run ENV_FILE=var/simulator.env`
        served = start_serve(
            tmp_path,
            "--env-file",
            "var/dev.env",
            "--env-file",
            "var/simulator.env",
            "--host",
            "127.0.0.1",
            port=receiver_port,
        )
        jobs = f"http://127.0.0.1:{sim_port}/_sim/jobs"
        curl = {"content-type": "application/x-www-form-urlencoded"}  # what `curl -d` sends
        flora_job = b'{"provider": "flora", "outputs": [{"size": 1000000}]}'
        flora = httpx.post(jobs, content=flora_job, headers=curl)
        assert flora.status_code == 201
        apex = httpx.post(jobs, content=b'{"provider": "apex"}', headers=curl)
        assert apex.status_code == 201
        run_id = flora.json()["job_id"]
        tracked = subprocess.run(
            [
                *(RECEIVER, "track", "flora", run_id, "--technique", "character-lock"),
                *("--env-file", "var/dev.env", "--env-file", "var/simulator.env"),
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert tracked.returncode == 0, tracked.stderr

        wanted = {f"flora/{run_id}", f"apex/{apex.json()['job_id']}"}
        states: dict[str, str] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            listed = subprocess.run(
                [RECEIVER, "jobs", "list", "--json", "--env-file", "var/dev.env"],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            states = {
                f"{j['provider']}/{j['job_id']}": j["state"] for j in json.loads(listed.stdout)
            }
            if all(states.get(job) == "archived" for job in wanted):
                break
            time.sleep(0.5)
        assert {job: states.get(job) for job in wanted} == dict.fromkeys(wanted, "archived")
    finally:
        if served is not None:
            stop(served.child)
        stop(sim)
