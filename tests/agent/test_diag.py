"""`gpufleet-agent diag`: on the simulator, injected faults decide the outcome; dcgmi's JSON
is read in both its 3.x and 4.x shapes; a diagnostic that cannot run exits 2."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gpufleet.agent import diag, nvml_sim
from gpufleet.agent.infiniband import IbSysfs
from gpufleet.agent.nvml import NvmlBackend, load_library

from tests.agent.fake_sysfs import make_hca, set_port


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[NvmlBackend]:
    lib = load_library("simulated", "dgx-h100", tmp_path / "faults.json", "n1")
    b = NvmlBackend(lib, "simulated:dgx-h100")
    b.inventory()  # starts the simulator
    yield b
    b.close()


def _run(b: NvmlBackend, level: int = 1, **expect: Any) -> diag.DiagReport:
    return diag.run_own(b, level, diag.Expectations(**expect),
                        retired_pending=b.retired_pages_pending, sleep=lambda _s: None)


def test_healthy_simulated_node_passes(backend: NvmlBackend) -> None:
    r = _run(backend, gpu_count=8)
    assert r.exit_code == diag.EXIT_PASS
    names = {c.name for c in r.checks}
    assert {"gpu_enumerate", "ecc", "row_remap", "pcie", "nvlink"} <= names
    # H100 remaps rows: NVML has no retired-page status, so no such check is invented
    assert "retired_pages" not in names


@pytest.mark.parametrize(("fault", "check"), [
    ({"kind": "xid", "xid": 79}, "gpu_enumerate"),
    ({"kind": "ecc_dbe"}, "ecc"),
    ({"kind": "row_remap_pending"}, "row_remap"),
    ({"kind": "row_remap_failure"}, "row_remap"),
    ({"kind": "pcie_downtrain", "width": 8}, "pcie"),
    ({"kind": "nvlink_down", "link": 5}, "nvlink"),
])
def test_each_fault_fails_its_check(backend: NvmlBackend, fault: dict[str, Any],
                                    check: str) -> None:
    nvml_sim.inject({"gpu": 2, **fault})
    r = _run(backend, gpu_count=8)
    assert r.exit_code == diag.EXIT_FAIL
    failed = r.failed()
    assert [c.name for c in failed] == [check]
    assert "GPU 2" in failed[0].evidence or "lost from the bus: 2" in failed[0].evidence


def test_reset_fixes_what_a_reset_fixes_and_not_more(backend: NvmlBackend) -> None:
    nvml_sim.inject({"gpu": 1, "kind": "ecc_dbe"})
    nvml_sim.inject({"gpu": 4, "kind": "row_remap_failure"})
    assert {c.name for c in _run(backend).failed()} == {"ecc", "row_remap"}
    nvml_sim.inject({"gpu": 1, "kind": "reset"})
    nvml_sim.inject({"gpu": 4, "kind": "reset"})
    failed = _run(backend).failed()
    assert [(c.name, c.gpu_index) for c in failed] == [("row_remap", 4)]


def test_level2_watch_sees_power_brake_and_heat(backend: NvmlBackend) -> None:
    assert _run(backend, 2).exit_code == diag.EXIT_PASS
    nvml_sim.inject({"gpu": 0, "kind": "power_brake"})
    nvml_sim.inject({"gpu": 6, "kind": "overheat", "temperature_c": 97.0})
    failed = _run(backend, 2).failed()
    assert {(c.name, c.gpu_index) for c in failed} == {("clocks_power", 0),
                                                        ("clocks_power", 6)}
    ev = {c.gpu_index: c.evidence for c in failed}
    assert "hardware power brake" in ev[0]
    assert "97 C" in ev[6]


def test_ib_ports_down_or_slow_fail(tmp_path: Path, backend: NvmlBackend) -> None:
    root = tmp_path / "sys"
    make_hca(root, "mlx5_0", "506b:4b03:00c1:a2b4")
    make_hca(root, "mlx5_1", "506b:4b03:00c1:a2b5", pci_addr="0000:18:00.0")
    ib = IbSysfs(root)
    expect = diag.Expectations(ib_rate_gbps=400)
    assert all(c.passed for c in diag.ib_checks(ib.sample(), expect))
    set_port(root, "mlx5_0", 1, state="1: DOWN", phys_state="3: Disabled")
    set_port(root, "mlx5_1", 1, rate="200 Gb/sec (4X HDR)")
    failed = [c for c in diag.ib_checks(ib.sample(), expect) if not c.passed]
    assert {c.subject for c in failed} == {"mlx5_0/1", "mlx5_1/1"}
    assert any("expected 400" in c.evidence and "200" in c.evidence for c in failed)


DCGM3 = {"DCGM GPU Diagnostic": {"test_categories": [
    {"category": "Deployment", "tests": [
        {"name": "Denylist", "results": [{"status": "Pass"}]},
        {"name": "Page Retirement/Row Remap", "results": [
            {"status": "Fail", "gpu_ids": [3],
             "warnings": [{"warning": "GPU 3 had uncorrectable memory errors and row "
                                      "remapping failed", "error_id": 82}]}]}]},
    {"category": "Integration", "tests": [
        {"name": "PCIe", "results": [{"gpu_id": "0", "status": "Pass"},
                                     {"gpu_id": "1", "status": "Skip"}]}]}]}}
DCGM4 = {"DCGM Diagnostic": {"test_categories": [
    {"category": "Hardware", "tests": [
        {"name": "Memory", "results": [{"entity_group": "GPU", "entity_id": 0,
                                        "status": "Pass"}]}]}]}}


def test_dcgmi_json_3x_and_4x() -> None:
    r = diag.parse_dcgmi("some banner\n" + json.dumps(DCGM3), 2)
    assert r.exit_code == diag.EXIT_FAIL
    [bad] = r.failed()
    assert bad.name == "dcgm:page_retirement/row_remap"
    assert bad.gpu_index == 3 and "row remapping failed" in bad.evidence
    assert len(r.checks) == 3  # the skipped result is not a check
    r4 = diag.parse_dcgmi(json.dumps(DCGM4), 1)
    assert r4.exit_code == diag.EXIT_PASS and r4.checks[0].gpu_index == 0


@pytest.mark.parametrize("text", ["", "Error: unable to connect to host engine", "{nope",
                                  json.dumps({"other": 1})])
def test_dcgmi_unreadable_output_could_not_run(text: str) -> None:
    r = diag.parse_dcgmi(text, 1)
    assert r.exit_code == diag.EXIT_ERROR and r.error


def test_dcgmi_runner_passes_level_and_maps_exit(tmp_path: Path) -> None:
    seen: list[list[str]] = []

    def fake_run(argv: list[str], **_kw: Any) -> subprocess.CompletedProcess[str]:
        seen.append(argv)
        return subprocess.CompletedProcess(argv, 226, "", "Error: host engine not running")

    r = diag.run_dcgmi(3, "dcgmi", run=fake_run)
    assert seen == [["dcgmi", "diag", "-r", "3", "-j"]]
    assert r.exit_code == diag.EXIT_ERROR and "exited 226" in r.error
    assert "host engine" in r.error


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "agent.toml").write_text(
        f'sysfs_root = "{tmp_path / "nosys"}"\nexpected_gpu_count = 8\n')
    return subprocess.run(
        [sys.executable, "-m", "gpufleet.agent", "diag", "--config", str(tmp_path / "agent.toml"),
         "--gpu-backend", "simulated", "--state-dir", str(tmp_path),
         "--sim-faults-path", str(tmp_path / "faults.json"), *args],
        capture_output=True, text=True, timeout=60, check=False)


def test_cli_exit_codes_follow_injected_faults(tmp_path: Path) -> None:
    p = _cli(tmp_path, "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["passed"] is True
    nvml_sim.append_fault(tmp_path / "faults.json", {"kind": "xid", "xid": 79, "gpu": 5})
    p = _cli(tmp_path, "--json")
    assert p.returncode == 1
    doc = json.loads(p.stdout)
    assert [c["name"] for c in doc["checks"] if not c["passed"]] == ["gpu_enumerate"]
    p = _cli(tmp_path, "--dcgm")  # asked for DCGM where there is none
    assert p.returncode == 2 and "dcgmi not found" in p.stdout
