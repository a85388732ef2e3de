"""The simulated NVML profiles against real nvidia-smi captures; real `topo -m` parses."""

from __future__ import annotations

import re

import pytest
from gpufleet.agent import nvml_sim
from gpufleet.scheduler.topology.gputopo import from_inventory, parse_topo_m

from tests.conformance.corpus import real_data
from tests.support.inventory import sim_inventory

CAPTURES = "nvidia_smi_topo/utkuozdemir_nvidia_gpu_exporter_captures"


def _capture_section(text: str, command: str) -> str:
    m = re.search(rf"^# \$ nvidia-smi {re.escape(command)}\n#+\n(.*?)(?=^#{{20,}}|\Z)", text,
                  re.M | re.S)
    assert m, command
    return m.group(1)


def _real_gpu0(name: str) -> tuple[str, int, str]:
    """(model, active NVLinks of GPU 0, NUMA affinity of GPU0) from a real capture."""
    text = real_data(f"{CAPTURES}/{name}").read_text()
    model = re.search(r"^GPU 0: (.+?) \(UUID", text, re.M)
    assert model
    links = len(re.findall(r"^\s+Link \d+: [\d.]+ GB/s", _capture_section(text, "nvlink -s"),
                           re.M))
    topo = parse_topo_m(_capture_section(text, "topo -m"), name)
    return model.group(1), links, topo.numa_affinity["GPU0"]


# Real machines (non-MIG captures) whose GPU model a simulated profile claims to be.
REAL_VS_SIM = [
    ("linux-x86_64__nvidia-h100-80gb-hbm3__590.48.01.txt", "dgx-h100"),
    ("linux-x86_64__nvidia-l40s__595.80.txt", "l40s-pcie"),
]


@pytest.mark.parametrize(("capture", "profile"), REAL_VS_SIM)
def test_simulated_profile_matches_real_nvidia_smi(capture: str, profile: str) -> None:
    model, real_links, real_numa = _real_gpu0(capture)
    spec = nvml_sim.PROFILES[profile]
    assert spec.model == model
    assert spec.nvlinks_per_gpu == real_links, (
        f"{profile}: simulator gives {spec.nvlinks_per_gpu} NVLinks per GPU, a real {model} "
        f"has {real_links}")
    inv = sim_inventory(profile)
    sim = from_inventory(inv)
    assert sim.numa_affinity["GPU0"] == real_numa
    # every GPU pair of the profile joined by all its links, as NV<n> in topo -m
    expect = f"NV{real_links}" if real_links else None
    for a in sim.gpus:
        for b in sim.gpus:
            if a != b:
                cell = sim.cells[(a, b)]
                assert cell == expect if expect else cell in {"PIX", "PXB", "PHB", "NODE", "SYS"}


def test_simulated_a100_matches_real_nvlink_status() -> None:
    text = real_data("nvidia_smi_topo/leptonai_gpud/nvidia-smi.nvlink.status.a100").read_text()
    gpus = re.split(r"^GPU \d+: ", text, flags=re.M)[1:]
    assert len(gpus) == 8
    spec = nvml_sim.PROFILES["hgx-a100"]
    for g in gpus:
        assert g.startswith(spec.model)
        assert len(re.findall(r"Link \d+: 25 GB/s", g)) == spec.nvlinks_per_gpu == 12


def test_real_topo_m_parses_with_ansi_header_and_windows_blanks() -> None:
    text = real_data(f"{CAPTURES}/windows-x86_64__nvidia-geforce-rtx-2080-super__610.62.txt")
    m = parse_topo_m(_capture_section(text.read_text(), "topo -m"))
    assert m.devices == ["GPU0"] and m.cells[("GPU0", "GPU0")] == "X"
    assert (m.cpu_affinity["GPU0"], m.numa_affinity["GPU0"]) == ("N/A", "N/A")
    h100 = real_data(f"{CAPTURES}/linux-x86_64__nvidia-h100-80gb-hbm3__590.48.01.txt")
    m = parse_topo_m(_capture_section(h100.read_text(), "topo -m"))
    assert (m.cpu_affinity["GPU0"], m.numa_affinity["GPU0"], m.gpu_numa_id["GPU0"]) == (
        "0-19", "0", "N/A")

