"""The monitoring that ships with receiver (issue 23): the Prometheus rules pass promtool's check
and its unit tests, every alert says what to do, and every query in the rules and the Grafana
dashboard names a series receiver exports (or a rule records).

promtool comes from Debian's prometheus package (`make test` installs it); without it these
tests fail, never skip."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from receiver.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "receiver.rules.yml"
RULE_TESTS = ROOT / "tests" / "prometheus" / "receiver.rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "receiver.json"

# PromQL words that are not series names: operators, modifiers, aggregations (which may be
# followed by their `by (...)` clause rather than a parenthesis).
_KEYWORDS = {
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "inf",
    "nan",
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_NAME = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?")


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, (
        "promtool is missing: install Debian's prometheus package "
        "(`make test` does it as root: `make promtool`)"
    )
    return found


def series_names(expr: str) -> set[str]:
    """The series names a PromQL expression reads (functions, keywords and labels left out)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _LABEL_LIST.sub(r"\1", text)
    return {
        m.group(1)
        for m in _NAME.finditer(text)
        if not m.group(2) and m.group(1).lower() not in _KEYWORDS
    }


def test_the_tokenizer_finds_series_names_only() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, provider) (rate(receiver_x_bucket{job=~"$job",'
        'le="+Inf"}[$__rate_interval]))) > on (job) group_left (provider) receiver:y:rate5m '
        'offset 5m unless max without (instance) (up{code="a b"}) - time() > bool 1e3'
    )
    assert series_names(expr) == {"receiver_x_bucket", "receiver:y:rate5m", "up"}


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES.read_text())["groups"]
    return groups


def all_rules() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"]]


def exported() -> set[str]:
    """What receiver exports, plus what the rules record (dashboards may read those)."""
    recorded = {rule["record"] for rule in all_rules() if "record" in rule}
    return Metrics().metric_names() | recorded


def test_promtool_check_rules() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(all_rules())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", str(RULE_TESTS)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=RULE_TESTS.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_an_alert_reads_records_made_earlier_in_its_own_group() -> None:
    """Groups are evaluated independently (and concurrently in promtool): an alert reading a
    record of another group sees the previous evaluation's value, a minute stale and racy."""
    for group in rule_groups():
        made: set[str] = set()
        for rule in group["rules"]:
            if "record" in rule:
                made.add(rule["record"])
                continue
            read = {name for name in series_names(rule["expr"]) if ":" in name}
            assert read <= made, f"{rule['alert']} reads {read - made} from another group"


def test_every_alert_has_a_severity_a_summary_and_a_description() -> None:
    alerts = [rule for rule in all_rules() if "alert" in rule]
    assert len(alerts) >= 15
    for rule in alerts:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        # "says what to do": long enough to name an action, not just restate the summary.
        assert len(rule["annotations"]["description"]) > 120, rule["alert"]
    names = [rule["alert"] for rule in alerts]
    assert len(names) == len(set(names)), "one place for each rule"


def test_every_rule_has_a_unit_test_that_fires_it() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {
        case["alertname"]
        for group in tests
        for case in group.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    silent = {
        case["alertname"]
        for group in tests
        for case in group.get("alert_rule_test", [])
        if not case["exp_alerts"]
    }
    recorded = {case["expr"] for group in tests for case in group.get("promql_expr_test", [])}
    for rule in all_rules():
        if "alert" in rule:
            assert rule["alert"] in fired, f"{rule['alert']}: no test shows it firing"
            assert rule["alert"] in silent, f"{rule['alert']}: no test shows it silent"
        else:
            assert rule["record"] in recorded, f"{rule['record']}: no test of its value"


def test_every_rule_expression_names_an_exported_series() -> None:
    known = exported()
    for rule in all_rules():
        names = series_names(rule["expr"])
        assert names, rule
        unknown = names - known
        assert not unknown, f"{rule.get('alert') or rule.get('record')}: {sorted(unknown)}"


def test_the_issue_s_alerts_are_all_there() -> None:
    """Each failure the issue names reads the series that shows it."""
    reads = {rule["alert"]: series_names(rule["expr"]) for rule in all_rules() if "alert" in rule}
    wanted = {
        "ReceiverDeadlineAtRisk": "receiver:queue_deadline_headroom_seconds",
        "ReceiverDeadlineMissed": "receiver_archive_deadline_misses_total",
        "ReceiverArchiveBacklogOld": "receiver_queue_oldest_task_age_seconds",
        "ReceiverAssetsDeadLettered": "receiver_archive_dead_letters_total",
        "ReceiverAssetsExpired": "receiver_archive_expired_total",
        "ReceiverStoreDown": "receiver_store_up",
        "ReceiverLedgerUnavailable": "receiver_ledger_up",
        "ReceiverFixityOverdue": "receiver_fixity_oldest_check_age_seconds",
        "ReceiverFixityFailures": "receiver_fixity_failing_assets",
        "ReceiverPollingStopped": "receiver_polling_stopped",
        "ReceiverWebhookAuthFailures": "receiver:webhook_auth_failures:increase5m",
        "ReceiverOnwardEndpointFailing": "receiver_onward_endpoint_up",
        "ReceiverOnwardDeliveryLagging": "receiver_onward_oldest_undelivered_seconds",
        "ReceiverInvalidContent": "receiver_archive_invalid_total",
    }
    for alert, series in wanted.items():
        assert series in reads.get(alert, set()), alert


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    exprs: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable["type"] == "query" and isinstance(query, str):
            exprs.append(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", query))
    return exprs


def test_dashboard_queries_name_exported_series() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    known = exported()
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 20
    read: set[str] = set()
    for expr in queries:
        names = series_names(expr)
        assert names, expr
        assert not names - known, f"{sorted(names - known)} in {expr}"
        read |= names
    # The panels the issue asks for, each by the series it draws.
    for series in (
        "receiver_deliveries_total",  # ingest rate
        "receiver_webhook_duration_seconds_bucket",  # ingest latency
        "receiver_queue_tasks",  # queue depth
        "receiver_queue_oldest_task_age_seconds",  # queue age
        "receiver_archive_deadline_slack_seconds_bucket",  # slack histogram
        "receiver_archived_bytes_total",  # bytes per day and provider, throughput
        "receiver_archive_copy_duration_seconds_bucket",
        "receiver_fixity_checks_total",  # fixity progress
        "receiver_fixity_oldest_check_age_seconds",
        "receiver_status_calls_total",  # polling
        "receiver_polling_stopped",
        "receiver_onward_attempts_total",  # onward delivery
        "receiver_onward_endpoint_up",
        "receiver_onward_pending",
    ):
        assert series in read, series


def test_dashboard_ids_and_places_are_unique() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


@pytest.mark.parametrize(
    "name",
    [
        "receiver_onward_attempts_total",
        "receiver_onward_oldest_undelivered_seconds",
        "receiver_onward_endpoint_up",
        "receiver_onward_pending",
        "receiver_archive_invalid_total",
    ],
)
def test_the_metrics_issues_21_and_22_set_are_defined(name: str) -> None:
    assert name in Metrics().metric_names()
