"""What the image and CI install (issue 14): pinned, hashed, and nothing secret in the build."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pins(lock: Path) -> dict[str, str]:
    pins = {}
    for line in lock.read_text().splitlines():
        found = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s;\\]+)", line)
        if found:
            pins[re.sub(r"[-_.]+", "-", found.group(1)).lower()] = found.group(2)
    return pins


def _names(requirements: list[str]) -> set[str]:
    return {
        re.sub(r"[-_.]+", "-", re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0]).lower()
        for r in requirements
    }


def test_every_dependency_is_pinned_with_hashes() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = _names(project["dependencies"])
    dev = _names(project["optional-dependencies"]["dev"])
    lock, dev_lock = _pins(ROOT / "requirements.lock"), _pins(ROOT / "requirements-dev.lock")
    assert runtime <= set(lock), f"run `make lock`: {sorted(runtime - set(lock))} not pinned"
    assert runtime | dev <= set(dev_lock), (
        f"run `make lock`: {sorted((runtime | dev) - set(dev_lock))} not pinned"
    )
    for path in ("requirements.lock", "requirements-dev.lock"):
        text = (ROOT / path).read_text()
        assert text.count("==") <= text.count("--hash=sha256:"), f"{path}: pins without hashes"


def test_image_installs_the_lock_and_keeps_state_and_secrets_out() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "--require-hashes -r /src/requirements.lock" in dockerfile
    runtime = dockerfile.split("\nFROM ")[-1]  # the final stage
    assert "wheel" not in runtime.lower()
    assert 'VOLUME ["/var/lib/receiver"]' in runtime
    assert "USER 10001:10001" in runtime
    assert "RECEIVER_LEDGER_URL=sqlite:////var/lib/receiver/receiver.db" in runtime
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {"var/", ".env", ".venv/", ".git/"} <= ignored
