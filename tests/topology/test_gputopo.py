"""Node GPU topology: `topo -m` rendering and parsing over the simulated NVML profiles (checked
against real nvidia-smi output in tests/conformance/test_gputopo_real.py)."""

from __future__ import annotations

import pytest
from gpufleet.agent import nvml_sim, wire
from gpufleet.agent.nvml import NvmlBackend, load_library
from gpufleet.rpc.v1 import fleet_pb2
from gpufleet.scheduler.service.convert import inventory_from_pb
from gpufleet.scheduler.topology.gputopo import (
    from_inventory,
    nvlink_islands,
    parse_topo_m,
    render_topo_m,
)
from gpufleet.scheduler.topology.inventory import NodeInventory


def _sim_inventory(profile: str) -> NodeInventory:
    """The simulated profile's inventory as the agent sends it, read as the controller does."""
    return inventory_from_pb(sim_inventory_pb(profile))


def sim_inventory_pb(profile: str) -> fleet_pb2.NodeInventory:
    """The simulated profile's inventory as the agent sends it."""
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
