"""Every local health check, driven by simulated faults through the real NVML door."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from gpufleet.agent import nvml_sim
from gpufleet.agent.health import HealthConfig, HealthState, Severity
from gpufleet.agent.nvml import NvmlBackend, load_library
from gpufleet.agent.telemetry import DiskUsage, HostSample, IbPortSample


@pytest.fixture
def backend() -> Iterator[NvmlBackend]:
    b = NvmlBackend(load_library("simulated", "dgx-h100", None, "n1"), "sim")
    b.counter_interval_s = 0.0  # read the costly counters every cycle in tests
    yield b
    b.close()


@pytest.mark.parametrize(
    ("fault", "check", "severity", "reason"),
    [
        ({"kind": "gpu_lost"}, "gpu_lost", Severity.FATAL, "gpu_lost"),
        ({"kind": "ecc_dbe"}, "ecc", Severity.FATAL, "ecc_dbe"),
        ({"kind": "row_remap_failure"}, "row_remap", Severity.FATAL, "row_remap_failure"),
        ({"kind": "row_remap_pending"}, "row_remap", Severity.DEGRADED, "row_remap_pending"),
        ({"kind": "overheat", "temperature_c": 95}, "thermal", Severity.DEGRADED, "thermal"),
        ({"kind": "power_brake"}, "power", Severity.DEGRADED, "power_brake"),
        ({"kind": "nvlink_down", "link": 4}, "nvlink", Severity.DEGRADED, "nvlink_down"),
        ({"kind": "pcie_downtrain", "width": 8}, "pcie", Severity.DEGRADED, "pcie_downtrained"),
        ({"kind": "nvlink_errors", "count": 5000}, "nvlink_errors", Severity.DEGRADED,
         "nvlink_errors"),
    ],
)
def test_simulated_fault_yields_verdict(
    backend: NvmlBackend, fault: dict, check: str, severity: Severity, reason: str
) -> None:
    h = HealthState(HealthConfig(debounce_default=3))
    t = 1_000
    for _ in range(3):  # healthy baseline, counters primed
        assert h.evaluate(backend.sample(), t) == []
        t += 1_000
    nvml_sim.inject({"gpu": 2, **fault})
    changed: list = []
    cycles = 0
    while not changed and cycles < 5:
        changed = [v for v in h.evaluate(backend.sample(), t) if v.check == check]
        t += 1_000
        cycles += 1
    assert changed, f"no {check} verdict after {cycles} cycles"
    (v,) = changed
    assert (v.severity, v.reason_code, v.gpu_index) == (severity, reason, 2)
    assert "GPU 2" in v.evidence
    # fatal acts on the first observation; everything else waits for 3 agreeing cycles
    assert cycles == (1 if severity == Severity.FATAL else 3)
    worst = h.worst()
    assert worst is not None and worst.severity >= severity


@pytest.mark.parametrize("error", [nvml_sim.NVMLError_NotSupported, nvml_sim.NVMLError_Unknown,
                                   nvml_sim.NVMLError_NoPermission])
@pytest.mark.parametrize(("function", "check"), [
    ("nvmlDeviceGetRemappedRows", "row_remap"),
    ("nvmlDeviceGetTotalEccErrors", "ecc"),
    ("nvmlDeviceGetCurrPcieLinkWidth", "pcie"),
])
def test_a_field_nvml_cannot_read_is_no_verdict(
    backend: NvmlBackend, monkeypatch: pytest.MonkeyPatch, error: type, function: str,
    check: str,
) -> None:
    def failing(*_a: object) -> int:
        raise error()

    monkeypatch.setattr(nvml_sim, function, failing)
    h = HealthState(HealthConfig(debounce_default=1))
    for t in range(3):
        assert [v for v in h.evaluate(backend.sample(), t * 1000) if v.check == check] == []


def _port(state: str = "ACTIVE", rate: float = 400.0, downed: int = 0,
          symbol: int = 0) -> IbPortSample:
    return IbPortSample("mlx5_0", 1, state, "LinkUp" if state == "ACTIVE" else "Polling", rate,
                        symbol_error=symbol, link_downed=downed, link_error_recovery=0,
                        port_rcv_errors=0, port_xmit_discards=0)


def test_ib_port_down_and_down_trained() -> None:
    h = HealthState(HealthConfig(expected_ib_rate_gbps=400, debounce_default=2))
    assert h.evaluate([], 0, [_port()]) == []
    assert h.evaluate([], 1000, [_port(rate=100)]) == []
    (v,) = h.evaluate([], 2000, [_port(rate=100)])
    assert (v.check, v.severity, v.reason_code) == ("ib_port", Severity.DEGRADED, "ib_rate_low")
    assert "mlx5_0/1 at 100 Gb/s, expected 400" in v.evidence
    h.evaluate([], 3000, [_port(state="DOWN")])
    (v,) = h.evaluate([], 4000, [_port(state="DOWN")])
    assert v.reason_code == "ib_port_down"


def test_flapping_ib_port_is_caught_by_its_error_rate_not_its_state() -> None:
    """A port that drops and comes back between samples looks ACTIVE every time; its
    link_downed counter tells the truth."""
    h = HealthState(HealthConfig(debounce_default=3, ib_errors_per_min_degraded=10))
    seen = []
    for cycle in range(8):
        seen += h.evaluate([], cycle * 1000, [_port(downed=cycle * 2)])  # 120 flaps/min
    assert [(v.check, v.reason_code) for v in seen] == [("ib_errors", "ib_errors")]
    quiet = []
    for cycle in range(70, 74):  # a minute later the window holds no flaps
        quiet += h.evaluate([], cycle * 1000, [_port(downed=14)])
    assert [(v.check, v.severity) for v in quiet] == [("ib_errors", Severity.OK)]


def test_counter_reset_is_not_an_error_burst() -> None:
    h = HealthState(HealthConfig(debounce_default=1))
    h.evaluate([], 0, [_port(symbol=10_000)])
    assert h.evaluate([], 1000, [_port(symbol=0)]) == []


def test_only_configured_rails_are_checked() -> None:
    h = HealthState(HealthConfig(ib_hcas=("mlx5_1",), debounce_default=1))
    assert h.evaluate([], 0, [_port(state="DOWN")]) == []


def test_disk_almost_full_warns() -> None:
    h = HealthState(HealthConfig(debounce_default=1))
    host = HostSample(1.0, 1, 2, 0.1, (DiskUsage("/var/tmp", 97, 100),))
    (v,) = h.evaluate([], 0, host=host)
    assert (v.check, v.severity, v.reason_code) == ("disk", Severity.WARN, "disk_full")


def test_debounce_per_check_override() -> None:
    h = HealthState(HealthConfig(debounce_default=5, debounce=(("ib_port", 1),)))
    (v,) = h.evaluate([], 0, [_port(state="DOWN")])
    assert v.reason_code == "ib_port_down"
