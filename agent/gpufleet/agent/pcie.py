"""GPU<->NIC PCIe relation from sysfs, the way `nvidia-smi topo -m` labels it.

Reads only /sys (root configurable for tests); never touches NVML.
"""

from __future__ import annotations

import os
from pathlib import Path

from gpufleet.agent.telemetry import PcieRelation


def _pci_path(sys_root: Path, bus_id: str) -> list[str]:
    """Chain of PCI addresses from the root port down to the device."""
    real = os.path.realpath(sys_root / "bus/pci/devices" / bus_id)
    return [p for p in real.split("/") if p.count(":") == 2 and "." in p]


def _numa(sys_root: Path, bus_id: str) -> int:
    try:
        return int((sys_root / "bus/pci/devices" / bus_id / "numa_node").read_text())
    except (OSError, ValueError):
        return -1


def relation(sys_root: Path, a: str, b: str) -> PcieRelation:
    pa, pb = _pci_path(sys_root, a), _pci_path(sys_root, b)
    if not pa or not pb:
        return PcieRelation.SYS
    common = 0
    for x, y in zip(pa, pb, strict=False):
        if x != y:
            break
        common += 1
    if common == 0:
        # different root complexes: same NUMA node is NODE, else across the CPU link
        na, nb = _numa(sys_root, a), _numa(sys_root, b)
        return PcieRelation.NODE if na == nb and na >= 0 else PcieRelation.SYS
    # the shared part ends at the root port (depth 1) = host bridge; deeper = PCIe switches.
    # A switch shows as two levels (upstream + downstream port): 3 shared levels = one switch.
    if common == 1:
        return PcieRelation.PHB
    return PcieRelation.PIX if common <= 3 else PcieRelation.PXB


def nic_affinity(
    gpu_bus_ids: dict[int, str], sys_root: Path = Path("/sys")
) -> list[tuple[int, str, PcieRelation]]:
    ib = sys_root / "class/infiniband"
    try:
        hcas = sorted(os.listdir(ib))
    except OSError:
        return []
    out = []
    for hca in hcas:
        nic_bus = os.path.basename(os.path.realpath(ib / hca / "device"))
        for gpu, bus in sorted(gpu_bus_ids.items()):
            out.append((gpu, hca, relation(sys_root, bus, nic_bus)))
    return out
