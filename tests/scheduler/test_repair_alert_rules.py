"""The repair loop's alert rules: promtool checks and unit tests (the real promtool), a broken
rule is caught, and every metric they use is one the repair collector exports."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml
from gpufleet.scheduler.repair import Journal, RepairConfig, RepairManager
from gpufleet.scheduler.repair.metrics import RepairCollector
from prometheus_client import CollectorRegistry, generate_latest

from tests.scheduler.fakes import FakeSlurm
from tests.support.prometheus import MONITORING, known_series_names, metric_names, promtool

RULES = MONITORING / "gpufleet-repair-alerts.yml"
RULE_TESTS = MONITORING / "gpufleet-repair-alerts.test.yml"


def test_promtool_checks_and_tests_the_repair_rules() -> None:
    done = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 5 rules found" in done.stdout
    done = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], cwd=MONITORING,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_repair_alert_has_a_firing_case() -> None:
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"]
              for r in g["rules"]}
    tested = {t["alertname"] for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    assert alerts == tested


def test_broken_repair_rule_is_caught(tmp_path: Path) -> None:
    (tmp_path / RULES.name).write_text(RULES.read_text().replace(
        'outcome="quarantined"', 'outcome="quarantine"'))
    shutil.copy(RULE_TESTS, tmp_path)
    done = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], cwd=tmp_path,
                          capture_output=True, text=True, check=False)
    assert done.returncode != 0 and "GpufleetRepairQuarantine" in done.stdout + done.stderr


class _NoAgents:
    def send(self, _cmd: object) -> bool:
        return False

    def boot_id(self, _node: str) -> str | None:
        return None


def _collector(tmp_path: Path) -> tuple[RepairManager, RepairCollector]:
    rm = RepairManager(FakeSlurm(["n1", "n2"]), Journal(tmp_path / "j.jsonl"), RepairConfig(),
                       _NoAgents(), _NoAgents(), lambda *a: None)  # type: ignore[arg-type]
    return rm, RepairCollector(rm)


def test_rules_use_only_exported_metrics(tmp_path: Path) -> None:
    known = known_series_names()
    _rm, col = _collector(tmp_path)
    suffixes = {"counter": ("_total",), "summary": ("_count", "_sum"), "gauge": ("",)}
    for f in col.describe():
        known |= {f.name + s for s in suffixes[f.type]}
    for g in yaml.safe_load(RULES.read_text())["groups"]:
        for r in g["rules"]:
            names = metric_names(r["expr"])
            assert names and not names - known, (r["alert"], names - known)


def test_collector_reports_outcomes_drained_time_and_open_cases(tmp_path: Path) -> None:
    rm, col = _collector(tmp_path)
    reg = CollectorRegistry()
    reg.register(col)
    slurm: FakeSlurm = rm.slurm  # type: ignore[assignment]
    slurm.drain("n1", "gpufleet:xid95 GPU 1")
    slurm.state["n1"] = ("MIXED+DRAIN", slurm.state["n1"][1])  # a job still runs there
    rm.node_fatal("n1", "xid95", "GPU 1 Xid 95")
    slurm.drain("n2", "gpufleet:row_remap_failure GPU 1")
    rm.node_fatal("n2", "row_remap_failure", "GPU 1 row remapping failed", rm.clock() - 60_000)
    rm.tick()
    assert reg.get_sample_value("gpufleet_controller_repair_open", {"step": "waiting"}) == 1
    assert reg.get_sample_value("gpufleet_controller_repairs_total",
                                {"outcome": "escalated"}) == 1
    assert reg.get_sample_value("gpufleet_controller_repairs_total",
                                {"outcome": "resumed"}) == 0
    drained = reg.get_sample_value("gpufleet_controller_repair_drained_seconds_total",
                                   {"cause": "row_remap_failure"})
    assert drained is not None and 59 <= drained <= 70
    assert reg.get_sample_value("gpufleet_controller_repair_seconds_count") == 0
    assert b"gpufleet_controller_repair_open" in generate_latest(reg)
