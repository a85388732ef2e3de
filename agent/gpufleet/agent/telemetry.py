"""Typed values the agent collects. Units are in the names; None means "not measured"."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol


class PcieRelation(IntEnum):
    """How two PCIe devices reach each other, as `nvidia-smi topo -m` names it.

    Values match the wire contract's PcieRelation enum.
    """

    SELF = 1
    PIX = 2
    PXB = 3
    PHB = 4
    NODE = 5
    SYS = 6


@dataclass(frozen=True, slots=True)
class GpuInfo:
    index: int
    uuid: str
    pci_bus_id: str
    model: str
    memory_total_bytes: int
    numa_node: int | None
    serial: str
    vbios_version: str
    nvlink_count: int


@dataclass(frozen=True, slots=True)
class GpuLinkInfo:
    gpu_a: int
    gpu_b: int
    nvlink_count: int
    pcie_relation: PcieRelation


@dataclass(frozen=True, slots=True)
class GpuSample:
    index: int
    lost: bool = False
    temperature_c: float | None = None
    memory_temperature_c: float | None = None
    power_w: float | None = None
    energy_mj: int | None = None
    utilization_gpu_pct: float | None = None
    utilization_memory_pct: float | None = None
    memory_used_bytes: int | None = None
    sm_clock_mhz: int | None = None
    memory_clock_mhz: int | None = None
    throttle_reasons: int | None = None
    ecc_sbe_volatile: int | None = None
    ecc_dbe_volatile: int | None = None
    ecc_sbe_aggregate: int | None = None
    ecc_dbe_aggregate: int | None = None
    remapped_rows_pending: int | None = None
    remapped_rows_failure: int | None = None
    pcie_link_gen: int | None = None
    pcie_link_gen_max: int | None = None
    pcie_link_width: int | None = None
    pcie_link_width_max: int | None = None
    pcie_replay_count: int | None = None
    nvlink_up_count: int = 0
    nvlink_down_count: int = 0
    nvlink_crc_errors: int | None = None
    nvlink_replay_errors: int | None = None
    nvlink_recovery_errors: int | None = None
    persistence_mode: bool | None = None


@dataclass(frozen=True, slots=True)
class XidEvent:
    gpu_index: int | None  # None when NVML could not tell which device
    xid: int  # 0 when `lost` (no Xid was logged)
    timestamp_ms: int
    source: str  # "nvml" or "kmsg"
    message: str = ""  # the driver's words after the Xid number (kernel log only)
    lost: bool = False  # the kernel log says the GPU fell off the bus, without an Xid line


class GpuBackendError(Exception):
    """The GPU library failed as a whole (not one field of one GPU)."""


class GpuBackend(Protocol):
    """Every call the agent makes to the GPUs; implemented over real or simulated NVML
    (nvml.NvmlBackend). A backend that cannot answer one of the per-GPU questions leaves
    that GPU out of the answer (or says None) rather than guessing."""

    name: str

    def driver_version(self) -> str: ...

    def cuda_driver_version(self) -> str: ...

    def inventory(self) -> list[GpuInfo]: ...

    def links(self) -> list[GpuLinkInfo]: ...

    def nic_affinity(self) -> list[tuple[int, str, PcieRelation]]: ...

    def sample(self) -> list[GpuSample]: ...

    def wait_xid(self, timeout_ms: int) -> XidEvent | None: ...

    def compute_pids(self, gpus: Iterable[int]) -> dict[int, tuple[int, ...]]:
        """Pids of the compute processes per GPU; a GPU that cannot tell is left out."""
        ...

    def retired_pages_pending(self) -> dict[int, bool | None]:
        """Per GPU: retired pages waiting for a reset (None: not supported)."""
        ...

    def expire_counters(self) -> None:
        """Make the next sample read every counter afresh (a job started or ended)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class IbPortInfo:
    """One InfiniBand (or RoCE) port as sysfs describes it: inventory and state."""

    hca: str  # mlx5_0
    port: int  # 1-based
    node_guid: str  # 0x-prefixed, 16 lower-case hex digits: 0x506b4b0300c1a2b4
    port_guid: str
    lid: int
    sm_lid: int
    state: str  # ACTIVE, DOWN, INIT, ARMED (sysfs "4: ACTIVE" -> "ACTIVE")
    phys_state: str  # LinkUp, Polling, Disabled (sysfs "5: LinkUp" -> "LinkUp")
    rate_gbps: float  # sysfs "400 Gb/sec (4X NDR)" -> 400.0
    link_layer: str  # InfiniBand or Ethernet
    numa_node: int | None = None


@dataclass(frozen=True, slots=True)
class IbPortSample:
    """A port's state and its standard error counters (None where the counter is missing)."""

    hca: str
    port: int
    state: str
    phys_state: str
    rate_gbps: float
    symbol_error: int | None = None
    link_downed: int | None = None
    link_error_recovery: int | None = None
    port_rcv_errors: int | None = None
    port_xmit_discards: int | None = None


@dataclass(frozen=True, slots=True)
class DiskUsage:
    path: str
    used_bytes: int
    total_bytes: int


@dataclass(frozen=True, slots=True)
class HostSample:
    cpu_pct: float
    memory_used_bytes: int
    memory_total_bytes: int
    load_1m: float
    disks: tuple[DiskUsage, ...] = ()
