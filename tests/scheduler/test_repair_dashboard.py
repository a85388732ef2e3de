"""The repair loop's Grafana dashboard: valid dashboard JSON, every panel's PromQL parsed by
the real promtool (each expression checked as a recording rule), and every metric and label it
names present in a real scrape of a controller whose repair loop has repaired, escalated and
diagnosed an idle node."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from gpufleet.scheduler.observability.metrics import ControllerMetrics
from gpufleet.scheduler.repair.metrics import RepairCollector
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.scheduler.test_repair import Lab
from tests.support.prometheus import MONITORING, metric_names, promtool

DASHBOARD = MONITORING / "gpufleet-repair-dashboard.json"
# labels Prometheus adds to every scraped series
TARGET_LABELS = {"job", "instance"}


def _dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def _targets(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every query."""
    return [(p["title"], t["expr"]) for p in dash["panels"] if p["type"] != "row"
            for t in p["targets"]]


def scrape(tmp_path: Path) -> dict[str, set[str]]:
    """A real /metrics text of a controller's registry (what its HTTP server serves), after
    a repair resumed, one escalated, a routine diagnostic passed and Slurm actions ran, with
    a reboot in progress: sample name -> its label names."""
    lab = Lab(tmp_path, nodes=4, max_per_partition=3, routine_every_s=86400.0,
              routine_idle_s=0.0)
    metrics = ControllerMetrics(CollectorRegistry(), nodes_by_health=lambda: {"ok": 2},
                                queue_depth=lambda: 0)
    metrics.registry.register(RepairCollector(lab.rm))
    lab.fault("n1", "xid95")
    lab.tick()
    lab.answer("n1")
    lab.answer("n1")  # reset, diag: resumed
    lab.fault("n2", "row_remap_failure")  # RMA class: escalated
    lab.tick(61)  # a scan: n3 or n4 (idle, never diagnosed) -> routine diag
    [routine] = [n for n, c in lab.rm.cases.items() if c.routine]
    lab.answer(routine)
    other = "n4" if routine == "n3" else "n3"
    lab.fault(other, "xid79")
    lab.tick()  # rebooting: in progress at scrape time
    metrics.xid_event("n1")
    metrics.action_finished("drain", "done", 0.2)
    metrics.store_up(True)
    text = generate_latest(metrics.registry).decode()
    out: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


def test_dashboard_is_grafana_json() -> None:
    dash = _dashboard()
    assert dash["uid"] == "gpufleet-repair" and dash["title"] and dash["schemaVersion"] >= 36
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource"}
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for p in panels:
        assert p["title"] and set(p["gridPos"]) == {"x", "y", "w", "h"}, p
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
            assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])


def test_dashboard_shows_what_the_issue_asks() -> None:
    used = set().union(*(metric_names(e) for _t, e in _targets(_dashboard())))
    assert {
        "gpufleet_controller_repair_drained_nodes",  # nodes drained per cause over time
        "gpufleet_controller_repair_drained_seconds_total",  # time drained per cause
        "gpufleet_controller_repairs_total",  # repairs per outcome
        "gpufleet_controller_repair_seconds_sum", "gpufleet_controller_repair_seconds_count",
        "gpufleet_controller_repair_open",  # open steps
        "gpufleet_controller_repair_in_progress",  # in progress per partition
        "gpufleet_controller_routine_diags_total",  # routine diagnostics done / failed
        "gpufleet_controller_nodes", "gpufleet_controller_connected_agents",  # fleet health
        "gpufleet_controller_fault_to_action_seconds_bucket",
    } <= used
    mttr = [e for _t, e in _targets(_dashboard()) if "repair_seconds_sum" in e]
    assert mttr and all("[1d]" in e and "repair_seconds_count" in e for e in mttr)


def test_every_metric_and_label_is_in_a_real_scrape(tmp_path: Path) -> None:
    scraped = scrape(tmp_path)
    for title, expr in _targets(_dashboard()):
        names = metric_names(expr)
        assert names, f"{title!r}: no metric in {expr!r}"
        unknown = names - set(scraped)
        assert not unknown, f"panel {title!r} uses metrics the controller does not export: " \
                            f"{unknown}"
        labels = set().union(*(scraped[n] for n in names)) | TARGET_LABELS
        used = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", expr))
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            used |= {g.strip() for g in group.split(",") if g.strip()}
        assert used <= labels, f"panel {title!r}: labels {used - labels} not on {names}"


def test_a_metric_the_controller_does_not_export_is_caught(tmp_path: Path) -> None:
    scraped = scrape(tmp_path)
    assert metric_names("sum(gpufleet_controller_repairs_totl)") - set(scraped) == {
        "gpufleet_controller_repairs_totl"}
    assert "gpufleet_controller_routine_diags_total" in scraped  # the scrape did see it


def _as_rules(exprs: list[str], path: Path) -> Path:
    rules = [{"record": f"gpufleet:dashboard_query_{i}", "expr": e}
             for i, e in enumerate(exprs)]
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    return path


def test_promtool_parses_every_query(tmp_path: Path) -> None:
    exprs = [e for _t, e in _targets(_dashboard())]
    done = subprocess.run([promtool(), "check", "rules", str(_as_rules(exprs, tmp_path / "q.yml"))],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in done.stdout


@pytest.mark.parametrize("broken", [
    "sum by (cause) (gpufleet_controller_repair_drained_nodes{job=\"gpufleet-controller\"}",
    "rate(gpufleet_controller_repair_seconds_sum[1x])",
])
def test_promtool_catches_a_broken_query(tmp_path: Path, broken: str) -> None:
    done = subprocess.run([promtool(), "check", "rules",
                           str(_as_rules([broken], tmp_path / "q.yml"))],
                          capture_output=True, text=True, check=False)
    assert done.returncode != 0 and "dashboard_query_0" in done.stdout + done.stderr
