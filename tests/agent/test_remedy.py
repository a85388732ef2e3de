"""The agent's repair commands: a GPU reset only when no process holds the GPU, nvidia-smi's
failure reported, the simulator's reset applied; a diagnostic's failed checks first."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from gpufleet.agent import diag, nvml_sim
from gpufleet.agent.nvml import NvmlBackend, load_library
from gpufleet.agent.remedy import CommandRunner
from gpufleet.rpc.v1 import fleet_pb2 as pb


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[NvmlBackend]:
    b = NvmlBackend(load_library("simulated", "l40s-pcie", tmp_path / "faults.json", "n1"),
                    "simulated:l40s-pcie")
    b.inventory()
    yield b
    b.close()


def _runner(backend: NvmlBackend, tmp_path: Path | None, cleared: list[int],
            run: Any = subprocess.run) -> CommandRunner:
    def clear(gpus: Sequence[int]) -> None:
        cleared.extend(gpus)

    def run_diag(level: int) -> diag.DiagReport:
        return diag.run_own(backend, level, diag.Expectations(), sleep=lambda _s: None)

    return CommandRunner(backend, lambda _r: None, run_diag, clear,
                         sim_faults_path=tmp_path / "faults.json" if tmp_path else None, run=run)


def _cmd(kind: int, gpus: Sequence[int] = (), level: int = 1) -> pb.Command:
    return pb.Command(kind=kind, request_id="r1", gpu_indices=gpus, diag_level=level)


def test_reset_refused_while_a_process_holds_the_gpu(backend: NvmlBackend,
                                                     tmp_path: Path) -> None:
    cleared: list[int] = []
    nvml_sim.inject({"gpu": 1, "kind": "processes", "processes": [{"pid": 4242}]})
    res = _runner(backend, tmp_path, cleared).execute(_cmd(pb.Command.KIND_RESET_GPU, [1]))
    assert (res.ok, res.could_not_run) == (False, True)
    assert "GPU 1 held by pid(s) [4242]" in res.detail and res.request_id == "r1"
    assert not cleared


def test_simulated_reset_clears_ecc_and_xid_verdicts(backend: NvmlBackend,
                                                     tmp_path: Path) -> None:
    cleared: list[int] = []
    nvml_sim.inject({"gpu": 2, "kind": "ecc_dbe"})
    r = _runner(backend, tmp_path, cleared)
    assert not r.execute(_cmd(pb.Command.KIND_RUN_DIAG)).ok
    res = r.execute(_cmd(pb.Command.KIND_RESET_GPU, [2]))
    assert res.ok and cleared == [2]
    after = r.execute(_cmd(pb.Command.KIND_RUN_DIAG))
    assert after.ok and after.tool == "gpufleet" and after.finished_ms >= after.started_ms


def test_real_reset_reports_nvidia_smi_failure(backend: NvmlBackend) -> None:
    calls: list[list[str]] = []

    def fake_run(argv: list[str], **_kw: Any) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 255, "", "GPU 00000000:41:00.0 is in use")

    cleared: list[int] = []
    res = _runner(backend, None, cleared, run=fake_run).execute(
        _cmd(pb.Command.KIND_RESET_GPU, [0]))
    assert calls == [["nvidia-smi", "--gpu-reset", "-i", "0"]]
    assert not res.ok and not res.could_not_run and "exited 255" in res.detail
    assert not cleared


def test_diag_result_lists_failed_checks_first(backend: NvmlBackend, tmp_path: Path) -> None:
    nvml_sim.inject({"gpu": 3, "kind": "pcie_downtrain", "width": 4})
    res = _runner(backend, tmp_path, []).execute(_cmd(pb.Command.KIND_RUN_DIAG))
    assert not res.ok and res.detail == "failed: pcie"
    first = res.checks[0]
    assert (first.name, first.passed, first.gpu_index) == ("pcie", False, 3)
    assert "x4" in first.evidence


def test_repeated_request_runs_once(backend: NvmlBackend, tmp_path: Path) -> None:
    r = _runner(backend, tmp_path, [])
    r.submit(_cmd(pb.Command.KIND_RUN_DIAG))
    r.submit(_cmd(pb.Command.KIND_RUN_DIAG))
    # a kind this agent does not run (an older or newer controller's): ignored, not queued
    r.submit(pb.Command(kind=pb.Command.Kind.ValueType(1), request_id="x"))
    assert r._q.qsize() == 1
