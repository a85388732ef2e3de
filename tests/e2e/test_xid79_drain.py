"""End to end on a real Slurm: simulated GPU node -> agent process -> gRPC -> controller ->
scontrol. Xid 79 on n3 must leave n3 DRAIN with a gpufleet reason, and nothing else drained."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpufleet.agent.nvml_sim import append_fault
from gpufleet.scheduler.service.server import Controller
from gpufleet.scheduler.slurm import CliSlurmClient
from gpufleet.scheduler.store import SqliteStore

from tests.slurm.harness import SlurmLab

pytestmark = pytest.mark.slurm


def _wait(cond, timeout_s: float, step_s: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step_s)
    return False


@pytest.fixture
def fleet(clean_slurm_lab: SlurmLab, tmp_path: Path) -> Iterator[tuple[Controller, Path]]:
    store = SqliteStore(tmp_path / "state.db")
    ctl = Controller(store, CliSlurmClient(env=clean_slurm_lab.env()), listen="127.0.0.1:0")
    ctl.start()
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "gpufleet.agent", "run", "--gpu-backend", "simulated",
             "--node-name", node, "--controller", f"127.0.0.1:{ctl.port}",
             "--state-dir", str(tmp_path / node), "--metrics-listen", ""],
            stdin=subprocess.DEVNULL,
        )
        for node in ("n1", "n3")
    ]
    try:
        yield ctl, tmp_path
    finally:
        for p in agents:
            p.terminate()
        for p in agents:
            p.wait(timeout=10)
        ctl.stop()
        store.close()


def test_xid79_on_n3_drains_n3_in_real_slurm(
    clean_slurm_lab: SlurmLab, fleet, report_figure
) -> None:
    ctl, work = fleet
    lab = clean_slurm_lab
    assert _wait(lambda: {n.name for n in ctl.store.nodes()} == {"n1", "n3"}, 30)
    assert "DRAIN" not in lab.node_state("n3")

    t_fault = time.monotonic()
    append_fault(work / "n3" / "sim-faults.json", {"kind": "xid", "gpu": 3, "xid": 79})
    drained = _wait(lambda: "DRAIN" in lab.node_state("n3"), 15)
    fault_to_drain_ms = (time.monotonic() - t_fault) * 1000
    assert drained, f"n3 not drained: {lab.node_state('n3')}"

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
