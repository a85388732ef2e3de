"""Node GPU topology: `topo -m` rendering and parsing over the simulated NVML profiles (checked
against real nvidia-smi output in tests/conformance/test_gputopo_real.py)."""

from __future__ import annotations

import pytest
from gpufleet.agent import nvml_sim
from gpufleet.scheduler.topology.gputopo import (
    from_inventory,
    nvlink_islands,
    parse_topo_m,
    render_topo_m,
)

from tests.support.inventory import sim_inventory


@pytest.mark.parametrize("profile", sorted(nvml_sim.PROFILES))
def test_render_parse_round_trip_and_islands(profile: str) -> None:
    m = from_inventory(sim_inventory(profile))
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
