"""Agent -> real gRPC over loopback -> controller -> (fake) Slurm: the loop in one process."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from gpufleet.agent import nvml_sim
from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.scheduler.health.actions import ActionQueue
from gpufleet.scheduler.health.policy import HealthPolicy, PolicyConfig
from gpufleet.scheduler.service.ingest import IngestError, Ingestor
from gpufleet.scheduler.service.server import Controller
from gpufleet.scheduler.store import SqliteStore

from tests.scheduler.fakes import FakeSlurm
from tests.support import wait_for
from tests.support.agents import make_agent


@pytest.fixture
def controller(tmp_path) -> Iterator[tuple[Controller, FakeSlurm]]:
    slurm = FakeSlurm([f"n{i}" for i in range(1, 5)])
    store = SqliteStore(tmp_path / "state.db")
    ctl = Controller(store, slurm, listen="127.0.0.1:0")
    ctl.start()
    yield ctl, slurm
    ctl.stop()
    store.close()


def test_once_registers_the_node(controller, tmp_path) -> None:
    ctl, _ = controller
    agent = make_agent(tmp_path, ctl.port, profile="l40s-pcie")
    assert agent.run(once=True, once_timeout_s=10)
    (node,) = ctl.store.nodes()
    assert (node.name, node.gpu_count, node.health) == ("n1", 4, "ok")


def test_xid79_drains_once_with_gpufleet_reason(controller, tmp_path, report_figure) -> None:
    ctl, slurm = controller
    agent = make_agent(tmp_path, ctl.port, node="n3")
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    try:
        wait_for(lambda: bool(ctl.store.nodes()))
        t0 = time.monotonic()
        nvml_sim.inject({"kind": "xid", "gpu": 3, "xid": 79})
        wait_for(lambda: slurm.state["n3"][0] == "IDLE+DRAIN")
        elapsed_ms = (time.monotonic() - t0) * 1000
        _state, reason = slurm.state["n3"]
        assert reason.startswith("gpufleet:xid79 GPU 3 (0000:5d:00.0)")
        time.sleep(0.5)  # the GPU-lost verdicts that follow must not drain again
        assert slurm.calls == [("drain", "n3")]
        (act,) = ctl.store.actions("n3")
        assert act.status == "done" and act.fault_ms is not None
        node = ctl.store.node("n3")
        assert node is not None and node.health == "fatal"
        report_figure(f"fault -> drain over loopback gRPC, in-memory Slurm: {elapsed_ms:.0f} ms")
    finally:
        agent.stop.set()
        t.join(5)


def test_admin_drained_node_keeps_its_reason(controller, tmp_path) -> None:
    ctl, slurm = controller
    slurm.state["n2"] = ("IDLE+DRAIN", "admin: bad fan")
    ctl.actions.submit("n2", "drain", "gpufleet:xid79 x", 1)
    assert ctl.actions.wait_idle(5)
    assert slurm.state["n2"] == ("IDLE+DRAIN", "admin: bad fan")
    (act,) = ctl.store.actions("n2")
    assert act.status == "skipped" and "admin: bad fan" in act.detail
    ctl.actions.submit("n2", "resume", "healthy again", None)
    assert ctl.actions.wait_idle(5)
    assert slurm.state["n2"][0] == "IDLE+DRAIN"  # never resume what gpufleet did not drain


def test_slurm_down_queues_and_retries(tmp_path) -> None:
    slurm = FakeSlurm(["n1"])
    slurm.down = True
    store = SqliteStore(tmp_path / "s.db")
    q = ActionQueue(store, slurm, retry_initial_s=0.05, retry_max_s=0.1)
    q.start()
    try:
        q.submit("n1", "drain", "gpufleet:xid79 x", 1)
        wait_for(lambda: store.actions()[0].attempts >= 2, 5)
        assert store.actions()[0].status == "queued"
        slurm.down = False
        wait_for(lambda: store.actions()[0].status == "done", 5)
        assert slurm.state["n1"][0] == "IDLE+DRAIN"
    finally:
        q.stop()


def test_shadow_mode_acts_on_nothing(tmp_path) -> None:
    slurm = FakeSlurm(["n1"])
    store = SqliteStore(tmp_path / "s.db")
    q = ActionQueue(store, slurm, shadow=True)
    q.start()
    q.submit("n1", "drain", "gpufleet:xid79 x", 1)
    q.stop()
    assert slurm.calls == []
    assert store.actions()[0].status == "shadow"


def _hello(node: str = "n1", instance: str = "i1") -> pb.AgentMessage:
    return pb.AgentMessage(seq=0, agent_instance=instance,
                           hello=pb.Hello(inventory=pb.NodeInventory(node_name=node)))


def test_replayed_report_is_not_applied_twice(tmp_path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    ingest = Ingestor(store, HealthPolicy(store, ActionQueue(store, None), PolicyConfig()))
    node = ingest.hello(_hello())
    ev = pb.AgentMessage(seq=1, agent_instance="i1", event=pb.HealthEvent(
        timestamp_ms=5, kind=pb.EVENT_KIND_XID, xid=13,
        verdict=pb.Verdict(check="xid", severity=pb.SEVERITY_WARN, reason_code="xid13")))
    assert ingest.handle(node, ev) == 1
    assert ingest.handle(node, ev) == 1  # acked again ...
    assert (ingest.counters.events, ingest.counters.duplicates) == (1, 1)  # ... stored once


@pytest.mark.parametrize(
    ("msg", "error"),
    [
        (pb.AgentMessage(seq=1, agent_instance="i1", sample=pb.NodeSample()), "first message"),
        (_hello(node="n1;rm -rf /"), "invalid node name"),
        (_hello(node=""), "invalid node name"),
        (_hello(instance=""), "without agent_instance"),
    ],
)
def test_bad_hello_is_refused(tmp_path, msg: pb.AgentMessage, error: str) -> None:
    store = SqliteStore(tmp_path / "s.db")
    ingest = Ingestor(store, HealthPolicy(store, ActionQueue(store, None), PolicyConfig()))
    with pytest.raises(IngestError, match=error):
        ingest.hello(msg)
    assert store.nodes() == []


def test_unknown_severity_is_refused_and_nothing_changes(tmp_path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    ingest = Ingestor(store, HealthPolicy(store, ActionQueue(store, None), PolicyConfig()))
    node = ingest.hello(_hello())
    bad = pb.AgentMessage(seq=1, agent_instance="i1", sample=pb.NodeSample(
        verdicts=[pb.Verdict(check="x", severity=77, reason_code="x")]))  # type: ignore[arg-type]
    with pytest.raises(IngestError, match="unknown severity 77"):
        ingest.handle(node, bad)
    assert store.last_seq("n1") == ("i1", 0)


def _ckpt(seq: int, job_id: str, step: int, path: str = "/scratch/ck/step") -> pb.AgentMessage:
    return pb.AgentMessage(seq=seq, agent_instance="i1", checkpoint=pb.CheckpointRegistered(
        job_id=job_id, step=step, path=f"{path}-{step}", time_ms=10, node="n1", uid=1000,
        received_ms=11))


def test_checkpoint_registrations_are_kept_per_job(tmp_path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    ingest = Ingestor(store, HealthPolicy(store, ActionQueue(store, None), PolicyConfig()))
    node = ingest.hello(_hello())
    assert ingest.handle(node, _ckpt(1, "4711", 300)) == 1
    assert ingest.handle(node, _ckpt(2, "4711", 200)) == 2  # older step: acked, not kept
    row = store.checkpoint("4711")
    assert row is not None and (row.step, row.path, row.uid) == (300, "/scratch/ck/step-300", 1000)
    assert store.last_seq("n1") == ("i1", 2)


@pytest.mark.parametrize(
    ("msg", "error"),
    [(_ckpt(1, "47;11", 1), "invalid job id"), (_ckpt(1, "4711", 1, path="rel/ck"), "bad path")],
)
def test_bad_checkpoint_registration_is_refused(tmp_path, msg: pb.AgentMessage,
                                                error: str) -> None:
    store = SqliteStore(tmp_path / "s.db")
    ingest = Ingestor(store, HealthPolicy(store, ActionQueue(store, None), PolicyConfig()))
    node = ingest.hello(_hello())
    with pytest.raises(IngestError, match=error):
        ingest.handle(node, msg)
    assert store.checkpoint("4711") is None and store.checkpoint("47;11") is None


def test_tune_gc_collects_the_young_less_often() -> None:
    """What `gpufleet controller` does to its process once started (docs/scaling.md)."""
    import gc

    from gpufleet.scheduler.service.server import GC_GEN0_THRESHOLD, tune_gc

    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == (GC_GEN0_THRESHOLD, *before[1:])
        assert before[0] < GC_GEN0_THRESHOLD
    finally:
        gc.set_threshold(*before)  # this test process goes on: put the collector back
