"""kill -9 the ACTIVE controller, again and again, while a STANDBY waits on the same PostgreSQL:
each time the standby takes over, the killed one comes back as the new standby, and at the end
the ledger, the health events, the drains and every node's sequence numbers are exactly what a
run without kills gives. Each takeover is timed.

Real processes throughout: two `gpufleet controller` on one throw-away PostgreSQL (leader by
advisory lock, `--slurm none`: Slurm actions are recorded as `shadow`), three `gpufleet-agent
run` with the accounting workload of test_kill.py (real prolog/epilog hooks under a frozen
clock, utilisation and energy the test sets, Xid 48 on n3 and Xid 13 on n2), two more agents
that only add load, every agent sampling at LOAD_INTERVAL_S and given both controllers
(comma-separated; half of them list the standby first). One in-process probe node, the
agent's own StreamClient and Outbox with the agent's default backoff, times each takeover:
from just before the kill -9 to the standby's first ack of a report queued after the kill,
and to `grpc.health.v1` SERVING on the standby.

The workload and what "exact" means for each total are test_kill.py's (its module docstring);
here only the controller dies, never an agent, so every total is exact in both runs. The
controller kills fall outside the phase A end (the agents are SIGSTOPped there, which would
be counted as takeover time).
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from gpufleet.agent.client import StreamClient
from gpufleet.agent.outbox import Outbox
from gpufleet.agent.spool import SpoolDir
from gpufleet.rpc.v1 import fleet_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.faults.fleet_helpers import (
    AgentProc,
    ControllerProc,
    GpuUse,
    acct_json,
    faketime_lib,
    stopped_all,
    wait_for,
)
from tests.faults.workload import (
    GPUS,
    XIDS,
    Plan,
    WorkloadFleet,
    assert_totals_exact,
    begin,
    expected,
    make_plan,
    run_actions,
    start_agents,
    workload_actions,
)
from tests.scheduler.pg_server import PgServer, started_pg_server
from tests.security.helpers import hello
from tests.support.ci import unavailable

pytestmark = pytest.mark.slow  # two ~35 s runs: over the 60 s line

KILL_SEED = 20_240_612
WORK_NODES = ("n1", "n2", "n3")  # test_kill's workload runs here
LOAD_NODES = ("l1", "l2")  # samples only: load for the controller
LOAD_INTERVAL_S = 0.01  # 100 reports/s per agent: ~500/s with the probe, on 2 cores
PROBE_INTERVAL_S = 0.02
# when the active controller is killed (seconds after T0, one kill per window): just after
# n3's Xid 48 reaches it (the drain it queued must be neither lost nor repeated by the new
# active); in phase B, after the phase A end (5.3-8 s: agents SIGSTOPped, then hooks);
# around n2's Xid 13; across the phase B epilogs (15, 16 s), while the jobs' final usage is
# on its way. A kill waits until the restarted controller is standby again.
RESTART_AFTER_S = (0.3, 1.5)  # the killed controller is started again (as standby) after this
TAKEOVER_LIMIT_S = 10.0
KILLS = 4


def kill_points(plan: Plan) -> list[tuple[float, float]]:
    """(at, restart after) per kill, seeded."""
    rng = random.Random(KILL_SEED)
    xid_n3 = plan.xid_at_s["n3"]
    windows = ((xid_n3 + 0.02, xid_n3 + 0.3), (8.2, 9.0), (11.0, 13.5), (15.05, 16.5))
    return [(rng.uniform(lo, hi), rng.uniform(*RESTART_AFTER_S)) for lo, hi in windows]


# ---------------------------------------------------------------- PostgreSQL readers


def pg_rows(dsn: str, query: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        return list(conn.execute(query, args).fetchall())


def pg_ledger(dsn: str) -> dict[tuple[str, str, int], GpuUse]:
    """(job, node, gpu) -> totals, read from the PostgreSQL store's ledger table."""
    return {(str(r[0]), str(r[1]), int(r[2])): GpuUse(int(r[3]), int(r[4]), int(r[5]),
                                                      r[6] is not None)
            for r in pg_rows(dsn, "SELECT job_id, node, gpu_index, allocated_ms, busy_ms, "
                                  "energy_mj, end_ms FROM acct_ledger")}


def health(stub: health_pb2_grpc.HealthStub) -> str | None:
    """SERVING / NOT_SERVING as the controller says; None when it does not answer."""
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
    except grpc.RpcError:
        return None
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


# ---------------------------------------------------------------- the probe node


class Probe:
    """A node in this process: the agent's StreamClient and Outbox (its default backoff),
    a sample every PROBE_INTERVAL_S; times when reports queued after a kill are acked."""

    def __init__(self, targets: str) -> None:
        self.outbox = Outbox(uuid.uuid4().hex)
        self.client = StreamClient(targets, self.outbox, lambda: hello("probe", gpus=0).hello)
        self.stop_sampling = threading.Event()
        self.stop_stream = threading.Event()
        self.last_put = 0
        self._threads = [threading.Thread(target=self.client.run, args=(self.stop_stream,),
                                          daemon=True),
                         threading.Thread(target=self._produce, daemon=True)]

    def put(self) -> int:
        self.last_put = self.outbox.put_sample(
            pb.NodeSample(timestamp_ms=int(time.time() * 1000)))
        return self.last_put

    def _produce(self) -> None:
        while not self.stop_sampling.wait(PROBE_INTERVAL_S):
            self.put()

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def finish(self) -> int:
        """Stop sampling, wait until every report is acked, close the stream; the last seq."""
        self.stop_sampling.set()
        self._threads[1].join(5)
        wait_for(lambda: self.outbox.acked_seq >= self.last_put, 20, "the probe's last ack")
        self.stop_stream.set()
        self._threads[0].join(10)
        return self.last_put


# ---------------------------------------------------------------- one run


@dataclass
class Takeover:
    killed: str  # the controller killed ("a" / "b") and its pid
    pid: int
    at_s: float  # after T0
    ack_s: float | None = None  # kill -9 -> the probe's first report acked by the other one
    serving_s: float | None = None  # kill -9 -> grpc health SERVING on the other one
    standby: str = ""
    standby_address: str = ""
    kill_wall_s: float = 0.0  # time.time() at the kill, to read the controllers' logs
    agents_hello_s: float | None = None  # kill -9 -> the last agent's hello on the other one
    acked_by: str = ""  # the address the probe's stream was on when the ack came


@dataclass
class NodeSeq:
    instance: str  # the agent's (one per agent: agents are never restarted here)
    acked: int  # the agent's highest acked seq (acked.json, written at its stop)
    spooled: list[int]  # seqs still in its spool after it stopped: sent later, never lost
    controller_instance: str
    controller_last_seq: int


@dataclass
class RunResult:
    ledger: dict[tuple[str, str, int], GpuUse]
    acct_jobs: dict[str, dict[str, Any]]
    xid_events: list[tuple[str, int, int]]  # (node, gpu, xid) per stored row
    all_events: list[tuple[str, str, int | None, int | None]]  # (node, kind, gpu, xid)
    actions: list[tuple[str, str, str]]  # (node, action, status)
    seqs: dict[str, NodeSeq]
    probe_seq: tuple[int, int]  # (last put and acked, controller's last_seq)
    takeovers: list[Takeover]
    reports_per_s: float
    lock_holders: int
    log: list[str]
    seconds: float


class StandbyFleet(WorkloadFleet):
    def __init__(self, base: Path, dsn: str) -> None:
        self.base = base
        self.dsn = dsn
        self.controllers: dict[str, ControllerProc] = {}
        for name in ("a", "b"):
            (base / f"ctl-{name}").mkdir(parents=True)
            self.controllers[name] = ControllerProc(dsn, base / f"ctl-{name}",
                                                    extra_args=("--slurm", "none"))
        a, b = (c.address for c in self.controllers.values())
        super().__init__({
            # half list the standby first: failover has to go past a refusing controller
            n: AgentProc(n, base, f"{a},{b}" if i % 2 == 0 else f"{b},{a}", gpus=GPUS,
                         interval_s=LOAD_INTERVAL_S,
                         # every sample a report: the ~500 reports/s the kills happen
                         # under (tests/faults/test_kill.py runs the heartbeat wire)
                         heartbeat_interval_s=0)
            for i, n in enumerate(WORK_NODES + LOAD_NODES)})
        self.probe = Probe(f"{b},{a}")
        self.channels = {n: grpc.insecure_channel(c.address)
                         for n, c in self.controllers.items()}
        self.health = {n: health_pb2_grpc.HealthStub(ch) for n, ch in self.channels.items()}
        self.takeovers: list[Takeover] = []
        self._threads: list[threading.Thread] = []

    def roles(self, timeout_s: float) -> tuple[str, str]:
        """(active, standby) once one says SERVING and the other NOT_SERVING."""
        found: list[tuple[str, str]] = []

        def settled() -> bool:
            states = {n: health(s) for n, s in self.health.items()}
            active = [n for n, st in states.items() if st == "SERVING"]
            standby = [n for n, st in states.items() if st == "NOT_SERVING"]
            if len(active) == 1 and len(standby) == 1:
                found.append((active[0], standby[0]))
                return True
            return False

        wait_for(settled, timeout_s, "one active and one standby controller", step_s=0.05)
        return found[-1]

    def kill_active(self, down_s: float) -> Callable[[], None]:
        def act() -> None:
            active, standby = self.roles(20)
            ctl = self.controllers[active]
            pid = ctl.proc.pid if ctl.proc else -1
            t_kill = time.monotonic()
            ctl.kill9()
            marker = self.probe.put()  # queued after the kill: only the new active can ack it
            take = Takeover(active, pid, time.time() - self.t0, standby=standby,
                            standby_address=self.controllers[standby].address,
                            kill_wall_s=time.time())
            self.takeovers.append(take)
            self.note(f"controller {active} (active, pid {pid}) kill -9; {standby} is standby; "
                      f"{active} restarts in {down_s:.2f} s")
            t = threading.Thread(target=self._time_takeover,
                                 args=(take, t_kill, marker, standby), daemon=True)
            t.start()
            self._threads.append(t)

            def restart() -> None:
                ctl.start(wait=False)
                self.note(f"controller {active} restarted (pid "
                          f"{ctl.proc.pid if ctl.proc else -1})")
            timer = threading.Timer(down_s, restart)
            timer.start()
            self._threads.append(timer)
        return act

    def _time_takeover(self, take: Takeover, t_kill: float, marker: int, standby: str) -> None:
        deadline = t_kill + TAKEOVER_LIMIT_S * 3
        while time.monotonic() < deadline and (take.ack_s is None or take.serving_s is None):
            if take.ack_s is None and self.probe.outbox.acked_seq >= marker:
                take.ack_s = time.monotonic() - t_kill
                take.acked_by = self.probe.client.target
            if take.serving_s is None and health(self.health[standby]) == "SERVING":
                take.serving_s = time.monotonic() - t_kill
            time.sleep(0.002)
        self.note(f"takeover by {standby}: first ack {_ms(take.ack_s)}, SERVING "
                  f"{_ms(take.serving_s)} after the kill")

    def join(self) -> None:
        for t in self._threads:
            t.join(TAKEOVER_LIMIT_S * 3 + 5)

    def close(self) -> None:
        for ch in self.channels.values():
            ch.close()

    def agents_hello(self) -> None:
        """From the new active's log: when every agent process said hello to it."""
        for take in self.takeovers:
            first: dict[str, float] = {}
            for line in self.controllers[take.standby].logs().splitlines():
                m = _CONNECTED.match(line)
                if m is None or m["node"] not in self.agents:
                    continue
                at = datetime.strptime(m["ts"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                # the log's clock is ms: a hello in the kill's own ms is after it
                if at >= take.kill_wall_s - 0.001:
                    first.setdefault(m["node"], at)
            if len(first) == len(self.agents):
                take.agents_hello_s = max(first.values()) - take.kill_wall_s


# ingest's line for a hello, in the controller's log format (cli/settings.py: the logger
# is the module's name)
_CONNECTED = re.compile(r"^(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO "
                        r"gpufleet\.scheduler\.service\.ingest: node (?P<node>\S+) connected ")


def _ms(s: float | None) -> str:
    return "never" if s is None else f"{s * 1000:.0f} ms"


def _agent_seq(agent: AgentProc) -> tuple[str, int, list[int]]:
    """A stopped agent's (instance, highest acked seq, seqs still spooled)."""
    acked = json.loads((agent.state_dir / "spool" / "acked.json").read_text())
    assert len(acked) == 1, f"{agent.node}: one agent instance expected, got {acked}"
    [(instance, seq)] = acked.items()
    loaded = SpoolDir(agent.state_dir / "spool", 1024 * 1024, 5.0).load()
    spooled = sorted(r.msg.seq for r in loaded.records
                     if r.msg.agent_instance == instance and r.msg.seq > int(seq))
    return str(instance), int(seq), spooled


def run_workload(base: Path, dsn: str, plan: Plan,
                 kills: list[tuple[float, float]]) -> RunResult:
    fleet = StandbyFleet(base, dsn)
    t_begin = time.monotonic()

    def inject(node: str, gpu: int, xid: int) -> Callable[[], None]:
        def act() -> None:
            fleet.agents[node].inject_xid(gpu, xid)
            fleet.note(f"Xid {xid} injected on {node} GPU {gpu}")
        return act

    # as in test_kill.py, but only the work nodes' agents are SIGSTOPped across the end second
    actions = workload_actions(fleet, plan, WORK_NODES)
    for node, gpu, xid in XIDS:
        actions.append((plan.xid_at_s[node], f"xid {node}", inject(node, gpu, xid)))
    for at, down in kills:
        actions.append((at, "kill the active controller", fleet.kill_active(down)))

    ctl_a, ctl_b = fleet.controllers["a"], fleet.controllers["b"]
    agents = list(fleet.agents.values())
    with stopped_all([*agents, ctl_a, ctl_b]):
        ctl_a.start()
        wait_for(lambda: health(fleet.health["a"]) == "SERVING", 30, "controller a active")
        ctl_b.start()
        assert fleet.roles(30) == ("a", "b")
        start_agents(fleet)
        fleet.probe.start()
        wait_for(lambda: len(pg_rows(dsn, "SELECT name FROM nodes")) == len(agents) + 1, 30,
                 "all agents and the probe connected")
        begin(fleet)
        seq_t0 = sum(int(r[0]) for r in pg_rows(dsn, "SELECT last_seq FROM nodes"))
        rate_t0 = time.monotonic()
        run_actions(fleet, actions)
        want = expected()
        try:
            wait_for(lambda: all(k in (got := pg_ledger(dsn)) and got[k].ended for k in want),
                     45, "every job's final usage in the ledger")
            wait_for(lambda: len(pg_rows(dsn, "SELECT id FROM events WHERE kind = "
                                         "'EVENT_KIND_XID'")) >= len(XIDS), 20, "the Xid events")
            fleet.join()
            fleet.roles(20)  # the last killed one is back, as standby
        except AssertionError as e:
            raise AssertionError(f"{e}\n" + "\n".join(fleet.log)) from e
        time.sleep(1.0)  # a late duplicate would land now
        # sequence numbers: the probe drains completely; the agents stop (SIGTERM), so their
        # streams end and the active controller writes each node's last sequence number
        probe_last = fleet.probe.finish()
        for a in agents:
            a.stop()
        rate_s = time.monotonic() - rate_t0
        nodes = {str(r[0]): (str(r[1]), int(r[2])) for r in pg_rows(
            dsn, "SELECT name, agent_instance, last_seq FROM nodes")}
        seqs = {}
        for a in agents:
            instance, acked, spooled = _agent_seq(a)
            seqs[a.node] = NodeSeq(instance, acked, spooled, *nodes[a.node])
        fleet.agents_hello()
        with psycopg.connect(dsn, autocommit=True) as conn:
            holders = conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND pid IN (SELECT pid FROM pg_stat_activity WHERE application_name = "
                "'gpufleet-controller-leader')").fetchone()
        result = RunResult(
            ledger=pg_ledger(dsn),
            acct_jobs={r["job"]: r for r in acct_json(dsn, "--group-by", "job")["rows"]},
            xid_events=[(str(r[0]), int(r[1]), int(r[2])) for r in pg_rows(
                dsn, "SELECT node, gpu_index, xid FROM events WHERE kind = 'EVENT_KIND_XID' "
                "ORDER BY id")],
            all_events=sorted((str(r[0]), str(r[1]), r[2], r[3]) for r in pg_rows(
                dsn, "SELECT node, kind, gpu_index, xid FROM events")),
            actions=[(str(r[0]), str(r[1]), str(r[2])) for r in pg_rows(
                dsn, "SELECT node, action, status FROM actions ORDER BY id")],
            seqs=seqs,
            probe_seq=(probe_last, nodes["probe"][1]),
            takeovers=fleet.takeovers,
            reports_per_s=(sum(v[1] for v in nodes.values()) - seq_t0) / rate_s,
            lock_holders=int(holders[0]) if holders else 0,
            log=fleet.log, seconds=time.monotonic() - t_begin,
        )
    fleet.close()
    for a in agents:
        logs = a.logs()
        assert "Traceback" not in logs, logs[-3000:]
        assert not (a.state_dir / "rejected.jsonl").exists(), f"{a.node}: reports rejected"
    for name, c in fleet.controllers.items():
        assert "Traceback" not in c.logs(), (name, c.logs()[-3000:])
    return result


def _print(title: str, r: RunResult) -> None:
    print(f"\n== {title} ({r.seconds:.1f} s, {r.reports_per_s:.0f} reports/s ingested)")
    for line in r.log:
        print("  " + line)
    for t in r.takeovers:
        print(f"  kill of {t.killed} at +{t.at_s:.2f} s: probe's first ack by {t.standby} "
              f"{_ms(t.ack_s)}, {t.standby} SERVING {_ms(t.serving_s)}, all "
              f"{len(WORK_NODES) + len(LOAD_NODES)} agents' hello on {t.standby} "
              f"{_ms(t.agents_hello_s)}")
    for (job, node, g), u in sorted(r.ledger.items()):
        print(f"  {job:>5} {node:>4} {g:>3} {u.allocated_ms:>12} {u.busy_ms:>8} "
              f"{u.energy_mj:>10}")
    print(f"  xid events {r.xid_events}; actions {r.actions}")
    for node, s in sorted(r.seqs.items()):
        print(f"  {node}: agent acked {s.acked} (+{len(s.spooled)} spooled at stop), "
              f"controller last_seq {s.controller_last_seq}")
    print(f"  probe: last seq {r.probe_seq[0]}, controller last_seq {r.probe_seq[1]}")


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    with started_pg_server("gf-standby-kill-pg-") as server:
        yield server


@pytest.fixture(scope="module")
def runs(pg: PgServer, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[RunResult, RunResult]]:
    """The workload on two controllers once without kills and once killing the active one
    KILLS times."""
    if faketime_lib() is None:
        unavailable("libfaketime (Debian faketime) is missing")
    base = tmp_path_factory.mktemp("standby-kill")
    plan = make_plan(with_kills=False)  # energy steps and Xid times only; no agent kills
    dsns = [pg.create_database(), pg.create_database()]
    try:
        plain = run_workload(base / "plain", dsns[0], plan, [])
        _print("two controllers, no kills", plain)
        kills = kill_points(plan)
        print(f"\nkill points (seed {KILL_SEED}): {[(round(a, 2), round(d, 2)) for a, d in kills]}"
              " (at s, restart after s)")
        killed = run_workload(base / "kills", dsns[1], plan, kills)
        _print("active controller kill -9, standby takes over", killed)
        yield plain, killed
    finally:
        for dsn in dsns:
            with contextlib.suppress(psycopg.Error):
                pg.drop_database(dsn)


def test_standby_takeovers_keep_totals_events_and_sequences_exact(
        runs: tuple[RunResult, RunResult], report_figure: Callable[[str], None]) -> None:
    plain, killed = runs
    want = expected()
    for name, r in (("without kills", plain), ("with kills", killed)):
        assert_totals_exact(name, r.ledger, r.acct_jobs, want)
        # every injected Xid stored exactly once
        assert sorted(r.xid_events) == sorted(XIDS), (name, r.xid_events)
        # only the Xid 48 node drained, once, recorded (--slurm none); nothing resumed
        assert r.actions == [("n3", "drain", "shadow")], (name, r.actions)
        # one leader at the end, as at the start
        assert r.lock_holders == 1, name
        # sequence numbers: the controller holds each node's instance and has stored exactly
        # up to what the agent had acked; what is left in the spool is the contiguous rest,
        # which the agent would send next (nothing acked was skipped, nothing dropped)
        for node, s in r.seqs.items():
            assert s.controller_instance == s.instance, (name, node, s)
            assert s.acked > 0, (name, node, s)
            assert s.spooled == list(range(s.acked + 1, s.acked + 1 + len(s.spooled))), \
                (name, node, s.acked, s.spooled[:10])
            # the controller may have stored the report whose ack was in flight at the stop
            assert s.acked <= s.controller_last_seq <= s.acked + len(s.spooled), (name, node, s)
        probe_last, probe_ctl = r.probe_seq
        assert probe_ctl == probe_last, (name, r.probe_seq)
    assert killed.ledger == plain.ledger
    assert killed.all_events == plain.all_events
    # every kill hit the active one and the standby took over within the limit
    assert len(killed.takeovers) == KILLS
    assert len({t.pid for t in killed.takeovers}) == KILLS
    assert [t.killed for t in killed.takeovers] == ["a", "b"] * (KILLS // 2)
    for t in killed.takeovers:
        assert t.ack_s is not None and t.ack_s < TAKEOVER_LIMIT_S, t
        assert t.serving_s is not None and t.serving_s < TAKEOVER_LIMIT_S, t
        assert t.acked_by == t.standby_address, t  # the ack came from the new active
        assert t.agents_hello_s is not None and t.agents_hello_s < TAKEOVER_LIMIT_S, t
    acks = [t.ack_s for t in killed.takeovers if t.ack_s is not None]
    hellos = [t.agents_hello_s for t in killed.takeovers if t.agents_hello_s is not None]
    serving = [t.serving_s for t in killed.takeovers if t.serving_s is not None]
    report_figure(
        f"standby takeover under load ({killed.reports_per_s:.0f} reports/s from "
        f"{len(WORK_NODES) + len(LOAD_NODES)} agents + probe), {len(acks)} kill -9 of the "
        f"active: to first report acked by the new active min/median/max "
        f"{min(acks) * 1000:.0f}/{statistics.median(acks) * 1000:.0f}/{max(acks) * 1000:.0f} "
        f"ms; to grpc health SERVING {min(serving) * 1000:.0f}/"
        f"{statistics.median(serving) * 1000:.0f}/{max(serving) * 1000:.0f} ms; to the "
        f"last agent's hello on the new active {min(hellos) * 1000:.0f}/"
        f"{statistics.median(hellos) * 1000:.0f}/{max(hellos) * 1000:.0f} ms; totals, "
        "events, drains and sequence numbers exact")
    assert killed.reports_per_s >= 300, killed.reports_per_s
