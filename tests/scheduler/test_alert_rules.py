"""The shipped alert rules and Grafana dashboard: promtool checks and unit tests (the real
promtool), valid JSON, and every metric name they use exists in the agent's or the
controller's registry."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.support.prometheus import MONITORING, known_series_names, metric_names, promtool

RULES = MONITORING / "gpufleet-alerts.yml"
RULE_TESTS = MONITORING / "gpufleet-alerts.test.yml"
DASHBOARD = MONITORING / "gpufleet-cluster-dashboard.json"


def test_promtool_check_rules() -> None:
    done = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    # promtool must have read every rule in the file, not stopped early
    rule_count = sum(len(g["rules"]) for g in yaml.safe_load(RULES.read_text())["groups"])
    assert rule_count >= 12
    assert f"SUCCESS: {rule_count} rules found" in done.stdout


def test_promtool_test_rules() -> None:
    done = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], cwd=MONITORING,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_rule_unit_tests_cover_every_alert() -> None:
    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tested = {t["alertname"] for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    # SlowDrain and IngestErrors are plain thresholds on our own histogram/counter; the
    # others each have a case where they fire, and one where they do not
    assert alerts - tested == {"GpufleetSlowDrain", "GpufleetControllerIngestErrors"}


def test_broken_rule_tests_fail(tmp_path: Path) -> None:
    """The unit tests can fail: a rule file whose fatal threshold is off is caught."""
    (tmp_path / "gpufleet-alerts.yml").write_text(
        RULES.read_text().replace("gpufleet_node_health_severity{job=\"gpufleet-agent\"} >= 4",
                                  "gpufleet_node_health_severity{job=\"gpufleet-agent\"} >= 5"))
    shutil.copy(RULE_TESTS, tmp_path)
    done = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], cwd=tmp_path,
                          capture_output=True, text=True, check=False)
    assert done.returncode != 0
    assert "GpufleetNodeFatal" in done.stdout + done.stderr


def test_metric_name_extraction() -> None:
    assert metric_names(
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{job="x",le="1"}[5m]))) > 5 '
        'or absent(up{job="c"}) or count(b == 0) or vector(0) / 2^30'
    ) == {"a_bucket", "up", "b"}


def test_dashboard_is_grafana_json_using_only_existing_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    panels = dash["panels"]
    assert len(panels) >= 10
    assert len({p["id"] for p in panels}) == len(panels)
    known = known_series_names()
    used: set[str] = set()
    for p in panels:
        assert p["title"] and p["targets"], p
        for t in p["targets"]:
            names = metric_names(t["expr"])
            assert names, f"panel {p['title']!r}: no metric in {t['expr']!r}"
            unknown = names - known
            assert not unknown, f"panel {p['title']!r} uses unknown metrics {unknown}"
            used |= names
    # the cluster view shows both sides: agents' GPUs and the controller's work
    assert {"gpufleet_gpu_lost", "gpufleet_controller_nodes",
            "gpufleet_controller_fault_to_action_seconds_bucket"} <= used


def test_alert_rules_use_only_existing_metrics() -> None:
    known = known_series_names()
    rules = yaml.safe_load(RULES.read_text())
    for g in rules["groups"]:
        for r in g["rules"]:
            names = metric_names(r["expr"])
            assert names and not names - known, (r["alert"], names - known)


def test_metric_check_catches_a_typo() -> None:
    assert "gpufleet_gpu_lsot" not in known_series_names()
    assert metric_names("sum(gpufleet_gpu_lsot)") - known_series_names() == {"gpufleet_gpu_lsot"}
