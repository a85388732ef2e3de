"""Several ingest processes on one PostgreSQL store, exactly one of them acting in Slurm.

Controllers started with `standby_ingests` take agents' streams and store their reports
while they are not the leader; a verdict that moves a node's health there is queued in the
store with it, and the leader (the advisory-lock holder) reads the queue and acts
(health/follow.py). Here the agents are connected to the controller that is NOT the leader,
so every drain below went through the store. The in-memory Slurm records every call: a
second drain of one node would show.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from gpufleet.agent.client import Heartbeats, StreamClient
from gpufleet.agent.outbox import Outbox
from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.scheduler.health.policy import PolicyConfig
from gpufleet.scheduler.service.server import Controller
from gpufleet.scheduler.store import PostgresStore, VerdictRow, open_store

from tests.scheduler.fakes import FakeSlurm
from tests.scheduler.pg_server import PgServer
from tests.security.helpers import hello
from tests.support import wait_for
from tests.support.net import free_port

NODES = ("n1", "n2", "n3")


class Agent:
    """One node: the agent's own StreamClient and Outbox, a heartbeat every 0.1 s."""

    def __init__(self, node: str, targets: str) -> None:
        self.node = node
        self.outbox = Outbox(uuid.uuid4().hex)
        self.heartbeats = Heartbeats(self.outbox.wake)
        self.client = StreamClient(targets, self.outbox, lambda: hello(node).hello,
                                   backoff_initial_s=0.05, backoff_max_s=0.5,
                                   heartbeats=self.heartbeats)
        self.stop = threading.Event()
        self.quiet = threading.Event()  # set: no more heartbeats (the node goes silent)
        self._threads = [threading.Thread(target=self.client.run, args=(self.stop,),
                                          daemon=True),
                         threading.Thread(target=self._beat, daemon=True)]
        for t in self._threads:
            t.start()

    def _beat(self) -> None:
        while not self.stop.wait(0.1):
            if not self.quiet.is_set():
                self.heartbeats.put(pb.Heartbeat(timestamp_ms=int(time.time() * 1000)))

    def xid79(self) -> int:
        now = int(time.time() * 1000)
        return self.outbox.put_event(pb.HealthEvent(
            timestamp_ms=now, kind=pb.EVENT_KIND_XID, gpu_index=1, xid=79,
            verdict=pb.Verdict(check="xid", severity=pb.SEVERITY_FATAL, reason_code="xid79",
                               evidence="GPU 1 Xid 79 fallen off the bus", since_ms=now,
                               gpu_index=1)))

    def close(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(5)


def _controller(dsn: str, slurm: FakeSlurm, resume_quiet_s: float = 3600,
                **kw: object) -> tuple[Controller, PostgresStore]:
    store = PostgresStore(dsn)
    policy = PolicyConfig(resume_quiet_s=resume_quiet_s, unreachable_after_s=1.5)
    ctl = Controller(store, slurm, listen="127.0.0.1:0", policy=policy, **kw)  # type: ignore[arg-type]
    return ctl, store


@pytest.fixture
def dsn(pg_server: PgServer) -> Iterator[str]:
    dsn = pg_server.create_database()
    yield dsn
    pg_server.drop_database(dsn)


def test_published_change_is_queued_only_when_health_moves(dsn: str) -> None:
    store = open_store(dsn)
    try:
        store.upsert_node("n1", "n1", 8, b"", "i1", 1)
        warn = VerdictRow("n1", "temp", 0, "", "warn", "hot", "81 C", 5)
        assert store.set_verdict(warn, publish=True) == ("ok", "warn")
        # the same health again: nothing moved, nothing queued
        assert store.set_verdict(VerdictRow("n1", "temp", 1, "", "warn", "hot", "82 C", 6),
                                 publish=True) == ("warn", "warn")
        # not published (this process acts itself): nothing queued
        assert store.set_verdict(VerdictRow("n1", "xid", 1, "", "fatal", "xid79", "x", 7)) \
            == ("warn", "fatal")
        (change,) = store.health_changes()
        assert (change.node, change.before, change.after, change.reason_code,
                change.evidence, change.fault_ms) == ("n1", "ok", "warn", "hot", "81 C", 5)
        store.delete_health_changes([change.id])
        assert store.health_changes() == []
    finally:
        store.close()


def test_fault_at_the_non_leader_is_drained_once_by_the_leader(dsn: str) -> None:
    slurm = FakeSlurm(list(NODES))
    leader, s1 = _controller(dsn, slurm)
    other, s2 = _controller(dsn, slurm, standby_ingests=True)
    agents: list[Agent] = []
    try:
        leader.start()
        wait_for(lambda: leader.active, 10, "the first controller to lead")
        other.start(elect_wait_s=0.5)
        assert not other.active  # one leader: the other only ingests
        # the non-leader listed first: the agents stay there
        agents = [Agent(n, f"127.0.0.1:{other.port},127.0.0.1:{leader.port}") for n in NODES]
        # streams up (the controller's headers) and heartbeats taken in (they are not acked)
        wait_for(lambda: all(a.client.connected.is_set() for a in agents)
                 and other.ingest.counters.reports >= 2 * len(agents), 20, "heartbeats")
        assert {a.client.target for a in agents} == {f"127.0.0.1:{other.port}"}
        assert {n.name for n in s1.nodes()} == set(NODES)  # hellos stored, seen by both

        # heartbeats at the non-leader are last-seen touches the leader reads
        before = s1.node("n2")
        assert before is not None
        wait_for(lambda: (n := s1.node("n2")) is not None
                 and n.last_seen_ms > before.last_seen_ms, 10, "n2's last-seen to move")

        seq = agents[0].xid79()
        wait_for(lambda: slurm.state["n1"][0] == "IDLE+DRAIN", 10, "the leader to drain n1")
        wait_for(lambda: agents[0].outbox.acked_seq >= seq, 10, "the event acked")
        assert slurm.state["n1"][1].startswith("gpufleet:xid79")
        # the event stored once, by the process that holds the stream
        assert [e.xid for e in s1.events("n1")] == [79]
        assert s1.health_changes() == []  # the leader took the change off the queue
        assert leader.follower is not None and leader.follower.applied >= 1

        # a node that goes silent at the non-leader is marked unreachable by the leader
        agents[1].quiet.set()
        wait_for(lambda: (n := s1.node("n2")) is not None and not n.reachable, 15,
                 "n2 unreachable")
        time.sleep(0.3)  # anything else either process would do in Slurm
        assert slurm.calls == [("drain", "n1")]  # exactly one action, by the leader
        assert [(a.node, a.action, a.status) for a in s1.actions()] == [
            ("n1", "drain", "done")]
        assert s1.node("n3") is not None and s1.node("n3").reachable  # type: ignore[union-attr]
    finally:
        for a in agents:
            a.close()
        other.stop(0.2)
        leader.stop(0.2)
        s2.close()
        s1.close()


def test_new_leader_resumes_what_the_old_one_drained(dsn: str) -> None:
    """The process that takes over was built before the old leader drained n1: it must still
    know the drain is gpufleet's to undo once n1 is healthy again."""
    slurm = FakeSlurm(list(NODES))
    leader, s1 = _controller(dsn, slurm, resume_quiet_s=0.5)
    other, s2 = _controller(dsn, slurm, resume_quiet_s=0.5, standby_ingests=True)
    agent: Agent | None = None
    try:
        leader.start()
        wait_for(lambda: leader.active, 10, "the first controller to lead")
        other.start(elect_wait_s=0.5)
        agent = Agent("n1", f"127.0.0.1:{other.port}")
        wait_for(lambda: agent.client.connected.is_set()
                 and other.ingest.counters.reports >= 1, 20, "a heartbeat")
        agent.xid79()
        wait_for(lambda: slurm.state["n1"][0] == "IDLE+DRAIN", 10, "the leader to drain n1")
        wait_for(lambda: any(a.status == "done" for a in s2.actions("n1")), 10, "drain done")
        leader.stop(0.2)
        wait_for(lambda: other.active, 20, "the other process to take over")
        now = int(time.time() * 1000)
        agent.outbox.put_sample(pb.NodeSample(timestamp_ms=now, verdicts=[pb.Verdict(
            check="xid", severity=pb.SEVERITY_OK, gpu_index=1, since_ms=now)]))
        wait_for(lambda: slurm.state["n1"][0] == "IDLE", 15, "the new leader to resume n1")
        assert slurm.calls == [("drain", "n1"), ("resume", "n1")]
    finally:
        if agent is not None:
            agent.close()
        other.stop(0.2)
        leader.stop(0.2)
        s2.close()
        s1.close()


def _start_cli_controller(dsn: str, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """A real controller process: `--slurm none` records its actions as `shadow`."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "gpufleet.scheduler", "controller", "--db", dsn,
             "--listen", f"127.0.0.1:{port}", "--slurm", "none", "--insecure",
             "--metrics-listen", "", "--standby-ingests"],
            stdout=log, stderr=subprocess.STDOUT)


def _leader_pid(dsn: str) -> int | None:
    """The backend holding the leader lock, or None (no leader)."""
    from gpufleet.scheduler.service.leader import LEADER_LOCK_KEY

    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND ((classid::bigint << 32) | objid::bigint) = %s",
            (LEADER_LOCK_KEY & 0xFFFF_FFFF_FFFF_FFFF,)).fetchone()
    return int(row[0]) if row else None


@pytest.mark.slow  # a controller process (imports, PostgreSQL) and a takeover: ~10 s
def test_leader_killed_the_other_takes_over_and_still_drains(dsn: str, tmp_path: Path) -> None:
    port = free_port()
    proc = _start_cli_controller(dsn, port, tmp_path / "leader.log")
    slurm = FakeSlurm(list(NODES))
    other: Controller | None = None
    store: PostgresStore | None = None
    agents: list[Agent] = []
    try:
        wait_for(lambda: _leader_pid(dsn) is not None, 30, "the controller process to lead")
        other, store = _controller(dsn, slurm, standby_ingests=True)
        other.start(elect_wait_s=0.5)
        assert not other.active
        agents = [Agent(n, f"127.0.0.1:{other.port},127.0.0.1:{port}") for n in NODES]
        wait_for(lambda: all(a.client.connected.is_set() for a in agents)
                 and other.ingest.counters.reports >= len(agents), 20, "heartbeats")

        agents[0].xid79()  # at the non-leader: the process leader records its (shadow) drain
        wait_for(lambda: any(a.node == "n1" and a.action == "drain"
                             for a in store.actions()), 15, "the leader's drain of n1")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        wait_for(lambda: other.active, 20, "the ingesting standby to take over")

        agents[1].xid79()
        wait_for(lambda: slurm.state["n2"][0] == "IDLE+DRAIN", 10, "the new leader to drain n2")
        time.sleep(0.3)
        # the new leader acted on n2 only: n1's change was acted on by the old leader
        assert slurm.calls == [("drain", "n2")]
        drains = [(a.node, a.status) for a in store.actions() if a.action == "drain"]
        assert sorted(drains) == [("n1", "shadow"), ("n2", "done")]
        # the agents' streams were never cut: their controller only changed role
        assert [a.client.connects for a in agents] == [1, 1, 1]
        assert store.health_changes() == []
    finally:
        for a in agents:
            a.close()
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if other is not None:
            other.stop(0.2)
        if store is not None:
            store.close()


def test_standby_ingests_refuses_a_store_it_cannot_share(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from gpufleet.scheduler.cli.main import main

    r = CliRunner().invoke(main, ["controller", "--db", str(tmp_path / "s.db"), "--insecure",
                                  "--standby-ingests"])
    assert r.exit_code == 2
    assert "--standby-ingests needs a PostgreSQL store" in r.output
    assert "Traceback" not in r.output
