"""Per-variant Xid classes (NVLink5 144-150, Xid 154) and a GPU lost without an Xid, from
kernel lines in the driver's formats (values made up for these tests).
The table against NVIDIA's whole catalog: tests/conformance/test_xid_catalog.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from gpufleet.agent.config import AgentConfig
from gpufleet.agent.health import HealthState, Severity
from gpufleet.agent.kmsg import (
    KmsgGpuLost,
    KmsgReader,
    KmsgXid,
    parse_kmsg_line,
    parse_xid_line,
    to_xid_events,
)
from gpufleet.agent.nvml import NvmlBackend, load_library
from gpufleet.agent.runner import Agent
from gpufleet.agent.telemetry import XidEvent
from gpufleet.agent.xid_catalog import XID_CATALOG, Resolution, classify
from gpufleet.rpc.v1 import fleet_pb2 as pb
from hypothesis import given, settings
from hypothesis import strategies as st


def _nvl5(xid: int, unit: str, said: str, intrinfo: int, status: int) -> str:
    return (f"NVRM: Xid (PCI:0018:01:00): {xid}, {unit}  {said}   XC0 i0 Link 11 "
            f"({intrinfo:#010x} {status:#010x} 0x00000000 0x00000000 0x00000000 0x00000000)")


def _message(line: str) -> str:
    x = parse_xid_line(line)
    assert x is not None
    return x.message


@pytest.mark.parametrize(
    ("xid", "unit", "said", "intrinfo", "status", "fatal", "resolution"),
    [
        # bit-error-rate event on a link: the catalog's non-fatal variant, whatever the word
        (149, "NETIR_BER_EVENT", "Nonfatal", 0x00000226, 0x2, False, Resolution.NONE),
        (149, "NETIR_BER_EVENT", "Fatal", 0x7FC00226 & ~(0x3F << 20), 0x3, False,
         Resolution.NONE),
        # link down, reason 0x25 in bits 20-25: reset
        (149, "NETIR_LINK_EVT", "Fatal", (0x25 << 20) | 0x1C6, 0x0, True, Resolution.RESET_GPU),
        # link down by a software/user cause: fatal to the link, nothing to reset
        (149, "NETIR_LINK_EVT", "Fatal", (0x26 << 20) | 0x1C6, 0x0, True, Resolution.NONE),
        # the later drivers' unit encoding (bits 0-6)
        (149, "NETIR_LINK_EVT", "Fatal", 0x11, 0x0, True, Resolution.RESET_GPU),
        (144, "SAW_MVB", "Nonfatal", 0x21, 0x4, False, Resolution.NONE),
        (144, "SAW_MVB", "Fatal", 0x21, 0x2, True, Resolution.RESET_GPU),
        (144, "SAW_MVB", "Fatal", 0x21, 0x6, True, Resolution.RESET_GPU),  # two bits: worst
        (145, "RLW_REMAP", "Nonfatal", 0x82, 0x1, False, Resolution.FOLLOW_XID_154),
        (146, "TLW_TX", "Nonfatal", 0x0C, 0x80000000, False, Resolution.NONE),
        (150, "MSE_WATCHDOG", "Fatal", 0x0, 0x0, True, Resolution.RESET_GPU),
    ],
)
def test_nvlink5_variant_from_the_kernel_line(xid: int, unit: str, said: str, intrinfo: int,
                                              status: int, fatal: bool,
                                              resolution: Resolution) -> None:
    got = classify(xid, _message(_nvl5(xid, unit, said, intrinfo, status)))
    assert (got.fatal, got.resolution, got.known) == (fatal, resolution, True)
    assert f"status {status:#x}" in got.variant


def test_nvlink5_variant_unknown_to_the_catalog_follows_the_driver() -> None:
    odd = classify(149, _message(_nvl5(149, "NETIR_NEW_UNIT", "Nonfatal", 0x3FF, 0x9)))
    assert (odd.fatal, odd.resolution, odd.known) == (False, Resolution.WORKFLOW_NVLINK5, False)
    odd = classify(149, _message(_nvl5(149, "NETIR_NEW_UNIT", "Fatal", 0x3FF, 0x9)))
    assert odd.fatal and "not in the catalog" in odd.variant
    no_words = classify(149, "NETIR_INT  Fatal   XC0 i0 Link -1")
    assert no_words.fatal and not no_words.known
    nvml = classify(149)  # NVML's event has no text: the variant is not known, no drain
    assert (nvml.fatal, nvml.resolution, nvml.known) == (False, Resolution.WORKFLOW_NVLINK5,
                                                          False)


def test_nonfatal_nvlink5_warns_and_does_not_drain() -> None:
    h = HealthState()
    line = _nvl5(145, "RLW_TAGSTATE", "Nonfatal", 0x102, 0x10000)
    (event,) = to_xid_events([parse_xid_line(line)], {"0018:01:00.0": 3}, 1000)
    verdict = h.on_xid(event, {3: "0018:01:00.0"})
    assert (verdict.severity, verdict.reason_code) == (Severity.WARN, "xid145")
    assert "RLW_TAGSTATE" in verdict.evidence and "NONE" in verdict.evidence
    fatal = _nvl5(145, "RLW_TAGSTATE", "Fatal", 0x102, 0x20000)
    (event,) = to_xid_events([parse_xid_line(fatal)], {"0018:01:00.0": 3}, 2000)
    assert h.on_xid(event, {}).severity == Severity.FATAL
    assert "RESET_GPU" in h.on_xid(event, {}).evidence


@pytest.mark.parametrize(("words", "resolution"), [
    ("from 0x0 (None) to 0x1 (GPU Reset Required)", Resolution.RESET_GPU),
    ("from 0x0 (None) to 0x2 (Node Reboot Required)", Resolution.REBOOT),
    ("from 0x1 (GPU Reset Required) to 0x4 (Drain and Reset)", Resolution.RESET_GPU),
    ("from 0x4 (Drain and Reset) to 0x0 (None)", Resolution.NONE),
])
def test_xid_154_carries_the_drivers_recovery_action(words: str,
                                                     resolution: Resolution) -> None:
    got = classify(154, f"GPU recovery action changed {words}")
    assert (got.fatal, got.resolution) == (False, resolution)  # 154 itself is informational
    assert classify(154).resolution == Resolution.FOLLOW_XID_154


def test_resolution_is_a_strenum_for_the_repair_loop() -> None:
    assert Resolution("RESET_GPU") is Resolution.RESET_GPU and f"{Resolution.REBOOT}" == "REBOOT"
    assert {e.resolution for e in XID_CATALOG.values()} <= set(Resolution)
    assert classify(79).resolution == Resolution.REBOOT and classify(79).fatal
    assert classify(13).resolution == Resolution.RESTART_APP and not classify(13).fatal
    unknown = classify(999)
    assert (unknown.fatal, unknown.known) == (False, False)


# ------------------------------------------------------------------ lost without an Xid

LOST_ONE_LINE = "[ 8812.004211] NVRM: GPU 0000:3b:00.0: GPU has fallen off the bus."
LOST_RECORD = ("3,1812,8812004211,-;NVRM: The NVIDIA GPU 0000:82:00.0\\x0aNVRM: (PCI ID: "
               "10de:2330) installed in this system has\\x0aNVRM: fallen off the bus and is "
               "not responding to commands.")
LOST_SPLIT = [
    "Dec  2 21:04:31 gpu17 kernel: NVRM: The NVIDIA GPU 0000:82:00.0",
    "Dec  2 21:04:31 gpu17 kernel: NVRM: (PCI ID: 10de:2330) installed in this system has",
    "Dec  2 21:04:31 gpu17 kernel: NVRM: fallen off the bus and is not responding to "
    "commands.",
]


def test_lost_gpu_lines() -> None:
    one = parse_kmsg_line(LOST_ONE_LINE)
    assert isinstance(one, KmsgGpuLost) and one.pci_bus_id == "0000:3b:00.0"
    rec = parse_kmsg_line(LOST_RECORD)
    assert isinstance(rec, KmsgGpuLost) and rec.pci_bus_id == "0000:82:00.0"
    assert "not responding to commands" in rec.message and "\\x0a" not in rec.message
    # an Xid 79 line stays an Xid, not a second report
    x79 = "NVRM: Xid (PCI:0000:3b:00): 79, pid=1, name=x, GPU has fallen off the bus."
    assert isinstance(parse_kmsg_line(x79), KmsgXid)
    # userspace cannot fake it: a /dev/kmsg record of another facility, or no NVRM prefix
    assert parse_kmsg_line("12,9,9,-;NVRM: GPU 0000:3b:00.0: GPU has fallen off the bus.") is None
    assert parse_kmsg_line("myapp: GPU 0000:3b:00.0 has fallen off the bus") is None
    # the last line alone, with no GPU named before it, names nothing
    assert parse_kmsg_line(LOST_SPLIT[2]) is None
    assert parse_xid_line(LOST_ONE_LINE) is None  # the Xid-only contract is unchanged


def test_split_lost_message_through_the_reader(tmp_path: Path) -> None:
    log = tmp_path / "syslog"
    log.write_text("")
    with KmsgReader(log) as reader:
        with log.open("a") as f:
            f.write("\n".join(LOST_SPLIT) + "\n")
        got = reader.read_new()
    assert [(type(g).__name__, g.pci_bus_id) for g in got] == [("KmsgGpuLost", "0000:82:00.0")]
    (event,) = to_xid_events(got, {"00000000:82:00.0": 5}, 77)
    assert (event.gpu_index, event.xid, event.lost, event.source) == (5, 0, True, "kmsg")


def test_lost_gpu_is_fatal_and_sent_as_gpu_lost(tmp_path: Path) -> None:
    cfg = AgentConfig(node_name="n5", controller="127.0.0.1:1", gpu_backend="simulated",
                      sim_profile="l40s-pcie", state_dir=str(tmp_path), interval_s=0.1,
                      metrics_listen="")
    agent = Agent(cfg, NvmlBackend(load_library("simulated", "l40s-pcie", None, "n5"), "sim"))
    agent.inventory()
    now = int(time.time() * 1000)
    (lost,) = to_xid_events([parse_kmsg_line(LOST_ONE_LINE)], {"0000:3b:00.0": 1}, now)
    ev = agent.on_xid(lost)
    assert (ev.kind, ev.HasField("xid"), ev.gpu_index) == (pb.EVENT_KIND_GPU_LOST, False, 1)
    assert (ev.verdict.severity, ev.verdict.reason_code) == (pb.SEVERITY_FATAL, "gpu_lost")
    worst = agent.health.worst()
    assert worst is not None and worst.reason_code == "gpu_lost"
    # the same words right after an Xid 79 of that GPU are not a second event
    x79 = XidEvent(0, 79, now, "kmsg", "GPU has fallen off the bus.")
    assert agent._xid_is_new(x79)
    assert not agent._xid_is_new(XidEvent(0, 0, now + 3, "kmsg", "fallen", lost=True))
    # NVML's bare NVLink5 event does not hide the kernel line that names the variant
    bare = XidEvent(2, 149, now, "nvml")
    line = _nvl5(149, "NETIR_LINK_EVT", "Fatal", (0x25 << 20) | 0x1C6, 0)
    (worded,) = to_xid_events([parse_xid_line(line)], {"0018:01:00.0": 2}, now + 5)
    assert agent._xid_is_new(bare) and agent._xid_is_new(worded)
    assert not agent._xid_is_new(XidEvent(2, 149, now + 9, "nvml"))  # NVML twice: once
    assert agent.on_xid(bare).verdict.severity == pb.SEVERITY_WARN
    assert agent.on_xid(worded).verdict.severity == pb.SEVERITY_FATAL


@settings(max_examples=300, deadline=None)
@given(xid=st.integers(0, 300),
       text=st.one_of(st.text(max_size=120),
                      st.builds(lambda u, s, i, e: f"{u} {s} XC0 i0 Link 3 ({i:#x} {e:#x})",
                                st.sampled_from(["NETIR_LINK_EVT", "SAW_MVB", "X"]),
                                st.sampled_from(["Fatal", "Nonfatal", "fatal"]),
                                st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))))
def test_any_text_classifies_without_raising(xid: int, text: str) -> None:
    got = classify(xid, text)
    assert got.xid == xid and isinstance(got.resolution, Resolution)
    if xid not in XID_CATALOG:
        assert not got.known and not got.fatal  # nobody is drained on an unknown code
    item = parse_kmsg_line("NVRM: " + text)
    assert item is None or isinstance(item, (KmsgXid, KmsgGpuLost))


def test_lost_words_beside_xid_79_make_one_event_and_keep_the_xid() -> None:
    h = HealthState()
    x79 = XidEvent(4, 79, 1000, "kmsg", "GPU has fallen off the bus.")
    lost = XidEvent(4, 0, 1001, "kmsg", "NVRM: GPU 0000:9b:00.0: GPU has fallen off the bus.",
                    lost=True)
    h.on_xid(x79, {})
    h.on_xid(lost, {})
    worst = h.worst()
    assert worst is not None and worst.reason_code == "xid79"
    alone = HealthState()
    alone.on_xid(lost, {})
    assert alone.worst() is not None and alone.worst().reason_code == "gpu_lost"
