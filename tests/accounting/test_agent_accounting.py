"""The agent's accounting: exact per-GPU attribution, energy counter resets/wraps, restarts."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner
from gpufleet.agent.accounting import (
    Accountant,
    AccountingError,
    counter_delta,
    job_from_env,
    parse_gpu_list,
    write_hook_file,
)
from gpufleet.agent.cli import main
from gpufleet.agent.telemetry import GpuSample
from gpufleet.rpc.v1 import fleet_pb2 as pb

from .conftest import Backend

T0 = 1_700_000_000_000  # ms; a minute boundary


class FakeNode:
    """Four GPUs whose energy counters run at a fixed power each, utilisation settable."""

    def __init__(self, power_w: dict[int, float], util: dict[int, float]) -> None:
        self.power_w = power_w
        self.util = util
        self.energy_mj = dict.fromkeys(power_w, 5_000_000)
        self.t_ms = T0

    def advance(self, dt_ms: int) -> None:
        self.t_ms += dt_ms
        for g, p in self.power_w.items():
            self.energy_mj[g] += int(p * dt_ms)  # W x ms = mJ

    def samples(self) -> list[GpuSample]:
        return [GpuSample(index=g, energy_mj=self.energy_mj[g], utilization_gpu_pct=self.util[g])
                for g in self.power_w]


def _job(job_id: str, gpus: list[str], user: str = "alice", account: str = "phys") -> dict:
    return {"job_id": job_id, "gpus": gpus, "user": user, "account": account}


def _final(rows: list[pb.JobGpuUsage]) -> dict[tuple[str, int], pb.JobGpuUsage]:
    return {(r.job_id, r.gpu_index): r for r in rows if r.phase == pb.JOB_PHASE_ENDED}


def _step(acc: Accountant, node: FakeNode, dt_ms: int = 1000) -> list[pb.JobGpuUsage]:
    node.advance(dt_ms)
    acc.poll_spool()
    return acc.on_sample(node.samples(), node.t_ms)


def test_counter_delta_handles_reset_and_wrap() -> None:
    assert counter_delta(100, 250) == 150
    assert counter_delta(None, 250) == 0
    assert counter_delta(100, None) == 0
    # driver reload: the counter restarts from 0, what it shows now was used since
    assert counter_delta(9_000_000, 1_200) == 1_200
    # uint64 wrap
    assert counter_delta(2**64 - 100, 50) == 150


def test_shared_node_two_jobs_get_exactly_their_own_gpus(tmp_path: Path) -> None:
    node = FakeNode(power_w={0: 300.0, 1: 300.0, 2: 100.0, 3: 100.0},
                    util={0: 100.0, 1: 100.0, 2: 50.0, 3: 0.0})
    acc = Accountant(tmp_path, "n1")
    acc.on_sample(node.samples(), node.t_ms)  # baseline before any job
    write_hook_file(tmp_path, "start", _job("11", ["0", "1"]), node.t_ms)
    write_hook_file(tmp_path, "start", _job("12", ["2", "3"], "bob", "chem"), node.t_ms)
    rows: list[pb.JobGpuUsage] = []
    rows += _step(acc, node, 0)
    for _ in range(90):
        rows += _step(acc, node)
    write_hook_file(tmp_path, "end", _job("12", ["2", "3"]), node.t_ms)
    rows += _step(acc, node, 0)
    for _ in range(30):
        rows += _step(acc, node)
    write_hook_file(tmp_path, "end", _job("11", ["0", "1"]), node.t_ms)
    rows += _step(acc, node, 0)
    final = _final(rows)
    assert set(final) == {("11", 0), ("11", 1), ("12", 2), ("12", 3)}
    a, b2, b3 = final[("11", 0)], final[("12", 2)], final[("12", 3)]
    assert a.allocated_ms == 120_000 and b2.allocated_ms == 90_000
    assert a.busy_ms == 120_000  # 100 % for 120 s
    assert b2.busy_ms == 45_000 and b3.busy_ms == 0  # 50 % and 0 % for 90 s
    assert a.energy_mj == 300 * 120_000  # 300 W x 120 s, not a joule of GPU 2/3
    assert b2.energy_mj == 100 * 90_000
    assert (b2.user, b2.account, a.user) == ("bob", "chem", "alice")
    # minute reports went out while the jobs ran, and the spool is empty afterwards
    assert any(r.phase == pb.JOB_PHASE_RUNNING for r in rows)
    assert not list((tmp_path / "jobs").glob("*.json"))


def test_energy_counter_reset_mid_job_is_counted(tmp_path: Path) -> None:
    node = FakeNode(power_w={0: 200.0}, util={0: 100.0})
    acc = Accountant(tmp_path, "n1")
    acc.on_sample(node.samples(), node.t_ms)
    write_hook_file(tmp_path, "start", _job("5", ["0"]), node.t_ms)
    _step(acc, node, 0)
    for _ in range(10):
        _step(acc, node)
    node.energy_mj[0] = 0  # driver reloaded
    for _ in range(10):
        _step(acc, node)
    write_hook_file(tmp_path, "end", _job("5", ["0"]), node.t_ms)
    final = _final(_step(acc, node, 0))
    # the counter restarted from 0 at the reload: what it shows since is counted on top
    assert final[("5", 0)].energy_mj == 200 * 20_000
    assert final[("5", 0)].allocated_ms == 20_000


def test_agent_restart_loses_no_energy_and_resends(tmp_path: Path) -> None:
    def run(restart_at: int | None) -> pb.JobGpuUsage:
        d = tmp_path / f"r{restart_at}"
        node = FakeNode(power_w={0: 250.0}, util={0: 100.0})
        acc = Accountant(d, "n1")
        acc.on_sample(node.samples(), node.t_ms)
        write_hook_file(d, "start", _job("9", ["0"]), node.t_ms)
        _step(acc, node, 0)
        for i in range(150):
            if i == restart_at:
                acc = Accountant(d, "n1")  # agent killed and started again
                node.advance(5000)  # it was down 5 s
                resent = acc.on_sample(node.samples(), node.t_ms)
                assert {r.job_id for r in resent} == {"9"}  # reported again at once
            _step(acc, node)
        write_hook_file(d, "end", _job("9", ["0"]), node.t_ms)
        return _final(_step(acc, node, 0))[("9", 0)]

    plain, restarted = run(None), run(70)
    assert restarted.allocated_ms == plain.allocated_ms + 5000
    assert restarted.energy_mj == 250 * restarted.allocated_ms  # downtime energy counted
    # busy time while down is not observed, and at most SAVE_PERIOD_MS before the kill is lost
    assert plain.busy_ms - 10_000 <= restarted.busy_ms <= plain.busy_ms


def test_ended_job_is_kept_until_its_final_report_is_acked(tmp_path: Path) -> None:
    node = FakeNode(power_w={0: 100.0}, util={0: 10.0})
    acc = Accountant(tmp_path, "n1")
    write_hook_file(tmp_path, "start", _job("3", ["0"]), node.t_ms)
    acc.queued(_step(acc, node, 0), seq=1)
    write_hook_file(tmp_path, "end", _job("3", ["0"]), node.t_ms + 2000)
    rows = _step(acc, node, 3000)
    acc.queued(rows, seq=2)
    assert ("3", 0) in acc.jobs
    again = Accountant(tmp_path, "n1").on_sample(node.samples(), node.t_ms)
    assert [r.phase for r in again] == [pb.JOB_PHASE_ENDED]  # resent after a restart
    acc.on_sample(node.samples(), node.t_ms + 1000, acked_seq=2)
    assert ("3", 0) not in acc.jobs
    assert json.loads((tmp_path / "accounting.json").read_text())["jobs"] == []


def test_gpu_lists_and_environment() -> None:
    assert parse_gpu_list("0,2-3") == ("0", "2", "3")
    assert parse_gpu_list("GPU-1f2e3d4c-0000-1111-2222-333344445555") == (
        "GPU-1f2e3d4c-0000-1111-2222-333344445555",)
    with pytest.raises(AccountingError, match="SLURM_JOB_GPUS='0,x'"):
        parse_gpu_list("0,x")
    env = {"SLURM_JOB_ID": "42", "CUDA_VISIBLE_DEVICES": "1", "SLURM_JOB_USER": "u",
           "SLURM_JOB_ACCOUNT": "a"}
    assert job_from_env(env)["gpus"] == ["1"]
    with pytest.raises(AccountingError, match="SLURM_JOB_ID"):
        job_from_env({**env, "SLURM_JOB_ID": "4;rm"})


def test_prolog_and_epilog_never_fail_the_job(tmp_path: Path) -> None:
    env = {"SLURM_JOB_ID": "77", "SLURM_JOB_GPUS": "0,1", "SLURM_JOB_USER": "alice",
           "SLURM_JOB_ACCOUNT": "phys", "SLURMD_NODENAME": "n3", "SLURM_JOB_RESTART_COUNT": "2"}
    r = CliRunner().invoke(main, ["prolog", "--state-dir", str(tmp_path / "{node}")], env=env)
    assert r.exit_code == 0, r.output
    # one file per run: named by Slurm's restart count (the run)
    doc = json.loads((tmp_path / "n3" / "jobs" / "start-77.r2.json").read_text())
    assert doc["gpus"] == ["0", "1"] and doc["user"] == "alice" and doc["kind"] == "start"
    assert doc["restart_count"] == 2
    blocker = tmp_path / "file"
    blocker.write_text("")  # state dir under a file: cannot be created
    r = CliRunner().invoke(main, ["epilog", "--state-dir", str(blocker / "x")], env=env)
    assert r.exit_code == 0 and "job not accounted" in r.output
    r = CliRunner().invoke(main, ["epilog", "--state-dir", str(tmp_path)], env={})
    assert r.exit_code == 0 and "SLURM_JOB_ID" in r.output


# ------------------------------------------------------------------ /proc safety net

PROC_V1 = "11:devices:/slurm/uid_{uid}/job_{job}/step_0/task_0\n0::/system.slice/slurmd.service\n"
PROC_V2 = "0::/system.slice/slurmstepd.scope/job_{job}/step_0/user/task_0\n"


def _fake_proc(root: Path, pid: int, cgroup: str, uid: int = 0) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "cgroup").write_text(cgroup)
    (d / "status").write_text(f"Name:\tpython\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")


class Procs:
    """GPU -> pids as NVML would list them; records which GPUs were asked about."""

    def __init__(self) -> None:
        self.pids: dict[int, list[int]] = {}
        self.asked: list[list[int]] = []

    def __call__(self, gpus: Sequence[int]) -> dict[int, list[int]]:
        self.asked.append(list(gpus))
        return {g: list(self.pids.get(g, [])) for g in gpus}


def _proc_acc(tmp_path: Path, procs: Procs) -> Accountant:
    return Accountant(tmp_path / "state", "n1", processes=procs,
                      proc_root=str(tmp_path / "proc"), proc_scan_interval_s=10)


def test_unhooked_job_is_attributed_from_proc_first_to_last_seen(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    _fake_proc(proc, 500, PROC_V1.format(uid=0, job=4242))
    _fake_proc(proc, 501, PROC_V2.format(job=4242), uid=0)
    _fake_proc(proc, 600, "0::/user.slice/user-0.slice/session-1.scope\n")  # not a job
    _fake_proc(proc, 700, PROC_V2.format(job=999))  # on the hooked GPU: must not be read
    node = FakeNode(power_w={0: 300.0, 1: 200.0, 2: 100.0, 3: 100.0},
                    util={0: 100.0, 1: 50.0, 2: 80.0, 3: 10.0})
    procs = Procs()
    procs.pids = {0: [500], 1: [501], 2: [600], 3: [700]}
    acc = _proc_acc(tmp_path, procs)
    write_hook_file(acc.state_dir, "start", _job("11", ["3"]), node.t_ms)
    rows = _step(acc, node, 0)
    assert procs.asked == [[0, 1, 2]]  # the GPU its hook announced is not asked about
    started = [r for r in rows if r.job_id == "4242"]
    assert [(r.gpu_index, r.phase, r.user, r.account) for r in started] == [
        (0, pb.JOB_PHASE_STARTED, "root", ""), (1, pb.JOB_PHASE_STARTED, "root", "")]
    for _ in range(99):
        rows += _step(acc, node)
    assert len(procs.asked) == 10  # every 10 s, not every sample
    procs.pids = {2: [600], 3: [700]}  # job 4242's processes exit at T0+99..100 s
    for _ in range(200):
        rows += _step(acc, node)
    final = _final(rows)
    a0, a1 = final[("4242", 0)], final[("4242", 1)]
    # first seen at T0, no longer seen at the check at T0+100 s: 100 s, and usage over it
    assert (a0.start_ms, a0.end_ms, a0.allocated_ms) == (T0, T0 + 100_000, 100_000)
    assert a0.busy_ms == 100_000 and a0.energy_mj == 300 * 100_000
    assert a1.busy_ms == 50_000 and a1.energy_mj == 200 * 100_000
    # ended only after PROC_END_GRACE_MS without a sighting, and reported once as ended
    ended_at = [i for i, r in enumerate(rows) if r.job_id == "4242" and r.end_ms]
    assert len(ended_at) == 2
    # other users' processes: no job
    assert ("4242", 2) not in final and all(j != "999" for j, _run in acc.jobs)
    assert acc.jobs["11", 0].use[3].energy_mj == 100 * 299_000  # the hooked job is untouched


def test_hook_arriving_later_wins_without_double_counting(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    _fake_proc(proc, 800, PROC_V2.format(job=4243), uid=0)
    node = FakeNode(power_w={0: 300.0}, util={0: 100.0})
    procs = Procs()
    procs.pids = {0: [800]}
    acc = _proc_acc(tmp_path, procs)
    rows = _step(acc, node, 0)
    for _ in range(30):
        rows += _step(acc, node)
    assert acc.jobs["4243", 0].source == "proc"
    # the prolog's file turns up late; the job really started 5 s before it was first seen
    write_hook_file(acc.state_dir, "start", _job("4243", ["0"], "alice", "phys"), T0 - 5000)
    for _ in range(30):
        rows += _step(acc, node)
    assert acc.jobs["4243", 0].source == "hook"
    write_hook_file(acc.state_dir, "end", _job("4243", ["0"]), node.t_ms)
    rows += _step(acc, node, 0)
    mine = [r for r in rows if r.job_id == "4243"]
    final = _final(mine)[("4243", 0)]
    assert (final.start_ms, final.end_ms, final.allocated_ms) == (T0 - 5000, T0 + 60_000, 65_000)
    assert (final.user, final.account) == ("alice", "phys")
    assert final.busy_ms == 60_000 and final.energy_mj == 300 * 60_000  # observed from T0
    # cumulative rows under the same (job, GPU) key, never going back: the controller keeps
    # the newest, so the time under /proc attribution is not counted a second time
    for a, b in itertools.pairwise(mine):
        assert b.as_of_ms >= a.as_of_ms and b.energy_mj >= a.energy_mj and b.busy_ms >= a.busy_ms
    # the epilog's end is exact too; after it, the job's stragglers start nothing new
    acc.on_sample(node.samples(), node.t_ms + 10_000)
    assert acc.jobs["4243", 0].end_ms == T0 + 60_000


def test_proc_attribution_reaches_the_ledger_once(store_backend: Backend, tmp_path: Path
                                                  ) -> None:
    from gpufleet.agent.outbox import Outbox
    from gpufleet.scheduler.accounting.ledger import UsageQuery
    from gpufleet.scheduler.health.actions import ActionQueue
    from gpufleet.scheduler.health.policy import HealthPolicy, PolicyConfig
    from gpufleet.scheduler.service.ingest import Ingestor

    _fake_proc(tmp_path / "proc", 900, PROC_V1.format(uid=0, job=77))
    node = FakeNode(power_w={0: 100.0, 1: 100.0}, util={0: 40.0, 1: 0.0})
    procs = Procs()
    procs.pids = {0: [900]}
    acc = _proc_acc(tmp_path, procs)
    box = Outbox("inst-1")

    def step(dt_ms: int = 1000) -> None:
        rows = _step(acc, node, dt_ms)
        if rows:
            acc.queued(rows, box._put(pb.AgentMessage(usage=acc.report(rows))))

    step(0)
    for t in range(1, 181):
        if t == 40:  # the prolog's record turns up, naming its start at T0 - 2 s
            write_hook_file(acc.state_dir, "start", _job("77", ["0"], "bob", "chem"), T0 - 2000)
        if t == 150:
            write_hook_file(acc.state_dir, "end", _job("77", ["0"]), node.t_ms + 1000)
        step()
    store = store_backend.open()
    store.upsert_node("n1", "h1", 8, b"", "inst-1", T0)
    ing = Ingestor(store, HealthPolicy(store, ActionQueue(store, None), PolicyConfig()))
    for m in list(box._pending):
        ing.handle("n1", m)
    (job,) = store.usage(UsageQuery(group_by="job"))
    assert job.key == "77"
    assert job.allocated_ms == 152_000  # the hook's start to its end, counted once
    assert job.busy_ms == 0.4 * 150_000  # observed from the first /proc sighting to the end
    assert job.energy_mj == 100 * 150_000


def test_proc_jobs_survive_a_restart_and_nvml_sim_lists_processes(tmp_path: Path) -> None:
    from gpufleet.agent import nvml_sim
    from gpufleet.agent.nvml import NvmlBackend, load_library

    backend = NvmlBackend(load_library("simulated", "dgx-h100", None, "n1"), "sim")
    try:
        assert backend.compute_pids([0, 1]) == {0: (), 1: ()}
        nvml_sim.inject({"kind": "processes", "gpu": 1,
                         "processes": [{"pid": 950, "used_memory_bytes": 2 << 30}]})
        assert backend.compute_pids([0, 1, 99]) == {0: (), 1: (950,)}
        nvml_sim.inject({"kind": "gpu_lost", "gpu": 0})
        assert backend.compute_pids([0, 1]) == {1: (950,)}  # lost: unknown, not idle
        _fake_proc(tmp_path / "proc", 950, PROC_V2.format(job=31))
        node = FakeNode(power_w={1: 100.0}, util={1: 100.0})
        acc = Accountant(tmp_path / "state", "n1", processes=backend.compute_pids,
                         proc_root=str(tmp_path / "proc"))
        _step(acc, node, 0)
        for _ in range(20):
            _step(acc, node)
        again = Accountant(tmp_path / "state", "n1", processes=backend.compute_pids,
                           proc_root=str(tmp_path / "proc"))
        resent = again.on_sample(node.samples(), node.t_ms + 1000)
        assert [(r.job_id, r.gpu_index, r.start_ms) for r in resent] == [("31", 1, T0)]
        assert again.jobs["31", 0].source == "proc"
    finally:
        backend.close()


def test_hook_time_comes_from_the_wrapper_stamp_when_fresh(tmp_path: Path) -> None:
    """The wrapper script stamps the time before Python starts (start-up makes the hook late
    by 0.2-1 s); a stale or malformed stamp falls back to the clock."""
    env = {"SLURM_JOB_ID": "78", "SLURM_JOB_GPUS": "0", "SLURMD_NODENAME": "n3"}
    now = int(time.time() * 1000)
    cases = {"fresh": str(now - 1500), "stale": str(now - 600_000), "garbage": "12ab"}
    for i, (name, stamp) in enumerate(cases.items()):
        job = str(80 + i)
        r = CliRunner().invoke(main, ["prolog", "--state-dir", str(tmp_path)],
                               env={**env, "SLURM_JOB_ID": job, "GPUFLEET_HOOK_TIME_MS": stamp})
        assert r.exit_code == 0, r.output
        (path,) = (tmp_path / "jobs").glob(f"start-{job}.*.json")
        got = json.loads(path.read_text())["time_ms"]
        if name == "fresh":
            assert got == now - 1500
        else:
            assert now <= got <= int(time.time() * 1000), (name, got)
