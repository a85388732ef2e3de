"""kill -9 the controller and the agents at seeded random points while jobs run: the ledger's
totals per job x GPU, the health events and the drains come out exactly as in a run without
kills, and exactly as the workload says they must.

Real processes throughout: one `gpufleet controller` (SQLite store, `--slurm none`: its
Slurm actions are recorded, not run, so "drained once" is read from the actions table), three
`gpufleet-agent run` on simulated L40S nodes (4 GPUs each), the real prolog/epilog hooks.

What "exact" can mean, and how the workload is built so it holds (agent/accounting.py):

* allocated_ms is end - start from the hook files: exact under any kill. The hooks run
  with a frozen clock (libfaketime) at whole seconds, so it is also the same in both runs.
* energy_mj is the difference of NVML's energy counter, which keeps counting while the agent
  is dead; the agent keeps its last reading on disk. The test advances the counter only
  while a job holds the GPU (after the agent has saved the job's start, before its end hook
  is written), so each job's energy is the sum of what the test added: exact under any kill.
* busy_ms integrates utilisation over the agent's own samples, so busy time while an agent
  is dead is NOT observed (documented in accounting.py), and a kill loses what was
  integrated since the last save (<= 10 s). So the workload has two phases per node:
  phase A runs jobs at 25-100 % utilisation with every agent alive (the controller is still
  killed whenever the seed says); phase B runs jobs that hold their GPUs at 0 %, and the
  agents are killed at random points only there. Busy is then exact in both phases. To make
  phase A's busy exact to the millisecond, its jobs' start times lie in the future when the
  prolog runs (the agent clips integration at the start), and at the end the agents are
  SIGSTOPped across the end second while the epilogs are written, so the last sample before
  the end hook is before the end and the next one after it (the agent clips at the end).
  Wherever in a sample an agent is stopped, and however late the hooks let it resume: it
  reads the sample's clock before it scans the job spool (tests/accounting/test_hook_timing.py).
"""

from __future__ import annotations

import functools
import math
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.faults.fleet_helpers import (
    AgentProc,
    ControllerProc,
    GpuUse,
    acct_json,
    faketime_lib,
    finish_hooks,
    ledger,
    run_hook,
    sql,
    stopped_all,
    wait_for,
)

pytestmark = pytest.mark.slow  # kill -9 under load in real time: ~1 min (fast set: -m 'not slow')

SEED = 20_240_611
NODES = ("n1", "n2", "n3")
GPUS = 4


@dataclass(frozen=True)
class Job:
    job_id: str
    node: str
    gpus: tuple[int, ...]
    util_pct: int  # multiples of 25: util/100 x whole ms is exact in binary floating point
    start_s: int  # seconds after the run's T0
    end_s: int
    account: str


PHASE_A = (  # every agent alive; utilisation > 0
    Job("1001", "n1", (0, 1), 50, 0, 6, "phys"),
    Job("1002", "n1", (2,), 100, 0, 6, "phys"),
    Job("1003", "n1", (3,), 25, 0, 6, "chem"),
    Job("2001", "n2", (0, 1, 2, 3), 75, 0, 6, "chem"),
    Job("3001", "n3", (0, 1), 100, 0, 6, "bio"),
    Job("3002", "n3", (2, 3), 0, 0, 6, "bio"),
)
PHASE_B = (  # GPUs held at 0 %: the agents are killed in here
    Job("1004", "n1", (0, 1, 2, 3), 0, 8, 16, "phys"),
    Job("2002", "n2", (0, 1), 0, 8, 16, "chem"),
    Job("2003", "n2", (2, 3), 0, 9, 15, "chem"),
    Job("3003", "n3", (0, 1, 2, 3), 0, 8, 16, "bio"),
)
A_END_S = 6
B_FROM_S, B_UNTIL_S = 8, 15  # agent kills happen inside this window
XIDS = (("n3", 1, 48), ("n2", 2, 13))  # Xid 48 (DBE, fatal: drain n3) and 13 (app error)


@dataclass
class Plan:
    """Everything seeded: energy steps, fault times, and (with kills) the kill points."""

    energy: list[tuple[float, Job, dict[int, int]]]
    xid_at_s: dict[str, float]
    controller_kills: list[tuple[float, float]] = field(default_factory=list)  # (at, down)
    agent_kills: list[tuple[float, str, float]] = field(default_factory=list)


def make_plan(with_kills: bool) -> Plan:
    rng = random.Random(SEED)
    energy: list[tuple[float, Job, dict[int, int]]] = []
    for step, at in enumerate((2.0, 4.0)):
        for job in PHASE_A:
            energy.append((at, job, {g: 1_000_000 * (job.util_pct + 1) + 1_000 * g + 17 * step
                                     for g in job.gpus}))
    for job in PHASE_B:
        for k, at in enumerate(sorted(rng.uniform(job.start_s + 0.5, job.end_s - 0.5)
                                      for _ in range(3))):
            energy.append((at, job, {g: 2_000_000 + 12_345 * k + 101 * g for g in job.gpus}))
    plan = Plan(sorted(energy, key=lambda e: e[0]),
                {"n3": rng.uniform(1.0, 4.5), "n2": rng.uniform(9.0, 14.0)})
    # drawn either way, so both runs get the same energy and fault times
    ctl_kills = [(rng.uniform(1.0, 6.5), rng.uniform(0.5, 2.5)),
                 (rng.uniform(9.5, 14.0), rng.uniform(0.5, 2.5))]
    agent_kills: list[tuple[float, str, float]] = []
    for node in (*NODES, rng.choice(NODES)):
        busy_until = max((at + down + 1.5 for at, n, down in agent_kills if n == node),
                         default=B_FROM_S + 0.3)
        at = rng.uniform(busy_until, B_UNTIL_S - 0.5)
        agent_kills.append((at, node, rng.uniform(0.3, 2.0)))
    if with_kills:
        plan.controller_kills = ctl_kills
        plan.agent_kills = sorted(agent_kills)
    return plan


def expected() -> dict[tuple[str, str, int], GpuUse]:
    """What the ledger must hold, from the workload alone."""
    out = {}
    energy: dict[tuple[str, int], int] = {}
    for _at, job, add in make_plan(False).energy:
        for g, e in add.items():
            energy[(job.job_id, g)] = energy.get((job.job_id, g), 0) + e
    for job in PHASE_A + PHASE_B:
        alloc_ms = (job.end_s - job.start_s) * 1000
        for g in job.gpus:
            out[(job.job_id, job.node, g)] = GpuUse(alloc_ms, alloc_ms * job.util_pct // 100,
                                                    energy[(job.job_id, g)], True)
    return out


@dataclass
class RunResult:
    ledger: dict[tuple[str, str, int], GpuUse]
    acct_jobs: dict[str, dict[str, Any]]
    events: list[tuple[str, int, int]]  # (node, gpu, xid) per stored row
    actions: list[tuple[str, str, str]]  # (node, action, status)
    log: list[str]
    seconds: float


class Fleet:
    def __init__(self, base: Path) -> None:
        base.mkdir(parents=True)
        self.base = base
        self.db = str(base / "state.db")
        self.controller = ControllerProc(self.db, base, extra_args=("--slurm", "none"))
        self.agents = {n: AgentProc(n, base, self.controller.address, gpus=GPUS)
                       for n in NODES}
        self.t0 = 0.0
        self.log: list[str] = []
        self._lock = threading.Lock()

    def note(self, text: str) -> None:
        with self._lock:
            self.log.append(f"t={time.time() - self.t0:+7.3f}s {text}")

    def at(self, rel_s: float) -> None:
        delay = self.t0 + rel_s - time.time()
        if delay > 0:
            time.sleep(delay)

    def applied(self, job: Job) -> bool:
        return job.job_id in self.agents[job.node].jobs()

    def ended(self, job: Job) -> bool:
        j = self.agents[job.node].jobs().get(job.job_id)
        return j is None or j["end_ms"] is not None  # gone: ended, reported and acked


def _hooks(fleet: Fleet, kind: str, jobs: tuple[Job, ...]) -> None:
    procs = [run_hook("prolog" if kind == "start" else "epilog",
                      fleet.agents[j.node].state_dir, j.job_id, j.gpus,
                      int(fleet.t0) + (j.start_s if kind == "start" else j.end_s),
                      user=f"u{j.account}", account=j.account) for j in jobs]
    finish_hooks(procs)


def run_workload(base: Path, plan: Plan) -> RunResult:
    fleet = Fleet(base)
    t_begin = time.monotonic()
    actions: list[tuple[float, str, Callable[[], None]]] = []

    def kill_controller(down_s: float) -> Callable[[], None]:
        def act() -> None:
            pid = fleet.controller.proc.pid if fleet.controller.proc else -1
            fleet.controller.kill9()
            fleet.note(f"controller kill -9 (pid {pid}); restart in {down_s:.2f} s")
            threading.Timer(down_s, restart_controller).start()
        return act

    def restart_controller() -> None:
        fleet.controller.start(wait=False)
        fleet.note(f"controller restarted (pid {fleet.controller.proc.pid})"  # type: ignore[union-attr]
                   )

    def kill_agent(node: str, down_s: float) -> Callable[[], None]:
        def act() -> None:
            agent = fleet.agents[node]
            pid = agent.proc.pid if agent.proc else -1
            agent.kill9()
            fleet.note(f"agent {node} kill -9 (pid {pid}); restart in {down_s:.2f} s")

            def restart() -> None:
                agent.start()
                fleet.note(f"agent {node} restarted (pid {agent.proc.pid})"  # type: ignore[union-attr]
                           )
            threading.Timer(down_s, restart).start()
        return act

    def add_energy(job: Job, add: dict[int, int]) -> Callable[[], None]:
        def act() -> None:
            # the GPU draws for the job only once the agent knows (and saved) the job
            wait_for(lambda: fleet.applied(job), 20, f"agent {job.node} to save job {job.job_id}")
            fleet.agents[job.node].load.add_energy(add)
        return act

    def inject(node: str, gpu: int, xid: int) -> Callable[[], None]:
        def act() -> None:
            agent = fleet.agents[node]
            wait_for(lambda: agent.alive, 20, f"agent {node} running")
            agent.inject_xid(gpu, xid)
            fleet.note(f"Xid {xid} injected on {node} GPU {gpu}")
        return act

    def end_phase_a() -> None:
        # SIGSTOP before the end second, epilogs stamped with it, SIGCONT after it: the
        # agents' last sample before each end hook is before the end, the next one after
        end_at = fleet.t0 + A_END_S
        late_s = time.time() - (end_at - 0.1)
        assert late_s < 0, f"schedule fell behind by {late_s:.3f} s before the phase A end"
        for a in fleet.agents.values():
            a.pause()
        try:
            _hooks(fleet, "end", PHASE_A)
            fleet.at(A_END_S + 0.05)
        finally:
            for a in fleet.agents.values():
                a.resume()
        fleet.note("phase A ended (epilogs written while the agents were stopped)")
        for job in PHASE_A:
            wait_for(functools.partial(fleet.ended, job), 20,
                     f"agent {job.node} to end {job.job_id}")
        for a in fleet.agents.values():  # only now: the GPUs are free, nothing integrates
            a.load.set_util(dict.fromkeys(range(GPUS), 0))
        _hooks(fleet, "start", PHASE_B)
        fleet.note("phase B prologs written")

    for at, job, add in plan.energy:
        actions.append((at, f"energy {job.job_id}", add_energy(job, add)))
    for node, gpu, xid in XIDS:
        actions.append((plan.xid_at_s[node], f"xid {node}", inject(node, gpu, xid)))
    for at, down in plan.controller_kills:
        actions.append((at, "kill controller", kill_controller(down)))
    for at, node, down in plan.agent_kills:
        actions.append((at, f"kill {node}", kill_agent(node, down)))
    actions.append((A_END_S - 0.7, "end phase A", end_phase_a))
    end_b = sorted({j.end_s for j in PHASE_B})
    for end_s in end_b:
        jobs = tuple(j for j in PHASE_B if j.end_s == end_s)
        actions.append((end_s + 0.01, f"epilog {end_s}",
                        functools.partial(_hooks, fleet, "end", jobs)))
    actions.sort(key=lambda a: a[0])

    with stopped_all([*fleet.agents.values(), fleet.controller]):
        fleet.controller.start()
        for job in PHASE_A:
            for g in job.gpus:
                fleet.agents[job.node].load.util_pct[g] = job.util_pct
        for a in fleet.agents.values():
            a.load.write()
            a.start()
        wait_for(lambda: len(sql(fleet.db, "SELECT name FROM nodes")) == len(NODES), 30,
                 "all agents connected")
        fleet.t0 = float(math.ceil(time.time()) + 3)
        _hooks(fleet, "start", PHASE_A)  # start times ~2 s in the future when written
        assert time.time() < fleet.t0 - 0.3, "phase A prologs took too long"
        for at, label, act in actions:
            fleet.at(at)
            try:
                act()
            except AssertionError as e:
                raise AssertionError(f"{label} at +{at:.2f} s: {e}\n" + "\n".join(fleet.log)
                                     ) from e
        # everything stored: every job's final row, and the injected events
        want = expected()
        wait_for(lambda: fleet.controller.proc is not None and fleet.controller.proc.poll()
                 is None, 10, "controller running")
        try:
            wait_for(lambda: all(k in (got := ledger(fleet.db)) and got[k].ended for k in want),
                     45, "every job's final usage in the ledger")
            wait_for(lambda: len(sql(fleet.db, "SELECT id FROM events WHERE kind = "
                                     "'EVENT_KIND_XID'")) >= len(XIDS), 20, "the Xid events")
        except AssertionError as e:
            raise AssertionError(f"{e}\n" + "\n".join(fleet.log)) from e
        time.sleep(1.0)  # a late duplicate would land now
        result = RunResult(
            ledger=ledger(fleet.db),
            acct_jobs={r["job"]: r for r in acct_json(fleet.db, "--group-by", "job")["rows"]},
            events=[(str(r[0]), int(r[1]), int(r[2])) for r in sql(
                fleet.db, "SELECT node, gpu_index, xid FROM events WHERE kind = "
                "'EVENT_KIND_XID' ORDER BY id")],
            actions=[(str(r[0]), str(r[1]), str(r[2])) for r in sql(
                fleet.db, "SELECT node, action, status FROM actions ORDER BY id")],
            log=fleet.log, seconds=time.monotonic() - t_begin,
        )
    for a in fleet.agents.values():
        assert "Traceback" not in a.logs(), a.logs()[-3000:]
    return result


def _print(title: str, r: RunResult) -> None:
    print(f"\n== {title} ({r.seconds:.1f} s)")
    for line in r.log:
        print("  " + line)
    print(f"  {'job':>5} {'node':>4} {'gpu':>3} {'allocated_ms':>12} {'busy_ms':>8} "
          f"{'energy_mj':>10}")
    for (job, node, g), u in sorted(r.ledger.items()):
        print(f"  {job:>5} {node:>4} {g:>3} {u.allocated_ms:>12} {u.busy_ms:>8} "
              f"{u.energy_mj:>10}")
    print("  acct --json per job: " + ", ".join(
        f"{j}: {d['alloc_gpu_s']} s/{d['busy_gpu_s']} s/{d['energy_j']} J"
        for j, d in sorted(r.acct_jobs.items())))
    print(f"  events {r.events}; actions {r.actions}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunResult, RunResult, Plan]:
    """The workload once without kills and once with them (about 25 s each)."""
    if faketime_lib() is None:
        if os.environ.get("CI") == "true":  # .ci/setup installs it: missing is a failure
            pytest.fail("libfaketime (Debian faketime) missing", pytrace=False)
        pytest.skip("libfaketime (Debian faketime) missing")
    base = tmp_path_factory.mktemp("kill")
    plain = run_workload(base / "plain", make_plan(with_kills=False))
    _print("run without kills", plain)
    plan = make_plan(with_kills=True)
    print(f"\nkill points (seed {SEED}): controller {plan.controller_kills} (at s, down s); "
          f"agents {plan.agent_kills} (at s, node, down s)")
    killed = run_workload(base / "kills", plan)
    _print("run with kill -9", killed)
    return plain, killed, plan


def assert_totals_exact(name: str, ledger: dict[Any, Any], acct_jobs: dict[str, Any],
                        want: dict[Any, Any]) -> None:
    """The ledger per job x GPU is exactly `want`, and `gpufleet acct --json` per job shows
    the ledger's sums, as users see them."""
    assert ledger == want, (name, {k: (ledger.get(k), v) for k, v in want.items()
                                   if ledger.get(k) != v})
    for job in PHASE_A + PHASE_B:
        rows = [want[(job.job_id, job.node, g)] for g in job.gpus]
        d = acct_jobs[job.job_id]
        assert d["alloc_gpu_s"] == sum(u.allocated_ms for u in rows) / 1000, (name, d)
        assert d["busy_gpu_s"] == sum(u.busy_ms for u in rows) / 1000, (name, d)
        assert d["energy_j"] == sum(u.energy_mj for u in rows) / 1000, (name, d)
        assert d["gpus"] == len(job.gpus) and d["account"] == job.account


def test_kill9_controller_and_agents_keep_totals_exact(
        runs: tuple[RunResult, RunResult, Plan]) -> None:
    plain, killed, plan = runs
    want = expected()
    for name, r in (("without kills", plain), ("with kills", killed)):
        assert_totals_exact(name, r.ledger, r.acct_jobs, want)
        # every injected fault stored exactly once; nothing else
        assert sorted(r.events) == sorted((n, g, x) for n, g, x in XIDS), (name, r.events)
        # only the faulted node is drained (recorded: --slurm none), nothing is resumed
        assert set(r.actions) == {("n3", "drain", "shadow")}, (name, r.actions)
    assert killed.ledger == plain.ledger
    assert len(plan.controller_kills) == 2 and len(plan.agent_kills) == 4
    assert sum("kill -9" in line for line in killed.log) == 6


def test_faulted_node_is_drained_exactly_once_across_agent_restarts(
        runs: tuple[RunResult, RunResult, Plan]) -> None:
    """n3's agent is killed after its Xid 48 drain: the restarted agent reports the double-bit
    ECC error afresh, and the node, still drained by gpufleet, must not be drained again."""
    plain, killed, _plan = runs
    assert plain.actions == [("n3", "drain", "shadow")]
    assert killed.actions == plain.actions
