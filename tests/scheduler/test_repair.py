"""The repair loop's state machine against the in-memory Slurm: pass -> resumed, fail ->
escalated, RMA never retried, quarantine after 3, the partition cap with 5 nodes faulting at
once, an admin's drain untouched, shadow mode acting on nothing, ask/approve/skip/cancel."""

from __future__ import annotations

from pathlib import Path

import pytest
from gpufleet.scheduler.repair import (
    AgentCommand,
    CommandResult,
    Journal,
    RepairConfig,
    RepairManager,
    Resolution,
    resolve,
)
from gpufleet.scheduler.repair.engine import Step

from tests.scheduler.fakes import FakeSlurm


class Agents:
    def __init__(self) -> None:
        self.sent: list[AgentCommand] = []
        self.boot: dict[str, str] = {}
        self.offline: set[str] = set()

    def send(self, cmd: AgentCommand) -> bool:
        if cmd.node in self.offline:
            return False
        self.sent.append(cmd)
        return True

    def boot_id(self, node: str) -> str | None:
        return self.boot.get(node, "boot-0")

    def has_stream(self, node: str) -> bool:
        return node not in self.offline

    def last(self, node: str) -> AgentCommand:
        return [c for c in self.sent if c.node == node][-1]


class Rebooter:
    def __init__(self, slurm: FakeSlurm) -> None:
        self.slurm = slurm
        self.calls: list[tuple[str, str]] = []

    def reboot(self, node: str, reason: str) -> None:
        self.calls.append((node, reason))


class Clock:
    def __init__(self) -> None:
        self.ms = 1_700_000_000_000

    def __call__(self) -> int:
        return self.ms


class Lab:
    def __init__(self, tmp_path: Path, nodes: int = 6, **cfg: object) -> None:
        self.names = [f"n{i}" for i in range(1, nodes + 1)]
        self.slurm = FakeSlurm(self.names)
        self.agents = Agents()
        self.rebooter = Rebooter(self.slurm)
        self.alerts: list[tuple[str, str, str, str]] = []
        self.clock = Clock()
        self.journal = Journal(tmp_path / "repair.jsonl")
        self.cfg = RepairConfig(**cfg)  # type: ignore[arg-type]
        self.rm = self.manager()

    def manager(self) -> RepairManager:
        return RepairManager(self.slurm, Journal(self.journal.path), self.cfg, self.agents,
                             self.rebooter, lambda *a: self.alerts.append(a),
                             partition_of=lambda n: "gpu", clock=self.clock,
                             queue=self.slurm)

    def fault(self, node: str, code: str, evidence: str = "", gpu: int | None = 2) -> None:
        # what the health policy does: drain with gpufleet's reason, then tell repair
        self.slurm.drain(node, f"gpufleet:{code} {evidence}".strip())
        self.rm.node_fatal(node, code, evidence or code, self.clock.ms, gpu)

    def answer(self, node: str, ok: bool = True, checks: tuple[str, ...] = (),
               evidence: str = "", could_not_run: bool = False) -> None:
        cmd = self.agents.last(node)
        self.rm.on_result(CommandResult(node, cmd.request_id, cmd.kind, ok, could_not_run,
                                        "", checks, evidence))
        self.tick()

    def tick(self, advance_s: float = 1.0) -> None:
        self.clock.ms += int(advance_s * 1000)
        self.rm.tick()

    def step(self, node: str) -> Step:
        return self.rm.cases[node].step

    def steps(self, node: str) -> list[str]:
        return [r["step"] for r in self.journal.history(node) if r.get("type") == "step"]


def test_catalog_resolutions() -> None:
    assert resolve("xid79") == Resolution.REBOOT
    assert resolve("xid95") == resolve("xid119") == resolve("xid48") == Resolution.RESET_GPU
    assert resolve("xid64") == resolve("xid63") == Resolution.RESET_GPU
    assert resolve("row_remap_failure") == Resolution.CONTACT_SUPPORT
    assert resolve("xid58") == Resolution.CONTACT_SUPPORT  # NVIDIA: report the issue
    assert resolve("gpu_lost") == Resolution.REBOOT
    assert resolve("ib_port_down") == Resolution.NONE


def test_gpu_reset_then_diag_pass_resumes(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.fault("n1", "xid95", "GPU 2 Xid 95 uncontained")
    lab.tick()
    reset = lab.agents.last("n1")
    assert (reset.kind, reset.gpus) == ("reset_gpu", (2,))
    assert lab.rm.holds("n1")
    lab.answer("n1")  # reset done -> diag sent
    assert lab.agents.last("n1").kind == "diag"
    lab.answer("n1", evidence="all checks passed")
    assert lab.step("n1") == Step.RESUMED
    assert lab.slurm.state["n1"] == ("IDLE", "")
    assert not lab.rm.holds("n1")
    assert lab.steps("n1") == ["fault", "remediating", "reset_done", "diagnosing",
                               "diag_passed", "resumed"]
    assert lab.rm.outcomes == {"resumed": 1} and len(lab.rm.repair_seconds) == 1
    assert not lab.alerts


def test_xid79_reboot_waits_for_new_boot_then_diag(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.fault("n2", "xid79", "GPU 3 fell off the bus")
    lab.tick()
    assert lab.rebooter.calls == [("n2", "gpufleet:reboot xid79")]
    assert lab.step("n2") == Step.REMEDIATING
    lab.tick()
    assert not lab.agents.sent  # same boot: not back yet
    lab.agents.boot["n2"] = "boot-1"
    lab.tick()
    assert lab.agents.last("n2").kind == "diag"
    lab.answer("n2")
    assert lab.step("n2") == Step.RESUMED


def test_diag_fail_stays_drained_and_escalates_with_evidence(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.fault("n1", "nvlink_down")
    lab.tick()
    lab.answer("n1")  # reset ok
    lab.answer("n1", ok=False, checks=("nvlink",), evidence="GPU 2 16 of 18 NVLinks up")
    assert lab.step("n1") == Step.ESCALATED
    assert lab.slurm.state["n1"] == ("IDLE+DRAIN", "gpufleet:diag-failed nvlink")
    [(node, name, summary, evidence)] = lab.alerts
    assert (node, name) == ("n1", "GpufleetRepairEscalated")
    assert "16 of 18 NVLinks up" in evidence and "nvlink" in summary
    assert lab.rm.holds("n1")  # the health policy must not resume it when quiet
    assert ("resume", "n1") not in lab.slurm.calls


def test_rma_class_is_never_retried(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.fault("n3", "row_remap_failure", "GPU 1 row remapping failed")
    for _ in range(3):
        lab.tick()
    assert lab.step("n3") == Step.ESCALATED
    assert not lab.agents.sent and not lab.rebooter.calls
    assert [a[1] for a in lab.alerts] == ["GpufleetRepairEscalated"]
    assert lab.slurm.state["n3"][0] == "IDLE+DRAIN"


def test_third_failure_in_window_quarantines_and_escalates_once(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    for _ in range(3):
        lab.fault("n1", "xid119")
        lab.tick()
        lab.answer("n1")
        lab.answer("n1", ok=False, checks=("ecc",), evidence="GPU 2 1 DBE")
        lab.tick(3600)
    assert lab.step("n1") == Step.QUARANTINED
    names = [a[1] for a in lab.alerts]
    assert names == ["GpufleetRepairEscalated"] * 2 + ["GpufleetNodeQuarantined"]
    sent = len(lab.agents.sent)
    lab.fault("n1", "xid119")  # a fourth fault: stays drained, no command, no new alert
    lab.tick()
    assert lab.step("n1") == Step.QUARANTINED
    assert len(lab.agents.sent) == sent and len(lab.alerts) == 3
    # a new controller reads the same journal: still quarantined, not escalated again
    lab.rm = lab.manager()
    lab.fault("n1", "xid119")
    lab.tick()
    assert lab.step("n1") == Step.QUARANTINED and len(lab.alerts) == 3


def test_failures_outside_the_window_do_not_quarantine(tmp_path: Path) -> None:
    lab = Lab(tmp_path, fail_window_s=3600.0)
    for _ in range(3):
        lab.fault("n1", "xid119")
        lab.tick()
        lab.answer("n1", ok=False, evidence="reset failed: in use")
        lab.tick(7200)
    assert lab.step("n1") == Step.ESCALATED


def test_partition_cap_holds_with_five_nodes_faulting_at_once(tmp_path: Path) -> None:
    lab = Lab(tmp_path, max_per_partition=2)
    five = lab.names[:5]
    for n in five:
        lab.fault(n, "xid95")
    lab.tick()
    active = {c.node for c in lab.agents.sent}
    assert len(active) == 2
    assert lab.rm.in_remediation() == {"gpu": 2}
    for _ in range(5):
        lab.tick()
        assert sum(lab.rm.in_remediation().values()) <= 2
    waiting = [n for n in five if lab.step(n) == Step.WAITING]
    assert len(waiting) == 3
    assert any("cap 2 reached" in r.get("detail", "") for r in lab.journal.records())
    # finishing one lets exactly one more start
    first = sorted(active)[0]
    lab.answer(first)
    lab.answer(first)
    assert lab.step(first) == Step.RESUMED
    lab.tick()
    assert len({c.node for c in lab.agents.sent}) == 3
    assert sum(lab.rm.in_remediation().values()) == 2
    # drive every node to the end, never more than 2 at once
    for _ in range(20):
        for n in five:
            if lab.step(n) in (Step.REMEDIATING, Step.DIAGNOSING):
                lab.answer(n)
        assert sum(lab.rm.in_remediation().values()) <= 2
    assert all(lab.step(n) == Step.RESUMED for n in five)


def test_admin_drain_is_never_touched(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.slurm.drain("n4", "disk swap, ticket 4411")  # an admin drained it first
    lab.rm.node_fatal("n4", "xid95", "GPU 0 Xid 95", lab.clock.ms, 0)
    lab.tick()
    assert lab.step("n4") == Step.LEFT
    assert not lab.agents.sent and not lab.rebooter.calls
    assert lab.slurm.state["n4"] == ("IDLE+DRAIN", "disk swap, ticket 4411")
    assert not lab.rm.holds("n4")


def test_busy_node_waits_for_its_jobs(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.fault("n1", "xid95")
    lab.slurm.state["n1"] = ("MIXED+DRAIN", lab.slurm.state["n1"][1])
    lab.tick()
    lab.tick()
    assert not lab.agents.sent
    assert lab.steps("n1").count("waiting") == 1  # said once, not every tick
    lab.slurm.state["n1"] = ("IDLE+DRAIN", lab.slurm.state["n1"][1])
    lab.tick()
    assert lab.agents.last("n1").kind == "reset_gpu"


def test_reset_refused_while_a_process_holds_the_gpu_is_retried(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.fault("n1", "xid95")
    lab.tick()
    lab.answer("n1", ok=False, could_not_run=True)
    assert lab.step("n1") == Step.WAITING
    lab.tick(10)
    assert len(lab.agents.sent) == 1  # not hammered while the process is still there
    lab.tick(30)
    assert [c.kind for c in lab.agents.sent] == ["reset_gpu", "reset_gpu"]
    assert "reset_refused" in lab.steps("n1")


def test_shadow_mode_acts_on_nothing(tmp_path: Path) -> None:
    lab = Lab(tmp_path, shadow=True)
    lab.fault("n1", "xid95")
    lab.fault("n2", "xid79")
    lab.tick()
    assert not lab.agents.sent and not lab.rebooter.calls
    assert lab.step("n1") == lab.step("n2") == Step.SHADOW
    assert ("resume", "n1") not in lab.slurm.calls
    assert any("would reboot" in r.get("detail", "") for r in lab.journal.history("n2"))


def test_timeouts_fail_the_step(tmp_path: Path) -> None:
    lab = Lab(tmp_path, reboot_timeout_s=60.0)
    lab.fault("n1", "xid79")
    lab.tick()
    lab.tick(61)
    assert lab.step("n1") == Step.ESCALATED
    assert lab.slurm.state["n1"][1] == "gpufleet:diag-failed timeout-reboot"


def test_ask_policy_waits_for_approve_skip_or_cancel(tmp_path: Path) -> None:
    lab = Lab(tmp_path, policy={"reset_gpu": "ask", "reboot": "ask", "none": "auto"},
              max_per_partition=3)
    for n in ("n1", "n2", "n3"):
        lab.fault(n, "xid95")
    lab.tick()
    lab.tick()
    assert {lab.step(n) for n in ("n1", "n2", "n3")} == {Step.APPROVAL}
    assert not lab.agents.sent
    assert [a[1] for a in lab.alerts] == ["GpufleetRepairAwaitsApproval"] * 3
    lab.journal.request("n1", "approve", "alice")
    lab.journal.request("n2", "skip", "alice")
    lab.journal.request("n3", "cancel", "bob")
    lab.tick()
    assert lab.agents.last("n1").kind == "reset_gpu"
    assert lab.agents.last("n2").kind == "diag"  # remediation skipped
    assert lab.step("n3") == Step.CANCELLED and lab.rm.holds("n3")
    with pytest.raises(ValueError, match="repair action"):
        lab.journal.request("n1", "reboot-now", "mallory")


def test_policy_never_escalates_without_acting(tmp_path: Path) -> None:
    lab = Lab(tmp_path, policy={"reboot": "never"})
    lab.fault("n1", "xid79")
    lab.tick()
    assert lab.step("n1") == Step.ESCALATED and not lab.rebooter.calls


@pytest.mark.parametrize(("cfg", "msg"), [
    ({"policy": {"reboot": "sometimes"}}, "use auto, ask or never"),
    ({"policy": {"contact_support": "auto"}}, "never retried"),
    ({"max_per_partition": 0}, "max_per_partition"),
    ({"diag_level": 4}, "diag_level"),
])
def test_bad_config_is_one_clear_error(cfg: dict[str, object], msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        RepairConfig(**cfg).validate()  # type: ignore[arg-type]


def test_controller_restart_mid_reboot_picks_up_where_it_was(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.fault("n2", "xid79", "GPU 3 fell off the bus")
    lab.tick()
    assert lab.rebooter.calls and lab.step("n2") == Step.REMEDIATING
    lab.rm = lab.manager()  # a new controller process, same journal
    assert lab.step("n2") == Step.REMEDIATING and lab.rm.holds("n2")
    lab.tick()
    assert len(lab.rebooter.calls) == 1 and not lab.agents.sent  # not rebooted twice
    lab.agents.boot["n2"] = "boot-1"
    lab.tick()
    lab.answer("n2")
    assert lab.step("n2") == Step.RESUMED
