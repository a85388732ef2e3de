"""The one door to NVML: the only module that touches `pynvml` (real or simulated).

It starts NVML lazily under a lock and shuts it down at exit, turns "library not found" into
a message that says how to fix it, falls back across versioned functions (`_v3` -> `_v2` ->
plain), and degrades per field and per GPU: a field NVML does not support is None, a GPU that
fell off the bus is reported as lost while the others keep reporting.

It must never let an NVML exception escape except as `GpuBackendError`.

One module on purpose (~500 lines): it is the agent's only door to NVML, and the fallbacks per
function version and per field are easiest to check side by side.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar, cast

from gpufleet.agent.telemetry import (
    GpuBackendError,
    GpuInfo,
    GpuLinkInfo,
    GpuSample,
    PcieRelation,
    XidEvent,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# Versioned NVML entry points, newest first: drivers and nvidia-ml-py releases differ in
# which of these exist, and a missing one raises FunctionNotFound or AttributeError.
FALLBACKS: dict[str, tuple[str, ...]] = {
    "pci_info": ("nvmlDeviceGetPciInfo_v3", "nvmlDeviceGetPciInfo"),
    "remote_pci_info": ("nvmlDeviceGetNvLinkRemotePciInfo_v2", "nvmlDeviceGetNvLinkRemotePciInfo"),
    "numa_node": ("nvmlDeviceGetNumaNodeId",),
    "throttle_reasons": (
        "nvmlDeviceGetCurrentClocksEventReasons",
        "nvmlDeviceGetCurrentClocksThrottleReasons",
    ),
    "cuda_driver_version": ("nvmlSystemGetCudaDriverVersion_v2", "nvmlSystemGetCudaDriverVersion"),
    "event_wait": ("nvmlEventSetWait_v2", "nvmlEventSetWait"),
    "compute_processes": (
        "nvmlDeviceGetComputeRunningProcesses_v3",
        "nvmlDeviceGetComputeRunningProcesses_v2",
        "nvmlDeviceGetComputeRunningProcesses",
    ),
}

_TOPOLOGY_TO_RELATION = {
    0: PcieRelation.SELF,  # NVML_TOPOLOGY_INTERNAL
    10: PcieRelation.PIX,  # SINGLE
    20: PcieRelation.PXB,  # MULTIPLE
    30: PcieRelation.PHB,  # HOSTBRIDGE
    40: PcieRelation.NODE,
    50: PcieRelation.SYS,
}

NVML_FI_DEV_MEMORY_TEMP = 82
_NVLINK_MAX_LINKS_DEFAULT = 18  # NVLink4 (H100); newer bindings say 36
_NVLINK_DEVICE_TYPE_SWITCH = 2


def load_library(
    backend: str,
    sim_profile: str = "dgx-h100",
    sim_faults_path: str | Path | None = None,
    node_name: str = "",
) -> ModuleType:
    """Return the pynvml-compatible module for `backend` ("nvml" or "simulated")."""
    if backend == "simulated":
        from gpufleet.agent import nvml_sim

        nvml_sim.configure(sim_profile, sim_faults_path, seed=zlib.crc32(node_name.encode()))
        return nvml_sim
    if backend == "nvml":
        try:
            import pynvml
        except ImportError as e:
            raise GpuBackendError(
                "the Python NVML bindings are missing: install them with "
                "`pip install 'gpufleet[agent]'` (package nvidia-ml-py)"
            ) from e
        return cast(ModuleType, pynvml)
    raise GpuBackendError(f"unknown GPU backend {backend!r}: use 'nvml' or 'simulated'")


class NvmlBackend:
    """GpuBackend over a pynvml-compatible module."""

    def __init__(self, lib: ModuleType, name: str = "nvml", counter_interval_s: float = 10.0
                 ) -> None:
        self.lib = lib
        self.name = name
        # Energy, PCIe replay and NVLink error counters are read every counter_interval_s and
        # the last values reported in between. Measured on an H100 (driver 580.159.04):
        # nvmlDeviceGetTotalEnergyConsumption busy-waits 2.6-4.6 ms per call and
        # nvmlDeviceGetPcieReplayCounter 0.2-0.4 ms, against 3-130 us for everything else
        # (bench/nvml_call_cost.py). Counters keep their totals, so reading them less often
        # loses no energy or error: only the moment of the change is known less precisely.
        self.counter_interval_s = counter_interval_s
        self._lock = threading.Lock()
        self._started = False
        self._handles: list[Any] = []
        self._unsupported: set[tuple[str, int]] = set()  # (field, gpu): skip after NotSupported
        self._event_set: Any = None
        self._nvlink_links: dict[int, int] = {}
        self._counter_cache: dict[int, tuple[float, _Counters]] = {}
        self._max_links = int(getattr(lib, "NVML_NVLINK_MAX_LINKS", _NVLINK_MAX_LINKS_DEFAULT))
        self._NVMLError: type[Exception] = lib.NVMLError
        self._lost_error: type[Exception] = lib.NVMLError_GpuIsLost
        # the return codes that mean "this field is not there", not "something broke"
        self._absent_codes = {
            lib.NVML_ERROR_NOT_SUPPORTED,
            lib.NVML_ERROR_NO_PERMISSION,
            lib.NVML_ERROR_FUNCTION_NOT_FOUND,
            lib.NVML_ERROR_NOT_FOUND,
        }

    # ------------------------------------------------------------ lifecycle

    def _ensure_started(self) -> None:
        if self._started:
            return
        with self._lock:
            if self._started:
                return
            try:
                self.lib.nvmlInit()
                count = self.lib.nvmlDeviceGetCount()
                self._handles = [self.lib.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            except self._NVMLError as e:
                code = getattr(e, "value", None)
                if code == getattr(self.lib, "NVML_ERROR_LIBRARY_NOT_FOUND", -1):
                    raise GpuBackendError(
                        "libnvidia-ml.so.1 was not found: install the NVIDIA driver on this "
                        "node, or run the agent with `--gpu-backend simulated` for a test"
                    ) from e
                raise GpuBackendError(f"NVML failed to start: {e}") from e
            self._started = True
            atexit.register(self.close)

    def close(self) -> None:
        with self._lock:
            if not self._started:
                return
            try:
                if self._event_set is not None:
                    self.lib.nvmlEventSetFree(self._event_set)
                self.lib.nvmlShutdown()
            except self._NVMLError as e:
                log.debug("nvmlShutdown: %s", e)
            self._started = False
            self._event_set = None

    @property
    def gpu_count(self) -> int:
        self._ensure_started()
        return len(self._handles)

    # ------------------------------------------------------------ calling NVML

    def _fn(self, key: str) -> Callable[..., Any]:
        for fname in FALLBACKS[key]:
            fn = getattr(self.lib, fname, None)
            if fn is not None:
                return fn  # type: ignore[no-any-return]
        raise GpuBackendError(f"NVML has none of {FALLBACKS[key]}")

    def _field(self, name: str, gpu: int, fn: Callable[..., T], *args: Any) -> T | None:
        """One field of one GPU: None if unsupported; GpuIsLost propagates."""
        if (name, gpu) in self._unsupported:
            return None
        try:
            return fn(*args)
        except self._lost_error:
            raise
        except self._NVMLError as e:
            if getattr(e, "value", None) in self._absent_codes:
                self._unsupported.add((name, gpu))
            else:
                log.debug("NVML %s on GPU %d: %s", name, gpu, e)
            return None
        except AttributeError:  # an old nvidia-ml-py without this function
            self._unsupported.add((name, gpu))
            return None

    def driver_version(self) -> str:
        self._ensure_started()
        v = self.lib.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)

    def cuda_driver_version(self) -> str:
        self._ensure_started()
        try:
            v = int(self._fn("cuda_driver_version")())
        except self._NVMLError:
            return ""
        return f"{v // 1000}.{v % 1000 // 10}"

    # ------------------------------------------------------------ inventory

    def inventory(self) -> list[GpuInfo]:
        self._ensure_started()
        lib = self.lib
        out = []
        for i, h in enumerate(self._handles):
            try:
                pci = self._fn("pci_info")(h)
                bus_id = _text(pci.busId)
                mem = lib.nvmlDeviceGetMemoryInfo(h)
                out.append(
                    GpuInfo(
                        index=i,
                        uuid=_text(lib.nvmlDeviceGetUUID(h)),
                        pci_bus_id=_normalise_bus_id(bus_id),
                        model=_text(lib.nvmlDeviceGetName(h)),
                        memory_total_bytes=int(mem.total),
                        numa_node=self._field("numa", i, lib.nvmlDeviceGetNumaNodeId, h)
                        if hasattr(lib, "nvmlDeviceGetNumaNodeId")
                        else _sysfs_numa_node(bus_id),
                        serial=_text(self._field("serial", i, lib.nvmlDeviceGetSerial, h) or ""),
                        vbios_version=_text(
                            self._field("vbios", i, lib.nvmlDeviceGetVbiosVersion, h) or ""
                        ),
                        nvlink_count=len(self._nvlink_states(i, h)),
                    )
                )
            except self._lost_error:
                log.warning("GPU %d is lost (fell off the bus): not in the inventory", i)
            except self._NVMLError as e:
                log.warning("GPU %d: inventory failed: %s", i, e)
        return out

    def _nvlink_states(self, i: int, h: Any) -> list[bool]:
        """Up/down per NVLink of GPU i; [] where the GPU has none.

        NVML answers NotSupported (or InvalidArgument) past the GPU's last link, so the
        number of links is found once and remembered.
        """
        n = self._nvlink_links.get(i)
        states: list[bool] = []
        for link in range(self._max_links if n is None else n):
            try:
                states.append(bool(self.lib.nvmlDeviceGetNvLinkState(h, link)))
            except self._lost_error:
                raise
            except self._NVMLError:
                break
        if n is None:
            self._nvlink_links[i] = len(states)
        return states

    def links(self) -> list[GpuLinkInfo]:
        """GPU pairs with their NVLink count and PCIe relation."""
        self._ensure_started()
        lib = self.lib
        n = len(self._handles)
        # For each GPU: remote endpoint of every active link (a peer GPU's bus id or "switch").
        remotes: list[list[str]] = []
        bus_ids: list[str] = []
        for i, h in enumerate(self._handles):
            ends: list[str] = []
            try:
                bus_ids.append(_normalise_bus_id(_text(self._fn("pci_info")(h).busId)))
                for link, up in enumerate(self._nvlink_states(i, h)):
                    if not up:
                        continue
                    kind = self._field(
                        "nvlink_remote_type", i, lib.nvmlDeviceGetNvLinkRemoteDeviceType, h, link
                    )
                    if kind == _NVLINK_DEVICE_TYPE_SWITCH:
                        ends.append("switch")
                        continue
                    remote = self._field(
                        "nvlink_remote_pci", i, self._fn("remote_pci_info"), h, link
                    )
                    if remote is not None:
                        ends.append(_normalise_bus_id(_text(remote.busId)))
            except self._lost_error:
                bus_ids.append("")
            remotes.append(ends)
        out = []
        for a in range(n):
            for b in range(a + 1, n):
                try:
                    rel = _TOPOLOGY_TO_RELATION.get(
                        lib.nvmlDeviceGetTopologyCommonAncestor(self._handles[a], self._handles[b]),
                        PcieRelation.SYS,
                    )
                except self._NVMLError:
                    continue  # a lost GPU has no relation to report
                # Through NVSwitch every GPU reaches every other with all its switch links.
                via_switch = min(remotes[a].count("switch"), remotes[b].count("switch"))
                direct = remotes[a].count(bus_ids[b]) if bus_ids[b] else 0
                out.append(GpuLinkInfo(a, b, via_switch + direct, rel))
        return out

    def nic_affinity(self) -> list[tuple[int, str, PcieRelation]]:
        from gpufleet.agent import pcie

        self._ensure_started()
        if getattr(self.lib, "PROFILES", None) is not None:  # the simulator knows its board
            return self.lib.simulated_nic_affinity()  # type: ignore[no-any-return]
        infos = self.inventory()
        return pcie.nic_affinity({g.index: g.pci_bus_id for g in infos})

    # ------------------------------------------------------------ samples

    def sample(self) -> list[GpuSample]:
        self._ensure_started()
        return [self._sample_one(i, h) for i, h in enumerate(self._handles)]

    def _sample_one(self, i: int, h: Any) -> GpuSample:
        lib = self.lib
        f = self._field
        try:
            util = f("utilization", i, lib.nvmlDeviceGetUtilizationRates, h)
            mem = f("memory", i, lib.nvmlDeviceGetMemoryInfo, h)
            power_mw = f("power", i, lib.nvmlDeviceGetPowerUsage, h)
            rows = f("remapped_rows", i, lib.nvmlDeviceGetRemappedRows, h)
            mem_temp = None
            fv = f("memory_temp", i, lib.nvmlDeviceGetFieldValues, h, [NVML_FI_DEV_MEMORY_TEMP])
            if fv and fv[0].nvmlReturn == 0:
                mem_temp = float(fv[0].value.ullVal)
            states = self._nvlink_states(i, h)
            up = sum(states)
            down = len(states) - up
            counters = self._counters(i, h, len(states))
            persistence = f("persistence", i, lib.nvmlDeviceGetPersistenceMode, h)
            temp = f("temperature", i, lib.nvmlDeviceGetTemperature, h, 0)
            return GpuSample(
                index=i,
                temperature_c=float(temp) if temp is not None else None,
                memory_temperature_c=mem_temp,
                power_w=power_mw / 1000.0 if power_mw is not None else None,
                energy_mj=counters.energy_mj,
                utilization_gpu_pct=float(util.gpu) if util is not None else None,
                utilization_memory_pct=float(util.memory) if util is not None else None,
                memory_used_bytes=int(mem.used) if mem is not None else None,
                sm_clock_mhz=f("sm_clock", i, lib.nvmlDeviceGetClockInfo, h, 1),
                memory_clock_mhz=f("mem_clock", i, lib.nvmlDeviceGetClockInfo, h, 2),
                throttle_reasons=f("throttle", i, self._fn("throttle_reasons"), h),
                ecc_sbe_volatile=f("ecc_sbe_v", i, lib.nvmlDeviceGetTotalEccErrors, h, 0, 0),
                ecc_dbe_volatile=f("ecc_dbe_v", i, lib.nvmlDeviceGetTotalEccErrors, h, 1, 0),
                ecc_sbe_aggregate=f("ecc_sbe_a", i, lib.nvmlDeviceGetTotalEccErrors, h, 0, 1),
                ecc_dbe_aggregate=f("ecc_dbe_a", i, lib.nvmlDeviceGetTotalEccErrors, h, 1, 1),
                remapped_rows_pending=int(rows[2]) if rows is not None else None,
                remapped_rows_failure=int(rows[3]) if rows is not None else None,
                pcie_link_gen=f("pcie_gen", i, lib.nvmlDeviceGetCurrPcieLinkGeneration, h),
                pcie_link_gen_max=f("pcie_gen_max", i, lib.nvmlDeviceGetMaxPcieLinkGeneration, h),
                pcie_link_width=f("pcie_width", i, lib.nvmlDeviceGetCurrPcieLinkWidth, h),
                pcie_link_width_max=f("pcie_w_max", i, lib.nvmlDeviceGetMaxPcieLinkWidth, h),
                pcie_replay_count=counters.pcie_replay_count,
                nvlink_up_count=up,
                nvlink_down_count=down,
                nvlink_crc_errors=counters.nvlink_crc_errors,
                nvlink_replay_errors=counters.nvlink_replay_errors,
                nvlink_recovery_errors=counters.nvlink_recovery_errors,
                persistence_mode=bool(persistence) if persistence is not None else None,
            )
        except self._lost_error:
            return GpuSample(index=i, lost=True)

    def compute_pids(self, gpus: Iterable[int]) -> dict[int, tuple[int, ...]]:
        """Pids of the compute processes on each of `gpus` (job attribution's safety net).

        A GPU that is lost, out of range or cannot tell (NotSupported, NoPermission) is left
        out rather than shown empty, so a caller never takes "unknown" for "idle".
        """
        self._ensure_started()
        out: dict[int, tuple[int, ...]] = {}
        for i in gpus:
            if not 0 <= i < len(self._handles):
                continue
            try:
                procs = self._field("processes", i, self._fn("compute_processes"), self._handles[i])
            except self._lost_error:
                continue
            except GpuBackendError:  # bindings without any of the functions
                return out
            if procs is not None:
                out[i] = tuple(sorted({int(p.pid) for p in procs}))
        return out

    def retired_pages_pending(self) -> dict[int, bool | None]:
        """Per GPU: whether retired pages wait for a reset (pre-Ampere page retirement;
        None where NVML does not support it, as on GPUs that remap rows instead)."""
        self._ensure_started()
        out: dict[int, bool | None] = {}
        fn = getattr(self.lib, "nvmlDeviceGetRetiredPagesPendingStatus", None)
        for i, h in enumerate(self._handles):
            try:
                v = self._field("retired_pending", i, fn, h) if fn is not None else None
            except self._lost_error:
                v = None
            out[i] = bool(v) if v is not None else None
        return out

    def expire_counters(self) -> None:
        """Make the next sample read every counter afresh (e.g. at a job's start or end)."""
        self._counter_cache.clear()

    def _counters(self, i: int, h: Any, links: int) -> _Counters:
        """The costly counters of GPU i, read at most every counter_interval_s."""
        now = time.monotonic()
        cached = self._counter_cache.get(i)
        if cached is not None and now - cached[0] < self.counter_interval_s:
            return cached[1]
        f, lib = self._field, self.lib
        crc = replay = recovery = None
        if links:
            # three calls per link (54 per H100): only their rate over minutes matters
            ec = lib.nvmlDeviceGetNvLinkErrorCounter
            crc = replay = recovery = 0
            for link in range(links):
                crc += f("nvl_crc", i, ec, h, link, 3) or 0  # NVML_NVLINK_ERROR_DL_CRC_DATA
                replay += f("nvl_replay", i, ec, h, link, 0) or 0  # DL_REPLAY
                recovery += f("nvl_recovery", i, ec, h, link, 1) or 0  # DL_RECOVERY
        counters = _Counters(
            energy_mj=f("energy", i, lib.nvmlDeviceGetTotalEnergyConsumption, h),
            pcie_replay_count=f("pcie_replay", i, lib.nvmlDeviceGetPcieReplayCounter, h),
            nvlink_crc_errors=crc,
            nvlink_replay_errors=replay,
            nvlink_recovery_errors=recovery,
        )
        self._counter_cache[i] = (now, counters)
        return counters

    # ------------------------------------------------------------ events

    def wait_xid(self, timeout_ms: int) -> XidEvent | None:
        """Block up to timeout_ms for an XID event; None on timeout."""
        self._ensure_started()
        lib = self.lib
        if self._event_set is None:
            with self._lock:
                if self._event_set is None:
                    es = lib.nvmlEventSetCreate()
                    for i, h in enumerate(self._handles):
                        try:
                            lib.nvmlDeviceRegisterEvents(h, lib.nvmlEventTypeXidCriticalError, es)
                        except self._NVMLError as e:
                            log.warning("GPU %d: cannot watch XID events: %s", i, e)
                    self._event_set = es
        try:
            data = self._fn("event_wait")(self._event_set, timeout_ms)
        except lib.NVMLError_Timeout:
            return None
        except self._NVMLError as e:
            # e.g. GPU_IS_LOST reported through the wait: don't spin, let the caller retry
            log.debug("nvmlEventSetWait: %s", e)
            time.sleep(timeout_ms / 1000.0)
            return None
        gpu: int | None = None
        for i, h in enumerate(self._handles):
            if _same_handle(h, data.device):
                gpu = i
                break
        return XidEvent(gpu, int(data.eventData), int(time.time() * 1000), "nvml")


@dataclass(frozen=True)
class _Counters:
    energy_mj: int | None
    pcie_replay_count: int | None
    nvlink_crc_errors: int | None
    nvlink_replay_errors: int | None
    nvlink_recovery_errors: int | None


def _same_handle(a: Any, b: Any) -> bool:
    if a is b or a == b:
        return True
    ia, ib = getattr(a, "index", None), getattr(b, "index", None)
    if ia is not None and ia == ib:
        return True
    # real pynvml handles are ctypes pointers: compare the addresses they hold
    try:
        import ctypes

        return bool(ctypes.cast(a, ctypes.c_void_p).value == ctypes.cast(b, ctypes.c_void_p).value)
    except (TypeError, ctypes.ArgumentError):
        return False


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _normalise_bus_id(bus_id: str) -> str:
    """NVML gives 00000000:18:00.0; sysfs and nvidia-smi topo use 0000:18:00.0 (lower case)."""
    bus_id = bus_id.strip().lower()
    dom, _, rest = bus_id.partition(":")
    if len(dom) > 4:
        dom = dom[-4:]
    return f"{dom}:{rest}" if rest else bus_id


def _sysfs_numa_node(bus_id: str) -> int | None:
    try:
        v = int(Path(f"/sys/bus/pci/devices/{_normalise_bus_id(bus_id)}/numa_node").read_text())
    except (OSError, ValueError):
        return None
    return v if v >= 0 else None
