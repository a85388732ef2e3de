"""XID verdicts last for the boot, not for the agent process: a restarted agent (crash,
upgrade, rollout) keeps reporting the Xid that took its node out, so the controller does not
resume the node after its quiet period; a reboot starts clean."""

from __future__ import annotations

import json
import time
from pathlib import Path

from gpufleet.agent.config import AgentConfig
from gpufleet.agent.health import Severity
from gpufleet.agent.nvml import NvmlBackend, load_library
from gpufleet.agent.runner import XID_STATE_FILE, Agent
from gpufleet.agent.telemetry import XidEvent
from gpufleet.rpc.v1 import fleet_pb2 as pb


def _agent(state_dir: Path) -> Agent:
    cfg = AgentConfig(node_name="n3", controller="127.0.0.1:1", gpu_backend="simulated",
                      sim_profile="l40s-pcie", state_dir=str(state_dir), interval_s=0.1,
                      metrics_listen="")
    return Agent(cfg, NvmlBackend(load_library("simulated", "l40s-pcie", None, "n3"), "sim"))


def _fatal_codes(sample: pb.NodeSample) -> list[tuple[str, int]]:
    return [(v.reason_code, v.gpu_index) for v in sample.verdicts
            if v.severity == pb.SEVERITY_FATAL]


def test_a_restarted_agent_still_reports_the_xid(tmp_path: Path) -> None:
    first = _agent(tmp_path)
    first.inventory()
    first.on_xid(XidEvent(2, 79, int(time.time() * 1000), "kmsg"))
    first.on_xid(XidEvent(1, 13, int(time.time() * 1000), "kmsg"))  # a warning: kept too
    assert first.health.worst() is not None and first.health.worst().severity == Severity.FATAL

    again = _agent(tmp_path)  # same state dir, same boot
    again.inventory()
    assert again.health.worst() is not None
    assert again.health.worst().reason_code == "xid79"
    s1 = again.sample()
    assert _fatal_codes(s1) == [("xid79", 2)]  # sent with the first sample, not as an event
    assert {v.reason_code for v in s1.verdicts} >= {"xid79", "xid13"}
    assert _fatal_codes(again.sample()) == []  # once: later samples carry only changes
    # no new event: the Xid was stored as an event once, by the first process
    assert all(m.WhichOneof("body") != "event" for m in again.outbox.pending_messages())


def test_a_reboot_or_a_damaged_file_starts_clean(tmp_path: Path) -> None:
    first = _agent(tmp_path)
    first.inventory()
    first.on_xid(XidEvent(0, 48, int(time.time() * 1000), "kmsg"))
    path = tmp_path / XID_STATE_FILE
    doc = json.loads(path.read_text())
    doc["boot_id"] = "another-boot"
    path.write_text(json.dumps(doc))
    assert _agent(tmp_path).health.worst() is None  # rebooted: the GPU starts clean

    path.write_text("{not json")
    assert _agent(tmp_path).health.worst() is None  # unreadable: logged, not fatal
    doc["boot_id"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    doc["verdicts"] = [{"check": "xid", "severity": 99}]  # a bad entry is skipped
    path.write_text(json.dumps(doc))
    assert _agent(tmp_path).health.worst() is None
