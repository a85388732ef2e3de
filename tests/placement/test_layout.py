"""The GPU layout placement reads: NVLink islands and each GPU's nearest NIC, from the node's
inventory as a domain type (the stored bytes are converted in service/convert.py, not here)."""

from __future__ import annotations

from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.scheduler.placement.layout import GpuLayout, gpu_layout
from gpufleet.scheduler.placement.model import NicAffinity
from gpufleet.scheduler.service.convert import stored_inventories
from gpufleet.scheduler.topology.inventory import Gpu, GpuLink, GpuNic, NodeInventory


def test_islands_join_through_other_gpus_and_the_nearest_nic_wins() -> None:
    inv = NodeInventory(
        "n1", gpus=tuple(Gpu(i) for i in range(6)),
        gpu_links=(GpuLink(0, 1, 2), GpuLink(1, 2, 2), GpuLink(3, 4, 1), GpuLink(2, 3, 0),
                   GpuLink(5, 9, 4)),
        gpu_nics=(GpuNic(0, "mlx5_1", "SYS"), GpuNic(0, "mlx5_0", "PIX"),
                  GpuNic(3, "mlx5_0", "PXB"), GpuNic(3, "mlx5_1", "PHB"),
                  GpuNic(4, "mlx5_2", None)))
    layout = gpu_layout(inv)
    assert layout.islands == (frozenset({0, 1, 2}), frozenset({3, 4}), frozenset({5}))
    assert layout.nics == {0: NicAffinity("mlx5_0", "PIX"), 3: NicAffinity("mlx5_0", "PXB"),
                           4: NicAffinity("mlx5_2", "SYS")}


def test_no_link_matrix_means_islands_not_known() -> None:
    inv = NodeInventory("n1", gpus=tuple(Gpu(i) for i in range(4)))
    assert gpu_layout(inv) == GpuLayout((), {})


class _Store:
    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs

    def inventory(self, name: str) -> bytes | None:
        return self.blobs.get(name)


def test_the_stored_inventory_reaches_placement_as_a_layout() -> None:
    inv = pb.NodeInventory(node_name="n1", boot_id="b-1", gpus=[pb.Gpu(index=i) for i in range(2)])
    inv.gpu_links.add(gpu_a=0, gpu_b=1, nvlink_count=12)
    inv.gpu_nic_affinity.add(gpu_index=1, hca="mlx5_0", pcie_relation=pb.PCIE_RELATION_NODE)
    inventories = stored_inventories(_Store({"n1": inv.SerializeToString()}))
    got = inventories("n1")
    assert got is not None and got.boot_id == "b-1"
    assert gpu_layout(got) == GpuLayout((frozenset({0, 1}),), {1: NicAffinity("mlx5_0", "NODE")})
    assert inventories("n2") is None
