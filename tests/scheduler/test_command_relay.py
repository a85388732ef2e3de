"""Repair commands and their answers between ingest processes on one store
(service/command_relay.py, migration 12): the store's queues on both backends, the relay
between two processes' AgentCommands, and the Xid 95 repair of a node whose agent is
connected to the process that is NOT the leader, end to end on PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpufleet.agent import nvml_sim
from gpufleet.agent.config import AgentConfig
from gpufleet.agent.nvml import NvmlBackend, load_library
from gpufleet.agent.runner import Agent
from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.scheduler.health.policy import PolicyConfig
from gpufleet.scheduler.repair import Journal, RepairConfig
from gpufleet.scheduler.repair.engine import AgentCommand, CommandResult, Step
from gpufleet.scheduler.service.command_relay import CommandRelay, RelayedCommands
from gpufleet.scheduler.service.repair_link import AgentCommands, result_from_wire
from gpufleet.scheduler.service.server import Controller
from gpufleet.scheduler.store import (
    AgentCommandRow,
    CommandResultRow,
    PostgresStore,
    SqliteStore,
    StateStore,
)

from tests.scheduler.fakes import FakeSlurm
from tests.scheduler.pg_server import PgServer
from tests.support import wait_for

from .conftest import Backend

# ----------------------------------------------------------------------------- the store


def _cmd(node: str, request_id: str, created_ms: int = 1_000, gpus: tuple[int, ...] = (2,)
         ) -> AgentCommandRow:
    return AgentCommandRow(0, node, "reset_gpu", request_id, gpus, 1, created_ms)


def test_stream_holders_are_live_processes_and_the_last_to_publish(
        store_backend: Backend) -> None:
    s = store_backend.open()
    s.publish_streams("p1", ["n1", "n2"], [], 1_000)
    assert s.stream_holders(500) == {"n1": "p1", "n2": "p1"}
    assert s.stream_holders(500, "n2") == {"n2": "p1"}
    assert s.stream_holders(1_001) == {}  # p1 has not beaten since: dead
    # n2's agent reconnected to p2; p1 then notices its old stream closed
    s.publish_streams("p2", ["n2"], [], 2_000)
    s.publish_streams("p1", [], ["n2"], 2_000)
    assert s.stream_holders(1_500) == {"n1": "p1", "n2": "p2"}
    s.publish_streams("p1", [], [], 3_000)  # a beat alone
    assert s.stream_holders(2_500) == {"n1": "p1"}
    s.forget_streams("p1")
    assert s.stream_holders(0) == {"n2": "p2"}


def test_commands_are_claimed_once_by_the_holder_of_their_node(store_backend: Backend) -> None:
    s = store_backend.open()
    s.publish_streams("p1", ["n1"], [], 1_000)
    s.publish_streams("p2", ["n2"], [], 1_000)
    first = s.queue_command(_cmd("n1", "r1", gpus=(0, 3)))
    s.queue_command(_cmd("n2", "r2", gpus=()))
    s.queue_command(_cmd("n3", "r3"))  # no stream anywhere: waits
    assert s.claim_commands("p9") == []
    (mine,) = s.claim_commands("p1")
    assert mine == AgentCommandRow(first, "n1", "reset_gpu", "r1", (0, 3), 1, 1_000)
    assert s.claim_commands("p1") == []  # gone with the claim
    assert [c.request_id for c in s.claim_commands("p2")] == ["r2"]
    # n3's agent connects to p2: the command waiting for it goes there
    s.publish_streams("p2", ["n3"], [], 2_000)
    (late,) = s.claim_commands("p2")
    assert (late.node, late.gpus) == ("n3", (2,))


def test_prune_drops_dead_processes_and_unclaimed_old_commands(store_backend: Backend) -> None:
    s = store_backend.open()
    s.publish_streams("old", ["n1"], [], 1_000)
    s.publish_streams("new", ["n2"], [], 5_000)
    s.queue_command(_cmd("n9", "stale", created_ms=1_000))
    s.queue_command(_cmd("n9", "fresh", created_ms=5_000))
    assert s.prune_relay(dead_before_ms=2_000, commands_before_ms=2_000) == (1, 1)
    assert s.stream_holders(0) == {"n2": "new"}
    s.publish_streams("new", ["n9"], [], 6_000)
    assert [c.request_id for c in s.claim_commands("new")] == ["fresh"]


def test_command_results_queue_keeps_every_field(store_backend: Backend) -> None:
    s = store_backend.open()
    odd = ("row_remap, failed", 'pcie "x"\nnext')
    a = s.add_command_result(CommandResultRow(0, "n1", "r1", "diag", False, True, "exit 2",
                                              odd, "GPU 1: failure=1", 7))
    s.add_command_result(CommandResultRow(0, "n2", "r2", "reset_gpu", True, False, "", (), "", 8))
    rows = s.command_results()
    assert rows[0] == CommandResultRow(a, "n1", "r1", "diag", False, True, "exit 2", odd,
                                       "GPU 1: failure=1", 7)
    assert [r.node for r in rows] == ["n1", "n2"]
    assert [r.node for r in s.command_results(limit=1)] == ["n1"]
    s.delete_command_results([a])
    assert [r.node for r in s.command_results()] == ["n2"]


def test_concurrent_claimers_on_postgres_take_each_command_once(pg_server: PgServer) -> None:
    """Two connections claim for the same holder at once (an agent with streams on two
    processes is the real case): every command is taken, none twice."""
    dsn = pg_server.create_database()
    stores = [PostgresStore(dsn), PostgresStore(dsn)]
    try:
        stores[0].publish_streams("p1", [f"n{i}" for i in range(10)], [], 1_000)
        for i in range(200):
            stores[0].queue_command(_cmd(f"n{i % 10}", f"r{i}"))
        taken: list[list[str]] = [[], []]
        go = threading.Barrier(2)

        def claim(k: int) -> None:
            go.wait()
            while rows := stores[k].claim_commands("p1"):
                taken[k] += [r.request_id for r in rows]

        threads = [threading.Thread(target=claim, args=(k,)) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(taken[0] + taken[1]) == sorted(f"r{i}" for i in range(200))
    finally:
        for s in stores:
            s.close()
        pg_server.drop_database(dsn)


# ----------------------------------------------------------------------------- the relay


class Process:
    """One controller process's side of the relay: its AgentCommands, link and relay, over a
    store every process shares."""

    def __init__(self, store: StateStore, name: str, acting: bool = False,
                 clock: list[int] | None = None) -> None:
        self.local = AgentCommands(store)
        self.delivered: list[CommandResult] = []
        self.acting = acting
        tick = clock if clock is not None else [1_000]
        self.link = RelayedCommands(self.local, store, holder=name, snapshot_s=0,
                                    clock=lambda: tick[0])
        self.relay = CommandRelay(self.link, store, self.delivered.append, lambda: self.acting)


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "state.db")
    yield s
    s.close()


def test_a_command_for_a_node_held_elsewhere_reaches_that_stream_once(
        sqlite_store: SqliteStore) -> None:
    clock = [1_000]
    leader = Process(sqlite_store, "leader", acting=True, clock=clock)
    other = Process(sqlite_store, "other", clock=clock)
    cmd = AgentCommand("n1", "reset_gpu", "r1", (2,))
    assert not leader.link.has_stream("n1")
    assert not leader.link.send(cmd)  # nobody holds n1: the repair loop waits
    other.local.connected("n1", True)
    other.relay.poll_once()  # publishes n1 as other's
    assert leader.link.has_stream("n1") and not other.link.has_stream("n2")
    assert leader.link.send(cmd)
    assert leader.link.queued == 1 and leader.local.take("n1") == []
    assert other.local.take("n1") == []  # not before other's next poll
    other.relay.poll_once()
    (sent,) = other.local.take("n1")
    assert (sent.kind, sent.request_id, list(sent.gpu_indices)) == (
        pb.Command.KIND_RESET_GPU, "r1", [2])
    other.relay.poll_once()
    assert other.local.take("n1") == [] and other.relay.handed == 1


def test_a_command_follows_the_agent_to_the_process_it_reconnects_to(
        sqlite_store: SqliteStore) -> None:
    clock = [1_000]
    leader = Process(sqlite_store, "leader", acting=True, clock=clock)
    a, b = Process(sqlite_store, "a", clock=clock), Process(sqlite_store, "b", clock=clock)
    a.local.connected("n1", True)
    a.relay.poll_once()
    assert leader.link.send(AgentCommand("n1", "diag", "r1", level=2))
    a.local.connected("n1", False)  # the stream dropped before a claimed it
    a.relay.poll_once()
    assert a.local.take("n1") == []
    assert not leader.link.has_stream("n1")
    b.local.connected("n1", True)
    b.relay.poll_once()
    (sent,) = b.local.take("n1")
    assert (sent.kind, sent.diag_level) == (pb.Command.KIND_RUN_DIAG, 2)


def test_a_holder_that_stopped_beating_holds_no_stream(sqlite_store: SqliteStore) -> None:
    clock = [1_000]
    leader = Process(sqlite_store, "leader", acting=True, clock=clock)
    other = Process(sqlite_store, "other", clock=clock)
    other.local.connected("n1", True)
    other.relay.poll_once()
    assert leader.link.has_stream("n1")
    clock[0] += leader.link.live_ms + 1  # other died (killed -9): no beat since
    assert not leader.link.has_stream("n1")
    assert not leader.link.send(AgentCommand("n1", "diag", "r1"))
    other.relay.poll_once()  # alive after all: its beat counts again
    assert leader.link.has_stream("n1")


def test_an_answer_at_a_non_leader_reaches_the_leaders_repair_loop(
        sqlite_store: SqliteStore) -> None:
    leader = Process(sqlite_store, "leader", acting=True)
    other = Process(sqlite_store, "other")
    answer = pb.CommandResult(request_id="r1", kind=pb.Command.KIND_RUN_DIAG, ok=False,
                              detail="1 check failed", checks=[pb.DiagCheck(
                                  name="row_remap", passed=False, evidence="GPU 1 failure=1")])
    other.relay.on_result("n1", answer)
    other.relay.poll_once()  # not the leader: keeps it in the store
    assert other.delivered == [] and other.relay.results_stored == 1
    leader.relay.poll_once()
    assert leader.delivered == [result_from_wire("n1", answer)]
    leader.relay.poll_once()
    assert len(leader.delivered) == 1  # once
    leader.relay.on_result("n2", answer)  # its own stream's: straight to its loop
    assert [r.node for r in leader.delivered] == ["n1", "n2"]
    assert sqlite_store.command_results() == []


def test_stop_withdraws_the_streams_at_once(sqlite_store: SqliteStore) -> None:
    leader = Process(sqlite_store, "leader", acting=True)
    other = Process(sqlite_store, "other")
    other.local.connected("n1", True)
    other.relay.poll_once()
    assert leader.link.has_stream("n1")
    other.relay.stop()
    assert not leader.link.has_stream("n1")


# ----------------------------------------------------------------------------- end to end


class Rebooter:
    def reboot(self, node: str, reason: str) -> None:
        raise AssertionError(f"no reboot expected ({node}: {reason})")


def _controller(dsn: str, slurm: FakeSlurm, journal: Path, **kw: object
                ) -> tuple[Controller, PostgresStore]:
    store = PostgresStore(dsn)
    ctl = Controller(store, slurm, listen="127.0.0.1:0",
                     policy=PolicyConfig(tick_s=0.1, resume_quiet_s=0.5),
                     repair=RepairConfig(tick_s=0.1), repair_journal=str(journal),
                     rebooter=Rebooter(), partition_of=lambda _n: "gpu",
                     metrics_listen=None, **kw)  # type: ignore[arg-type]
    return ctl, store


def _agent(tmp_path: Path, port: int, node: str) -> tuple[Agent, threading.Thread]:
    cfg = AgentConfig(node_name=node, controller=f"127.0.0.1:{port}", gpu_backend="simulated",
                      state_dir=str(tmp_path / node), interval_s=0.1, metrics_listen="",
                      sysfs_root=str(tmp_path / "nosys"))
    nvml_sim.nvmlShutdown()  # process-global, as NVML is
    lib = load_library("simulated", "dgx-h100", cfg.resolved_faults_path(), node)
    agent = Agent(cfg, NvmlBackend(lib, "simulated:dgx-h100"))
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    return agent, t


@pytest.mark.slow  # two controllers, PostgreSQL, a reset and a diag over loopback: ~10 s
def test_xid95_at_the_non_leader_is_reset_diagnosed_and_resumed_by_the_leader(
        pg_server: PgServer, tmp_path: Path, report_figure) -> None:
    dsn = pg_server.create_database()
    slurm = FakeSlurm(["n1", "n2"])
    leader, s1 = _controller(dsn, slurm, tmp_path / "leader.jsonl")
    other, s2 = _controller(dsn, slurm, tmp_path / "other.jsonl", standby_ingests=True)
    agent: Agent | None = None
    t: threading.Thread | None = None
    try:
        leader.start()
        wait_for(lambda: leader.active, 10, "the first controller to lead")
        other.start(elect_wait_s=0.5)
        assert not other.active
        agent, t = _agent(tmp_path, other.port, "n1")  # the non-leader only
        assert leader.relay is not None and other.relay is not None
        assert leader.repair is not None
        wait_for(lambda: leader.relay is not None and leader.relay.link.has_stream("n1"), 15,
                 "the leader to see n1's stream on the other process")
        assert leader.commands is not None and not leader.commands.has_stream("n1")
        t0 = time.monotonic()
        nvml_sim.inject({"kind": "xid", "gpu": 2, "xid": 95})
        wait_for(lambda: slurm.state["n1"][0] == "IDLE+DRAIN", 15, "the leader to drain n1")
        wait_for(lambda: slurm.state["n1"] == ("IDLE", ""), 30, "n1 repaired and resumed")
        elapsed = time.monotonic() - t0
        assert leader.repair.cases["n1"].step == Step.RESUMED
        steps = [r["step"] for r in Journal(str(tmp_path / "leader.jsonl")).history("n1")
                 if r.get("type") == "step"]
        assert steps == ["fault", "remediating", "reset_done", "diagnosing", "diag_passed",
                         "resumed"]
        assert slurm.calls == [("drain", "n1"), ("resume", "n1")]
        # both commands went through the store, and both answers came back through it
        assert leader.relay.link.queued == 2 and other.relay.handed == 2
        assert other.relay.results_stored == 2 and leader.relay.results_delivered == 2
        assert s1.command_results() == [] and s1.claim_commands(other.relay.holder) == []
        report_figure(f"Xid 95 at a non-leader ingest process -> drain -> GPU reset -> diag "
                      f"-> resumed, relayed through PostgreSQL: {elapsed:.2f} s")
    finally:
        if agent is not None and t is not None:
            agent.stop.set()
            t.join(5)
        other.stop(0.2)
        leader.stop(0.2)
        s2.close()
        s1.close()
        pg_server.drop_database(dsn)
