"""The agent's Prometheus exporter: values and units, absent fields, lost GPUs, verdicts,
the HTTP endpoint, and `promtool check metrics` on what it serves."""

from __future__ import annotations

import ast
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpufleet.agent import metrics
from gpufleet.agent.health import Severity, Verdict
from gpufleet.agent.metrics import THROTTLE_REASONS, AgentCollector, Snapshot, start_exporter
from gpufleet.agent.outbox import OutboxStats
from gpufleet.agent.telemetry import DiskUsage, GpuInfo, GpuSample, HostSample, IbPortSample
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from tests.support.prometheus import promtool

GIB = 1 << 30


def _info(i: int) -> GpuInfo:
    return GpuInfo(index=i, uuid=f"GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd",
                   pci_bus_id=f"00000000:{0x18 + i:02X}:00.0", model="NVIDIA H100 80GB HBM3",
                   memory_total_bytes=80 * GIB, numa_node=0, serial=f"165{i}",
                   vbios_version="96.00.74.00.01", nvlink_count=18)


FULL = GpuSample(
    index=0, temperature_c=41.0, memory_temperature_c=38.0, power_w=312.5,
    energy_mj=123_456_789, utilization_gpu_pct=87.0, utilization_memory_pct=25.0,
    memory_used_bytes=40 * GIB, sm_clock_mhz=1980, memory_clock_mhz=2619,
    throttle_reasons=0x4 | 0x40 | 0x1000, ecc_sbe_volatile=3, ecc_dbe_volatile=0,
    ecc_sbe_aggregate=17, ecc_dbe_aggregate=1, remapped_rows_pending=0,
    remapped_rows_failure=0, pcie_link_gen=5, pcie_link_gen_max=5, pcie_link_width=16,
    pcie_link_width_max=16, pcie_replay_count=2, nvlink_up_count=17, nvlink_down_count=1,
    nvlink_crc_errors=11, nvlink_replay_errors=12, nvlink_recovery_errors=13,
    persistence_mode=True,
)
SPARSE = GpuSample(index=1, temperature_c=35.0)  # every other field unread
LOST = GpuSample(index=2, lost=True)

IB_UP = IbPortSample(hca="mlx5_0", port=1, state="ACTIVE", phys_state="LinkUp",
                     rate_gbps=400.0, symbol_error=0, link_downed=2, link_error_recovery=1,
                     port_rcv_errors=5, port_xmit_discards=None)
IB_DOWN = IbPortSample(hca="mlx5_1", port=1, state="DOWN", phys_state="Polling",
                       rate_gbps=10.0)

HOST = HostSample(cpu_pct=12.5, memory_used_bytes=100 * GIB, memory_total_bytes=2048 * GIB,
                  load_1m=3.25, disks=(DiskUsage("/", 10 * GIB, 100 * GIB),
                                       DiskUsage("/var/lib/slurm", GIB, 2 * GIB)))

VERDICTS = (
    Verdict("gpu_lost", Severity.FATAL, "gpu_lost", "GPU 2 does not answer NVML",
            1_700_000_000_000, gpu_index=2),
    Verdict("nvlink", Severity.DEGRADED, "nvlink_down", "GPU 0 1 of 18 NVLinks down",
            1_700_000_001_500, gpu_index=0),
    Verdict("ib_port", Severity.DEGRADED, "ib_port_down", "mlx5_1/1 DOWN (Polling)",
            1_700_000_002_000, subject="mlx5_1/1"),
    Verdict("disk", Severity.WARN, "disk_full", "/ 96% used", 1_700_000_003_000,
            subject="/"),
)

SNAP = Snapshot(
    node_name="gpu-a01", timestamp_ms=1_700_000_004_250,
    gpus=(_info(0), _info(1), _info(2)), gpu_samples=(FULL, SPARSE, LOST),
    ib_ports=(IB_UP, IB_DOWN), host=HOST, verdicts=VERDICTS, cycle_seconds=0.042,
)


def _registry(snap: Snapshot | None = SNAP) -> CollectorRegistry:
    collector = AgentCollector()
    if snap is not None:
        collector.update(snap)
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


def _gpu(i: int, **extra: str) -> dict[str, str]:
    return {"gpu": str(i), "uuid": _info(i).uuid, **extra}


def _promtool(text: str) -> None:
    done = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "" and done.stderr.strip() == ""


# ----------------------------------------------------------------------------- values


def test_gpu_values_in_base_units() -> None:
    r = _registry()
    g0 = _gpu(0)
    value = r.get_sample_value
    assert value("gpufleet_gpu_temperature_celsius", g0) == 41.0
    assert value("gpufleet_gpu_memory_temperature_celsius", g0) == 38.0
    assert value("gpufleet_gpu_power_watts", g0) == 312.5
    assert value("gpufleet_gpu_energy_joules_total", g0) == pytest.approx(123_456.789)
    assert value("gpufleet_gpu_utilization_ratio", g0) == pytest.approx(0.87)
    assert value("gpufleet_gpu_memory_utilization_ratio", g0) == pytest.approx(0.25)
    assert value("gpufleet_gpu_memory_used_bytes", g0) == 40 * GIB
    assert value("gpufleet_gpu_memory_total_bytes", g0) == 80 * GIB
    assert value("gpufleet_gpu_sm_clock_hertz", g0) == 1_980_000_000
    assert value("gpufleet_gpu_memory_clock_hertz", g0) == 2_619_000_000
    assert value("gpufleet_gpu_remapped_rows_pending", g0) == 0
    assert value("gpufleet_gpu_remapped_rows_failure", g0) == 0
    assert value("gpufleet_gpu_pcie_link_generation", g0) == 5
    assert value("gpufleet_gpu_pcie_link_generation_max", g0) == 5
    assert value("gpufleet_gpu_pcie_link_width", g0) == 16
    assert value("gpufleet_gpu_pcie_link_width_max", g0) == 16
    assert value("gpufleet_gpu_pcie_replay_total", g0) == 2
    assert value("gpufleet_gpu_nvlink_up", g0) == 17
    assert value("gpufleet_gpu_nvlink_down", g0) == 1
    assert value("gpufleet_gpu_persistence_mode", g0) == 1
    assert value("gpufleet_gpu_lost", g0) == 0
    for kind, n in (("crc", 11), ("replay", 12), ("recovery", 13)):
        assert value("gpufleet_gpu_nvlink_errors_total", _gpu(0, type=kind)) == n
    for typ, counter, n in (("sbe", "volatile", 3), ("dbe", "volatile", 0),
                            ("sbe", "aggregate", 17), ("dbe", "aggregate", 1)):
        assert value("gpufleet_gpu_ecc_errors_total", _gpu(0, type=typ, counter=counter)) == n


def test_throttle_reasons_one_series_per_bit() -> None:
    r = _registry()
    active = {name: r.get_sample_value("gpufleet_gpu_throttle_reasons", _gpu(0, reason=name))
              for name, _ in THROTTLE_REASONS}
    assert {k for k, v in active.items() if v == 1} == {"sw_power_cap", "hw_thermal_slowdown"}
    assert all(v == 0 for k, v in active.items()
               if k not in {"sw_power_cap", "hw_thermal_slowdown"})
    # 0x1000 has no name here: it shows as "other" rather than vanishing
    assert r.get_sample_value("gpufleet_gpu_throttle_reasons", _gpu(0, reason="other")) == 1
    assert r.get_sample_value("gpufleet_gpu_throttle_reasons", _gpu(1, reason="gpu_idle")) \
        is None
    assert dict(THROTTLE_REASONS)["hw_power_brake_slowdown"] == 0x80


def test_none_fields_have_no_sample() -> None:
    r = _registry()
    g1 = _gpu(1)
    assert r.get_sample_value("gpufleet_gpu_temperature_celsius", g1) == 35.0
    for name in ("gpufleet_gpu_power_watts", "gpufleet_gpu_energy_joules_total",
                 "gpufleet_gpu_utilization_ratio", "gpufleet_gpu_memory_used_bytes",
                 "gpufleet_gpu_sm_clock_hertz", "gpufleet_gpu_persistence_mode",
                 "gpufleet_gpu_pcie_replay_total", "gpufleet_gpu_remapped_rows_pending"):
        assert r.get_sample_value(name, g1) is None, name
    assert r.get_sample_value("gpufleet_gpu_ecc_errors_total",
                              _gpu(1, type="sbe", counter="volatile")) is None
    assert r.get_sample_value("gpufleet_gpu_nvlink_errors_total", _gpu(1, type="crc")) is None
    # an IB counter sysfs lacks has no sample either, the others do
    port = {"hca": "mlx5_0", "port": "1"}
    assert r.get_sample_value("gpufleet_ib_port_errors_total",
                              {**port, "counter": "port_xmit_discards"}) is None
    assert r.get_sample_value("gpufleet_ib_port_errors_total",
                              {**port, "counter": "symbol_error"}) == 0
    # no host sample, no cycle time: no host series, no duration
    bare = _registry(Snapshot("n", 1000, (), ()))
    assert bare.get_sample_value("gpufleet_host_load1") is None
    assert bare.get_sample_value("gpufleet_agent_cycle_duration_seconds") is None
    assert bare.get_sample_value("gpufleet_agent_last_sample_timestamp_seconds") == 1.0


def test_lost_gpu_has_only_lost_and_info() -> None:
    r = _registry()
    uuid = _info(2).uuid
    series = [(s.name, s.value) for fam in r.collect() for s in fam.samples
              if s.labels.get("uuid") == uuid]
    assert sorted(series) == [("gpufleet_gpu_info", 1.0), ("gpufleet_gpu_lost", 1.0)]
    assert r.get_sample_value("gpufleet_gpu_info", {
        "gpu": "2", "uuid": uuid, "pci_bus_id": "00000000:1A:00.0",
        "model": "NVIDIA H100 80GB HBM3"}) == 1


def test_model_only_on_info() -> None:
    r = _registry()
    for fam in r.collect():
        for s in fam.samples:
            if fam.name != "gpufleet_gpu_info":
                assert "model" not in s.labels and "pci_bus_id" not in s.labels, s
            if fam.name.startswith("gpufleet_gpu_"):
                assert {"gpu", "uuid"} <= set(s.labels), s


def test_ib_and_host() -> None:
    r = _registry()
    up, down = {"hca": "mlx5_0", "port": "1"}, {"hca": "mlx5_1", "port": "1"}
    assert r.get_sample_value("gpufleet_ib_port_state_up", up) == 1
    assert r.get_sample_value("gpufleet_ib_port_state_up", down) == 0
    # 400 Gb/s = 400e9 bit/s = 50e9 byte/s (promtool wants the base unit bytes, not bits)
    assert r.get_sample_value("gpufleet_ib_port_rate_bytes_per_second", up) == 50e9
    assert r.get_sample_value("gpufleet_ib_port_errors_total",
                              {**up, "counter": "link_downed"}) == 2
    assert r.get_sample_value("gpufleet_ib_port_errors_total",
                              {**up, "counter": "port_rcv_errors"}) == 5
    assert r.get_sample_value("gpufleet_host_cpu_utilization_ratio") == 0.125
    assert r.get_sample_value("gpufleet_host_memory_used_bytes") == 100 * GIB
    assert r.get_sample_value("gpufleet_host_memory_total_bytes") == 2048 * GIB
    assert r.get_sample_value("gpufleet_host_load1") == 3.25
    assert r.get_sample_value("gpufleet_host_disk_used_bytes", {"path": "/"}) == 10 * GIB
    assert r.get_sample_value("gpufleet_host_disk_total_bytes",
                              {"path": "/var/lib/slurm"}) == 2 * GIB


def test_verdicts_and_node_severity() -> None:
    r = _registry()

    def labels(check: str, code: str, gpu: str = "", subject: str = "") -> dict[str, str]:
        return {"check": check, "reason_code": code, "gpu": gpu, "subject": subject}

    assert r.get_sample_value("gpufleet_health_verdict", labels("gpu_lost", "gpu_lost", "2")) \
        == 4
    assert r.get_sample_value("gpufleet_health_verdict",
                              labels("nvlink", "nvlink_down", "0")) == 3
    assert r.get_sample_value("gpufleet_health_verdict",
                              labels("ib_port", "ib_port_down", subject="mlx5_1/1")) == 3
    assert r.get_sample_value("gpufleet_health_verdict",
                              labels("disk", "disk_full", subject="/")) == 2
    assert r.get_sample_value("gpufleet_health_verdict_since_timestamp_seconds",
                              labels("nvlink", "nvlink_down", "0")) == 1_700_000_001.5
    assert r.get_sample_value("gpufleet_node_health_severity") == 4
    # evidence is never a label value
    text = generate_latest(r).decode()
    for v in VERDICTS:
        assert v.evidence not in text
    assert "evidence" not in text

    healthy = _registry(Snapshot("n", 0, (), ()))
    assert healthy.get_sample_value("gpufleet_node_health_severity") == 1
    warn = _registry(Snapshot("n", 0, (), (), verdicts=(VERDICTS[3],)))
    assert warn.get_sample_value("gpufleet_node_health_severity") == 2


def test_duplicate_verdict_labels_keep_the_worst() -> None:
    a = Verdict("xid", Severity.WARN, "xid13", "x", 1000, gpu_index=0)
    b = Verdict("xid", Severity.FATAL, "xid13", "y", 2000, gpu_index=0)
    r = _registry(Snapshot("n", 0, (), (), verdicts=(a, b, a)))
    samples = [s for fam in r.collect() if fam.name == "gpufleet_health_verdict"
               for s in fam.samples]
    assert [s.value for s in samples] == [4]


def test_agent_self_metrics() -> None:
    r = _registry()
    assert r.get_sample_value("gpufleet_agent_last_sample_timestamp_seconds") == 1_700_000_004.25
    assert r.get_sample_value("gpufleet_agent_cycle_duration_seconds") == 0.042
    assert r.get_sample_value("gpufleet_agent_info", {"node": "gpu-a01"}) == 1


# ----------------------------------------------------------------------------- collector


def test_before_first_update_only_empty_families() -> None:
    collector = AgentCollector()
    families = list(collector.collect())
    assert families
    assert all(not fam.samples for fam in families)
    assert generate_latest(_registry(None))  # renders HELP/TYPE lines, no error


SPOOL = OutboxStats(pending_messages=7, pending_bytes=7_000, disk_bytes=8_192,
                    memory_only_messages=2, dropped_samples=30, dropped_checkpoints=1,
                    write_errors=4, corrupt_records=1, rejected=3)


def test_describe_matches_collect_and_every_family_has_help() -> None:
    collector = AgentCollector(spool_stats=lambda: SPOOL)
    described = [m.name for m in collector.describe()]
    assert described == [m.name for m in collector.collect()]
    collector.update(SNAP)
    collected = list(collector.collect())
    assert described == [m.name for m in collected]
    assert len(set(described)) == len(described)
    for fam in collected:
        assert fam.name.startswith("gpufleet_")
        assert fam.documentation and fam.documentation.endswith("."), fam.name
        if fam.type == "counter":
            assert all(s.name == fam.name + "_total" for s in fam.samples), fam.name
        else:
            assert not fam.name.endswith("_total"), fam.name
    # every family the full snapshot can fill gets at least one sample
    assert [f.name for f in collected if not f.samples] == []


def test_spool_counters_are_exported() -> None:
    r = CollectorRegistry()
    r.register(AgentCollector(spool_stats=lambda: SPOOL))
    assert r.get_sample_value("gpufleet_agent_spool_messages") == 7
    assert r.get_sample_value("gpufleet_agent_spool_pending_bytes") == 7_000
    assert r.get_sample_value("gpufleet_agent_spool_disk_bytes") == 8_192
    assert r.get_sample_value("gpufleet_agent_spool_memory_messages") == 2
    assert r.get_sample_value("gpufleet_agent_spool_dropped_total", {"kind": "sample"}) == 30
    assert r.get_sample_value("gpufleet_agent_spool_dropped_total", {"kind": "checkpoint"}) == 1
    assert r.get_sample_value("gpufleet_agent_spool_write_errors_total") == 4
    assert r.get_sample_value("gpufleet_agent_spool_corrupt_records_total") == 1
    assert r.get_sample_value("gpufleet_agent_reports_rejected_total") == 3


def test_no_duplicate_series() -> None:
    seen = set()
    for fam in _registry().collect():
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in seen, key
            seen.add(key)


def test_update_swaps_the_snapshot() -> None:
    collector = AgentCollector()
    registry = CollectorRegistry()
    registry.register(collector)
    collector.update(SNAP)
    assert registry.get_sample_value("gpufleet_gpu_temperature_celsius", _gpu(0)) == 41.0
    collector.update(Snapshot("gpu-a01", 1, (_info(0),), (GpuSample(0, temperature_c=50.0),)))
    assert registry.get_sample_value("gpufleet_gpu_temperature_celsius", _gpu(0)) == 50.0
    assert registry.get_sample_value("gpufleet_gpu_temperature_celsius", _gpu(1)) is None
    assert collector.snapshot is not None and collector.snapshot.timestamp_ms == 1


def test_concurrent_updates_and_scrapes() -> None:
    collector = AgentCollector()
    registry = CollectorRegistry()
    registry.register(collector)
    stop = threading.Event()

    def writer() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            collector.update(Snapshot("n", n * 1000, (), (GpuSample(0, power_w=float(n)),)))

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        for _ in range(200):
            text = generate_latest(registry).decode()
            assert text.count("gpufleet_gpu_power_watts{") <= 1
    finally:
        stop.set()
        t.join(timeout=5)


def test_metrics_module_never_touches_hardware() -> None:
    """A scrape renders the snapshot; the module must not even import NVML or read sysfs."""
    tree = ast.parse(Path(metrics.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    banned = ("pynvml", "nvml", "psutil", "gpufleet.agent.nvml", "gpufleet.agent.nvml_sim",
              "gpufleet.agent.pcie", "subprocess", "os")
    assert not {m for m in imported if m.split(".")[-1] in banned or m in banned}, imported
    calls = {n.func.id for n in ast.walk(tree)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert "open" not in calls


# ----------------------------------------------------------------------------- HTTP


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return str(resp.read().decode())


@pytest.fixture
def served() -> Iterator[tuple[CollectorRegistry, metrics.MetricsServer]]:
    collector = AgentCollector()
    collector.update(SNAP)
    registry, server = start_exporter(collector, "127.0.0.1", 0)
    yield registry, server
    server.shutdown()


def test_http_exporter_serves_metrics(
        served: tuple[CollectorRegistry, metrics.MetricsServer]) -> None:
    registry, server = served
    assert server.port > 0
    text = _scrape(server.port)
    assert 'gpufleet_gpu_temperature_celsius{gpu="0",uuid="' + _info(0).uuid + '"} 41.0' in text
    assert "gpufleet_node_health_severity 4.0" in text
    assert "# TYPE gpufleet_gpu_energy_joules_total counter" in text
    # the default collectors share the private registry; the global one is left alone
    assert "python_info{" in text
    assert registry.get_sample_value("process_cpu_seconds_total") is not None
    assert REGISTRY.get_sample_value("gpufleet_node_health_severity") is None


def test_exporter_shutdown_frees_the_port() -> None:
    collector = AgentCollector()
    registry, server = start_exporter(collector, "127.0.0.1", 0)
    port = server.port
    assert "gpufleet_node_health_severity" in _scrape(port)  # HELP/TYPE before any update
    server.shutdown()
    server.shutdown()  # idempotent
    # the port is free again, and the same collector can be served anew
    registry2, server2 = start_exporter(collector, "127.0.0.1", port)
    try:
        assert registry2 is not registry
        _scrape(port)
    finally:
        server2.shutdown()


def test_exporter_port_taken_leaves_registry_clean() -> None:
    collector = AgentCollector()
    _, server = start_exporter(collector, "127.0.0.1", 0)
    try:
        registry = CollectorRegistry()
        with pytest.raises(OSError):  # noqa: PT011 - the errno differs between platforms
            start_exporter(collector, "127.0.0.1", server.port, registry=registry)
        registry.register(collector)  # not left registered by the failed start
    finally:
        server.shutdown()


def test_promtool_check_metrics(served: tuple[CollectorRegistry, metrics.MetricsServer]) -> None:
    _, server = served
    _promtool(_scrape(server.port))


def test_promtool_check_metrics_sparse() -> None:
    """Sparse and lost GPUs, no IB, no host: still lint-clean (empty families included)."""
    _promtool(generate_latest(_registry(Snapshot("n", 0, (_info(0), _info(1)), (SPARSE, LOST))))
              .decode())
    _promtool(generate_latest(_registry(None)).decode())
