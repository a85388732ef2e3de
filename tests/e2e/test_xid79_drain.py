"""End to end on a real Slurm: simulated GPU node -> agent process -> gRPC -> controller ->
scontrol. Xid 79 on n3 must leave n3 DRAIN with a gpufleet reason, and nothing else drained."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpufleet.agent.nvml_sim import append_fault
from gpufleet.scheduler.cli.simfleet import SimFleet
from gpufleet.scheduler.service.server import Controller
from gpufleet.scheduler.slurm import CliSlurmClient
from gpufleet.scheduler.store import SqliteStore

from tests.slurm.harness import SlurmLab
from tests.support import wait_for

pytestmark = pytest.mark.slurm


@pytest.fixture
def fleet(clean_slurm_lab: SlurmLab, tmp_path: Path) -> Iterator[SimFleet]:
    ctl = Controller(SqliteStore(tmp_path / "state.db"), CliSlurmClient(env=clean_slurm_lab.env()),
                     listen="127.0.0.1:0")
    with SimFleet(ctl, ["n1", "n3"], tmp_path) as fleet:
        yield fleet


def test_xid79_on_n3_drains_n3_in_real_slurm(
    clean_slurm_lab: SlurmLab, fleet: SimFleet, report_figure
) -> None:
    ctl, lab = fleet.ctl, clean_slurm_lab
    wait_for(fleet.registered, 30, "both agents")
    assert "DRAIN" not in lab.node_state("n3")

    t_fault = time.monotonic()
    append_fault(fleet.faults_path("n3"), {"kind": "xid", "gpu": 3, "xid": 79})
    wait_for(lambda: "DRAIN" in lab.node_state("n3"), 15,
             lambda: f"n3 drained: {lab.node_state('n3')}", step_s=0.01)
    fault_to_drain_ms = (time.monotonic() - t_fault) * 1000

    reason = lab.node_reason("n3")
    assert reason.startswith("gpufleet:xid79 GPU 3 (0000:5d:00.0) Xid 79"), reason
    show = lab.run("scontrol", "show", "node", "n3").stdout
    assert "DRAIN" in show and "gpufleet:xid79" in show
    assert "DRAIN" not in lab.node_state("n1")

    (action,) = [a for a in ctl.store.actions("n3") if a.action == "drain"]
    assert action.status == "done" and action.fault_ms is not None and action.done_ms is not None
    report_figure(
        f"fault -> drain on real Slurm {lab.version}: {fault_to_drain_ms:.0f} ms from the fault to "
        f"scontrol showing DRAIN (controller's record, agent Xid event -> scontrol done: "
        f"{action.done_ms - action.fault_ms} ms)"
    )
    assert ctl.store.node("n3").health == "fatal"
