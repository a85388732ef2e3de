"""The NVML door over the simulator: inventory, samples, per-field and per-GPU degrade."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from gpufleet.agent import nvml_sim
from gpufleet.agent.nvml import NvmlBackend, load_library
from gpufleet.agent.telemetry import GpuBackendError, PcieRelation


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Iterator[NvmlBackend]:
    profile = getattr(request, "param", "dgx-h100")
    b = NvmlBackend(load_library("simulated", profile, None, "n1"), f"simulated:{profile}")
    yield b
    b.close()


def test_inventory_dgx_h100(backend: NvmlBackend) -> None:
    inv = backend.inventory()
    assert [g.index for g in inv] == list(range(8))
    assert inv[0].pci_bus_id == "0000:18:00.0"
    assert all(g.nvlink_count == 18 for g in inv)
    assert {g.numa_node for g in inv} == {0, 1}


def test_nvswitch_board_is_one_island(backend: NvmlBackend) -> None:
    links = backend.links()
    assert len(links) == 28  # 8 choose 2
    assert all(lk.nvlink_count == 18 for lk in links)
    rel = {(lk.gpu_a, lk.gpu_b): lk.pcie_relation for lk in links}
    assert rel[(0, 1)] == PcieRelation.NODE
    assert rel[(0, 7)] == PcieRelation.SYS


@pytest.mark.parametrize("backend", ["a100-pcie-bridged"], indirect=True)
def test_nvlink_bridges_make_pairs(backend: NvmlBackend) -> None:
    counts = {(lk.gpu_a, lk.gpu_b): lk.nvlink_count for lk in backend.links()}
    assert counts[(0, 1)] == 12 and counts[(2, 3)] == 12
    assert counts[(0, 2)] == 0 and counts[(1, 3)] == 0


def test_nic_affinity_pix_for_own_nic(backend: NvmlBackend) -> None:
    aff = {(g, hca): rel for g, hca, rel in backend.nic_affinity()}
    assert aff[(0, "mlx5_0")] == PcieRelation.PIX
    assert aff[(0, "mlx5_4")] == PcieRelation.SYS


@pytest.mark.parametrize("backend", ["l40s-pcie"], indirect=True)
def test_unsupported_fields_are_none_not_errors(backend: NvmlBackend) -> None:
    samples = backend.sample()
    assert len(samples) == 4
    s = samples[0]
    assert s.memory_temperature_c is None  # L40S (GDDR6) has no memory temperature
    assert s.nvlink_up_count == 0 and s.nvlink_crc_errors is None
    assert s.temperature_c is not None and s.power_w is not None


def test_lost_gpu_is_reported_lost_while_others_report(backend: NvmlBackend) -> None:
    backend.sample()
    nvml_sim.inject({"kind": "gpu_lost", "gpu": 5})
    samples = backend.sample()
    assert samples[5].lost and samples[5].temperature_c is None
    assert not any(s.lost for i, s in enumerate(samples) if i != 5)
    assert all(s.temperature_c is not None for i, s in enumerate(samples) if i != 5)


# Every NVML error class a field read can raise, and what the agent must make of it.
@pytest.mark.parametrize(
    ("error", "expect"),
    [
        (nvml_sim.NVMLError_NotSupported, "none"),
        (nvml_sim.NVMLError_NoPermission, "none"),
        (nvml_sim.NVMLError_FunctionNotFound, "none"),
        (nvml_sim.NVMLError_Unknown, "none"),
        (nvml_sim.NVMLError_Timeout, "none"),
        (nvml_sim.NVMLError_GpuIsLost, "lost"),
    ],
)
def test_field_errors_degrade_per_field(
    backend: NvmlBackend, monkeypatch: pytest.MonkeyPatch, error: type, expect: str
) -> None:
    real = nvml_sim.nvmlDeviceGetPowerUsage

    def failing(handle: object) -> int:
        if getattr(handle, "index", None) == 2:
            raise error()
        return real(handle)

    monkeypatch.setattr(nvml_sim, "nvmlDeviceGetPowerUsage", failing)
    samples = backend.sample()
    if expect == "lost":
        assert samples[2].lost
    else:
        assert samples[2].power_w is None and not samples[2].lost
        assert samples[2].temperature_c is not None  # the other fields still come
    assert samples[1].power_w is not None


def test_xid_event_names_the_gpu(backend: NvmlBackend) -> None:
    assert backend.wait_xid(10) is None
    nvml_sim.inject({"kind": "xid", "gpu": 6, "xid": 79})
    ev = backend.wait_xid(500)
    assert ev is not None and (ev.gpu_index, ev.xid) == (6, 79)


def test_unknown_backend_is_a_clear_error() -> None:
    with pytest.raises(GpuBackendError, match="unknown GPU backend 'cuda'"):
        load_library("cuda")


def test_missing_libnvidia_ml_says_how_to_fix() -> None:
    # the real bindings on a machine without the driver
    backend = NvmlBackend(load_library("nvml"), "nvml")
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - probing whether a driver is present
        with pytest.raises(GpuBackendError, match=r"libnvidia-ml\.so\.1 was not found"):
            backend.inventory()
    else:
        pynvml.nvmlShutdown()
        pytest.skip("an NVIDIA driver is present on this machine")


def test_costly_counters_are_read_every_counter_interval(
    backend: NvmlBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Energy (2.6-4.6 ms per call on an H100) is not read every cycle; expiring forces it."""
    calls: list[object] = []
    real = nvml_sim.nvmlDeviceGetTotalEnergyConsumption

    def counting(handle: object) -> int:
        calls.append(handle)
        return real(handle)  # type: ignore[arg-type]

    monkeypatch.setattr(nvml_sim, "nvmlDeviceGetTotalEnergyConsumption", counting)
    backend.counter_interval_s = 3600.0
    first = backend.sample()
    assert len(calls) == 8
    again = backend.sample()
    assert len(calls) == 8  # within the interval: the last reading is reported
    assert [g.energy_mj for g in again] == [g.energy_mj for g in first]
    backend.expire_counters()
    backend.sample()
    assert len(calls) == 16
    backend.counter_interval_s = 0.0
    backend.sample()
    assert len(calls) == 24
