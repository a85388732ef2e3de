"""The simulated NVML must look like pynvml to the agent: same names, codes, behaviour."""

from __future__ import annotations

import json

import pynvml
import pytest
from gpufleet.agent import nvml_sim

# helpers the simulator adds for tests and demos; real NVML has no such calls
SIM_ONLY = {"configure", "inject", "append_fault", "simulated_nic_affinity"}


def _public_nvml_names() -> list[str]:
    return [n for n in dir(nvml_sim)
            if n.startswith(("nvml", "NVML")) and n not in SIM_ONLY]


@pytest.mark.parametrize("name", _public_nvml_names())
def test_every_simulated_name_exists_in_pynvml(name: str) -> None:
    assert hasattr(pynvml, name), f"{name} is not a pynvml name: the agent would break on GPUs"


@pytest.mark.parametrize("name", [n for n in _public_nvml_names()
                                  if n.startswith("NVML_") and not n.startswith("NVML_FI_")])
def test_constants_have_pynvml_values(name: str) -> None:
    assert getattr(nvml_sim, name) == getattr(pynvml, name)


@pytest.mark.parametrize("cls", ["NVMLError_NotSupported", "NVMLError_GpuIsLost",
                                 "NVMLError_Timeout", "NVMLError_LibraryNotFound",
                                 "NVMLError_NoPermission", "NVMLError_Uninitialized"])
def test_error_classes_carry_pynvml_codes(cls: str) -> None:
    sim_err = getattr(nvml_sim, cls)()
    assert isinstance(sim_err, nvml_sim.NVMLError)
    real_code = {
        "NVMLError_NotSupported": pynvml.NVML_ERROR_NOT_SUPPORTED,
        "NVMLError_GpuIsLost": pynvml.NVML_ERROR_GPU_IS_LOST,
        "NVMLError_Timeout": pynvml.NVML_ERROR_TIMEOUT,
        "NVMLError_LibraryNotFound": pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
        "NVMLError_NoPermission": pynvml.NVML_ERROR_NO_PERMISSION,
        "NVMLError_Uninitialized": pynvml.NVML_ERROR_UNINITIALIZED,
    }[cls]
    assert sim_err.value == real_code


@pytest.fixture
def sim():
    nvml_sim.configure("dgx-h100", None, seed=7)
    nvml_sim.nvmlInit()
    yield nvml_sim
    nvml_sim.nvmlShutdown()


def test_calls_before_init_raise_uninitialized() -> None:
    nvml_sim.nvmlShutdown()
    with pytest.raises(nvml_sim.NVMLError_Uninitialized):
        nvml_sim.nvmlDeviceGetCount()


def test_unknown_profile_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown simulated GPU profile 'dgx-h999'"):
        nvml_sim.configure("dgx-h999")


def test_dgx_h100_profile(sim) -> None:
    assert sim.nvmlDeviceGetCount() == 8
    h = sim.nvmlDeviceGetHandleByIndex(0)
    assert sim.nvmlDeviceGetName(h) == "NVIDIA H100 80GB HBM3"
    assert sim.nvmlDeviceGetMemoryInfo(h).total == 80 * 1024**3
    assert sim.nvmlDeviceGetNvLinkState(h, 17) == sim.NVML_FEATURE_ENABLED
    with pytest.raises(sim.NVMLError_NotSupported):  # H100 has 18 links: 0..17
        sim.nvmlDeviceGetNvLinkState(h, 18)
    uuids = {sim.nvmlDeviceGetUUID(sim.nvmlDeviceGetHandleByIndex(i)) for i in range(8)}
    assert len(uuids) == 8


def test_energy_counter_is_monotonic(sim) -> None:
    h = sim.nvmlDeviceGetHandleByIndex(1)
    a = sim.nvmlDeviceGetTotalEnergyConsumption(h)
    b = sim.nvmlDeviceGetTotalEnergyConsumption(h)
    assert b >= a


def test_xid79_makes_the_gpu_lost_and_raises_an_event(sim) -> None:
    es = sim.nvmlEventSetCreate()
    for i in range(8):
        sim.nvmlDeviceRegisterEvents(sim.nvmlDeviceGetHandleByIndex(i),
                                     sim.nvmlEventTypeXidCriticalError, es)
    with pytest.raises(sim.NVMLError_Timeout):
        sim.nvmlEventSetWait(es, 10)
    sim.inject({"kind": "xid", "gpu": 3, "xid": 79})
    ev = sim.nvmlEventSetWait(es, 100)
    assert (ev.device.index, ev.eventData) == (3, 79)
    with pytest.raises(sim.NVMLError_GpuIsLost):
        sim.nvmlDeviceGetTemperature(sim.nvmlDeviceGetHandleByIndex(3), 0)
    # the other GPUs keep answering
    assert sim.nvmlDeviceGetTemperature(sim.nvmlDeviceGetHandleByIndex(2), 0) > 0


def test_fault_file_reaches_a_running_simulator(tmp_path) -> None:
    faults = tmp_path / "faults.json"
    nvml_sim.configure("l40s-pcie", faults, seed=1)
    nvml_sim.nvmlInit()
    try:
        h = nvml_sim.nvmlDeviceGetHandleByIndex(2)
        es = nvml_sim.nvmlEventSetCreate()
        nvml_sim.nvmlDeviceRegisterEvents(h, nvml_sim.nvmlEventTypeXidCriticalError, es)
        nvml_sim.append_fault(faults, {"kind": "overheat", "gpu": 2, "temperature_c": 97})
        nvml_sim.append_fault(faults, {"kind": "xid", "gpu": 2, "xid": 48})
        ev = nvml_sim.nvmlEventSetWait(es, 1000)
        assert ev.eventData == 48
        assert nvml_sim.nvmlDeviceGetTemperature(h, 0) == 97
        assert nvml_sim.nvmlDeviceGetTotalEccErrors(h, 1, 0) == 1
        doc = json.loads(faults.read_text())
        assert [f["kind"] for f in doc["faults"]] == ["overheat", "xid"]
    finally:
        nvml_sim.nvmlShutdown()


def test_pcie_only_profile_has_no_nvlink(sim) -> None:
    nvml_sim.nvmlShutdown()
    nvml_sim.configure("l40s-pcie")
    nvml_sim.nvmlInit()
    h = nvml_sim.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(nvml_sim.NVMLError_NotSupported):
        nvml_sim.nvmlDeviceGetNvLinkState(h, 0)
