"""Node GPU topology: the simulated NVML profiles checked against real nvidia-smi output, and
`topo -m` rendering / parsing."""

from __future__ import annotations

import re

import pytest
from gpufleet.agent import nvml_sim, wire
from gpufleet.agent.nvml import NvmlBackend, load_library
from gpufleet.rpc.v1 import fleet_pb2
from gpufleet.scheduler.topology.gputopo import (
    from_inventory,
    nvlink_islands,
    parse_topo_m,
    render_topo_m,
)

from tests.conftest import real_data

CAPTURES = "nvidia_smi_topo/utkuozdemir_nvidia_gpu_exporter_captures"


def _sim_inventory(profile: str) -> fleet_pb2.NodeInventory:
    nvml_sim.nvmlShutdown()  # the simulator is process-global, as NVML is: start it afresh
    backend = NvmlBackend(load_library("simulated", profile, None, "n1"), f"simulated:{profile}")
    try:
        gpus = backend.inventory()
        return fleet_pb2.NodeInventory(
            node_name="n1", gpus=[wire.gpu_info(g) for g in gpus],
            gpu_links=[wire.gpu_link(lk) for lk in backend.links()],
            gpu_nic_affinity=[wire.nic_affinity(*a) for a in backend.nic_affinity()])
    finally:
        nvml_sim.nvmlShutdown()


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
    inv = _sim_inventory(profile)
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


@pytest.mark.parametrize("profile", sorted(nvml_sim.PROFILES))
def test_render_parse_round_trip_and_islands(profile: str) -> None:
    m = from_inventory(_sim_inventory(profile))
    back = parse_topo_m(render_topo_m(m))
    assert back.cells == m.cells and back.nics == m.nics
    assert back.numa_affinity == m.numa_affinity
    islands = nvlink_islands(m)
    expected = {"dgx-h100": [8], "hgx-a100": [8], "l40s-pcie": [1, 1, 1, 1],
                "a100-pcie-bridged": [2, 2]}[profile]
    assert [len(i) for i in islands] == expected


def test_topo_m_bad_cell_names_the_line() -> None:
    with pytest.raises(ValueError, match=r"t:3: unknown relation 'QQQ'"):
        parse_topo_m("\tGPU0\tGPU1\tCPU Affinity\tNUMA Affinity\n"
                     "GPU0\t X \tNV4\t0-7\t0\nGPU1\tQQQ\t X \t0-7\t0\n", "t")
