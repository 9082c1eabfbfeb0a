"""The demo end to end: real receiver (uvicorn) and the simulator, all four providers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from receiver import logs
from receiver.cli import app as cli
from receiver.simulator import DEMO_CASES, Faults, content_sha256, run_demo


def check(results: list[dict[str, object]], workdir: Path) -> None:
    assert [(r["job_id"], r["state"]) for r in results] == [
        (c.job_id, c.expect) for c in DEMO_CASES
    ]
    for case, result in zip(DEMO_CASES, results, strict=True):
        assets = result["assets"]
        assert isinstance(assets, list)
        assert len(assets) == (0 if case.fail else len(case.outputs))
        for n, asset in enumerate(assets):
            seed = f"{case.provider}:{case.job_id}:{n}"
            assert asset["sha256"] == content_sha256(seed, case.outputs[n][0])
            path = Path(asset["uri"][len("file://") :])
            assert path.is_relative_to(workdir)
            assert hashlib.sha256(path.read_bytes()).hexdigest() == asset["sha256"]
    by_id = {r["job_id"]: r for r in results}
    # The lost Apex webhook was recovered by a poll; Fliki's webhook beat its poll.
    assert by_id["apex-lost-webhook"]["deliveries"] == ["poll:accepted"]
    assert by_id["fliki-video"]["deliveries"][0] == "webhook:accepted"


def test_demo_archives_every_provider(tmp_path: Path) -> None:
    lines: list[str] = []
    results = run_demo(tmp_path, echo=lines.append, timeout=30)
    check(results, tmp_path)
    assert (
        lines[-1].strip().startswith(f"{len(DEMO_CASES)}/{len(DEMO_CASES)} jobs ended as expected")
    )


def test_demo_survives_rate_limits_server_errors_and_dropped_downloads(tmp_path: Path) -> None:
    faults = Faults(status_429_every=3, status_5xx_every=5, drop_every=2, retry_after=1)
    results = run_demo(tmp_path, echo=lambda line: None, timeout=30, faults=faults)
    check(results, tmp_path)


def test_demo_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Configuring structlog caches loggers process-wide; other tests capture logs.
    monkeypatch.setattr(logs, "configure", lambda *args: None)
    result = CliRunner().invoke(cli, ["demo", "--workdir", str(tmp_path / "d"), "--timeout", "30"])
    assert result.exit_code == 0, result.output
    assert "jobs ended as expected" in result.output
