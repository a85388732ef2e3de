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

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.faults.fleet_helpers import (
    AgentProc,
    ControllerProc,
    GpuUse,
    acct_json,
    faketime_lib,
    ledger,
    sql,
    stopped_all,
    wait_for,
)
from tests.faults.workload import (
    GPUS,
    NODES,
    SEED,
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
from tests.support.ci import unavailable

pytestmark = pytest.mark.slow  # kill -9 under load in real time: ~1 min (fast set: -m 'not slow')


@dataclass
class RunResult:
    ledger: dict[tuple[str, str, int], GpuUse]
    acct_jobs: dict[str, dict[str, Any]]
    events: list[tuple[str, int, int]]  # (node, gpu, xid) per stored row
    actions: list[tuple[str, str, str]]  # (node, action, status)
    log: list[str]
    seconds: float


class Fleet(WorkloadFleet):
    def __init__(self, base: Path) -> None:
        base.mkdir(parents=True)
        self.base = base
        self.db = str(base / "state.db")
        self.controller = ControllerProc(self.db, base, extra_args=("--slurm", "none"))
        super().__init__({n: AgentProc(n, base, self.controller.address, gpus=GPUS)
                          for n in NODES})


def run_workload(base: Path, plan: Plan) -> RunResult:
    fleet = Fleet(base)
    t_begin = time.monotonic()

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

    def inject(node: str, gpu: int, xid: int) -> Callable[[], None]:
        def act() -> None:
            agent = fleet.agents[node]
            wait_for(lambda: agent.alive, 20, f"agent {node} running")
            agent.inject_xid(gpu, xid)
            fleet.note(f"Xid {xid} injected on {node} GPU {gpu}")
        return act

    actions = workload_actions(fleet, plan, NODES)
    for node, gpu, xid in XIDS:
        actions.append((plan.xid_at_s[node], f"xid {node}", inject(node, gpu, xid)))
    for at, down in plan.controller_kills:
        actions.append((at, "kill controller", kill_controller(down)))
    for at, node, down in plan.agent_kills:
        actions.append((at, f"kill {node}", kill_agent(node, down)))

    with stopped_all([*fleet.agents.values(), fleet.controller]):
        fleet.controller.start()
        start_agents(fleet)
        wait_for(lambda: len(sql(fleet.db, "SELECT name FROM nodes")) == len(NODES), 30,
                 "all agents connected")
        begin(fleet)
        run_actions(fleet, actions)
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
        unavailable("libfaketime (Debian faketime) is missing")
    base = tmp_path_factory.mktemp("kill")
    plain = run_workload(base / "plain", make_plan(with_kills=False))
    _print("run without kills", plain)
    plan = make_plan(with_kills=True)
    print(f"\nkill points (seed {SEED}): controller {plan.controller_kills} (at s, down s); "
          f"agents {plan.agent_kills} (at s, node, down s)")
    killed = run_workload(base / "kills", plan)
    _print("run with kill -9", killed)
    return plain, killed, plan


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
