"""The repair loop on a real Slurm (22.05 on the host, 24.11/26.05 from their roots): simulated
agent processes -> gRPC -> controller -> scontrol, on a lab whose RebootProgram reboots a lab
node (tests/slurm/reboot.py: the node's slurmd restarted in a time namespace whose boot clock
starts then, so slurmctld accepts the reboot as done; the simulator's faults cleared; the
agent back with a new boot id).

- Xid 79 on n2 -> drain -> `scontrol reboot ASAP nextstate=DOWN` -> RebootProgram -> agent
  back with a new boot id -> diag -> resumed (IDLE, no reason), the timeline printed as
  `gpufleet nodes history` prints it
- Xid 95 on n3 -> drain -> GPU reset by the agent -> diag -> resumed; an admin's drain on n1
  is never touched
- Xid 54 (RMA class) on n4 -> stays drained, no remediation, escalated to a real Alertmanager
  with the evidence
- Xid 79 on five nodes at once with --repair-max-per-partition 2: never more than two in
  remediation or diagnosis at once (from the journal), every node back in the end

A node failing three times is quarantined: tests/scheduler/test_repair.py
(test_third_failure_in_window_quarantines_and_escalates_once), on the in-memory Slurm.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from gpufleet.agent.nvml_sim import append_fault
from gpufleet.scheduler.cli.repair import history_rows
from gpufleet.scheduler.health.policy import PolicyConfig
from gpufleet.scheduler.observability.alerting import AlertSender
from gpufleet.scheduler.repair import Journal, RepairConfig
from gpufleet.scheduler.repair.engine import ACTIVE, OPEN, Step
from gpufleet.scheduler.service.server import Controller
from gpufleet.scheduler.slurm import CliSlurmClient
from gpufleet.scheduler.slurm.repair_calls import CliPartitions, CliRebooter
from gpufleet.scheduler.store import SqliteStore

from tests.slurm.fixtures import running_lab
from tests.slurm.harness import SlurmLab, SlurmLabConfig
from tests.slurm.reboot import RebootingAgents, stop_reboots, write_reboot_program
from tests.support import wait_for
from tests.support.alertmanager import alertmanager, recorder

pytestmark = pytest.mark.slurm
__all__ = ["alertmanager", "recorder"]  # the real Alertmanager fixture, for the RMA test

LAB_DIR = Path("/tmp/gf-lab-repair-test")  # the lab's own fixed place


@pytest.fixture(scope="module")
def repair_lab(slurm_version: str) -> Iterator[SlurmLab]:
    """Its own 6-node lab (own directory and ports: the shared lab's directory is also used
    by other suites' version labs), with a RebootProgram that reboots a lab node."""
    cfg = SlurmLabConfig(lab_dir=LAB_DIR, nodes=6, leaves=1, ctld_port=9937, node_port0=20301,
                         version=slurm_version)
    program = write_reboot_program(LAB_DIR, cfg.etc / "slurm.conf")
    # ResumeTimeout bounds a reboot: a node whose slurmd has not registered by then is DOWN
    cfg = dataclasses.replace(cfg, extra_conf=f"RebootProgram={program}\nResumeTimeout=600\n")
    with running_lab(cfg) as lab:
        try:
            yield lab
        finally:
            stop_reboots(LAB_DIR)  # before running_lab stops the daemons


class Fleet:
    """A controller (real gRPC, SQLite, the lab's Slurm through the CLI client) and rebootable
    simulated agents for `nodes`."""

    def __init__(self, lab: SlurmLab, work: Path, nodes: Sequence[str],
                 repair: RepairConfig, alerts: AlertSender | None = None) -> None:
        env = lab.env()
        self.lab, self.work = lab, work
        self.db = work / "state.db"
        self.journal_path = work / "r.jsonl"
        self.ctl = Controller(SqliteStore(self.db), CliSlurmClient(env=env),
                              listen="127.0.0.1:0",
                              policy=PolicyConfig(tick_s=0.2, resume_quiet_s=2.0),
                              repair=repair, repair_journal=str(self.journal_path),
                              rebooter=CliRebooter(env=env), partition_of=CliPartitions(env=env),
                              alerts=alerts)
        self.ctl.start()
        self.agents = RebootingAgents(lab.lab_dir, nodes, self.ctl.port,
                                      agent_args=lambda _n: ("--interval-s", "0.2"))
        self.agents.start()

    @property
    def journal(self) -> Journal:
        return Journal(self.journal_path)

    def registered(self) -> bool:
        return {n.name for n in self.ctl.store.nodes()} >= set(self.agents.nodes)

    def step(self, node: str) -> Step | None:
        case = self.ctl.repair.cases.get(node) if self.ctl.repair is not None else None
        return None if case is None else case.step

    def close(self) -> None:
        self.agents.close()
        self.ctl.stop()
        self.ctl.store.close()


@pytest.fixture
def fleet(repair_lab: SlurmLab, tmp_path: Path) -> Iterator[Callable[..., Fleet]]:
    made: list[Fleet] = []

    def make(nodes: Sequence[str], repair: RepairConfig | None = None,
             alerts: AlertSender | None = None) -> Fleet:
        made.append(Fleet(repair_lab, tmp_path, nodes, repair or RepairConfig(tick_s=0.2),
                          alerts))
        return made[-1]

    repair_lab.reset()
    yield make
    for f in made:
        f.close()
    stop_reboots(repair_lab.lab_dir)  # a reboot still running must not outlive its test


def history_text(f: Fleet, node: str) -> str:
    """What `gpufleet nodes history NODE` prints for this controller's store and journal."""
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("gpufleet")), "nodes", "history", node,
         "--db", str(f.db), "--repair-journal", str(f.journal_path)],
        capture_output=True, text=True, timeout=60, check=True)
    return proc.stdout


def ordered(whats: list[str], *steps: str) -> None:
    """`steps` occur in `whats` in this order (each at its first occurrence)."""
    for step in steps:
        assert step in whats, (step, whats)
    at = [whats.index(s) for s in steps]
    assert at == sorted(at), list(zip(steps, at, strict=True))


def test_xid79_reboot_diag_resume_on_real_slurm(repair_lab: SlurmLab, fleet, slurm_version: str,
                                                report_figure) -> None:
    lab = repair_lab
    f = fleet(["n2"])
    wait_for(f.registered, 30, "the agent's hello")
    boot_before = f.agents.boot_id("n2")
    slurmd_before = lab.status()["slurmd-n2"]

    t0 = time.monotonic()
    append_fault(f.agents.faults_path("n2"), {"kind": "xid", "gpu": 3, "xid": 79})
    wait_for(lambda: "DRAIN" in lab.node_state("n2"), 20, lambda: lab.node_state("n2"))
    # the controller asks Slurm for the reboot (its reason), Slurm runs the RebootProgram
    wait_for(lambda: lab.node_reason("n2").startswith("gpufleet:reboot "), 20,
             lambda: (lab.node_state("n2"), lab.node_reason("n2")))
    wait_for(lambda: f.step("n2") == Step.RESUMED, 120,
             lambda: (f.step("n2"), lab.node_state("n2"), lab.node_reason("n2")))
    back_s = time.monotonic() - t0

    # Slurm: the node is back, idle, with no reason left; slurmd is a new process
    wait_for(lambda: lab.node_state("n2") == "IDLE", 20, lambda: lab.node_state("n2"))
    if lab.version == "24.11":
        # 24.11.5 keeps the last reason on a resumed, IDLE node (tests/slurm/test_harness.py
        # test_drain_then_resume): the state says it is back
        assert lab.node_reason("n2") in ("", "gpufleet:reboot xid79 : reboot issued : "
                                         "reboot complete")
    else:
        assert lab.node_reason("n2") == ""
    assert lab.status()["slurmd-n2"] not in (None, slurmd_before)
    # the node's agent came back once, from the new boot
    assert f.agents.starts["n2"] == 2
    boot_after = f.agents.boot_id("n2")
    assert boot_after != boot_before

    print(f"\n$ gpufleet nodes history n2   (Slurm {slurm_version})\n{history_text(f, 'n2')}")
    rows = history_rows("n2", f.journal, f.ctl.store)
    whats = [r["what"] for r in rows]
    ordered(whats, "event event_kind_xid", "drain (done)", "repair remediating",
            "repair rebooted", "repair diagnosing", "repair diag_passed", "repair resumed")
    ordered(whats, "repair fault", "repair remediating")
    detail = {r["what"]: r["detail"] for r in rows}
    assert "scontrol reboot ASAP nextstate=DOWN reason='gpufleet:reboot " in \
        detail["repair remediating"]
    assert detail["repair rebooted"] == f"boot id {boot_before} -> {boot_after}"
    assert "reset" not in " ".join(whats)  # a reboot, not a GPU reset
    report_figure(f"Xid 79 on real Slurm {slurm_version}: fault -> drain -> scontrol reboot -> "
                  f"RebootProgram -> diag -> resumed {back_s:.2f} s")


def test_xid95_reset_diag_resume_on_real_slurm(repair_lab: SlurmLab, fleet, slurm_version: str,
                                               report_figure) -> None:
    lab = repair_lab
    f = fleet(["n1", "n3"])
    wait_for(f.registered, 30, "both agents")
    lab.run("scontrol", "update", "nodename=n1", "state=drain", "reason=admin: fan swap")

    t0 = time.monotonic()
    append_fault(f.agents.faults_path("n3"), {"kind": "xid", "gpu": 2, "xid": 95})
    wait_for(lambda: "DRAIN" in lab.node_state("n3"), 15, lambda: lab.node_state("n3"))
    drained_s = time.monotonic() - t0
    assert lab.node_reason("n3").startswith("gpufleet:xid95 GPU 2")
    # n1 also goes fatal now: its admin drain must stay as it is
    append_fault(f.agents.faults_path("n1"), {"kind": "xid", "gpu": 0, "xid": 95})
    wait_for(lambda: "DRAIN" not in lab.node_state("n3"), 30,
             lambda: (lab.node_state("n3"), lab.node_reason("n3")))
    back_s = time.monotonic() - t0
    assert f.step("n3") == Step.RESUMED
    wait_for(lambda: f.step("n1") == Step.LEFT, 15, "n1's case to be left alone")
    assert "DRAIN" in lab.node_state("n1")
    assert lab.node_reason("n1") == "admin: fan swap"
    rows = history_rows("n3", f.journal, f.ctl.store)
    timeline = "\n".join(f"  +{(r['ts_ms'] - rows[0]['ts_ms']) / 1000:6.2f}s {r['what']:<22} "
                         f"{r['detail'][:90]}" for r in rows)
    print(f"\nn3 timeline:\n{timeline}")
    ordered([r["what"] for r in rows], "drain (done)", "repair remediating",
            "repair reset_done", "repair diagnosing", "repair diag_passed", "repair resumed")
    assert f.agents.starts["n3"] == 1  # a GPU reset, no reboot
    report_figure(f"Xid 95 on real Slurm {slurm_version}: fault -> drain {drained_s:.2f} s, "
                  f"fault -> reset -> diag -> resumed {back_s:.2f} s")


def test_rma_fault_stays_drained_and_reaches_real_alertmanager(
        repair_lab: SlurmLab, fleet, alertmanager) -> None:
    lab = repair_lab
    url, _chat = alertmanager
    sender = AlertSender(url, backoff_s=0.05)
    f = fleet(["n4"], alerts=sender)
    wait_for(f.registered, 30, "the agent's hello")

    def escalated() -> list[dict[str, Any]]:
        with urllib.request.urlopen(url + "/api/v2/alerts", timeout=5) as r:  # noqa: S310
            return [a for a in json.loads(r.read())
                    if a["labels"]["alertname"] == "GpufleetRepairEscalated"]

    append_fault(f.agents.faults_path("n4"), {"kind": "xid", "gpu": 5, "xid": 54})
    wait_for(lambda: bool(escalated()), 30, "the escalation to reach Alertmanager")
    [alert] = escalated()
    assert alert["labels"]["node"] == "n4" and alert["labels"]["severity"] == "page"
    assert "contact_support (xid54)" in alert["annotations"]["summary"]
    assert "GPU 5" in alert["annotations"]["description"]
    assert "Xid 54" in alert["annotations"]["description"]
    assert f.step("n4") == Step.ESCALATED
    # past the health policy's quiet period (2 s) and many repair ticks: still drained,
    # never remediated
    time.sleep(3.0)
    assert "DRAIN" in lab.node_state("n4")
    assert lab.node_reason("n4").startswith("gpufleet:xid54 GPU 5")
    steps = [r["step"] for r in f.journal.history("n4") if r.get("type") == "step"]
    # ("waiting" may come between: the drain had not reached Slurm at the first tick)
    assert [s for s in steps if s != "waiting"] == ["fault", "escalated"], steps


def test_partition_cap_holds_when_five_nodes_fault_at_once(repair_lab: SlurmLab, fleet,
                                                           slurm_version: str,
                                                           report_figure) -> None:
    lab = repair_lab
    five = ["n2", "n3", "n4", "n5", "n6"]
    f = fleet(five, RepairConfig(tick_s=0.2, max_per_partition=2))
    wait_for(f.registered, 60, "five agents")
    t0 = time.monotonic()
    for n in five:
        append_fault(f.agents.faults_path(n), {"kind": "xid", "gpu": 0, "xid": 79})
    wait_for(lambda: all(f.step(n) == Step.RESUMED for n in five), 300,
             lambda: {n: (f.step(n), lab.node_state(n)) for n in five})
    all_back_s = time.monotonic() - t0
    for n in five:
        wait_for(lambda n=n: lab.node_state(n) == "IDLE", 20, lambda n=n: lab.node_state(n))
        assert f.agents.starts[n] == 2  # each rebooted once

    # from the journal: how many were in remediation or diagnosis at once, at every step
    ended = {s.value for s in Step} - {s.value for s in OPEN}
    active: set[str] = set()
    most = 0
    for r in f.journal.records():
        if r.get("type") != "step":
            continue
        if r.get("step") in {s.value for s in ACTIVE}:
            active.add(r["node"])
        elif r.get("step") in ended:
            active.discard(r["node"])
        most = max(most, len(active))
    assert most == 2
    waits = [r for r in f.journal.records() if r.get("step") == "waiting"
             and "partition main cap 2 reached" in r.get("detail", "")]
    assert {r["node"] for r in waits}, "no node waited for the cap"
    report_figure(f"5x Xid 79 at once on real Slurm {slurm_version}, cap 2: all rebooted, "
                  f"diagnosed and resumed in {all_back_s:.1f} s")
