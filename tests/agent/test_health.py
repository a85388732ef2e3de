"""Health verdicts from samples and XID events; the XID table against NVIDIA's catalog."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from gpufleet.agent.health import HealthConfig, HealthState, Severity, classify_xid
from gpufleet.agent.telemetry import GpuSample, XidEvent
from gpufleet.agent.xid_catalog import XID_CATALOG

from tests.conftest import REPO


def _generator():
    spec = importlib.util.spec_from_file_location("gen_xid", REPO / ".ci/gen_xid_table.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gen_xid"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_committed_table_is_what_the_generator_renders() -> None:
    """The catalog itself (NVIDIA's CSV) is checked in tests/conformance/test_xid_real.py."""
    gen = _generator()
    assert (REPO / "agent/gpufleet/agent/xid_catalog.py").read_text() == gen.render(XID_CATALOG)


@pytest.mark.parametrize("xid", sorted(XID_CATALOG))
def test_every_catalog_xid_has_a_severity(xid: int) -> None:
    severity, text = classify_xid(xid)
    assert severity == (Severity.FATAL if XID_CATALOG[xid][2] else Severity.WARN)
    assert text.startswith(f"Xid {xid} ")


def test_known_xids() -> None:
    assert classify_xid(79)[0] == Severity.FATAL  # fallen off the bus
    assert classify_xid(48)[0] == Severity.FATAL  # double-bit ECC
    assert classify_xid(13)[0] == Severity.WARN  # graphics engine exception: the app's fault


def test_unknown_xid_is_warn_and_keeps_its_number() -> None:
    severity, text = classify_xid(100_000)
    assert severity == Severity.WARN
    assert "100000" in text


def test_xid_verdict_never_softens() -> None:
    h = HealthState()
    h.on_xid(XidEvent(1, 79, 1000, "nvml"), {1: "0000:2a:00.0"})
    h.on_xid(XidEvent(1, 13, 2000, "nvml"), {1: "0000:2a:00.0"})
    worst = h.worst()
    assert worst is not None and worst.reason_code == "xid79"
    assert "0000:2a:00.0" in worst.evidence


def test_lost_gpu_and_gpu_count_act_at_once_and_recover_debounced() -> None:
    h = HealthState(HealthConfig(expected_gpu_count=4, debounce_default=2))
    ok = [GpuSample(index=i) for i in range(4)]
    assert h.evaluate(ok, 1) == []  # all fine: nothing to report
    changed = h.evaluate([*ok[:3], GpuSample(index=3, lost=True)], 2)
    assert {(v.check, v.severity) for v in changed} == {
        ("gpu_lost", Severity.FATAL), ("gpu_count", Severity.FATAL)}
    assert h.evaluate([*ok[:3], GpuSample(index=3, lost=True)], 3) == []  # no change, no noise
    assert h.evaluate(ok, 4) == []  # one good cycle is not yet a recovery
    back = h.evaluate(ok, 5)
    assert {(v.check, v.severity) for v in back} == {
        ("gpu_lost", Severity.OK), ("gpu_count", Severity.OK)}
