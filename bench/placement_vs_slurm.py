"""gpufleet's placement side by side with Slurm's own, on a real Slurm 22.05 lab (issue 16, 3).

One job trace (1-GPU, whole-node and multi-node jobs, each with an arrival time and a run
time; one node gpufleet's health already calls degraded and one that turns degraded half-way
through: an InfiniBand port down-trained, which Slurm does not see) is replayed twice on the
same lab: once through plain `sbatch` (Slurm's topology/tree over the lab's switch tree, the
tree gpufleet's topology export writes for this fabric) and once through `gpufleet sbatch`
(cli_filter.lua -> the controller's FleetUser.Place). Per job and in total it prints the leaf
switches spanned, the wait (Slurm's StartTime - SubmitTime), GPU utilisation (allocated
GPU-seconds over the lab's GPU-seconds from the first submission to the last end), and jobs
placed on a node that gpufleet's health called unhealthy when the job was submitted.

    flock /tmp/gpufleet-slurm.lock .venv/bin/python bench/placement_vs_slurm.py \\
        --nodes 32 --leaves 4 --jobs 48
    ... --nodes 32 --leaves 4 --jobs 96 --fill   # fills the lab, fragmented (gaps 0.3 s)
(root: the lab starts slurmctld/slurmd; lab in /tmp/gpufleet-bench-pvs, port 7417). The
small size runs in CI: tests/placement/test_placement_vs_slurm.py.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpufleet.scheduler.placement.switch_hold import DEFAULT_GRACE_S

from tests.placement.sbatch_lab import GPUFLEET, Placed, degrade
from tests.slurm.harness import SlurmLab, SlurmLabConfig

KINDS = ("1-GPU", "1-node", "multi-node")
PART_NODE = "part-node"  # 2-6 GPUs of one node (make_fill_trace)
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "BOOT_FAIL", "DEADLINE", "PREEMPTED")


@dataclass(frozen=True)
class TraceJob:
    name: str
    kind: str
    arrival_s: float
    run_s: float
    nodes: int
    gpus_per_node: int

    def sbatch_args(self) -> list[str]:
        return [f"-J{self.name}", f"-N{self.nodes}",
                f"--gres=gpu:{self.gpus_per_node}", "-t", "5", "--wrap",
                f"sleep {self.run_s:.1f}"]


@dataclass(frozen=True)
class Trace:
    jobs: list[TraceJob]
    degraded_at_start: str  # gpufleet's health: degraded before the first job
    fault_node: str  # turns degraded at fault_s
    fault_s: float


def make_trace(nodes: int, jobs: int, seed: int = 1, gap_s: float = 1.0,
               run_s: tuple[float, float] = (4.0, 12.0)) -> Trace:
    """A seeded trace: ~half 1-GPU jobs, a quarter whole nodes, a quarter 2..4 nodes (at most
    a quarter of the lab), exponential gaps of mean gap_s, run times uniform in run_s."""
    rnd = random.Random(seed)
    out: list[TraceJob] = []
    t = 0.0
    for i in range(jobs):
        r = rnd.random()
        kind = KINDS[0] if r < 0.5 else KINDS[1] if r < 0.75 else KINDS[2]
        n = 1 if kind != KINDS[2] else rnd.randint(2, max(2, min(4, nodes // 4)))
        out.append(TraceJob(f"t{i:03d}", kind, round(t, 2), round(rnd.uniform(*run_s), 1), n,
                            1 if kind == KINDS[0] else 8))
        t += rnd.expovariate(1 / gap_s)
    return Trace(out, degraded_at_start=f"n{max(1, nodes // 2 + 2)}",
                 fault_node=f"n{max(2, nodes // 4)}", fault_s=round(t / 2, 2))


def make_fill_trace(nodes: int, jobs: int, seed: int = 1, gap_s: float = 0.3,
                    run_scale: float = 1.0) -> Trace:
    """A seeded trace that fills the lab, fragmented: its first half are 1-GPU and
    partial-node jobs (2-6 GPUs on one node) arriving fast with long, mixed run times
    (20-60 s), so by the time the second half arrives most nodes are partly used; the second
    half is ~60 % whole-node jobs of 2..nodes/4 nodes (6-15 s) among more small jobs (5-30 s)
    that keep taking the holes the first ones leave. Arrival gaps: exponential, mean gap_s;
    run times times run_scale (CI: a short trace of the same shape)."""
    rnd = random.Random(seed)
    out: list[TraceJob] = []
    t = 0.0
    widest = max(2, nodes // 4)
    for i in range(jobs):
        multi = i >= jobs // 2 and rnd.random() < 0.6
        if multi:
            job = TraceJob(f"t{i:03d}", KINDS[2], round(t, 2),
                           round(rnd.uniform(6, 15) * run_scale, 1), rnd.randint(2, widest), 8)
        else:
            one = rnd.random() < 0.55
            run = rnd.uniform(20, 60) if i < jobs // 2 else rnd.uniform(5, 30)
            job = TraceJob(f"t{i:03d}", KINDS[0] if one else PART_NODE, round(t, 2),
                           round(run * run_scale, 1), 1, 1 if one else rnd.randint(2, 6))
        out.append(job)
        t += rnd.expovariate(1 / gap_s)
    return Trace(out, degraded_at_start=f"n{max(1, nodes // 2 + 2)}",
                 fault_node=f"n{max(2, nodes // 4)}", fault_s=round(t / 2, 2))


@dataclass
class JobResult:
    job: TraceJob
    job_id: str
    submitted: float  # wall clock, when sbatch returned
    state: str = ""
    nodes: list[str] = field(default_factory=list)
    leaves: int = 0
    wait_s: float = 0.0
    start: float = 0.0
    end: float = 0.0
    on_unhealthy: list[str] = field(default_factory=list)
    added: str = ""  # gpufleet sbatch: what the filter added (pin, sw=K@M, ex, -)


@dataclass
class RunResult:
    how: str
    jobs: list[JobResult]
    gpus_total: int
    # gpufleet sbatch only: submissions the helper sent on as plain sbatch, and why
    fallbacks: list[str] = field(default_factory=list)

    @property
    def utilisation(self) -> float:
        ran = [r for r in self.jobs if r.end > r.start > 0]
        if not ran:
            return 0.0
        span = max(r.end for r in ran) - min(r.submitted for r in self.jobs)
        used = sum((r.end - r.start) * r.job.nodes * r.job.gpus_per_node for r in ran)
        return used / (span * self.gpus_total) if span > 0 else 0.0

    def total(self, what: str) -> float:
        return float(sum(getattr(r, what) if what != "on_unhealthy" else bool(r.on_unhealthy)
                         for r in self.jobs))


def _slurm_time(text: str) -> float:
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return 0.0


def replay(lab: SlurmLab, trace: Trace, submit: Callable[[TraceJob], str],
           health_at: Callable[[float], None], leaf_of: dict[str, str],
           timeout_s: float = 600) -> list[JobResult]:
    """Submit each job at its arrival (health_at(t) first, to inject the fault), wait for all
    to end, and read what Slurm did from `scontrol show job` (MinJobAge keeps ended jobs)."""
    unhealthy: dict[str, float] = {}
    t0 = time.time()
    unhealthy[trace.degraded_at_start] = t0 - 1
    fault_done = False
    results: list[JobResult] = []
    for job in trace.jobs:
        delay = t0 + job.arrival_s - time.time()
        if delay > 0:
            time.sleep(delay)
        if not fault_done and job.arrival_s >= trace.fault_s:
            health_at(time.time())
            unhealthy[trace.fault_node] = time.time()
            fault_done = True
        before = time.time()
        job_id = submit(job)
        results.append(JobResult(job, job_id, before))
    end = time.monotonic() + timeout_s
    for r in results:
        lab.wait_job_state(int(r.job_id), ENDED, timeout_s=max(1.0, end - time.monotonic()))
    for r in results:
        fields = dict(w.split("=", 1) for w in lab.show_job(int(r.job_id)).split() if "=" in w)
        r.state = fields.get("JobState", "?")
        r.nodes = lab.hostnames(fields["NodeList"]) if fields.get("NodeList", "(null)") not in {
            "", "(null)"} else []
        r.leaves = len({leaf_of.get(n, n) for n in r.nodes})
        r.start, r.end = _slurm_time(fields.get("StartTime", "")), \
            _slurm_time(fields.get("EndTime", ""))
        r.wait_s = max(0.0, r.start - _slurm_time(fields.get("SubmitTime", "")))
        r.on_unhealthy = sorted(n for n in r.nodes if unhealthy.get(n, float("inf")) <= r.submitted)
    return results


def leaves_of(lab: SlurmLab) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, fields in lab.switches().items():
        if "Nodes" in fields and fields.get("Level") == "0":
            for node in lab.hostnames(fields["Nodes"]):
                out[node] = name
    return out


def _added(stderr: str) -> str:
    """The filter's `adds ...` line (--gpufleet-verbose) in short: pin, sw=K@M, ex, -."""
    words: list[str] = []
    for line in stderr.splitlines():
        if " adds " not in line:
            continue
        for flag in line.split(" adds ", 1)[1].split():
            if flag.startswith("--nodelist="):
                words.append("pin")
            elif flag.startswith("--switches="):
                words.append("sw=" + flag.split("=", 1)[1])
            elif flag.startswith("--exclude="):
                words.append("ex")
    return "+".join(words) or "-"


def _gpufleet_sbatch(args: Sequence[str], env: dict[str, str], cwd: Path,
                     fallbacks: list[str], added: dict[str, str]) -> str:
    """Submit with --gpufleet-verbose; a submission the helper sent on as plain sbatch (no
    answer from Place in time, or an error) is added to `fallbacks` with the reason, and
    what the filter added to each job to `added` (job id -> _added)."""
    argv = [GPUFLEET, "sbatch", "--gpufleet-verbose", "--parsable", *args]
    p = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, check=False,
                       timeout=60)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {p.stderr.strip()}")
    fallbacks.extend(line for line in p.stderr.splitlines() if "no placement (" in line)
    job_id = p.stdout.strip().split(";")[0]
    added[job_id] = "fb" if "no placement (" in p.stderr else _added(p.stderr)
    return job_id


def run_both(lab: SlurmLab, trace: Trace, tmp: Path,
             switch_hold_grace_s: float | None = None) -> tuple[RunResult, RunResult]:
    """The trace through plain sbatch, then through gpufleet sbatch, on an idle lab each
    (`switch_hold_grace_s`: the controller with --switch-holds and this grace)."""
    leaf_of = leaves_of(lab)
    gpus = lab.config.nodes * lab.config.gpus
    lab.reset()
    plain = replay(lab, trace, lambda j: str(lab.sbatch(*j.sbatch_args())), lambda _t: None,
                   leaf_of)
    lab.reset()
    placed = Placed(lab, tmp / "gpufleet", degraded=(trace.degraded_at_start,),
                    switch_hold_grace_s=switch_hold_grace_s)
    try:
        env = placed.env()
        fallbacks: list[str] = []
        added: dict[str, str] = {}
        gf = replay(lab, trace,
                    lambda j: _gpufleet_sbatch(j.sbatch_args(), env, lab.jobs_dir, fallbacks,
                                               added),
                    lambda _t: degrade(placed.store, trace.fault_node), leaf_of)
        holds = placed.ctl.switch_holds
        dropped = set(holds.released) if holds is not None else set()
        for r in gf:
            # "/dropped": the controller dropped the job's switch count (switch_hold.py)
            r.added = added.get(r.job_id, "?") + ("/dropped" if r.job_id in dropped else "")
    finally:
        placed.close()
    return (RunResult("plain sbatch", plain, gpus),
            RunResult("gpufleet sbatch", gf, gpus, fallbacks))


def table(trace: Trace, plain: RunResult, gf: RunResult) -> str:
    lines = [f"trace: {len(trace.jobs)} jobs over {trace.jobs[-1].arrival_s:.0f} s; "
             f"{trace.degraded_at_start} degraded from the start, {trace.fault_node} degraded "
             f"at {trace.fault_s:.0f} s (gpufleet health; Slurm sees neither)",
             f"{'job':5} {'kind':10} {'N':>2} {'run s':>5} | {'plain: leaves':>13} {'wait s':>6} "
             f"{'nodes':12} | {'gpufleet: leaves':>16} {'wait s':>6} {'nodes':12} added"]
    for p, g in zip(plain.jobs, gf.jobs, strict=True):
        def nodes(r: JobResult) -> str:
            text = ",".join(r.nodes)
            text = text if len(text) <= 12 else text[:11] + "+"
            return text + ("!" if r.on_unhealthy else "")
        lines.append(f"{p.job.name:5} {p.job.kind:10} {p.job.nodes:2d} {p.job.run_s:5.1f} | "
                     f"{p.leaves:13d} {p.wait_s:6.0f} {nodes(p):12} | {g.leaves:16d} "
                     f"{g.wait_s:6.0f} {nodes(g):12} {g.added}")
    lines.append("(! = placed on a node gpufleet's health called unhealthy at submission; "
                 "added: what gpufleet's filter added, pin = --nodelist, sw = --switches, "
                 "ex = --exclude, fb = no placement, - = nothing; /dropped = the controller "
                 "dropped the switch count, the job could start across leaves)")
    lines.append(f"{'total':24} {'leaves spanned':>15} {'multi-node leaves':>17} {'wait s':>7} "
                 f"{'mean wait s':>11} {'GPU util':>8} {'on unhealthy':>12} {'not COMPLETED':>13}")
    for r in (plain, gf):
        multi = sum(j.leaves for j in r.jobs if j.job.nodes > 1)
        bad = sum(1 for j in r.jobs if j.state != "COMPLETED")
        lines.append(f"{r.how:24} {r.total('leaves'):15.0f} {multi:17d} {r.total('wait_s'):7.0f} "
                     f"{r.total('wait_s') / len(r.jobs):11.2f} {r.utilisation:8.1%} "
                     f"{r.total('on_unhealthy'):12.0f} {bad:13d}")
    lines.append("mean wait s, plain / gpufleet, per kind and per what gpufleet added:")
    groups: dict[str, list[tuple[JobResult, JobResult]]] = {}
    for p, g in zip(plain.jobs, gf.jobs, strict=True):
        groups.setdefault(f"kind {p.job.kind}", []).append((p, g))
        groups.setdefault(f"added {g.added}", []).append((p, g))
    for key, pairs in groups.items():
        n = len(pairs)
        lines.append(f"  {key:24} {n:3d} job(s): {sum(p.wait_s for p, _ in pairs) / n:6.2f} / "
                     f"{sum(g.wait_s for _, g in pairs) / n:6.2f}")
    reasons = sorted({f.split("no placement (", 1)[1].split(")")[0][:60] for f in gf.fallbacks})
    lines.append(f"gpufleet sbatch: {len(gf.fallbacks)} of {len(gf.jobs)} submission(s) went "
                 f"on as plain sbatch (no placement){': ' if reasons else ''}"
                 + "; ".join(reasons))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=32)
    ap.add_argument("--leaves", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=48)
    ap.add_argument("--gap-s", type=float, default=None,
                    help="mean gap between arrivals (default 1.0; 0.3 with --fill)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fill", action="store_true",
                    help="a trace that fills the lab, fragmented (make_fill_trace): small "
                         "jobs first, then multi-node jobs among more small ones")
    ap.add_argument("--switch-holds", action="store_true",
                    help="run gpufleet's controller with --switch-holds")
    ap.add_argument("--switch-hold-grace-s", type=float, default=DEFAULT_GRACE_S,
                    help="with --switch-holds: its grace (default %(default)s)")
    ap.add_argument("--lab", type=Path, default=Path("/tmp/gpufleet-bench-pvs"))  # noqa: S108 - the harness's lab dirs live in /tmp
    ap.add_argument("--port", type=int, default=7417)
    a = ap.parse_args()
    if a.nodes < 4 or a.leaves < 2 or a.jobs < 4:
        ap.error("need --nodes >= 4, --leaves >= 2, --jobs >= 4")
    lab = SlurmLab(SlurmLabConfig(lab_dir=a.lab, nodes=a.nodes, leaves=a.leaves,
                                  ctld_port=a.port, node_port0=a.port + 10183))
    t = time.monotonic()
    lab.start(timeout_s=300)
    print(f"lab: {a.nodes} nodes, {a.leaves} leaf switches, Slurm {lab.version}, "
          f"started in {time.monotonic() - t:.0f} s")
    tmp = Path(tempfile.mkdtemp(prefix="gf-pvs-"))
    try:
        trace = (make_fill_trace(a.nodes, a.jobs, a.seed, a.gap_s or 0.3) if a.fill
                 else make_trace(a.nodes, a.jobs, a.seed, a.gap_s or 1.0))
        plain, gf = run_both(lab, trace, tmp,
                             a.switch_hold_grace_s if a.switch_holds else None)
        print(table(trace, plain, gf))
    finally:
        lab.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
