"""The seeded accounting workload of the kill -9 fault tests (test_kill.py: one controller on
SQLite; test_standby_kill.py: an active and a standby controller on PostgreSQL): its jobs in two
phases, energy steps and faults, what the ledger must hold after it, and the schedule that
drives it on a fleet of agent processes. test_kill.py's docstring says why the workload is
built this way (what "exact" can mean under kills)."""

from __future__ import annotations

import functools
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.faults.fleet_helpers import AgentProc, GpuUse, finish_hooks, run_hook, wait_for

SEED = 20_240_611
NODES = ("n1", "n2", "n3")
GPUS = 4
Action = tuple[float, str, Callable[[], None]]


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


class WorkloadFleet:
    """The agents the workload runs on (by node), its T0 (wall clock, whole seconds) and a
    log of what happened when, for a failure's message."""

    def __init__(self, agents: dict[str, AgentProc]) -> None:
        self.agents = agents
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


def hooks(fleet: WorkloadFleet, kind: str, jobs: tuple[Job, ...]) -> None:
    procs = [run_hook("prolog" if kind == "start" else "epilog",
                      fleet.agents[j.node].state_dir, j.job_id, j.gpus,
                      int(fleet.t0) + (j.start_s if kind == "start" else j.end_s),
                      user=f"u{j.account}", account=j.account) for j in jobs]
    finish_hooks(procs)


def workload_actions(fleet: WorkloadFleet, plan: Plan, work: Sequence[str]) -> list[Action]:
    """The workload's own timeline (energy steps, the end of phase A on the `work` nodes, the
    phase B epilogs); a test adds its faults and kills, and run_actions sorts the whole."""

    def add_energy(job: Job, add: dict[int, int]) -> Callable[[], None]:
        def act() -> None:
            # the GPU draws for the job only once the agent knows (and saved) the job
            wait_for(lambda: fleet.applied(job), 20, f"agent {job.node} to save job {job.job_id}")
            fleet.agents[job.node].load.add_energy(add)
        return act

    def end_phase_a() -> None:
        # SIGSTOP before the end second, epilogs stamped with it, SIGCONT after it: the
        # agents' last sample before each end hook is before the end, the next one after
        agents = [fleet.agents[n] for n in work]
        late_s = time.time() - (fleet.t0 + A_END_S - 0.1)
        assert late_s < 0, f"schedule fell behind by {late_s:.3f} s before the phase A end"
        for a in agents:
            a.pause()
        try:
            hooks(fleet, "end", PHASE_A)
            fleet.at(A_END_S + 0.05)
        finally:
            for a in agents:
                a.resume()
        fleet.note("phase A ended (epilogs written while the agents were stopped)")
        for job in PHASE_A:
            wait_for(functools.partial(fleet.ended, job), 20,
                     f"agent {job.node} to end {job.job_id}")
        for a in agents:  # only now: the GPUs are free, nothing integrates
            a.load.set_util(dict.fromkeys(range(GPUS), 0))
        hooks(fleet, "start", PHASE_B)
        fleet.note("phase B prologs written")

    actions: list[Action] = [(at, f"energy {job.job_id}", add_energy(job, add))
                             for at, job, add in plan.energy]
    actions.append((A_END_S - 0.7, "end phase A", end_phase_a))
    for end_s in sorted({j.end_s for j in PHASE_B}):
        jobs = tuple(j for j in PHASE_B if j.end_s == end_s)
        actions.append((end_s + 0.01, f"epilog {end_s}",
                        functools.partial(hooks, fleet, "end", jobs)))
    return actions


def start_agents(fleet: WorkloadFleet) -> None:
    """Every agent started, phase A's GPUs at their jobs' utilisation."""
    for job in PHASE_A:
        for g in job.gpus:
            fleet.agents[job.node].load.util_pct[g] = job.util_pct
    for a in fleet.agents.values():
        a.load.write()
        a.start()


def begin(fleet: WorkloadFleet) -> None:
    """T0 a few seconds ahead; phase A's prologs written now, with start times ~5 s in the
    future (the agent clips busy time at the start). 6 s, not 3: in a full CI run on the 2-core
    VM, phase A's 6 prolog processes once took over 2.7 s to start and finish together."""
    fleet.t0 = float(math.ceil(time.time()) + 6)
    hooks(fleet, "start", PHASE_A)
    assert time.time() < fleet.t0 - 0.3, "phase A prologs took too long"


def run_actions(fleet: WorkloadFleet, actions: list[Action]) -> None:
    """Each action at its time; a failed one says which, when, and the log so far."""
    for at, label, act in sorted(actions, key=lambda a: a[0]):
        fleet.at(at)
        try:
            act()
        except AssertionError as e:
            raise AssertionError(f"{label} at +{at:.2f} s: {e}\n" + "\n".join(fleet.log)
                                 ) from e
