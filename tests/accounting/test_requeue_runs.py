"""Runs of a requeued job: the same job id runs again (on the same node and GPUs), and each run
is accounted apart and exactly, on the agent and in the store (SQLite and PostgreSQL).

The real-Slurm test at the end requeues a running job with `scontrol requeue` on a real
slurmctld + slurmd + slurmdbd (22.05) and reconciles both runs with live sacct.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from gpufleet.agent.accounting import Accountant, GpuUsage, JobPhase, write_hook_file
from gpufleet.agent.telemetry import GpuSample
from gpufleet.scheduler.accounting.ledger import UsageQuery, UsageRow
from gpufleet.scheduler.cli.acct_reconcile import reconcile
from gpufleet.scheduler.cli.simfleet import SimFleet
from gpufleet.scheduler.service.server import Controller
from gpufleet.scheduler.slurm import CliSlurmClient
from gpufleet.scheduler.slurm.sacct import parse_sacct_json
from gpufleet.scheduler.store import SqliteStore
from gpufleet.scheduler.store.migrations import MIGRATIONS, PG_MIGRATIONS, statements

from tests.slurm.fixtures import slurm_acct_lab
from tests.slurm.harness import SlurmLab
from tests.support import wait_for

from .conftest import Backend

__all__ = ["slurm_acct_lab"]  # the fixture, imported to be used here

T0 = 1_700_000_040_000  # a minute boundary
W_MJ = 100_000  # every GPU draws 100 W: 100,000 mJ per second


class Node:
    """A simulated node: per-second samples with energy counters of 100 W per GPU."""

    def __init__(self, gpus: int = 4) -> None:
        self.t_ms = T0
        self.energy = dict.fromkeys(range(gpus), 5_000_000)

    def tick(self) -> list[GpuSample]:
        self.t_ms += 1000
        for g in self.energy:
            self.energy[g] += W_MJ
        return [GpuSample(index=g, energy_mj=e, utilization_gpu_pct=50.0)
                for g, e in self.energy.items()]


def _job(restarts: int | None) -> dict[str, Any]:
    job: dict[str, Any] = {"job_id": "7", "gpus": ["0", "1"], "user": "alice",
                           "account": "phys"}
    if restarts is not None:
        job["restart_count"] = restarts
    return job


class Agent:
    """An Accountant driven like the agent's loop; every row it reports, acked at once."""

    def __init__(self, state: Path, node: Node) -> None:
        self.state, self.node, self.seq = state, node, 0
        self.acc = Accountant(state, "n1")
        self.rows: list[GpuUsage] = []

    def restart(self) -> None:
        self.acc = Accountant(self.state, "n1")

    def step(self, seconds: int = 1) -> None:
        for _ in range(seconds):
            samples = self.node.tick()
            self.acc.poll_spool()
            rows = self.acc.on_sample(samples, self.node.t_ms, acked_seq=self.seq)
            if rows:
                self.seq += 1
                self.acc.queued(rows, self.seq)
                self.rows += rows


def _final(rows: list[GpuUsage]) -> dict[tuple[int, int], GpuUsage]:
    """(run, GPU) -> the ENDED row (the newest of each)."""
    return {(r.run, r.gpu_index): r for r in rows if r.phase == JobPhase.ENDED}


def test_a_rerun_on_the_same_gpus_is_a_second_run_across_an_agent_restart(
        tmp_path: Path) -> None:
    node = Node()
    agent = Agent(tmp_path, node)
    agent.step()
    start0 = node.t_ms
    write_hook_file(tmp_path, "start", _job(0), start0)
    agent.step(10)
    end0 = node.t_ms
    # the Epilog of a requeued run already sees the NEXT run's restart count (22.05)
    write_hook_file(tmp_path, "end", _job(1), end0)
    agent.step(3)  # ENDED reported and acked: run 0 is forgotten
    assert not agent.acc.jobs
    agent.restart()  # between the runs
    agent.step(2)
    start1 = node.t_ms
    write_hook_file(tmp_path, "start", _job(1), start1)
    agent.step(20)
    end1 = node.t_ms
    write_hook_file(tmp_path, "end", _job(1), end1)
    agent.step(3)
    final = _final(agent.rows)
    assert set(final) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    for (run, _g), r in final.items():
        start, end = (start0, end0) if run == 0 else (start1, end1)
        assert (r.start_ms, r.end_ms, r.allocated_ms) == (start, end, end - start)
        assert r.source == "hook" and r.user == "alice"
        # energy exactly the counter's rise while the run held the GPU: nothing lost,
        # nothing counted for the gap between the runs, nothing twice
        assert r.energy_mj == (end - start) // 1000 * W_MJ
    # a repeated Prolog of run 0 (a late copy) is not taken for a new run
    write_hook_file(tmp_path, "start", {**_job(0), "gpus": ["2"]}, node.t_ms)
    agent.step(3)
    assert not agent.acc.jobs
    assert {(r.run, r.gpu_index) for r in agent.rows} == set(final)


def test_agent_down_across_a_whole_requeue_still_gives_both_runs(tmp_path: Path) -> None:
    """All four hook files wait in the spool at once (the old names collided: the rerun's
    start-7.json replaced run 0's); they are applied in time order."""
    node = Node()
    times = {"s0": T0 + 1000, "e0": T0 + 5000, "s1": T0 + 9000, "e1": T0 + 15_000}
    write_hook_file(tmp_path, "start", _job(0), times["s0"])
    write_hook_file(tmp_path, "end", _job(1), times["e0"])
    write_hook_file(tmp_path, "start", _job(1), times["s1"])
    write_hook_file(tmp_path, "end", _job(1), times["e1"])
    assert len(list((tmp_path / "jobs").glob("*.json"))) == 4
    node.t_ms = T0 + 20_000
    agent = Agent(tmp_path, node)
    agent.step(5)
    final = _final(agent.rows)
    assert {k: (r.start_ms, r.end_ms) for k, r in final.items()} == {
        (0, 0): (times["s0"], times["e0"]), (0, 1): (times["s0"], times["e0"]),
        (1, 0): (times["s1"], times["e1"]), (1, 1): (times["s1"], times["e1"])}
    assert not list((tmp_path / "jobs").glob("*.json"))  # all applied, none left behind


def test_a_prolog_without_restart_count_counts_runs_on_the_node(tmp_path: Path) -> None:
    """Another Slurm without SLURM_JOB_RESTART_COUNT: one past the last run seen here."""
    node = Node()
    agent = Agent(tmp_path, node)
    for _ in range(2):
        agent.step()
        write_hook_file(tmp_path, "start", _job(None), node.t_ms)
        agent.step(4)
        write_hook_file(tmp_path, "end", _job(None), node.t_ms)
        agent.step(3)
    assert set(_final(agent.rows)) == {(0, 0), (0, 1), (1, 0), (1, 1)}


# ------------------------------------------------------------------------------ the store

def _row(run: int, start_s: int, as_of_s: int, *, end: bool = False, gpu: int = 0,
         source: str = "hook", user: str = "alice", account: str = "phys") -> UsageRow:
    start, as_of = T0 + start_s * 1000, T0 + as_of_s * 1000
    return UsageRow("7", "n1", gpu, user, account, start, as_of if end else None, as_of,
                    as_of - start, (as_of - start) // 2, (as_of - start) * 100,
                    run=run, source=source)


def test_two_runs_on_one_gpu_both_count_and_replays_count_once(store_backend: Backend) -> None:
    store = store_backend.open()
    run0 = [_row(0, 0, 60), _row(0, 0, 100, end=True)]
    run1 = [_row(1, 300, 360), _row(1, 300, 400, end=True)]
    store.record_usage(run0)
    store.record_usage(run1[:1])
    (job,) = store.usage(UsageQuery(jobs=("7",)))
    # run 1 is running: the job is not ended, though run 0 is
    assert (job.end_ms, job.runs, job.gpus, job.allocated_ms) == (None, 2, 1, 160_000)
    store.record_usage(run1[1:])
    for replay in (run0, run1, run0[::-1] + run1[::-1]):
        assert store.record_usage(replay) == []  # nothing applied again
    (job,) = store.usage(UsageQuery(jobs=("7",)))
    assert (job.allocated_ms, job.busy_ms, job.energy_mj) == (200_000, 100_000, 20_000_000)
    assert (job.start_ms, job.end_ms, job.runs, job.gpus) == (T0, T0 + 400_000, 2, 1)
    assert [(r.run, r.allocated_ms) for r in store.usage_rows("7")] == [(0, 100_000),
                                                                       (1, 100_000)]
    (acct,) = store.usage(UsageQuery(group_by="account"))  # from the job-day rollups
    assert (acct.jobs, acct.gpus, acct.allocated_ms) == (1, 1, 200_000)
    (minutes,) = store.usage_by_minute(T0, T0 + 3_600_000)
    assert minutes.allocated_ms == 200_000
    # lost time goes to the killed run's GPUs only
    assert store.add_lost_time("7", "n1", 5_000, run=0) == 1
    assert [r[0] for r in store_backend.raw(
        "SELECT lost_ms FROM acct_ledger ORDER BY run")] == [5_000, 0]


def test_a_hook_row_takes_over_the_identity_of_its_proc_row(store_backend: Backend) -> None:
    store = store_backend.open()
    store.record_usage([_row(0, 10, 60, source="proc", user="uid1000", account="")])
    store.record_usage([_row(0, 0, 120, source="hook")])  # the Prolog came after all
    (row,) = store.usage_rows("7")
    assert (row.user, row.account, row.start_ms, row.source) == ("alice", "phys", T0, "hook")
    (job,) = store.usage(UsageQuery(jobs=("7",)))
    assert (job.user, job.account, job.start_ms) == ("alice", "phys", T0)
    by_account = {t.key: t for t in store.usage(UsageQuery(group_by="account"))}
    assert set(by_account) == {"phys"} and by_account["phys"].allocated_ms == 120_000
    # a later hook report does not go back to the first report's identity, nor the reverse
    store.record_usage([_row(0, 10, 180, source="proc", user="uid1000", account="")])
    (row,) = store.usage_rows("7")
    assert (row.user, row.account, row.start_ms) == ("alice", "phys", T0)


def test_upgrade_from_v8_keeps_every_row_as_run_0(store_backend: Backend) -> None:
    migrations = MIGRATIONS if store_backend.kind == "sqlite" else PG_MIGRATIONS
    store_backend.raw("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for i, migration in enumerate(migrations[:8]):
        for stmt in statements(migration):
            store_backend.raw(stmt)
        store_backend.raw(f"INSERT INTO schema_version VALUES ({i + 1})")  # noqa: S608 - int
    for g in (0, 1):
        store_backend.raw(
            "INSERT INTO acct_ledger (job_id, node, gpu_index, user_name, account, start_ms, "
            "end_ms, as_of_ms, allocated_ms, busy_ms, energy_mj, lost_ms) VALUES "
            "('7', 'n1', ?, 'alice', 'phys', ?, ?, ?, 100000, 50000, 10000000, 7)",
            (g, T0, T0 + 100_000, T0 + 100_000))
    store_backend.raw(
        "INSERT INTO acct_jobs (job_id, user_name, account, start_ms, end_ms, gpus, "
        "allocated_ms, busy_ms, energy_mj, lost_ms) VALUES ('7', 'alice', 'phys', ?, ?, 2, "
        "200000, 100000, 20000000, 14)", (T0, T0 + 100_000))
    store = store_backend.open()
    assert store.schema_version() == len(MIGRATIONS)
    rows = store.usage_rows("7")
    assert [(r.run, r.gpu_index, r.allocated_ms, r.source) for r in rows] == [
        (0, 0, 100_000, ""), (0, 1, 100_000, "")]
    # the old run-0 rows' replay adds nothing; the rerun on the same GPUs adds its own
    assert store.record_usage([_row(0, 0, 100, end=True, gpu=1)]) == []
    store.record_usage([_row(1, 300, 400, end=True, gpu=g) for g in (0, 1)])
    (job,) = store.usage(UsageQuery(jobs=("7",)))
    assert (job.allocated_ms, job.gpus, job.runs, job.lost_ms) == (400_000, 2, 2, 14)
    assert job.end_ms == T0 + 400_000


# ------------------------------------------------------------------------------ real Slurm

@pytest.fixture
def fleet(slurm_acct_lab: SlurmLab, tmp_path: Path) -> Iterator[Controller]:
    lab = slurm_acct_lab
    ctl = Controller(SqliteStore(tmp_path / "state.db"), CliSlurmClient(env=lab.env()),
                     listen="127.0.0.1:0")
    with SimFleet(ctl, ["n1"], lab.lab_dir / "agents",
                  agent_args=lambda _: ("--sim-profile", "l40s-pcie")):
        yield ctl


@pytest.mark.slurm
def test_requeued_job_has_both_runs_in_the_ledger_and_reconciles(
        slurm_acct_lab: SlurmLab, fleet: Controller, tmp_path: Path,
        report_figure: Callable[[str], None]) -> None:
    lab, ctl = slurm_acct_lab, fleet
    wait_for(lambda: ctl.store.node("n1") is not None, 60, "the agent's hello")
    job = lab.sbatch("-w", "n1", "--gres=gpu:2", "-A", "physics", "--requeue", "--wrap",
                     "sleep 8")
    lab.wait_job_state(job, "RUNNING", timeout_s=60)
    time.sleep(4)
    lab.run("scontrol", "requeue", str(job))
    # 22.05 holds a requeued job back for cred_expire (120 s: slurmd refuses a job id it
    # killed until then; starting it sooner with StartTime=now made it fail in the lab)
    lab.wait_job_state(job, ("RUNNING", "COMPLETED"), timeout_s=240)
    assert lab.job_nodes(job) == ["n1"]
    lab.wait_job_state(job, "COMPLETED", timeout_s=60)
    records = lab.wait_sacct_ended(job)
    raw = lab.run("sacct", "--json", "--duplicates", "-j", str(job)).stdout
    slurm = [r for r in parse_sacct_json(raw) if r.job_id == str(job)]
    assert len(slurm) == 2 and len(records) >= 1, slurm  # the REQUEUED run and the last

    def ledger() -> list[UsageRow] | None:
        rows = ctl.store.usage_rows(str(job))
        runs = {r.run for r in rows}
        return rows if len(runs) == 2 and all(r.end_ms is not None for r in rows) else None

    rows = wait_for(ledger, 30, lambda: f"both runs ended in the ledger: "
                    f"{ctl.store.usage_rows(str(job))}", step_s=0.5)
    assert sorted((r.run, r.gpu_index) for r in rows) == [(0, g) for g in sorted(
        r.gpu_index for r in rows if r.run == 0)] + [(1, g) for g in sorted(
            r.gpu_index for r in rows if r.run == 1)]
    assert all(r.source == "hook" and r.energy_mj > 0 for r in rows)
    by_run = {run: [r for r in rows if r.run == run] for run in (0, 1)}
    slurm_by_start = sorted(slurm, key=lambda s: s.start_s or 0)
    for run, ours in by_run.items():
        s = slurm_by_start[run]
        assert len(ours) == s.gpus == 2
        ours_s = sum(r.allocated_ms for r in ours) / 1000
        diff = ours_s - s.gpu_s
        report_figure(f"requeued job {job} run {run}: Slurm {s.gpu_s} GPU-s (state {s.state}),"
                      f" gpufleet {ours_s:.3f} GPU-s, diff {diff:+.3f}")
        assert abs(diff) <= 1.0 * s.gpus, (run, ours_s, s)
    (total,) = ctl.store.usage(UsageQuery(jobs=(str(job),)))
    assert (total.runs, total.gpus) == (2, 2)
    assert total.allocated_ms == sum(r.allocated_ms for r in rows)

    r = CliRunner().invoke(reconcile, ["--db", str(tmp_path / "state.db"), "-j", str(job),
                                       "--json"], env=lab.env())
    print(r.output)
    assert r.exit_code == 0, r.output
    (doc,) = json.loads(r.output)["jobs"]
    assert (doc["status"], doc["slurm_runs"], doc["gpufleet_runs"]) == ("ok", 2, 2), doc
