"""`make demo` / `receiver demo`: receiver and the simulator side by side, one job of every kind.

Starts the simulator and a receiver configured to talk only to it, runs DEMO_CASES (polling,
webhooks, a lost webhook recovered by polling, a provider failure) and prints where each asset
landed.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx

from receiver.simulator.server import PROVIDERS, Faults, ServerThread, Simulator


@dataclass(frozen=True)
class DemoCase:
    provider: str
    job_id: str
    story: str
    expect: str  # the job's final state
    register: bool  # POST /jobs (polling or reconciliation)
    outputs: list[tuple[int, str]] = field(default_factory=list)
    fail: str | None = None
    webhook: bool = True


DEMO_CASES = (
    DemoCase(
        "flora",
        "run-character-lock",
        "no webhooks: polled; 3 outputs -> 3 assets",
        "archived",
        True,
        [(300_000, "image/png"), (400_000, "image/png"), (2_000_000, "video/mp4")],
    ),
    DemoCase(
        "vividflow",
        "vf-video",
        "status endpoint only: polled",
        "archived",
        True,
        [(3_000_000, "video/mp4")],
    ),
    DemoCase(
        "vividflow", "vf-broken", "provider failure, recorded", "failed", True, fail="no results"
    ),
    DemoCase("apex", "apex-image", "signed webhook", "archived", False, [(500_000, "image/png")]),
    DemoCase(
        "apex",
        "apex-lost-webhook",
        "webhook lost: recovered by polling after the grace period",
        "archived",
        True,
        [(4_000_000, "video/mp4")],
        webhook=False,
    ),
    DemoCase(
        "fliki",
        "fliki-video",
        "tracked, but the webhook came first: no poll needed",
        "archived",
        True,
        [(2_500_000, "video/mp4")],
    ),
)

FINAL = ("archived", "failed", "expired", "dead")


def demo_settings(workdir: Any, sim: Simulator, **overrides: Any) -> Any:
    """Receiver settings pointing at the simulator: local links allowed, short poll cadence."""
    import base64

    from receiver.settings import Settings

    values: dict[str, Any] = {
        "ledger_url": f"sqlite:///{workdir / 'receiver.db'}",
        "archive_url": f"file://{workdir / 'archive'}",
        "api_token": secrets.token_urlsafe(16),
        "fetch_allow_http": True,
        "fetch_allow_networks": "127.0.0.0/8",
        "poll_grace_seconds": 1.0,
        "poll_base_seconds": 0.3,
        "poll_cap_seconds": 2.0,
        "log_format": "console",
        "log_level": "error",
        "workers": 4,
    }
    for provider in PROVIDERS:
        values[f"{provider}_api_key"] = sim.api_keys[provider]
        values[f"{provider}_base_url"] = sim.base_url(provider)
        values[f"{provider}_download_hosts"] = "127.0.0.1"
    for provider in ("apex", "fliki"):
        secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        sim.webhook_secrets[provider] = secret
        values[f"{provider}_webhook_secrets"] = secret
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def run_demo(
    workdir: Any,
    *,
    retry_scale: float = 100.0,
    timeout: float = 60.0,
    faults: Faults | None = None,
    echo: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Start receiver and the simulator, run DEMO_CASES, print where each asset landed."""
    from pathlib import Path

    from receiver.app import build_parts, create_app
    from receiver.backends.sqlite import Database
    from receiver.ledger.sqlite import read_job

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    sim = Simulator(retry_scale=retry_scale, faults=faults)
    sim.bind()
    settings = demo_settings(workdir, sim)
    parts = build_parts(settings)
    receiver = ServerThread(create_app(parts, workers=settings.workers))
    sim.receiver_url = receiver.url
    started = time.monotonic()
    receiver.start()
    sim.start()
    results: list[dict[str, Any]] = []
    try:
        echo(f"receiver on {receiver.url}, provider simulator on http://127.0.0.1:{sim.port}")
        token = settings.api_token.get_secret_value()
        with httpx.Client(base_url=receiver.url, timeout=10) as http:
            for case in DEMO_CASES:
                sim.add_job(
                    case.provider,
                    case.job_id,
                    outputs=case.outputs or None,
                    after=0.5,
                    fail=case.fail,
                    webhook=case.webhook,
                )
                if case.register:
                    body: dict[str, Any] = {
                        "provider": case.provider,
                        "job_id": case.job_id,
                        "metadata": {"demo": True},
                    }
                    if case.provider == "flora":
                        body["technique"] = "character-lock"
                    response = http.post(
                        "/jobs", json=body, headers={"Authorization": f"Bearer {token}"}
                    )
                    response.raise_for_status()
        db = Database(settings.sqlite_path)
        deadline = time.monotonic() + timeout
        while True:
            jobs = {
                c.job_id: db.read_sync(partial(read_job, provider=c.provider, job_id=c.job_id))
                for c in DEMO_CASES
            }
            if all(j is not None and j.state.value in FINAL for j in jobs.values()):
                break
            if time.monotonic() > deadline:
                echo("timed out waiting for the jobs to settle")
                break
            time.sleep(0.1)
        elapsed = time.monotonic() - started
        for case in DEMO_CASES:
            job = jobs[case.job_id]
            state = job.state.value if job else "missing"
            sources = [f"{d.source}:{d.outcome}" for d in job.deliveries] if job else []
            results.append(
                {
                    "provider": case.provider,
                    "job_id": case.job_id,
                    "state": state,
                    "expected": case.expect,
                    "deliveries": sources,
                    "assets": [
                        {"uri": a.uri, "size": a.size, "sha256": a.sha256, "state": a.state}
                        for a in (job.assets if job else [])
                    ],
                    "error": job.error if job else None,
                }
            )
            mark = "ok" if state == case.expect else "UNEXPECTED"
            echo(f"\n[{mark}] {case.provider}/{case.job_id}: {state} -- {case.story}")
            echo(f"    deliveries: {', '.join(sources) or 'none'}")
            for asset in results[-1]["assets"]:
                echo(
                    f"    {asset['uri']}  ({asset['size']} bytes, sha256 "
                    f"{(asset['sha256'] or '')[:16]}...)"
                )
            if results[-1]["error"]:
                echo(f"    error: {results[-1]['error']}")
        good = sum(r["state"] == r["expected"] for r in results)
        echo(
            f"\n{good}/{len(results)} jobs ended as expected in {elapsed:.1f} s; "
            f"archive: {workdir / 'archive'}"
        )
        return results
    finally:
        sim.stop()
        receiver.stop()
