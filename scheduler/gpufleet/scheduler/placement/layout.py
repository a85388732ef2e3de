"""A node's GPU layout as placement needs it: NVLink islands and each GPU's nearest NIC,
computed from the node's inventory as a domain type (topology/inventory.py). Pure: how an
inventory is stored or sent is converted elsewhere (service/convert.py), never here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gpufleet.scheduler.placement.model import PCIE_RANK, NicAffinity
from gpufleet.scheduler.topology.inventory import NodeInventory

__all__ = ["GpuLayout", "gpu_layout"]


@dataclass(frozen=True)
class GpuLayout:
    """`islands` () = not known (no link matrix reported); `nics`: GPU index -> nearest NIC."""

    islands: tuple[frozenset[int], ...] = ()
    nics: Mapping[int, NicAffinity] = field(default_factory=dict)


def gpu_layout(inv: NodeInventory) -> GpuLayout:
    """Islands: GPUs joined by NVLink, directly or through others (NVSwitch); a GPU's NIC:
    the closest of those it reports (a relation not known counts as SYS)."""
    root = {g.index: g.index for g in inv.gpus}

    def find(x: int) -> int:
        while root[x] != x:
            root[x] = root[root[x]]
            x = root[x]
        return x

    for link in inv.gpu_links:
        if link.nvlink_count > 0 and link.gpu_a in root and link.gpu_b in root:
            root[find(link.gpu_a)] = find(link.gpu_b)
    groups: dict[int, set[int]] = {}
    for g in root:
        groups.setdefault(find(g), set()).add(g)
    islands = tuple(sorted((frozenset(s) for s in groups.values()), key=min))
    nics: dict[int, NicAffinity] = {}
    for aff in inv.gpu_nics:
        rel = aff.pcie_relation if aff.pcie_relation in PCIE_RANK else "SYS"
        old = nics.get(aff.gpu_index)
        if old is None or PCIE_RANK[rel] < PCIE_RANK[old.relation]:
            nics[aff.gpu_index] = NicAffinity(aff.hca, rel)
    return GpuLayout(islands if inv.gpu_links else (), nics)
