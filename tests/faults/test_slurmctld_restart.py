"""slurmctld stops and starts again while agents report and faults arrive, twice.

Real parts: Slurm 22.05 from the lab harness (its own lab dir and port: set
GPUFLEET_SLURM_TEST_LAB / GPUFLEET_SLURM_TEST_PORT), a `gpufleet controller` process acting
through Slurm's commands (`--slurm cli`), `gpufleet-agent run` processes with simulated GPUs.
tests/e2e/test_policy_real_slurm.py covers one 30 s outage with the policy in-process; this
one restarts slurmctld in the middle of a run of real processes, and again later, and checks
every node's end state:

* n1: healthy throughout: never drained;
* n2: Xid 79 during the outage: DRAIN with gpufleet's reason, one drain action;
* n3: PCIe trained down (degraded) during the outage: Weight=1000 applied once, put back by a
  `reassert` after the second restart (slurmctld forgets scontrol-set weights), not drained;
* n4: drained by an admin before the run, then a GPU lost and back: gpufleet leaves the
  admin's drain and reason alone and never resumes it, even past its quiet period.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpufleet.agent.nvml_sim import append_fault

from tests.faults.fleet_helpers import AgentProc, ControllerProc, sql, stopped_all, wait_for
from tests.slurm.harness import SlurmLab

pytestmark = pytest.mark.slurm

NODES = ("n1", "n2", "n3", "n4")
QUIET_S = 4.0  # gpufleet's resume quiet period: short, so a wrong resume would show


@pytest.fixture
def lab(clean_slurm_lab: SlurmLab) -> Iterator[SlurmLab]:
    weights = {n: re.search(r"Weight=(\d+)", clean_slurm_lab.show_node(n)) for n in NODES}
    yield clean_slurm_lab
    if not clean_slurm_lab.ctld_alive():
        clean_slurm_lab.start_slurmctld()
    for n, w in weights.items():  # clean_slurm_lab resumes nodes, not weights
        if w is not None:
            clean_slurm_lab.run("scontrol", "update", f"nodename={n}", f"weight={w.group(1)}")


def _actions(db: str, node: str) -> list[tuple[str, str]]:
    return [(str(a), str(s)) for a, s in sql(
        db, "SELECT action, status FROM actions WHERE node = ? ORDER BY id", (node,))]


def test_slurmctld_restarts_mid_run(lab: SlurmLab, tmp_path: Path) -> None:
    db = str(tmp_path / "state.db")
    ctl = ControllerProc(db, tmp_path, env=lab.env(), extra_args=(
        "--slurm", "cli", "--no-recover", "--resume-quiet-s", str(QUIET_S),
        "--reassert-s", "1"))
    agents = {n: AgentProc(n, tmp_path, ctl.address, gpus=8, profile="dgx-h100")
              for n in NODES}
    lab.run("scontrol", "update", "nodename=n4", "state=drain", "reason=admin: bad fan")
    with stopped_all([*agents.values(), ctl]):
        ctl.start()
        for a in agents.values():
            a.start()
        wait_for(lambda: len(sql(db, "SELECT name FROM nodes")) == len(NODES), 30, "agents")

        # first outage, faults arrive while slurmctld is away
        t0 = time.monotonic()
        lab.stop_slurmctld()
        agents["n2"].inject_xid(3, 79)
        append_fault(agents["n3"].faults_path, {"kind": "pcie_downtrain", "gpu": 1, "width": 8})
        append_fault(agents["n4"].faults_path, {"kind": "gpu_lost", "gpu": 0})
        wait_for(lambda: sql(db, "SELECT count(*) FROM actions")[0][0] >= 3, 20,
                 "the policy's decisions (queued while slurmctld is down)")
        time.sleep(2.0)
        lab.start_slurmctld()
        outage_s = time.monotonic() - t0
        wait_for(lambda: "DRAIN" in lab.node_state("n2"), 60, "n2 drained")
        wait_for(lambda: "Weight=1000" in lab.show_node("n3"), 60, "n3 weighted")

        # n4's GPU comes back; a second restart of slurmctld while gpufleet could resume
        append_fault(agents["n4"].faults_path, {"kind": "clear", "gpu": 0})
        wait_for(lambda: sql(db, "SELECT health FROM nodes WHERE name = 'n4'")[0][0] == "ok",
                 20, "n4 healthy again in gpufleet")
        lab.stop_slurmctld()
        time.sleep(1.0)
        lab.start_slurmctld()
        time.sleep(QUIET_S + 4.0)  # past the quiet period: a wrong resume would have run

        n3_after = lab.show_node("n3")
        states = {n: lab.node_state(n) for n in NODES}
        reasons = {n: lab.node_reason(n) for n in NODES}
        acts = {n: _actions(db, n) for n in NODES}
        print(f"\nslurmctld outage 1: {outage_s:.1f} s; states {states}; reasons {reasons}; "
              f"actions {acts}")
    assert "DRAIN" not in states["n1"] and acts["n1"] == []
    # Xid 79 is a GPU fallen off the bus: the agent may find the GPU gone from NVML (gpu_lost)
    # before it reads the Xid line; the first of the two names the drain, either is this fault
    assert "DRAIN" in states["n2"], states
    assert reasons["n2"].startswith(("gpufleet:xid79", "gpufleet:gpu_lost GPU 3")), reasons
    assert acts["n2"] == [("drain", "done")]
    # degraded once; after slurmctld's restart dropped the weight, put back (reassert) -
    # never drained, never restored while still degraded
    assert "DRAIN" not in states["n3"] and acts["n3"][0] == ("degrade", "done"), acts["n3"]
    assert ("reassert", "done") in acts["n3"][1:], acts["n3"]
    assert {a for a, _ in acts["n3"][1:]} == {"reassert"}, acts["n3"]
    assert "DRAIN" in states["n4"] and reasons["n4"] == "admin: bad fan"
    assert ("resume", "done") not in acts["n4"], acts["n4"]
    assert all(a != "drain" or s == "skipped" for a, s in acts["n4"]), acts["n4"]
    # last: the degraded weight must still be in force after slurmctld's second restart
    # (slurmctld does not keep a Weight set by scontrol across a restart: gpufleet has to
    # put it back while it still holds the node degraded)
    weight = re.search(r"Weight=(\d+)", n3_after)
    features = re.search(r"AvailableFeatures=(\S+)", n3_after)
    assert weight is not None and weight.group(1) == "1000", (
        f"n3 still degraded in gpufleet, but after the slurmctld restart Slurm shows "
        f"Weight={weight.group(1) if weight else '?'} "
        f"AvailableFeatures={features.group(1) if features else '?'}")
