"""The repair loop on a real Slurm 22.05: simulated agent processes -> gRPC -> controller ->
scontrol. Xid 95 on n3 -> drain -> GPU reset by the agent -> diag -> resumed in Slurm, with the
timeline printed; an admin's drain on n1 is never touched. (The reboot path is not run here:
the lab's slurmd restarts cannot change the host's boot time, which slurmctld checks.)"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpufleet.agent.nvml_sim import append_fault
from gpufleet.scheduler.cli.repair import history_rows
from gpufleet.scheduler.cli.simfleet import SimFleet
from gpufleet.scheduler.health.policy import PolicyConfig
from gpufleet.scheduler.repair import Journal, RepairConfig
from gpufleet.scheduler.repair.engine import Step
from gpufleet.scheduler.service.server import Controller
from gpufleet.scheduler.slurm import CliSlurmClient
from gpufleet.scheduler.slurm.repair_calls import CliPartitions, CliRebooter
from gpufleet.scheduler.store import SqliteStore

from tests.slurm.fixtures import running_lab
from tests.slurm.harness import SlurmLab, SlurmLabConfig
from tests.support import wait_for

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def repair_lab() -> Iterator[SlurmLab]:
    """Its own 3-node lab (own directory and ports): the shared lab's directory is also used
    by other suites' version labs."""
    # RebootProgram: slurmd runs it on `scontrol reboot`; /bin/true reboots nothing (the lab
    # cannot), it lets slurmctld accept the request as on a site that defines one
    with running_lab(SlurmLabConfig(lab_dir=Path("/tmp/gf-lab-repair-test"), nodes=3, leaves=1,
                                    ctld_port=9937, node_port0=20301,
                                    extra_conf="RebootProgram=/bin/true\nResumeTimeout=600\n")
                     ) as lab:
        yield lab


@pytest.fixture
def fleet(repair_lab: SlurmLab, tmp_path: Path) -> Iterator[SimFleet]:
    repair_lab.reset()
    env = repair_lab.env()
    ctl = Controller(SqliteStore(tmp_path / "state.db"), CliSlurmClient(env=env),
                     listen="127.0.0.1:0",
                     policy=PolicyConfig(tick_s=0.2, resume_quiet_s=2.0),
                     repair=RepairConfig(tick_s=0.2), repair_journal=str(tmp_path / "r.jsonl"),
                     rebooter=CliRebooter(env=env), partition_of=CliPartitions(env=env))
    with SimFleet(ctl, ["n1", "n3"], tmp_path,
                  agent_args=lambda _: ("--interval-s", "0.2")) as fleet:
        yield fleet


def test_xid95_reset_diag_resume_on_real_slurm(repair_lab: SlurmLab, fleet: SimFleet,
                                               report_figure) -> None:
    ctl, work, lab = fleet.ctl, fleet.work, repair_lab
    wait_for(fleet.registered, 30, "both agents")
    lab.run("scontrol", "update", "nodename=n1", "state=drain", "reason=admin: fan swap")

    t0 = time.monotonic()
    append_fault(fleet.faults_path("n3"), {"kind": "xid", "gpu": 2, "xid": 95})
    wait_for(lambda: "DRAIN" in lab.node_state("n3"), 15, lambda: lab.node_state("n3"))
    drained_s = time.monotonic() - t0
    assert lab.node_reason("n3").startswith("gpufleet:xid95 GPU 2")
    # n1 also goes fatal now: its admin drain must stay as it is
    append_fault(fleet.faults_path("n1"), {"kind": "xid", "gpu": 0, "xid": 95})
    wait_for(lambda: "DRAIN" not in lab.node_state("n3"), 30,
             lambda: (lab.node_state("n3"), lab.node_reason("n3")))
    back_s = time.monotonic() - t0
    assert ctl.repair is not None and ctl.repair.cases["n3"].step == Step.RESUMED
    wait_for(lambda: ctl.repair is not None and "n1" in ctl.repair.cases
             and ctl.repair.cases["n1"].step == Step.LEFT, 15, "n1's case to be left alone")
    assert "DRAIN" in lab.node_state("n1")
    assert lab.node_reason("n1") == "admin: fan swap"
    rows = history_rows("n3", Journal(work / "r.jsonl"), ctl.store)
    timeline = "\n".join(f"  +{(r['ts_ms'] - rows[0]['ts_ms']) / 1000:6.2f}s {r['what']:<22} "
                         f"{r['detail'][:90]}" for r in rows)
    print(f"\nn3 timeline:\n{timeline}")
    whats = [r["what"] for r in rows]
    for step in ("drain (done)", "repair remediating", "repair reset_done",
                 "repair diagnosing", "repair diag_passed", "repair resumed"):
        assert step in whats, whats
    assert whats.index("repair remediating") < whats.index("repair resumed")
    report_figure(f"Xid 95 on real Slurm 22.05: fault -> drain {drained_s:.2f} s, fault -> "
                  f"reset -> diag -> resumed {back_s:.2f} s")


def test_scontrol_reboot_request_as_gpufleet_sends_it(repair_lab: SlurmLab) -> None:
    """The reboot command line is one Slurm 22.05 accepts: the node is marked for reboot
    with gpufleet's reason (the lab cannot reboot a host, so the reboot itself is not run)."""
    lab = repair_lab
    lab.reset()
    lab.run("scontrol", "update", "nodename=n2", "state=drain", "reason=gpufleet:xid79 GPU 3")
    CliRebooter(env=lab.env()).reboot("n2", "gpufleet:reboot xid79")
    wait_for(lambda: "REBOOT" in lab.node_state("n2"), 10, lambda: lab.node_state("n2"))
    assert lab.node_reason("n2") == "gpufleet:reboot xid79"
    assert "REBOOT" not in lab.node_state("n3")
