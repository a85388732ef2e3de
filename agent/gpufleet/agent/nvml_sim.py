"""A simulated NVML with the names, constants and error classes of `pynvml`.

The agent talks to this module exactly as it talks to `pynvml` (nvidia-ml-py); everything
above `gpufleet.agent.nvml` is the same code for real and simulated GPUs. The GPUs come from a
hardware profile (see `PROFILES`), and faults are injected through a small JSON file that
another process (a test, `gpufleet-agent sim inject`, the demo) appends to, so a fault can be
injected into a running agent from outside.

Calls are plain attribute reads and arithmetic on purpose: the agent-overhead benchmark must
measure the agent, not the simulator. This module must never import the real `pynvml`.

One module (~890 lines) on purpose: it stands in for `pynvml`, which is one flat module, and
must offer the same names from one import.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------- constants (values as in pynvml)

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999

NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_GRAPHICS = 0
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2
NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
NVML_AGGREGATE_ECC = 1
NVML_FEATURE_DISABLED = 0
NVML_FEATURE_ENABLED = 1

NVML_TOPOLOGY_INTERNAL = 0
NVML_TOPOLOGY_SINGLE = 10
NVML_TOPOLOGY_MULTIPLE = 20
NVML_TOPOLOGY_HOSTBRIDGE = 30
NVML_TOPOLOGY_NODE = 40
NVML_TOPOLOGY_SYSTEM = 50

NVML_NVLINK_MAX_LINKS = 36
NVML_NVLINK_ERROR_DL_REPLAY = 0
NVML_NVLINK_ERROR_DL_RECOVERY = 1
NVML_NVLINK_ERROR_DL_CRC_FLIT = 2
NVML_NVLINK_ERROR_DL_CRC_DATA = 3
NVML_NVLINK_DEVICE_TYPE_GPU = 0
NVML_NVLINK_DEVICE_TYPE_IBMNPU = 1
NVML_NVLINK_DEVICE_TYPE_SWITCH = 2

nvmlEventTypeSingleBitEccError = 0x1
nvmlEventTypeDoubleBitEccError = 0x2
nvmlEventTypeXidCriticalError = 0x8

nvmlClocksThrottleReasonGpuIdle = 0x1
nvmlClocksThrottleReasonSwPowerCap = 0x4
nvmlClocksThrottleReasonHwSlowdown = 0x8
nvmlClocksThrottleReasonSwThermalSlowdown = 0x20
nvmlClocksThrottleReasonHwThermalSlowdown = 0x40
nvmlClocksThrottleReasonHwPowerBrakeSlowdown = 0x80

NVML_FI_DEV_MEMORY_TEMP = 82


# ---------------------------------------------------------------- errors (same names as pynvml)


class NVMLError(Exception):
    """Base class; `value` is the NVML return code, as in pynvml."""

    _value = NVML_ERROR_UNKNOWN

    def __init__(self, value: int | None = None) -> None:
        self.value = self._value if value is None else value
        super().__init__(self.value)

    def __str__(self) -> str:
        return _ERROR_STRINGS.get(self.value, f"NVML error {self.value}")


class NVMLError_Uninitialized(NVMLError):
    _value = NVML_ERROR_UNINITIALIZED


class NVMLError_InvalidArgument(NVMLError):
    _value = NVML_ERROR_INVALID_ARGUMENT


class NVMLError_NotSupported(NVMLError):
    _value = NVML_ERROR_NOT_SUPPORTED


class NVMLError_NoPermission(NVMLError):
    _value = NVML_ERROR_NO_PERMISSION


class NVMLError_NotFound(NVMLError):
    _value = NVML_ERROR_NOT_FOUND


class NVMLError_Timeout(NVMLError):
    _value = NVML_ERROR_TIMEOUT


class NVMLError_LibraryNotFound(NVMLError):
    _value = NVML_ERROR_LIBRARY_NOT_FOUND


class NVMLError_FunctionNotFound(NVMLError):
    _value = NVML_ERROR_FUNCTION_NOT_FOUND


class NVMLError_GpuIsLost(NVMLError):
    _value = NVML_ERROR_GPU_IS_LOST


class NVMLError_Unknown(NVMLError):
    _value = NVML_ERROR_UNKNOWN


_ERROR_STRINGS = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_TIMEOUT: "Timeout",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


# ---------------------------------------------------------------- hardware profiles


@dataclass(frozen=True)
class GpuSpec:
    bus_id: str
    numa_node: int
    pcie_switch: int  # GPUs (and NICs) with the same number share a PCIe switch
    socket: int
    nics: tuple[str, ...] = ()  # HCAs behind the same PCIe switch


@dataclass(frozen=True)
class Profile:
    name: str
    model: str
    memory_total_bytes: int
    power_idle_w: float
    power_max_w: float
    sm_clock_max_mhz: int
    memory_clock_mhz: int
    pcie_gen_max: int
    pcie_width_max: int
    nvlinks_per_gpu: int
    # "switch": every link goes to an NVSwitch (all GPUs form one island);
    # "pairs": NVLink bridges join GPU 2k with 2k+1; "none": PCIe only.
    nvlink_fabric: str
    gpus: tuple[GpuSpec, ...]
    driver_version: str = "550.90.07"
    cuda_driver_version: int = 12040
    has_memory_temperature: bool = True
    has_remapped_rows: bool = True


_GIB = 1024**3

PROFILES: dict[str, Profile] = {
    # DGX H100: 8x H100 SXM5 80GB, 4 NVSwitch (18 NVLink4 per GPU), 2 sockets; every GPU
    # sits behind its own PCIe switch together with one ConnectX-7 compute NIC.
    "dgx-h100": Profile(
        name="dgx-h100",
        model="NVIDIA H100 80GB HBM3",
        memory_total_bytes=80 * _GIB,
        power_idle_w=70.0,
        power_max_w=700.0,
        sm_clock_max_mhz=1980,
        memory_clock_mhz=2619,
        pcie_gen_max=5,
        pcie_width_max=16,
        nvlinks_per_gpu=18,
        nvlink_fabric="switch",
        gpus=tuple(
            GpuSpec(bus, 0 if i < 4 else 1, i, 0 if i < 4 else 1, (f"mlx5_{i}",))
            for i, bus in enumerate(
                ["0000:18:00.0", "0000:2a:00.0", "0000:3a:00.0", "0000:5d:00.0",
                 "0000:9a:00.0", "0000:ab:00.0", "0000:ba:00.0", "0000:db:00.0"]
            )
        ),
    ),
    # HGX/DGX A100: 8x A100 SXM4 80GB, 6 NVSwitch (12 NVLink3 per GPU); GPUs in pairs behind
    # PCIe switches with two HCAs each; NPS4 gives 8 NUMA nodes, pairs on 3,1,7,5.
    "hgx-a100": Profile(
        name="hgx-a100",
        model="NVIDIA A100-SXM4-80GB",
        memory_total_bytes=80 * _GIB,
        power_idle_w=60.0,
        power_max_w=400.0,
        sm_clock_max_mhz=1410,
        memory_clock_mhz=1593,
        pcie_gen_max=4,
        pcie_width_max=16,
        nvlinks_per_gpu=12,
        nvlink_fabric="switch",
        driver_version="535.154.05",
        cuda_driver_version=12020,
        gpus=tuple(
            GpuSpec(bus, (3, 1, 7, 5)[i // 2], i // 2, 0 if i < 4 else 1,
                    (f"mlx5_{i // 2 * 2}", f"mlx5_{i // 2 * 2 + 1}"))
            for i, bus in enumerate(
                ["0000:07:00.0", "0000:0f:00.0", "0000:47:00.0", "0000:4e:00.0",
                 "0000:87:00.0", "0000:90:00.0", "0000:b7:00.0", "0000:bd:00.0"]
            )
        ),
    ),
    # 4x L40S PCIe, no NVLink, two per socket, one HCA per socket.
    "l40s-pcie": Profile(
        name="l40s-pcie",
        model="NVIDIA L40S",
        memory_total_bytes=48 * _GIB,
        power_idle_w=35.0,
        power_max_w=350.0,
        sm_clock_max_mhz=2520,
        memory_clock_mhz=9001,
        pcie_gen_max=4,
        pcie_width_max=16,
        nvlinks_per_gpu=0,
        nvlink_fabric="none",
        has_memory_temperature=False,
        has_remapped_rows=True,
        gpus=(
            GpuSpec("0000:41:00.0", 0, 0, 0, ("mlx5_0",)),
            GpuSpec("0000:61:00.0", 0, 1, 0),
            GpuSpec("0000:a1:00.0", 1, 2, 1, ("mlx5_1",)),
            GpuSpec("0000:c1:00.0", 1, 3, 1),
        ),
    ),
    # 4x A100 PCIe with NVLink bridges joining GPU pairs (0,1) and (2,3): two NVLink islands.
    "a100-pcie-bridged": Profile(
        name="a100-pcie-bridged",
        model="NVIDIA A100 80GB PCIe",
        memory_total_bytes=80 * _GIB,
        power_idle_w=45.0,
        power_max_w=300.0,
        sm_clock_max_mhz=1410,
        memory_clock_mhz=1512,
        pcie_gen_max=4,
        pcie_width_max=16,
        nvlinks_per_gpu=12,
        nvlink_fabric="pairs",
        gpus=(
            GpuSpec("0000:17:00.0", 0, 0, 0, ("mlx5_0",)),
            GpuSpec("0000:31:00.0", 0, 1, 0),
            GpuSpec("0000:b1:00.0", 1, 2, 1, ("mlx5_1",)),
            GpuSpec("0000:ca:00.0", 1, 3, 1),
        ),
    ),
}

DEFAULT_PROFILE = "dgx-h100"


# ---------------------------------------------------------------- simulator state


@dataclass
class _Gpu:
    index: int
    spec: GpuSpec
    uuid: str
    serial: str
    lost: bool = False
    nvlink_down: set[int] = field(default_factory=set)
    overheat_c: float | None = None
    ecc_dbe: int = 0
    ecc_sbe: int = 0
    rows_pending: bool = False
    rows_failure: bool = False
    pcie_width: int | None = None  # None: trained at max
    nvlink_crc_errors: int = 0
    hw_power_brake: bool = False
    energy_mj: float = 0.0
    last_energy_t: float = 0.0
    # compute processes as (pid, used memory in bytes): set by a "processes" fault
    processes: list[tuple[int, int]] = field(default_factory=list)


def _clear(g: _Gpu, _fault: dict[str, Any]) -> None:
    g.lost = False
    g.nvlink_down.clear()
    g.overheat_c = None
    g.pcie_width = None
    g.rows_failure = g.rows_pending = g.hw_power_brake = False


def _reset(g: _Gpu, _fault: dict[str, Any]) -> None:
    """What a GPU reset fixes: volatile ECC counts, a pending row remap (applied at reset),
    NVLink and PCIe training. Not a GPU off the bus (that needs a reboot), nor a failed
    row remap (that needs service)."""
    g.ecc_dbe = 0
    g.rows_pending = False
    g.nvlink_down.clear()
    g.pcie_width = None


# fault kind -> how it changes the simulated GPU (xid is handled apart: it is an event)
_FAULTS: dict[str, Any] = {
    "gpu_lost": lambda g, f: setattr(g, "lost", True),
    "nvlink_down": lambda g, f: g.nvlink_down.add(int(f.get("link", 0))),
    "overheat": lambda g, f: setattr(g, "overheat_c", float(f.get("temperature_c", 95.0))),
    "ecc_dbe": lambda g, f: setattr(g, "ecc_dbe", g.ecc_dbe + int(f.get("count", 1))),
    "row_remap_failure": lambda g, f: setattr(g, "rows_failure", True),
    "row_remap_pending": lambda g, f: setattr(g, "rows_pending", True),
    "pcie_downtrain": lambda g, f: setattr(g, "pcie_width", int(f.get("width", 8))),
    "nvlink_errors": lambda g, f: setattr(
        g, "nvlink_crc_errors", g.nvlink_crc_errors + int(f.get("count", 100))),
    "power_brake": lambda g, f: setattr(g, "hw_power_brake", True),
    "clear": _clear,
    "reset": _reset,
}
FAULT_KINDS = ("xid", *_FAULTS)


class c_nvmlMemory_t:
    def __init__(self, total: int, used: int) -> None:
        self.total = total
        self.used = used
        self.free = total - used


class c_nvmlUtilization_t:
    def __init__(self, gpu: int, memory: int) -> None:
        self.gpu = gpu
        self.memory = memory


class nvmlPciInfo_t:
    def __init__(self, bus_id: str) -> None:
        self.busId = bus_id
        self.busIdLegacy = bus_id[4:]
        dom, bus, devfn = bus_id.split(":")
        self.domain = int(dom, 16)
        self.bus = int(bus, 16)
        self.device = int(devfn.split(".")[0], 16)


class c_nvmlEventData_t:
    def __init__(self, device: _Handle, event_type: int, event_data: int) -> None:
        self.device = device
        self.eventType = event_type
        self.eventData = event_data
        self.gpuInstanceId = 0xFFFFFFFF
        self.computeInstanceId = 0xFFFFFFFF


class c_nvmlFieldValue_t:
    class _Value:
        def __init__(self, v: int) -> None:
            self.ullVal = v
            self.uiVal = v
            self.sllVal = v

    def __init__(self, field_id: int, ret: int, value: int) -> None:
        self.fieldId = field_id
        self.nvmlReturn = ret
        self.value = self._Value(value)


class c_nvmlProcessInfo_t:
    """One compute process on a GPU, with the attribute names pynvml gives it."""

    def __init__(self, pid: int, used_gpu_memory_bytes: int | None) -> None:
        self.pid = pid
        self.usedGpuMemory = used_gpu_memory_bytes  # None: NVML_VALUE_NOT_AVAILABLE
        self.gpuInstanceId = 0xFFFFFFFF
        self.computeInstanceId = 0xFFFFFFFF


class _Handle:
    """Opaque device handle, like pynvml's c_nvmlDevice_t pointer."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"<simulated nvmlDevice {self.index}>"


class _EventSet:
    def __init__(self) -> None:
        self.registered: dict[int, int] = {}  # gpu index -> event type mask


class _Simulator:
    def __init__(self, profile: Profile, faults_path: Path | None, seed: int) -> None:
        self.profile = profile
        self.faults_path = faults_path
        self.seed = seed
        self.started = time.monotonic()
        self.gpus = [
            _Gpu(
                index=i,
                spec=spec,
                uuid=(f"GPU-{seed & 0xFFFFFFFF:08x}-{i:04x}-4000-8000-"
                      f"{zlib.crc32(profile.name.encode()):012x}"),
                serial=f"{1650000000000 + seed * 100 + i}",
            )
            for i, spec in enumerate(profile.gpus)
        ]
        self.pending_events: list[tuple[int, int, int]] = []  # (gpu, type, data)
        self.seen_fault_ids: set[str] = set()
        self.cond = threading.Condition()
        self.faults_mtime_ns = -1
        self.next_refresh = 0.0

    # Faults come from a JSON file: {"faults": [{"id": "...", "kind": "...", "gpu": N, ...}]}.
    def refresh(self) -> None:
        now = time.monotonic()
        if self.faults_path is None or now < self.next_refresh:
            return
        self.next_refresh = now + 0.02  # bounds the stat() rate; keeps injection latency ~20 ms
        try:
            mtime = self.faults_path.stat().st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self.faults_mtime_ns:
            return
        self.faults_mtime_ns = mtime
        try:
            faults = json.loads(self.faults_path.read_text())["faults"]
        except (OSError, ValueError, KeyError, TypeError):
            return  # a half-written file: the next refresh sees the complete one
        for fault in faults:
            fid = str(fault.get("id"))
            if fid in self.seen_fault_ids:
                continue
            self.seen_fault_ids.add(fid)
            self.apply(fault)

    def apply(self, fault: dict[str, Any]) -> None:
        kind = fault["kind"]
        gpu = self.gpus[int(fault["gpu"])]
        with self.cond:
            if kind == "xid":
                xid = int(fault["xid"])
                self.pending_events.append((gpu.index, nvmlEventTypeXidCriticalError, xid))
                if xid == 79:  # "GPU has fallen off the bus": the device stops answering
                    gpu.lost = True
                elif xid == 48:  # double-bit ECC error
                    gpu.ecc_dbe += 1
                self.cond.notify_all()
                return
            if kind == "processes":  # not a fault: which pids run on the GPU from now on
                gpu.processes = [(int(p["pid"]), int(p.get("used_memory_bytes", 0)))
                                 for p in fault.get("processes", [])]
                return
            change = _FAULTS.get(kind)
            if change is None:
                raise ValueError(f"unknown simulated fault kind {kind!r}")
            change(gpu, fault)

    def gpu(self, handle: _Handle) -> _Gpu:
        if not isinstance(handle, _Handle):
            raise NVMLError_InvalidArgument()
        self.refresh()
        g = self.gpus[handle.index]
        if g.lost:
            raise NVMLError_GpuIsLost()
        return g

    def utilization(self, g: _Gpu) -> float:
        # A slow, deterministic load pattern per GPU: cheap and repeatable.
        t = time.monotonic() - self.started
        return 50.0 + 45.0 * math.sin(t / 30.0 + g.index)

    def power_w(self, g: _Gpu) -> float:
        p = self.profile
        return p.power_idle_w + (p.power_max_w - p.power_idle_w) * self.utilization(g) / 100.0


_lock = threading.Lock()
_config: dict[str, Any] = {"profile": DEFAULT_PROFILE, "faults_path": None, "seed": 1}
_sim: _Simulator | None = None


def configure(
    profile: str = DEFAULT_PROFILE, faults_path: str | Path | None = None, seed: int = 1
) -> None:
    """Choose the hardware profile and fault file; call before nvmlInit()."""
    if profile not in PROFILES:
        raise ValueError(
            f"unknown simulated GPU profile {profile!r}; choose one of {', '.join(PROFILES)}"
        )
    _config.update(profile=profile, faults_path=Path(faults_path) if faults_path else None,
                   seed=seed)


def _s() -> _Simulator:
    sim = _sim
    if sim is None:
        raise NVMLError_Uninitialized()
    return sim


# ---------------------------------------------------------------- library


def nvmlInit() -> None:
    global _sim  # noqa: PLW0603 - NVML itself is process-global state
    with _lock:
        if _sim is None:
            _sim = _Simulator(PROFILES[_config["profile"]], _config["faults_path"], _config["seed"])


def nvmlInitWithFlags(flags: int) -> None:
    nvmlInit()


def nvmlShutdown() -> None:
    global _sim  # noqa: PLW0603
    with _lock:
        _sim = None


def nvmlSystemGetDriverVersion() -> str:
    return _s().profile.driver_version


def nvmlSystemGetCudaDriverVersion() -> int:
    return _s().profile.cuda_driver_version


nvmlSystemGetCudaDriverVersion_v2 = nvmlSystemGetCudaDriverVersion


def nvmlDeviceGetCount() -> int:
    sim = _s()
    sim.refresh()
    return len(sim.gpus)


def nvmlDeviceGetHandleByIndex(index: int) -> _Handle:
    sim = _s()
    if not 0 <= index < len(sim.gpus):
        raise NVMLError_InvalidArgument()
    return _Handle(index)


def nvmlDeviceGetIndex(handle: _Handle) -> int:
    return _s().gpu(handle).index


def nvmlDeviceGetUUID(handle: _Handle) -> str:
    return _s().gpu(handle).uuid


def nvmlDeviceGetName(handle: _Handle) -> str:
    sim = _s()
    sim.gpu(handle)
    return sim.profile.model


def nvmlDeviceGetSerial(handle: _Handle) -> str:
    return _s().gpu(handle).serial


def nvmlDeviceGetVbiosVersion(handle: _Handle) -> str:
    _s().gpu(handle)
    return "96.00.89.00.01"


def nvmlDeviceGetPciInfo(handle: _Handle) -> nvmlPciInfo_t:
    return nvmlPciInfo_t(_s().gpu(handle).spec.bus_id)


nvmlDeviceGetPciInfo_v3 = nvmlDeviceGetPciInfo


def nvmlDeviceGetNumaNodeId(handle: _Handle) -> int:
    return _s().gpu(handle).spec.numa_node


def nvmlDeviceGetMemoryInfo(handle: _Handle, version: int | None = None) -> c_nvmlMemory_t:
    sim = _s()
    g = sim.gpu(handle)
    total = sim.profile.memory_total_bytes
    return c_nvmlMemory_t(total, int(total * sim.utilization(g) / 120.0))


def nvmlDeviceGetTemperature(handle: _Handle, sensor: int) -> int:
    sim = _s()
    g = sim.gpu(handle)
    if sensor != NVML_TEMPERATURE_GPU:
        raise NVMLError_NotSupported()
    if g.overheat_c is not None:
        return int(g.overheat_c)
    return int(32 + 0.4 * sim.utilization(g))


def nvmlDeviceGetFieldValues(handle: _Handle, field_ids: list[int]) -> list[c_nvmlFieldValue_t]:
    sim = _s()
    g = sim.gpu(handle)
    out = []
    for fid in field_ids:
        if fid == NVML_FI_DEV_MEMORY_TEMP and sim.profile.has_memory_temperature:
            base = g.overheat_c if g.overheat_c is not None else 30 + 0.35 * sim.utilization(g)
            out.append(c_nvmlFieldValue_t(fid, NVML_SUCCESS, int(base) + 4))
        else:
            out.append(c_nvmlFieldValue_t(fid, NVML_ERROR_NOT_SUPPORTED, 0))
    return out


def nvmlDeviceGetPowerUsage(handle: _Handle) -> int:
    """Milliwatts, as NVML reports it."""
    sim = _s()
    return int(sim.power_w(sim.gpu(handle)) * 1000)


def nvmlDeviceGetTotalEnergyConsumption(handle: _Handle) -> int:
    """Millijoules since the driver loaded; integrates the simulated power draw."""
    sim = _s()
    g = sim.gpu(handle)
    now = time.monotonic()
    if g.last_energy_t:
        g.energy_mj += sim.power_w(g) * (now - g.last_energy_t) * 1000.0
    g.last_energy_t = now
    return int(g.energy_mj)


def nvmlDeviceGetUtilizationRates(handle: _Handle) -> c_nvmlUtilization_t:
    sim = _s()
    u = sim.utilization(sim.gpu(handle))
    return c_nvmlUtilization_t(int(u), int(u * 0.6))


def nvmlDeviceGetClockInfo(handle: _Handle, clock_type: int) -> int:
    sim = _s()
    g = sim.gpu(handle)
    if clock_type == NVML_CLOCK_MEM:
        return sim.profile.memory_clock_mhz
    clock = sim.profile.sm_clock_max_mhz
    return clock // 2 if g.overheat_c is not None else clock


def nvmlDeviceGetCurrentClocksThrottleReasons(handle: _Handle) -> int:
    g = _s().gpu(handle)
    reasons = 0
    if g.overheat_c is not None:
        reasons |= nvmlClocksThrottleReasonSwThermalSlowdown
        reasons |= nvmlClocksThrottleReasonHwThermalSlowdown
    if g.hw_power_brake:
        reasons |= nvmlClocksThrottleReasonHwPowerBrakeSlowdown
    return reasons


nvmlDeviceGetCurrentClocksEventReasons = nvmlDeviceGetCurrentClocksThrottleReasons


def nvmlDeviceGetTotalEccErrors(handle: _Handle, error_type: int, counter_type: int) -> int:
    g = _s().gpu(handle)
    return g.ecc_dbe if error_type == NVML_MEMORY_ERROR_TYPE_UNCORRECTED else g.ecc_sbe


def nvmlDeviceGetRemappedRows(handle: _Handle) -> tuple[int, int, int, int]:
    """(correctable rows, uncorrectable rows, is pending, failure occurred)."""
    sim = _s()
    g = sim.gpu(handle)
    if not sim.profile.has_remapped_rows:
        raise NVMLError_NotSupported()
    return (0, 1 if g.rows_failure else 0, int(g.rows_pending), int(g.rows_failure))


def nvmlDeviceGetCurrPcieLinkGeneration(handle: _Handle) -> int:
    sim = _s()
    sim.gpu(handle)
    return sim.profile.pcie_gen_max


def nvmlDeviceGetMaxPcieLinkGeneration(handle: _Handle) -> int:
    sim = _s()
    sim.gpu(handle)
    return sim.profile.pcie_gen_max


def nvmlDeviceGetCurrPcieLinkWidth(handle: _Handle) -> int:
    sim = _s()
    g = sim.gpu(handle)
    return g.pcie_width if g.pcie_width is not None else sim.profile.pcie_width_max


def nvmlDeviceGetMaxPcieLinkWidth(handle: _Handle) -> int:
    sim = _s()
    sim.gpu(handle)
    return sim.profile.pcie_width_max


def nvmlDeviceGetPcieReplayCounter(handle: _Handle) -> int:
    _s().gpu(handle)
    return 0


def nvmlDeviceGetPersistenceMode(handle: _Handle) -> int:
    _s().gpu(handle)
    return NVML_FEATURE_ENABLED


def nvmlDeviceGetComputeRunningProcesses(handle: _Handle) -> list[c_nvmlProcessInfo_t]:
    """The GPU's compute processes; set them with inject({"kind": "processes", "gpu": N,
    "processes": [{"pid": P, "used_memory_bytes": B}]}) or the same entry in the fault file."""
    g = _s().gpu(handle)
    return [c_nvmlProcessInfo_t(pid, mem) for pid, mem in g.processes]


nvmlDeviceGetComputeRunningProcesses_v3 = nvmlDeviceGetComputeRunningProcesses


def nvmlDeviceGetRetiredPagesPendingStatus(handle: _Handle) -> int:
    g = _s().gpu(handle)
    if _s().profile.has_remapped_rows:  # Ampere and later remap rows instead
        raise NVMLError_NotSupported()
    return int(g.rows_pending)


def _check_link(sim: _Simulator, g: _Gpu, link: int) -> None:
    if sim.profile.nvlinks_per_gpu == 0:
        raise NVMLError_NotSupported()
    if not 0 <= link < NVML_NVLINK_MAX_LINKS:
        raise NVMLError_InvalidArgument()
    if link >= sim.profile.nvlinks_per_gpu:
        raise NVMLError_NotSupported()
    del g


def nvmlDeviceGetNvLinkState(handle: _Handle, link: int) -> int:
    sim = _s()
    g = sim.gpu(handle)
    _check_link(sim, g, link)
    return NVML_FEATURE_DISABLED if link in g.nvlink_down else NVML_FEATURE_ENABLED


def nvmlDeviceGetNvLinkRemoteDeviceType(handle: _Handle, link: int) -> int:
    sim = _s()
    g = sim.gpu(handle)
    _check_link(sim, g, link)
    if sim.profile.nvlink_fabric == "switch":
        return NVML_NVLINK_DEVICE_TYPE_SWITCH
    return NVML_NVLINK_DEVICE_TYPE_GPU


def nvmlDeviceGetNvLinkRemotePciInfo(handle: _Handle, link: int) -> nvmlPciInfo_t:
    sim = _s()
    g = sim.gpu(handle)
    _check_link(sim, g, link)
    if sim.profile.nvlink_fabric == "switch":
        # links are striped over the NVSwitches, as on HGX boards
        switches = 4 if sim.profile.nvlinks_per_gpu == 18 else 6
        return nvmlPciInfo_t(f"0000:{0xC0 + link % switches:02x}:00.0")
    peer = g.index ^ 1  # NVLink bridge pairs (0,1), (2,3), ...
    return nvmlPciInfo_t(sim.gpus[peer].spec.bus_id)



def nvmlDeviceGetNvLinkErrorCounter(handle: _Handle, link: int, counter: int) -> int:
    sim = _s()
    g = sim.gpu(handle)
    _check_link(sim, g, link)
    # injected CRC errors all land on link 0
    return g.nvlink_crc_errors if (link == 0 and counter == NVML_NVLINK_ERROR_DL_CRC_DATA) else 0


def nvmlDeviceGetTopologyCommonAncestor(h1: _Handle, h2: _Handle) -> int:
    sim = _s()
    a, b = sim.gpu(h1).spec, sim.gpu(h2).spec
    if h1.index == h2.index:
        return NVML_TOPOLOGY_INTERNAL
    if a.pcie_switch == b.pcie_switch:
        return NVML_TOPOLOGY_MULTIPLE if sim.profile.name == "hgx-a100" else NVML_TOPOLOGY_SINGLE
    if a.numa_node == b.numa_node:
        return NVML_TOPOLOGY_NODE
    if a.socket == b.socket:
        return NVML_TOPOLOGY_NODE
    return NVML_TOPOLOGY_SYSTEM


def nvmlDeviceGetSupportedEventTypes(handle: _Handle) -> int:
    _s().gpu(handle)
    return nvmlEventTypeXidCriticalError | nvmlEventTypeDoubleBitEccError


def nvmlEventSetCreate() -> _EventSet:
    _s()
    return _EventSet()


def nvmlDeviceRegisterEvents(handle: _Handle, event_types: int, event_set: _EventSet) -> None:
    _s().gpu(handle)
    event_set.registered[handle.index] = event_types


def nvmlEventSetWait(event_set: _EventSet, timeout_ms: int) -> c_nvmlEventData_t:
    """Block up to timeout_ms for the next event on a registered GPU; NVMLError_Timeout if none."""
    sim = _s()
    deadline = time.monotonic() + timeout_ms / 1000.0
    while True:
        sim.refresh()
        with sim.cond:
            for i, (gpu, etype, data) in enumerate(sim.pending_events):
                if event_set.registered.get(gpu, 0) & etype:
                    del sim.pending_events[i]
                    return c_nvmlEventData_t(_Handle(gpu), etype, data)
            left = deadline - time.monotonic()
            if left <= 0:
                raise NVMLError_Timeout()
            # wake for in-process injections at once, and poll the fault file every 20 ms
            sim.cond.wait(min(left, 0.02))


nvmlEventSetWait_v2 = nvmlEventSetWait


def nvmlEventSetFree(event_set: _EventSet) -> None:
    event_set.registered.clear()


# ---------------------------------------------------------------- fault injection from outside


def inject(fault: dict[str, Any]) -> None:
    """Apply a fault to the simulator of this process (tests)."""
    sim = _s()
    if not 0 <= int(fault["gpu"]) < len(sim.gpus):
        raise ValueError(f"GPU index {fault['gpu']} out of range 0..{len(sim.gpus) - 1}")
    sim.apply(fault)


def append_fault(faults_path: str | Path, fault: dict[str, Any]) -> dict[str, Any]:
    """Add a fault to a fault file that a running simulated agent watches.

    The file is replaced atomically so the agent never reads half of it.
    """
    path = Path(faults_path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        doc = {"faults": []}
    fault = {"id": f"{time.time_ns()}-{os.getpid()}", **fault}
    doc["faults"].append(fault)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)
    return fault


def simulated_nic_affinity() -> list[tuple[int, str, int]]:
    """(gpu, hca, relation) for every GPU and HCA of the profile; relation values as in
    gpufleet's PcieRelation (2 PIX, 3 PXB, 5 NODE, 6 SYS). Real NVML has no such call: on
    hardware the agent derives it from sysfs PCI paths."""
    sim = _s()
    hcas = [(nic, spec) for spec in sim.profile.gpus for nic in spec.nics]
    out = []
    for g in sim.gpus:
        for nic, nic_spec in hcas:
            if nic_spec.pcie_switch == g.spec.pcie_switch:
                rel = 3 if sim.profile.name == "hgx-a100" else 2
            elif nic_spec.socket == g.spec.socket:
                rel = 5
            else:
                rel = 6
            out.append((g.index, nic, rel))
    return out
