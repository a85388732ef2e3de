"""gpufleet's ledger against Slurm's own accounting, on a real slurmctld + slurmd + slurmdbd +
MariaDB (Slurm 22.05): two jobs of different users and accounts share node n1, each with its
own GPUs. Prolog/Epilog run the real `gpufleet-agent prolog|epilog`; one simulated-NVML agent
per node reports to a real controller (SQLite store) over gRPC.

Per job: allocated GPU-seconds equal AllocTRES gres/gpu x ElapsedRaw within 1 s per GPU
(Slurm keeps whole seconds), the ledger's GPUs are Slurm's (`scontrol show job -d` IDX and
the job's own SLURM_JOB_GPUS), and each GPU's energy is exactly that GPU's simulated counter
difference between the samples at the job's start and end. `gpufleet acct reconcile` agrees.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.scheduler.accounting.ledger import UsageQuery, UsageRow
from gpufleet.scheduler.cli.acct_reconcile import reconcile
from gpufleet.scheduler.cli.simfleet import SimFleet
from gpufleet.scheduler.service.server import Controller
from gpufleet.scheduler.slurm import CliSlurmClient
from gpufleet.scheduler.slurm.sacct import parse_sacct_json
from gpufleet.scheduler.store import SqliteStore

from tests.slurm.fixtures import slurm_acct_lab
from tests.slurm.harness import SlurmLab
from tests.support import wait_for

pytestmark = pytest.mark.slurm
__all__ = ["slurm_acct_lab"]  # the fixture, imported to be used here

NODES = ("n1", "n2")
# node -> [(sample time ms, {gpu index: energy counter mJ})], as the controller received them
Samples = dict[str, list[tuple[int, dict[int, int]]]]


@pytest.fixture
def fleet(slurm_acct_lab: SlurmLab, tmp_path: Path) -> Iterator[tuple[Controller, Samples]]:
    lab = slurm_acct_lab
    ctl = Controller(SqliteStore(tmp_path / "state.db"), CliSlurmClient(env=lab.env()),
                     listen="127.0.0.1:0")
    samples: Samples = {n: [] for n in NODES}
    handle = ctl.ingest.handle

    def recording_handle(node: str, msg: pb.AgentMessage) -> int:
        # the real ingest path; only the energy counters each sample carried are noted
        if msg.WhichOneof("body") == "sample":
            counters = {g.index: g.energy_mj for g in msg.sample.gpus if g.HasField("energy_mj")}
            samples.setdefault(node, []).append((msg.sample.timestamp_ms, counters))
        return handle(node, msg)

    ctl.ingest.handle = recording_handle  # type: ignore[method-assign]
    # every sample to the controller (no heartbeats): the test reads their energy counters
    agent_cfg = tmp_path / "agent.toml"
    agent_cfg.write_text("heartbeat_interval_s = 0\n")
    with SimFleet(ctl, NODES, lab.lab_dir / "agents", agent_args=lambda _: (
            "--config", str(agent_cfg), "--sim-profile", "l40s-pcie")):
        yield ctl, samples


def _gres_idx(lab: SlurmLab, job: int) -> list[int]:
    """GPU indices of a job from `scontrol show job -d`: '... GRES=gpu:2(IDX:1-2)'."""
    match = re.search(r"GRES=gpu[^(\s]*\(IDX:([0-9,-]+)\)", lab.run(
        "scontrol", "show", "job", "-d", str(job)).stdout)
    assert match, f"no GRES IDX for job {job}"
    out: list[int] = []
    for part in match.group(1).split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def _job_gpus_env(lab: SlurmLab, job: int) -> list[int]:
    """SLURM_JOB_GPUS as the batch script printed it."""
    text = (lab.jobs_dir / f"slurm-{job}.out").read_text()
    match = re.search(r"^GPUS=([0-9,]*) ", text, re.M)
    assert match, f"job {job} printed no GPUS= line: {text!r}"
    return [int(g) for g in match.group(1).split(",") if g]


def _counter_pairs(samples: list[tuple[int, dict[int, int]]], start_ms: int, end_ms: int,
                   gpu: int) -> set[int]:
    """Counter differences of `gpu` between any sample near the job's start and any near its
    end (the agent reads the counters afresh in the sample that sees a hook file)."""
    near_start = [c[gpu] for t, c in samples if start_ms - 500 <= t <= start_ms + 3000 and gpu in c]
    near_end = [c[gpu] for t, c in samples if end_ms - 500 <= t <= end_ms + 3000 and gpu in c]
    return {e - s for s in near_start for e in near_end}


def test_two_jobs_sharing_a_node_match_slurmdbd(
    slurm_acct_lab: SlurmLab, fleet: tuple[Controller, Samples], tmp_path: Path,
    report_figure: Callable[[str], None],
) -> None:
    lab = slurm_acct_lab
    ctl, samples = fleet
    wait_for(lambda: {n.name for n in ctl.store.nodes()} == set(NODES), 60, "every agent")
    script = 'echo "GPUS=$SLURM_JOB_GPUS CVD=$CUDA_VISIBLE_DEVICES"; sleep {s}'
    jobs = {
        lab.sbatch("-w", "n1", "--gres=gpu:1", "-A", "physics", "--wrap",
                   script.format(s=5)): ("root", "physics", 1),
        lab.sbatch("-w", "n1", "--gres=gpu:2", "-A", "chemistry", "--wrap",
                   script.format(s=8), user="nobody"): ("nobody", "chemistry", 2),
    }
    idx: dict[int, list[int]] = {}
    for job in jobs:
        lab.wait_job_state(job, ("RUNNING", "COMPLETED"), timeout_s=60)
        idx[job] = _gres_idx(lab, job)
    assert lab.job_nodes(next(iter(jobs))) == ["n1"]
    for job in jobs:
        lab.wait_job_state(job, "COMPLETED", timeout_s=60)
    lab.wait_sacct_ended(*jobs)
    sacct_raw = lab.run("sacct", "--json", "-j", ",".join(map(str, jobs))).stdout
    slurm = {j.job_id: j for j in parse_sacct_json(sacct_raw)}

    def ledger() -> dict[int, list[UsageRow]] | None:
        rows = {job: ctl.store.usage_rows(str(job)) for job in jobs}
        done = all(r and all(u.end_ms is not None for u in r) for r in rows.values())
        return rows if done else None

    rows = wait_for(ledger, 30, lambda: f"ended ledger rows for {list(jobs)}: {ledger()}",
                    step_s=0.2)
    (tmp_path / "sacct.json").write_text(sacct_raw)

    all_gpus: list[int] = []
    off: list[str] = []
    for job, (user, account, ngpus) in jobs.items():
        s = slurm[str(job)]
        ours = rows[job]
        assert (s.user, s.account, s.gpus, s.nodes) == (user, account, ngpus, "n1")
        assert (ours[0].user, ours[0].account) == (user, account)
        # exactly its own GPUs: ledger == scontrol's IDX == the job's SLURM_JOB_GPUS
        ledger_gpus = sorted(u.gpu_index for u in ours)
        assert {u.node for u in ours} == {"n1"}
        assert ledger_gpus == idx[job] == _job_gpus_env(lab, job), (job, ledger_gpus, idx[job])
        all_gpus += ledger_gpus
        alloc_gpu_s = sum(u.allocated_ms for u in ours) / 1000.0
        slurm_gpu_s = s.gpus * s.elapsed_s
        diff = alloc_gpu_s - slurm_gpu_s
        start_ms, end_ms = ours[0].start_ms, ours[0].end_ms
        assert end_ms is not None and s.start_s is not None and s.end_s is not None
        energies = {u.gpu_index: u.energy_mj for u in ours}
        print(f"job {job} {user}/{account}: Slurm gres/gpu={s.gpus} x ElapsedRaw={s.elapsed_s}"
              f" = {slurm_gpu_s} GPU-s (Start {s.start_s} End {s.end_s}); gpufleet "
              f"{alloc_gpu_s:.3f} GPU-s (start {start_ms / 1000:.3f} end {end_ms / 1000:.3f}); "
              f"diff {diff:+.3f} GPU-s; GPUs {ledger_gpus}; energy J "
              f"{ {g: e / 1000 for g, e in energies.items()} }")
        report_figure(
            f"slurmdbd reconcile, job {job} ({ngpus} GPU): Slurm {slurm_gpu_s} GPU-s, gpufleet "
            f"{alloc_gpu_s:.3f} GPU-s, diff {diff:+.3f} ({diff / ngpus:+.3f} s per GPU); "
            f"start {start_ms / 1000 - s.start_s:+.3f} s, end {end_ms / 1000 - s.end_s:+.3f} s "
            f"after Slurm's")
        if abs(diff) > 1.0 * ngpus:  # asserted last: the GPU and energy checks still run
            off.append(f"job {job}: {diff:+.3f} GPU-s off Slurm's {slurm_gpu_s} "
                       f"(hooks {start_ms / 1000 - s.start_s:+.3f} s / "
                       f"{end_ms / 1000 - s.end_s:+.3f} s after Slurm's Start / End)")
        for u in ours:
            assert u.allocated_ms == end_ms - start_ms  # every GPU held for the whole job
            assert u.energy_mj > 0
            pairs = _counter_pairs(samples["n1"], start_ms, end_ms, u.gpu_index)
            assert u.energy_mj in pairs, (job, u.gpu_index, u.energy_mj, sorted(pairs))
    assert len(all_gpus) == len(set(all_gpus)) == 3  # no GPU counted for both jobs
    by_node = {t.key: t for t in ctl.store.usage(UsageQuery(group_by="node"))}
    assert set(by_node) == {"n1"} and by_node["n1"].gpus == 3  # nothing else accounted

    # the command: live sacct (SLURM_CONF of the lab) against the same store
    db = str(tmp_path / "state.db")
    r = CliRunner().invoke(
        reconcile, ["--db", db, "-j", ",".join(map(str, jobs)), "--json"],
        env=lab.env())
    print(r.output)
    assert not off, off
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["ok"] is True
    assert {j["job_id"]: j["status"] for j in doc["jobs"]} == {str(j): "ok" for j in jobs}
    assert not off, off
