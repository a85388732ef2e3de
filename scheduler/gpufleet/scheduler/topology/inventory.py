"""A node's inventory as the controller's domain code reads it: GPUs, the links between them,
which NIC each GPU is near, and the InfiniBand ports.

The agent sends it as the wire's `NodeInventory` (gpufleet.rpc.v1); the controller converts
it once, in gpufleet.scheduler.service.convert, so topology, placement and repair never see
protobuf. PCIe relations are nvidia-smi's names ("PIX", "PXB", "PHB", "NODE", "SYS"; "X" for
a device and itself), or None when the agent could not tell.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str = ""
    pci_bus_id: str = ""
    model: str = ""
    memory_total_bytes: int = 0
    numa_node: int | None = None
    nvlink_count: int = 0


@dataclass(frozen=True)
class GpuLink:
    """One unordered GPU pair (gpu_a < gpu_b)."""

    gpu_a: int
    gpu_b: int
    nvlink_count: int = 0  # active NVLinks joining the pair, directly or through NVSwitch
    pcie_relation: str | None = None


@dataclass(frozen=True)
class GpuNic:
    gpu_index: int
    hca: str  # mlx5_0
    pcie_relation: str | None = None


@dataclass(frozen=True)
class IbPort:
    hca: str
    port: int = 1
    node_guid: str = ""
    port_guid: str = ""
    state: str = ""  # ACTIVE, DOWN, INIT, ARMED
    link_layer: str = ""  # InfiniBand or Ethernet
    rate_gbps: float = 0.0


@dataclass(frozen=True)
class NodeInventory:
    node_name: str
    boot_id: str = ""
    gpus: tuple[Gpu, ...] = ()
    gpu_links: tuple[GpuLink, ...] = ()
    gpu_nics: tuple[GpuNic, ...] = ()
    ib_ports: tuple[IbPort, ...] = ()
