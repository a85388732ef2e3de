"""The health policy against a real Slurm 22.05: what an admin would curse us for must not
happen, and what we promise must show in `scontrol show node`."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpufleet.scheduler.health.actions import ActionQueue
from gpufleet.scheduler.health.policy import HealthPolicy, PolicyConfig
from gpufleet.scheduler.slurm import CliSlurmClient
from gpufleet.scheduler.store import SqliteStore, VerdictRow, now_ms

from tests.slurm.harness import SlurmLab

pytestmark = pytest.mark.slurm

QUIET_S = 60.0


class RealCluster:
    def __init__(self, lab: SlurmLab, tmp_path: Path, shadow: bool = False) -> None:
        self.lab = lab
        self.store = SqliteStore(tmp_path / "state.db")
        for n in lab.node_names:
            self.store.upsert_node(n, n, 8, b"", "i1", now_ms())
        self.actions = ActionQueue(self.store, CliSlurmClient(env=lab.env()), shadow=shadow,
                                   retry_initial_s=0.2, retry_max_s=2.0)
        self.actions.start()
        self.policy = HealthPolicy(self.store, self.actions, PolicyConfig(resume_quiet_s=QUIET_S))

    def verdict(self, node: str, severity: str, code: str = "xid79", check: str = "xid",
                wait: bool = True) -> None:
        before, after = self.store.set_verdict(
            VerdictRow(node, check, 0, "", severity, code, f"GPU 0 {code}", now_ms())
        )
        self.policy.on_health_change(node, before, after, code, f"GPU 0 {code}", now_ms())
        if wait:
            assert self.actions.wait_idle(30.0)

    def tick_after(self, seconds: float) -> None:
        later = now_ms() + int(seconds * 1000)
        for n in self.lab.node_names:
            self.store.touch_node(n, "i1", 0, later)
        self.policy.tick(later)
        assert self.actions.wait_idle(30.0)

    def show(self, node: str) -> str:
        return self.lab.run("scontrol", "show", "node", node).stdout

    def close(self) -> None:
        self.actions.stop()
        self.store.close()


@pytest.fixture
def cluster(clean_slurm_lab: SlurmLab, tmp_path: Path) -> Iterator[RealCluster]:
    c = RealCluster(clean_slurm_lab, tmp_path)
    yield c
    c.close()


def test_fatal_drains_then_resumes_after_the_quiet_period(cluster: RealCluster) -> None:
    cluster.verdict("n1", "fatal")
    assert "DRAIN" in cluster.lab.node_state("n1")
    assert cluster.lab.node_reason("n1").startswith("gpufleet:xid79")
    cluster.verdict("n1", "ok")
    cluster.tick_after(QUIET_S / 2)
    assert "DRAIN" in cluster.lab.node_state("n1")
    cluster.tick_after(QUIET_S + 1)
    assert "DRAIN" not in cluster.lab.node_state("n1")


def test_an_admin_drained_node_stays_drained_when_gpufleet_sees_it_healthy(
    cluster: RealCluster,
) -> None:
    cluster.lab.run("scontrol", "update", "nodename=n2", "state=drain", "reason=admin: bad fan")
    cluster.verdict("n2", "fatal")  # gpufleet would drain: it keeps the admin's reason
    cluster.verdict("n2", "ok")
    cluster.tick_after(QUIET_S + 1)
    assert "DRAIN" in cluster.lab.node_state("n2")
    assert cluster.lab.node_reason("n2") == "admin: bad fan"
    statuses = {(a.action, a.status) for a in cluster.store.actions("n2")}
    assert ("drain", "skipped") in statuses
    assert not any(a == "resume" and s == "done" for a, s in statuses)


def test_degraded_changes_weight_and_feature_and_puts_them_back(cluster: RealCluster) -> None:
    before = cluster.show("n3")
    weight_before = re.search(r"Weight=(\d+)", before)
    assert weight_before is not None
    try:
        cluster.verdict("n3", "degraded", "pcie_downtrained", check="pcie")
        shown = cluster.show("n3")
        assert "Weight=1000" in shown
        assert re.search(r"AvailableFeatures=\S*gf_degraded", shown), shown
        assert "DRAIN" not in cluster.lab.node_state("n3")
        cluster.verdict("n3", "ok", check="pcie")
        cluster.tick_after(QUIET_S + 1)
        shown = cluster.show("n3")
        assert f"Weight={weight_before.group(1)}" in shown
        assert "gf_degraded" not in shown
    finally:
        cluster.lab.run("scontrol", "update", "nodename=n3", f"weight={weight_before.group(1)}")


def test_shadow_mode_changes_nothing_in_slurm(clean_slurm_lab: SlurmLab, tmp_path: Path) -> None:
    c = RealCluster(clean_slurm_lab, tmp_path, shadow=True)
    try:
        before = c.show("n4")
        c.verdict("n4", "fatal")
        c.verdict("n5", "degraded", "thermal", check="thermal")
        assert c.show("n4") == before
        assert "gf_degraded" not in c.show("n5") and "DRAIN" not in c.lab.node_state("n5")
        assert {a.status for a in c.store.actions()} == {"shadow"}
    finally:
        c.close()


def test_slurmctld_down_for_30_s_while_faults_arrive(
    cluster: RealCluster, report_figure
) -> None:
    lab = cluster.lab
    lab.stop_slurmctld()
    try:
        t0 = time.monotonic()
        # faults arrive while slurmctld is away: the policy decides at once, nothing blocks
        for node in ("n6", "n7"):
            cluster.verdict(node, "fatal", wait=False)
        decide_s = time.monotonic() - t0
        assert decide_s < 1.0
        time.sleep(30)
        assert {a.status for a in cluster.store.actions() if a.node in ("n6", "n7")} == {
            "queued"
        }
    finally:
        t_start = time.monotonic()
        lab.start_slurmctld()
    assert cluster.actions.wait_idle(60.0)
    applied_s = time.monotonic() - t_start
    for node in ("n6", "n7"):
        assert "DRAIN" in lab.node_state(node), lab.node_state(node)
        assert lab.node_reason(node).startswith("gpufleet:xid79")
    report_figure(
        f"slurmctld down 30 s with 2 faults queued: both drains applied {applied_s:.1f} s after "
        "slurmctld was started again"
    )
