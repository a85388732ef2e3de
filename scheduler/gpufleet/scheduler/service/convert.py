"""The wire's messages as the controller's domain types: the one place protobuf is read for
what domain packages need (topology, placement, repair)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.scheduler.topology.inventory import Gpu, GpuLink, GpuNic, IbPort, NodeInventory

_RELATION = {
    pb.PCIE_RELATION_SELF: "X", pb.PCIE_RELATION_PIX: "PIX", pb.PCIE_RELATION_PXB: "PXB",
    pb.PCIE_RELATION_PHB: "PHB", pb.PCIE_RELATION_NODE: "NODE", pb.PCIE_RELATION_SYS: "SYS",
}


def inventory_from_pb(inv: pb.NodeInventory) -> NodeInventory:
    return NodeInventory(
        node_name=inv.node_name, boot_id=inv.boot_id,
        gpus=tuple(Gpu(g.index, g.uuid, g.pci_bus_id, g.model, g.memory_total_bytes,
                       g.numa_node if g.HasField("numa_node") else None, g.nvlink_count)
                   for g in inv.gpus),
        gpu_links=tuple(GpuLink(lk.gpu_a, lk.gpu_b, lk.nvlink_count,
                                _RELATION.get(lk.pcie_relation))
                        for lk in inv.gpu_links),
        gpu_nics=tuple(GpuNic(a.gpu_index, a.hca, _RELATION.get(a.pcie_relation))
                       for a in inv.gpu_nic_affinity),
        ib_ports=tuple(IbPort(p.hca, p.port, p.node_guid, p.port_guid, p.state, p.link_layer,
                              p.rate_gbps)
                       for p in inv.ib_ports),
    )


def inventory_from_blob(blob: bytes) -> NodeInventory:
    """A stored inventory (the agent's Hello.inventory as it came off the wire)."""
    inv = pb.NodeInventory()
    inv.ParseFromString(blob)
    return inventory_from_pb(inv)


class _InventoryStore(Protocol):
    def inventory(self, name: str) -> bytes | None: ...


def stored_inventories(store: _InventoryStore) -> Callable[[str], NodeInventory | None]:
    """node -> its inventory as the store keeps it (None: none stored), for placement."""
    def inventory(node: str) -> NodeInventory | None:
        blob = store.inventory(node)
        return inventory_from_blob(blob) if blob else None

    return inventory
