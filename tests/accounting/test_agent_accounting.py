"""The agent's accounting: exact per-GPU attribution, energy counter resets/wraps, restarts."""

from __future__ import annotations

import json
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
    assert "3" in acc.jobs
    again = Accountant(tmp_path, "n1").on_sample(node.samples(), node.t_ms)
    assert [r.phase for r in again] == [pb.JOB_PHASE_ENDED]  # resent after a restart
    acc.on_sample(node.samples(), node.t_ms + 1000, acked_seq=2)
    assert "3" not in acc.jobs
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
           "SLURM_JOB_ACCOUNT": "phys", "SLURMD_NODENAME": "n3"}
    r = CliRunner().invoke(main, ["prolog", "--state-dir", str(tmp_path / "{node}")], env=env)
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "n3" / "jobs" / "start-77.json").read_text())
    assert doc["gpus"] == ["0", "1"] and doc["user"] == "alice" and doc["kind"] == "start"
    blocker = tmp_path / "file"
    blocker.write_text("")  # state dir under a file: cannot be created
    r = CliRunner().invoke(main, ["epilog", "--state-dir", str(blocker / "x")], env=env)
    assert r.exit_code == 0 and "job not accounted" in r.output
    r = CliRunner().invoke(main, ["epilog", "--state-dir", str(tmp_path)], env={})
    assert r.exit_code == 0 and "SLURM_JOB_ID" in r.output
