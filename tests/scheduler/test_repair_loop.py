"""The repair loop end to end in one process: simulated agent -> real gRPC over loopback ->
controller (policy + repair) -> in-memory Slurm, with the reset and diag commands going to
the agent on its stream and their results coming back as reports."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpufleet.agent import nvml_sim
from gpufleet.agent.config import AgentConfig
from gpufleet.agent.nvml import NvmlBackend, load_library
from gpufleet.agent.runner import Agent
from gpufleet.scheduler.health.policy import PolicyConfig
from gpufleet.scheduler.repair import Journal, RepairConfig
from gpufleet.scheduler.repair.engine import Step
from gpufleet.scheduler.service.server import Controller
from gpufleet.scheduler.store import SqliteStore
from prometheus_client import generate_latest

from tests.scheduler.fakes import FakeSlurm
from tests.support import wait_for


class Rebooter:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def reboot(self, node: str, reason: str) -> None:
        self.calls.append((node, reason))


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[Controller, FakeSlurm, Journal]]:
    slurm = FakeSlurm(["n1", "n2"])
    store = SqliteStore(tmp_path / "state.db")
    journal = tmp_path / "repair.jsonl"
    ctl = Controller(store, slurm, listen="127.0.0.1:0",
                     policy=PolicyConfig(tick_s=0.1, resume_quiet_s=0.5),
                     repair=RepairConfig(tick_s=0.1), repair_journal=str(journal),
                     rebooter=Rebooter(), partition_of=lambda _n: "gpu",
                     metrics_listen=None)
    ctl.start()
    yield ctl, slurm, Journal(journal)
    ctl.stop()
    store.close()


def start_agent(tmp_path: Path, port: int, node: str) -> tuple[Agent, threading.Thread]:
    cfg = AgentConfig(node_name=node, controller=f"127.0.0.1:{port}", gpu_backend="simulated",
                      state_dir=str(tmp_path / node), interval_s=0.1, metrics_listen="",
                      sysfs_root=str(tmp_path / "nosys"))
    nvml_sim.nvmlShutdown()  # process-global, as NVML is: an earlier test's profile must not stay
    lib = load_library("simulated", "dgx-h100", cfg.resolved_faults_path(), node)
    agent = Agent(cfg, NvmlBackend(lib, "simulated:dgx-h100"))
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    return agent, t


def steps(journal: Journal, node: str) -> list[str]:
    return [r["step"] for r in journal.history(node) if r.get("type") == "step"]


@pytest.mark.slow  # ~5-11 s: keeps the fast set under 3 minutes; CI runs it
def test_xid95_reset_diag_pass_resumes(lab, tmp_path: Path, report_figure) -> None:
    ctl, slurm, journal = lab
    agent, t = start_agent(tmp_path, ctl.port, "n1")
    try:
        wait_for(lambda: bool(ctl.store.nodes()))
        t0 = time.monotonic()
        nvml_sim.inject({"kind": "xid", "gpu": 2, "xid": 95})
        wait_for(lambda: slurm.state["n1"][0] == "IDLE+DRAIN")
        wait_for(lambda: slurm.state["n1"] == ("IDLE", ""))
        elapsed = time.monotonic() - t0
        assert ctl.repair is not None and ctl.repair.cases["n1"].step == Step.RESUMED
        assert steps(journal, "n1") == ["fault", "remediating", "reset_done", "diagnosing",
                                        "diag_passed", "resumed"]
        # the reset cleared the sticky XID verdict: the controller sees the node healthy
        wait_for(lambda: ctl.store.node("n1").health == "ok")  # type: ignore[union-attr]
        assert slurm.calls == [("drain", "n1"), ("resume", "n1")]
        text = generate_latest(ctl.metrics.registry).decode()
        assert 'gpufleet_controller_repairs_total{outcome="resumed"} 1.0' in text
        assert "gpufleet_controller_repair_seconds_count 1.0" in text
        report_figure(f"Xid 95 -> drain -> GPU reset -> diag -> resumed over loopback, "
                      f"in-memory Slurm: {elapsed:.2f} s")
    finally:
        agent.stop.set()
        t.join(5)


@pytest.mark.slow  # ~5-11 s: keeps the fast set under 3 minutes; CI runs it
def test_failed_diag_stays_drained_with_the_check_in_the_reason(lab, tmp_path: Path) -> None:
    ctl, slurm, journal = lab
    agent, t = start_agent(tmp_path, ctl.port, "n2")
    try:
        wait_for(lambda: bool(ctl.store.nodes()))
        nvml_sim.inject({"kind": "xid", "gpu": 1, "xid": 119})
        wait_for(lambda: slurm.state["n2"][0] == "IDLE+DRAIN")
        # a row remap that fails now is not something a reset fixes: the diag says so
        nvml_sim.inject({"kind": "row_remap_failure", "gpu": 1})
        wait_for(lambda: slurm.state["n2"][1] == "gpufleet:diag-failed row_remap")
        assert ctl.repair is not None and ctl.repair.cases["n2"].step == Step.ESCALATED
        time.sleep(1.0)  # past the policy's quiet period: still drained
        assert slurm.state["n2"][0] == "IDLE+DRAIN"
        failure = [r for r in journal.history("n2") if r.get("step") == "failure"]
        assert "GPU 1" in failure[0]["evidence"] and "failure=1" in failure[0]["evidence"]
    finally:
        agent.stop.set()
        t.join(5)


# ----------------------------------------------------------------------------- real Alertmanager


def test_rma_fault_stays_drained_and_reaches_real_alertmanager(
        alertmanager, tmp_path: Path) -> None:
    import json
    import urllib.request

    from gpufleet.scheduler.observability.alerting import AlertSender

    url, _chat = alertmanager
    slurm = FakeSlurm(["n1"])
    store = SqliteStore(tmp_path / "state.db")
    journal = Journal(tmp_path / "repair.jsonl")
    rebooter = Rebooter()
    ctl = Controller(store, slurm, listen="127.0.0.1:0",
                     policy=PolicyConfig(tick_s=0.1, resume_quiet_s=0.5),
                     repair=RepairConfig(tick_s=0.1), repair_journal=str(journal.path),
                     rebooter=rebooter, partition_of=lambda _n: "gpu", metrics_listen=None,
                     alerts=AlertSender(url, backoff_s=0.05))
    ctl.start()
    agent, t = start_agent(tmp_path, ctl.port, "n1")

    def listed() -> list[dict]:
        with urllib.request.urlopen(url + "/api/v2/alerts", timeout=5) as r:  # noqa: S310
            return [a for a in json.loads(r.read())
                    if a["labels"]["alertname"] == "GpufleetRepairEscalated"]

    try:
        wait_for(lambda: bool(ctl.store.nodes()))
        nvml_sim.inject({"kind": "row_remap_failure", "gpu": 6})
        wait_for(lambda: slurm.state["n1"][0] == "IDLE+DRAIN")
        wait_for(lambda: bool(listed()), 20, "the escalation to reach Alertmanager")
        [alert] = listed()
        assert alert["labels"]["node"] == "n1" and alert["labels"]["severity"] == "page"
        assert "contact_support" in alert["annotations"]["summary"]
        assert "GPU 6 row remapping failed" in alert["annotations"]["description"]
        time.sleep(1.0)  # never retried, never resumed
        assert slurm.calls == [("drain", "n1")] and not rebooter.calls
        assert ctl.repair is not None and ctl.repair.cases["n1"].step == Step.ESCALATED
    finally:
        agent.stop.set()
        t.join(5)
        ctl.stop()
        store.close()
