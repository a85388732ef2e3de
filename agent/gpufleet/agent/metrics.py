"""The agent's Prometheus exporter: `/metrics` renders the latest sample cycle.

The agent loop hands every cycle's results to `AgentCollector.update` as one immutable
`Snapshot`; a scrape renders whatever snapshot is current. A scrape never reads hardware
(no NVML, no sysfs): it costs the same whether Prometheus scrapes every second or every
minute, and a hung GPU cannot hang `/metrics`.

Conventions (https://prometheus.io/docs/practices/naming/): base units in the names
(celsius, watts, joules, bytes, hertz, seconds, ratios 0..1), `_total` on counters. A
value the agent could not read (None) has no sample, never a made-up 0. Per-GPU series
carry `gpu` (the NVML index) and `uuid` only; `gpufleet_gpu_info` carries the PCI bus id
and the model and joins on those two. Labels hold bounded identifiers only: a verdict's
evidence text never becomes a label.

One module (~420 lines): the exporter's metric families are one table, read top to bottom
against the alert rules that use them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpufleet.agent.health import Severity, Verdict
from gpufleet.agent.telemetry import GpuInfo, GpuSample, HostSample, IbPortSample
from gpufleet.rpc.daemon import MetricsHttpServer as MetricsServer
from gpufleet.rpc.daemon import register_process_collectors, serve_metrics
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from gpufleet.agent.outbox import OutboxStats

__all__ = [
    "THROTTLE_REASONS",
    "AgentCollector",
    "MetricsServer",
    "Snapshot",
    "start_exporter",
]

DEFAULT_PORT = 9835
REASON_CODE_MAX = 64  # a reason code is a short identifier; longer is a bug, cut it


@dataclass(frozen=True)
class Snapshot:
    """Everything one sample cycle produced; what a scrape renders until the next one."""

    node_name: str
    timestamp_ms: int
    gpus: tuple[GpuInfo, ...]  # inventory (uuid, pci_bus_id, model per index)
    gpu_samples: tuple[GpuSample, ...]
    ib_ports: tuple[IbPortSample, ...] = ()
    host: HostSample | None = None
    verdicts: tuple[Verdict, ...] = ()  # current verdicts (all, not only changes)
    cycle_seconds: float | None = None  # how long the last sample cycle took


# NVML clocksThrottleReasons bits (nvml.h, nvmlClocksThrottleReason*). Bits not named here
# are reported together as reason="other".
THROTTLE_REASONS: tuple[tuple[str, int], ...] = (
    ("gpu_idle", 0x1),
    ("applications_clocks_setting", 0x2),
    ("sw_power_cap", 0x4),
    ("hw_slowdown", 0x8),
    ("sync_boost", 0x10),
    ("sw_thermal_slowdown", 0x20),
    ("hw_thermal_slowdown", 0x40),
    ("hw_power_brake_slowdown", 0x80),
    ("display_clock_setting", 0x100),
)
_THROTTLE_KNOWN = sum(bit for _, bit in THROTTLE_REASONS)

_Value = float | int | None
_GpuGetter = Callable[[GpuSample], _Value]
_IbGetter = Callable[[IbPortSample], _Value]
_Family = GaugeMetricFamily | CounterMetricFamily


def _scale(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def _flag(value: bool | None) -> int | None:
    return None if value is None else int(value)


def _throttle(bit: int) -> _GpuGetter:
    def get(s: GpuSample) -> int | None:
        return None if s.throttle_reasons is None else int(bool(s.throttle_reasons & bit))

    return get


def _throttle_other(s: GpuSample) -> int | None:
    return None if s.throttle_reasons is None else int(bool(s.throttle_reasons & ~_THROTTLE_KNOWN))


# ----------------------------------------------------------------------------- the table
#
# One row per family: (name, "gauge" | "counter", HELP, extra label names, series), where
# series is ((extra label values, getter), ...). A getter that returns None adds no sample.

_GpuRow = tuple[str, str, str, tuple[str, ...], tuple[tuple[tuple[str, ...], _GpuGetter], ...]]


def _one(get: _GpuGetter) -> tuple[tuple[tuple[str, ...], _GpuGetter], ...]:
    return (((), get),)


_GPU_ROWS: tuple[_GpuRow, ...] = (
    ("gpufleet_gpu_temperature_celsius", "gauge",
     "GPU die temperature, in degrees Celsius.", (), _one(lambda s: s.temperature_c)),
    ("gpufleet_gpu_memory_temperature_celsius", "gauge",
     "GPU memory (HBM) temperature, in degrees Celsius.", (),
     _one(lambda s: s.memory_temperature_c)),
    ("gpufleet_gpu_power_watts", "gauge", "GPU power draw, in watts.", (),
     _one(lambda s: s.power_w)),
    ("gpufleet_gpu_energy_joules_total", "counter",
     "Energy the GPU consumed since the driver loaded, in joules.", (),
     _one(lambda s: _scale(s.energy_mj, 1e-3))),
    ("gpufleet_gpu_utilization_ratio", "gauge",
     "Fraction of the last sample period a kernel ran on the GPU, as a ratio 0..1.", (),
     _one(lambda s: _scale(s.utilization_gpu_pct, 1e-2))),
    ("gpufleet_gpu_memory_utilization_ratio", "gauge",
     "Fraction of the last sample period device memory was read or written, as a ratio "
     "0..1.", (), _one(lambda s: _scale(s.utilization_memory_pct, 1e-2))),
    ("gpufleet_gpu_memory_used_bytes", "gauge", "GPU memory in use, in bytes.", (),
     _one(lambda s: s.memory_used_bytes)),
    ("gpufleet_gpu_sm_clock_hertz", "gauge", "GPU SM clock, in hertz.", (),
     _one(lambda s: _scale(s.sm_clock_mhz, 1e6))),
    ("gpufleet_gpu_memory_clock_hertz", "gauge", "GPU memory clock, in hertz.", (),
     _one(lambda s: _scale(s.memory_clock_mhz, 1e6))),
    ("gpufleet_gpu_throttle_reasons", "gauge",
     "1 while the NVML clock throttle reason is active, else 0 (a flag, no unit); "
     "reason=\"other\" covers bits without a name here.", ("reason",),
     (*(((name,), _throttle(bit)) for name, bit in THROTTLE_REASONS),
      (("other",), _throttle_other))),
    ("gpufleet_gpu_ecc_errors_total", "counter",
     "ECC errors, a count: type sbe (corrected) or dbe (uncorrected); counter volatile "
     "(since the last driver load or GPU reset) or aggregate (lifetime).",
     ("type", "counter"),
     ((("sbe", "volatile"), lambda s: s.ecc_sbe_volatile),
      (("dbe", "volatile"), lambda s: s.ecc_dbe_volatile),
      (("sbe", "aggregate"), lambda s: s.ecc_sbe_aggregate),
      (("dbe", "aggregate"), lambda s: s.ecc_dbe_aggregate))),
    ("gpufleet_gpu_remapped_rows_pending", "gauge",
     "Nonzero while a memory row remap waits for the next GPU reset (NVML isPending, a "
     "flag, no unit).", (), _one(lambda s: s.remapped_rows_pending)),
    ("gpufleet_gpu_remapped_rows_failure", "gauge",
     "Nonzero once a memory row remap failed: the GPU needs service (NVML failureOccurred, "
     "a flag, no unit).", (), _one(lambda s: s.remapped_rows_failure)),
    ("gpufleet_gpu_pcie_link_generation", "gauge",
     "Current PCIe link generation (no unit; GPUs lower it on their own when idle).", (),
     _one(lambda s: s.pcie_link_gen)),
    ("gpufleet_gpu_pcie_link_generation_max", "gauge",
     "Highest PCIe link generation the GPU and its slot support (no unit).", (),
     _one(lambda s: s.pcie_link_gen_max)),
    ("gpufleet_gpu_pcie_link_width", "gauge", "Current PCIe link width, in lanes.", (),
     _one(lambda s: s.pcie_link_width)),
    ("gpufleet_gpu_pcie_link_width_max", "gauge",
     "Widest PCIe link the GPU and its slot support, in lanes.", (),
     _one(lambda s: s.pcie_link_width_max)),
    ("gpufleet_gpu_pcie_replay_total", "counter",
     "PCIe replays (link-level retransmissions), a count.", (),
     _one(lambda s: s.pcie_replay_count)),
    ("gpufleet_gpu_nvlink_up", "gauge", "NVLinks of the GPU that are up, a count of links.",
     (), _one(lambda s: s.nvlink_up_count)),
    ("gpufleet_gpu_nvlink_down", "gauge",
     "NVLinks of the GPU that are down, a count of links.", (),
     _one(lambda s: s.nvlink_down_count)),
    ("gpufleet_gpu_nvlink_errors_total", "counter",
     "NVLink errors summed over the GPU's links, a count: type crc, replay or recovery.",
     ("type",),
     ((("crc",), lambda s: s.nvlink_crc_errors),
      (("replay",), lambda s: s.nvlink_replay_errors),
      (("recovery",), lambda s: s.nvlink_recovery_errors))),
    ("gpufleet_gpu_persistence_mode", "gauge",
     "1 when persistence mode is on, else 0 (a flag, no unit).", (),
     _one(lambda s: _flag(s.persistence_mode))),
)

_IB_COUNTERS: tuple[tuple[str, _IbGetter], ...] = (
    ("symbol_error", lambda p: p.symbol_error),
    ("link_downed", lambda p: p.link_downed),
    ("link_error_recovery", lambda p: p.link_error_recovery),
    ("port_rcv_errors", lambda p: p.port_rcv_errors),
    ("port_xmit_discards", lambda p: p.port_xmit_discards),
)

_GPU_LABELS = ("gpu", "uuid")
_IB_LABELS = ("hca", "port")
_VERDICT_LABELS = ("check", "reason_code", "gpu", "subject")

# Families outside the GPU table: (name, kind, HELP, label names).
_OTHER_FAMILIES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("gpufleet_gpu_info", "gauge",
     "Constant 1 per GPU in the inventory; carries its PCI bus id and model (no unit).",
     ("gpu", "uuid", "pci_bus_id", "model")),
    ("gpufleet_gpu_lost", "gauge",
     "1 when the GPU no longer answers NVML (lost from the bus), else 0 (a flag, no unit). "
     "A lost GPU has no other series but this and gpufleet_gpu_info.", _GPU_LABELS),
    ("gpufleet_gpu_memory_total_bytes", "gauge", "GPU memory installed, in bytes.",
     _GPU_LABELS),
    ("gpufleet_ib_port_state_up", "gauge",
     "1 when the InfiniBand/RoCE port is ACTIVE, else 0 (a flag, no unit).", _IB_LABELS),
    ("gpufleet_ib_port_rate_bytes_per_second", "gauge",
     "Port signalling rate, in bytes per second (sysfs rate in Gb/s * 1e9 / 8).",
     _IB_LABELS),
    ("gpufleet_ib_port_errors_total", "counter",
     "Port error counters from sysfs, a count: counter symbol_error, link_downed, "
     "link_error_recovery, port_rcv_errors or port_xmit_discards.",
     (*_IB_LABELS, "counter")),
    ("gpufleet_host_cpu_utilization_ratio", "gauge",
     "Host CPU busy fraction over the last sample period, as a ratio 0..1.", ()),
    ("gpufleet_host_memory_used_bytes", "gauge", "Host memory in use, in bytes.", ()),
    ("gpufleet_host_memory_total_bytes", "gauge", "Host memory installed, in bytes.", ()),
    ("gpufleet_host_load1", "gauge",
     "Host one-minute load average, in runnable tasks (no unit).", ()),
    ("gpufleet_host_disk_used_bytes", "gauge", "Filesystem space in use, in bytes.",
     ("path",)),
    ("gpufleet_host_disk_total_bytes", "gauge", "Filesystem size, in bytes.", ("path",)),
    ("gpufleet_health_verdict", "gauge",
     "Severity of a current health verdict, a level without unit: 1 ok, 2 warn, "
     "3 degraded, 4 fatal. gpu and subject are empty when they do not apply.",
     _VERDICT_LABELS),
    ("gpufleet_health_verdict_since_timestamp_seconds", "gauge",
     "When the current health verdict took effect, in seconds since the Unix epoch.",
     _VERDICT_LABELS),
    ("gpufleet_node_health_severity", "gauge",
     "Worst severity of the node's current verdicts, a level without unit: 1 ok (also "
     "when there is none), 2 warn, 3 degraded, 4 fatal.", ()),
    ("gpufleet_agent_info", "gauge",
     "Constant 1; carries the node name the agent reports as (no unit).", ("node",)),
    ("gpufleet_agent_last_sample_timestamp_seconds", "gauge",
     "When the agent took the sample being exported, in seconds since the Unix epoch.", ()),
    ("gpufleet_agent_cycle_duration_seconds", "gauge",
     "How long the agent's last sample cycle took, in seconds.", ()),
    ("gpufleet_agent_spool_messages", "gauge",
     "Reports waiting for the controller's ack (on disk or, while the spool disk fails, in "
     "memory), a count.", ()),
    ("gpufleet_agent_spool_pending_bytes", "gauge",
     "Size of the reports waiting for an ack, in bytes (what spool_max_bytes bounds).", ()),
    ("gpufleet_agent_spool_disk_bytes", "gauge",
     "Size of the spool's segment files on disk, in bytes.", ()),
    ("gpufleet_agent_spool_memory_messages", "gauge",
     "Reports held in memory only because the spool disk failed, a count (lost if the agent "
     "stops now).", ()),
    ("gpufleet_agent_spool_dropped_total", "counter",
     "Reports dropped unsent to stay within the spool bound, a count: kind sample (oldest "
     "first) or checkpoint (oldest pending registration). Events and usage are never "
     "dropped.", ("kind",)),
    ("gpufleet_agent_spool_write_errors_total", "counter",
     "Failed spool writes (disk full, quota, I/O error), a count; the reports stay in "
     "memory and the disk is retried.", ()),
    ("gpufleet_agent_spool_corrupt_records_total", "counter",
     "Torn or corrupt spool records skipped (an agent killed mid-write), a count.", ()),
    ("gpufleet_agent_reports_rejected_total", "counter",
     "Reports the controller rejected as invalid (kept in rejected.jsonl, never resent), "
     "a count.", ()),
)


def _new_families() -> dict[str, _Family]:
    """A fresh, empty family for every metric the collector exports, in a fixed order."""
    rows: list[tuple[str, str, str, tuple[str, ...]]] = [
        (name, kind, help_, (*_GPU_LABELS, *extra)) for name, kind, help_, extra, _ in _GPU_ROWS
    ]
    rows.extend(_OTHER_FAMILIES)
    families: dict[str, _Family] = {}
    for name, kind, help_, labels in rows:
        cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        families[name] = cls(name, help_, labels=labels)
    return families


def _add(family: _Family, labels: Iterable[str], value: _Value) -> None:
    if value is not None:
        family.add_metric(list(labels), float(value))


# ----------------------------------------------------------------------------- collector


class AgentCollector(Collector):
    """Renders the latest `Snapshot`; `update` is the only way in.

    Thread-safe without a lock: `update` replaces one reference (atomic) with an immutable
    snapshot, and `collect` reads that reference once, so a scrape always sees one whole
    cycle.
    """

    def __init__(self, spool_stats: Callable[[], OutboxStats] | None = None) -> None:
        self._snapshot: Snapshot | None = None
        # the outbox's counters: in-memory numbers, so reading them at scrape time is cheap
        self.spool_stats = spool_stats

    def update(self, snap: Snapshot) -> None:
        """Make `snap` the snapshot scrapes render (called by the agent loop every cycle)."""
        self._snapshot = snap

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def describe(self) -> Iterable[Metric]:
        return list(_new_families().values())

    def collect(self) -> Iterable[Metric]:
        snap = self._snapshot  # read once: an update during the scrape is not seen
        families = _new_families()
        if snap is not None:
            _collect_gpus(families, snap)
            _collect_ib(families, snap.ib_ports)
            _collect_host(families, snap.host)
            _collect_health(families, snap.verdicts)
            _add(families["gpufleet_agent_info"], (snap.node_name,), 1)
            _add(families["gpufleet_agent_last_sample_timestamp_seconds"], (),
                 snap.timestamp_ms / 1000.0)
            _add(families["gpufleet_agent_cycle_duration_seconds"], (), snap.cycle_seconds)
        if self.spool_stats is not None:
            _collect_spool(families, self.spool_stats())
        return list(families.values())


def _collect_gpus(families: dict[str, _Family], snap: Snapshot) -> None:
    by_index = {g.index: g for g in snap.gpus}
    for g in snap.gpus:
        _add(families["gpufleet_gpu_info"], (str(g.index), g.uuid, g.pci_bus_id, g.model), 1)
    for s in snap.gpu_samples:
        info = by_index.get(s.index)
        ids = (str(s.index), info.uuid if info is not None else "")
        _add(families["gpufleet_gpu_lost"], ids, int(s.lost))
        if s.lost:
            continue  # nothing else can be read from it; stale values would mislead
        if info is not None:
            _add(families["gpufleet_gpu_memory_total_bytes"], ids, info.memory_total_bytes)
        for name, _kind, _help, _extra, series in _GPU_ROWS:
            family = families[name]
            for extra_values, get in series:
                _add(family, (*ids, *extra_values), get(s))


def _collect_spool(families: dict[str, _Family], st: OutboxStats) -> None:
    _add(families["gpufleet_agent_spool_messages"], (), st.pending_messages)
    _add(families["gpufleet_agent_spool_pending_bytes"], (), st.pending_bytes)
    _add(families["gpufleet_agent_spool_disk_bytes"], (), st.disk_bytes)
    _add(families["gpufleet_agent_spool_memory_messages"], (), st.memory_only_messages)
    _add(families["gpufleet_agent_spool_dropped_total"], ("sample",), st.dropped_samples)
    _add(families["gpufleet_agent_spool_dropped_total"], ("checkpoint",),
         st.dropped_checkpoints)
    _add(families["gpufleet_agent_spool_write_errors_total"], (), st.write_errors)
    _add(families["gpufleet_agent_spool_corrupt_records_total"], (), st.corrupt_records)
    _add(families["gpufleet_agent_reports_rejected_total"], (), st.rejected)


def _collect_ib(families: dict[str, _Family], ports: Iterable[IbPortSample]) -> None:
    errors = families["gpufleet_ib_port_errors_total"]
    for p in ports:
        ids = (p.hca, str(p.port))
        _add(families["gpufleet_ib_port_state_up"], ids, int(p.state == "ACTIVE"))
        _add(families["gpufleet_ib_port_rate_bytes_per_second"], ids, p.rate_gbps * 1e9 / 8)
        for counter, get in _IB_COUNTERS:
            _add(errors, (*ids, counter), get(p))


def _collect_host(families: dict[str, _Family], host: HostSample | None) -> None:
    if host is None:
        return
    _add(families["gpufleet_host_cpu_utilization_ratio"], (), host.cpu_pct / 100.0)
    _add(families["gpufleet_host_memory_used_bytes"], (), host.memory_used_bytes)
    _add(families["gpufleet_host_memory_total_bytes"], (), host.memory_total_bytes)
    _add(families["gpufleet_host_load1"], (), host.load_1m)
    for d in host.disks:
        _add(families["gpufleet_host_disk_used_bytes"], (d.path,), d.used_bytes)
        _add(families["gpufleet_host_disk_total_bytes"], (d.path,), d.total_bytes)


def _collect_health(families: dict[str, _Family], verdicts: Iterable[Verdict]) -> None:
    # One series per label set: should two verdicts share one (a caller's bug), the worse
    # wins, so the exposition never holds a duplicate series.
    worst: dict[tuple[str, ...], Verdict] = {}
    for v in verdicts:
        key: tuple[str, ...] = (v.check, v.reason_code[:REASON_CODE_MAX],
               "" if v.gpu_index is None else str(v.gpu_index), v.subject)
        old = worst.get(key)
        if old is None or v.severity > old.severity:
            worst[key] = v
    for key, v in worst.items():
        _add(families["gpufleet_health_verdict"], key, int(v.severity))
        _add(families["gpufleet_health_verdict_since_timestamp_seconds"], key,
             v.since_ms / 1000.0)
    node = max((v.severity for v in worst.values()), default=Severity.OK)
    _add(families["gpufleet_node_health_severity"], (), int(node))


# ----------------------------------------------------------------------------- HTTP


def start_exporter(
    collector: AgentCollector,
    addr: str = "0.0.0.0",  # noqa: S104 - an exporter listens for the cluster's Prometheus
    port: int = DEFAULT_PORT,
    registry: CollectorRegistry | None = None,
) -> tuple[CollectorRegistry, MetricsServer]:
    """Serve `collector` (and the process/platform/GC collectors) on http://addr:port/metrics.

    Uses a private registry, never prometheus_client's global one, unless `registry` is
    given. Returns the registry and the server; `server.shutdown()` stops it. Raises
    OSError when the address cannot be bound, ValueError when the collector is already
    registered there.
    """
    if registry is None:
        registry = CollectorRegistry()
    registry.register(collector)
    register_process_collectors(registry)
    try:
        server = serve_metrics(registry, addr, port)
    except OSError:  # the port is taken: leave a caller's registry as it was
        registry.unregister(collector)
        raise
    return registry, server
