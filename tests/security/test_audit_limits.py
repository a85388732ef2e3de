"""Audit records for admin and policy actions; per-field limits on agent messages."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.scheduler.access import audit
from gpufleet.scheduler.health.actions import ActionQueue
from gpufleet.scheduler.health.admin import drain
from gpufleet.scheduler.service import limits
from gpufleet.scheduler.store import SqliteStore

from tests.scheduler.fakes import FakeSlurm
from tests.security.helpers import hello


def _records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_admin_drain_and_policy_actions_are_audited(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit.configure(path)
    store = SqliteStore(tmp_path / "state.db")
    try:
        slurm = FakeSlurm(["n1", "n2"])
        drain(store, slurm, "n1", "bad fan", "alice")
        queue = ActionQueue(store, slurm)
        queue.start()
        queue.submit("n2", "drain", "gpufleet:xid79 GPU 3", None)
        assert queue.wait_idle(5)
        queue.stop()
        shadow = ActionQueue(store, None)
        shadow.submit("n2", "resume", "gpufleet:quiet", None)
    finally:
        audit.configure(None)
        store.close()
    recs = _records(path)
    assert [(r["actor"], r["action"], r["target"], r["result"]) for r in recs] == [
        ("alice", "drain", "n1", "done"),
        ("policy", "drain", "n2", "done"),
        ("policy", "resume", "n2", "shadow"),
    ]
    assert str(recs[0]["source"]).startswith("cli@")
    assert recs[0]["reason"] == "bad fan"
    assert path.stat().st_mode & 0o777 == 0o600


def test_limits_bound_every_field() -> None:
    now = int(time.time() * 1000)
    limits.check(hello("n1", gpus=64), now)  # a full DGX-class node passes
    with pytest.raises(limits.LimitError, match=r"inventory\.gpus: 65 entries"):
        limits.check(hello("n1", gpus=65), now)
    msg = pb.AgentMessage(seq=1, agent_instance="i")
    msg.event.verdict.evidence = "x" * 1025
    with pytest.raises(limits.LimitError, match=r"event\.verdict\.evidence: 1025 characters"):
        limits.check(msg, now)
    msg = pb.AgentMessage(seq=1, agent_instance="i", sample=pb.NodeSample(timestamp_ms=now))
    limits.check(msg, now)
    msg.sample.timestamp_ms = now + 8 * 86_400_000
    with pytest.raises(limits.LimitError, match=r"timestamp_ms=.*7 days ahead"):
        limits.check(msg, now)
    msg.sample.timestamp_ms = -5
    with pytest.raises(limits.LimitError, match="before 2000"):
        limits.check(msg, now)
    msg = pb.AgentMessage(seq=1, agent_instance="i")
    msg.checkpoint.path = "/ckpt/" + "a" * 4000  # long paths are fine, up to 4096
    limits.check(msg, now)
    msg.checkpoint.job_id = "1\x002"
    with pytest.raises(limits.LimitError, match="NUL"):
        limits.check(msg, now)


def test_invalid_report_is_rejected_audited_and_its_seq_consumed(tmp_path: Path) -> None:
    """One bad report no longer ends the stream: it is acked with a reason, counted,
    audited, and its seq is stored as consumed, so the reports after it flow on and a replay
    of it changes nothing."""
    import grpc
    from gpufleet.rpc.v1 import fleet_pb2_grpc as pb_grpc
    from gpufleet.scheduler.service.server import Controller

    path = tmp_path / "audit.jsonl"
    audit.configure(path)
    store = SqliteStore(tmp_path / "state.db")
    ctl = Controller(store, None, listen="127.0.0.1:0")
    ctl.start()
    now = int(time.time() * 1000)
    inst = "inst-reject"
    bad = pb.AgentMessage(seq=2, agent_instance=inst, event=pb.HealthEvent(
        timestamp_ms=now, kind=pb.EVENT_KIND_XID, xid=79,
        verdict=pb.Verdict(check="xid", severity=pb.SEVERITY_FATAL, reason_code="x" * 65)))
    good_event = pb.AgentMessage(seq=3, agent_instance=inst, event=pb.HealthEvent(
        timestamp_ms=now, kind=pb.EVENT_KIND_XID, xid=13,
        verdict=pb.Verdict(check="xid", severity=pb.SEVERITY_WARN, reason_code="xid13")))
    first = [hello("n1", inst),
             pb.AgentMessage(seq=1, agent_instance=inst, sample=pb.NodeSample(timestamp_ms=now)),
             bad, good_event]
    channel = grpc.insecure_channel(f"127.0.0.1:{ctl.port}")
    try:
        stub = pb_grpc.FleetControllerStub(channel)
        acks = [r.ack for r in stub.Connect(iter(first), timeout=10)]  # ends OK: no abort
        assert [a.seq for a in acks] == [1, 2, 3]
        assert [list(a.rejected) for a in (acks[0], acks[2])] == [[], []]
        (rej,) = acks[1].rejected
        assert rej.seq == 2 and "reason_code" in rej.reason and "65 characters" in rej.reason
        assert store.last_seq("n1") == (inst, 3)
        # replayed after a reconnect: rejected again, nothing stored, the seq stays consumed
        again = [r.ack for r in stub.Connect(iter([hello("n1", inst), bad]), timeout=10)]
        assert [a.seq for a in again] == [2] and [r.seq for r in again[0].rejected] == [2]
        assert store.last_seq("n1") == (inst, 3)
        # the one good event is stored once; the bad one never
        assert [(e.xid, e.reason_code) for e in store.events("n1")] == [(13, "xid13")]
        assert ctl.metrics.registry.get_sample_value(
            "gpufleet_controller_reports_rejected_total", {"kind": "event"}) == 2
        # a stream-level violation still ends the stream
        other = pb.AgentMessage(seq=4, agent_instance="someone-else",
                                sample=pb.NodeSample(timestamp_ms=now))
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Connect(iter([hello("n1", inst), other]), timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "agent_instance changed" in (err.value.details() or "")
    finally:
        channel.close()
        ctl.stop(grace_s=0.2)
        audit.configure(None)
        store.close()
    recs = [r for r in _records(path) if r["action"] == "agent_report"]
    assert [(r["actor"], r["result"], r["seq"], r["kind"]) for r in recs] == [
        ("n1", "rejected", 2, "event"), ("n1", "rejected", 2, "event")]
    assert "reason_code" in str(recs[0]["reason"])
