"""Audit records for admin and policy actions; per-field limits on agent messages."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.scheduler import audit, limits
from gpufleet.scheduler.actions import ActionQueue
from gpufleet.scheduler.admin import drain
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
