"""Real faults against a real `receiver serve` make the series an alert rule reads cross its
threshold on the real `/metrics` (issue 23); the scraped values are then fed to promtool with
the shipped rules, which must fire the alert.

Two faults: the SeaweedFS server holding the archive is stopped (ReceiverStoreDown), and a task
is dead-lettered (ReceiverAssetsDeadLettered: a webhook whose download host no allowlist has)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.clirun import Served, start_serve, stop
from tests.payloads import APEX_TOKEN, apex_completed
from tests.s3server import new_bucket, point_boto3_at, seaweedfs_server
from tests.test_monitoring import RULES, promtool

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith(("RECEIVER_", "OTEL_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def serve(tmp_path: Path, **settings: str) -> Served:
    env = tmp_path / "receiver.env"
    env.write_text(
        f"RECEIVER_APEX_WEBHOOK_TOKEN={APEX_TOKEN}\nRECEIVER_WEBHOOK_PROVIDERS=apex\n"
        + "".join(f"RECEIVER_{k.upper()}={v}\n" for k, v in settings.items())
    )
    return start_serve(tmp_path, "--env-file", str(env))


@pytest.fixture
def served_factory(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    running: list[Served] = []

    def start(**settings: str) -> Served:
        running.append(serve(tmp_path, **settings))
        return running[-1]

    yield start
    for each in running:
        stop(each.child)


def scrape(served: Served, name: str, **labels: str) -> float | None:
    """One sample's value on the process's /metrics (None when it is not there)."""
    text = httpx.get(served.url + "/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def wait_for_sample(
    served: Served, name: str, wanted: Callable[[float | None], bool], timeout: float = 60
) -> float | None:
    deadline = time.monotonic() + timeout
    while True:
        value = scrape(served, name)
        if wanted(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def alert_fires(
    tmp_path: Path, alert: str, series: str, before: float, after: float, at: str
) -> dict[str, Any]:
    """Run the shipped rules in promtool over `series` scraped as `before` for 10 minutes and
    `after` from then on; the alerts active at `at` (promtool's output if the test fails)."""
    labels = {"job": "receiver", "instance": "e2e:8000"}
    selector = series + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": selector, "values": f"{before}x10 {after}x120"}],
                "alert_rule_test": [{"eval_time": "9m", "alertname": alert, "exp_alerts": []}],
            }
        ],
    }
    path = tmp_path / "e2e.test.yml"
    path.write_text(yaml.safe_dump(test))
    quiet = subprocess.run(
        [promtool(), "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert quiet.returncode == 0, f"{alert} fired before the fault:\n{quiet.stdout}"
    # Now expect nothing at `at` either: promtool's failure lists what did fire.
    test["tests"][0]["alert_rule_test"] = [{"eval_time": at, "alertname": alert, "exp_alerts": []}]
    path.write_text(yaml.safe_dump(test))
    fired = subprocess.run(
        [promtool(), "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    return {"fired": fired.returncode != 0, "output": fired.stdout + fired.stderr}


def test_a_stopped_seaweedfs_sets_store_up_to_0_and_fires_store_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, served_factory: Callable[..., Served]
) -> None:
    with seaweedfs_server(tmp_path / "weed") as (endpoint, weed):
        point_boto3_at(monkeypatch, endpoint, variable="AWS_ENDPOINT_URL_S3")
        bucket = new_bucket(endpoint)
        served = served_factory(archive_url=f"s3://{bucket}/archive", workers="1")
        up = scrape(served, "receiver_store_up")
        assert up == 1.0
        weed.terminate()
        weed.wait(timeout=30)
        down = wait_for_sample(served, "receiver_store_up", lambda v: v == 0.0)
        assert down == 0.0
        # /readyz (the load balancer's) stays ready: ingest needs the ledger only.
        assert httpx.get(served.url + "/readyz", timeout=30).status_code == 200
    result = alert_fires(tmp_path, "ReceiverStoreDown", "receiver_store_up", up, down, "17m")
    assert result["fired"], result["output"]
    assert 'alertname="ReceiverStoreDown"' in result["output"]
    assert 'severity="critical"' in result["output"]


def test_a_dead_lettered_task_is_counted_and_fires_the_dead_letter_alert(
    tmp_path: Path, served_factory: Callable[..., Served]
) -> None:
    served = served_factory(archive_url=f"file://{tmp_path / 'archive'}", workers="1")
    name = "receiver_archive_dead_letters_total"
    before = scrape(served, name) or 0.0
    assert before == 0.0
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    # A host on no provider's allowlist: the URL guard refuses it, the task is dead at once.
    payload = apex_completed("e2e-dead", url="https://downloads.not-apex.example/x.png")
    payload["data"]["completedAt"] = payload["timestamp"] = now
    answer = httpx.post(f"{served.url}/webhooks/apex/{APEX_TOKEN}", json=payload, timeout=30)
    assert answer.status_code == 202, answer.text
    after = wait_for_sample(served, name, lambda v: (v or 0) >= 1)
    assert after == 1.0
    assert scrape(served, "receiver_queue_tasks", state="dead") == 1.0
    result = alert_fires(tmp_path, "ReceiverAssetsDeadLettered", name, before, after, "15m")
    assert result["fired"], result["output"]
    assert 'alertname="ReceiverAssetsDeadLettered"' in result["output"]
