"""What `gpufleet sbatch` adds to a submission over plain `sbatch`, on a real Slurm 22.05 lab.

One run, three kinds of submission interleaved round-robin (so load noise hits all alike):
plain `sbatch`, `gpufleet sbatch --gpufleet-no-place` (the wrapper alone) and `gpufleet sbatch`
(cli_filter.lua -> gpufleet-sbatch-filter -> the controller's FleetUser.Place over loopback
gRPC with MUNGE -> a pin). All use the same client slurm.conf with cli_filter/lua enabled. The
partition is DOWN so every job stays pending and the cluster looks the same to each
submission. Prints the median and p90 wall time of each and the median added over plain.

    flock /tmp/gpufleet-slurm.lock .venv/bin/python bench/sbatch_overhead.py --rounds 30
(root: the lab starts slurmctld/slurmd; lab in /tmp/gpufleet-bench-sbatch, port 7317)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.placement.sbatch_lab import GPUFLEET, Placed
from tests.slurm.harness import SlurmLab, SlurmLabConfig

JOB = ["--gres=gpu:1", "-N1", "--wrap", "true"]


def _time(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, check=False,
                       timeout=60)
    dt = (time.perf_counter() - t0) * 1000
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {p.stderr.strip()}")
    return dt, p.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--lab", type=Path, default=Path("/tmp/gpufleet-bench-sbatch"))  # noqa: S108 - the harness's lab dirs live in /tmp
    ap.add_argument("--port", type=int, default=7317)
    a = ap.parse_args()
    lab = SlurmLab(SlurmLabConfig(lab_dir=a.lab, ctld_port=a.port, node_port0=a.port + 10183))
    lab.start()
    tmp = Path(tempfile.mkdtemp(prefix="gf-sbatch-bench-"))
    placed = Placed(lab, tmp, degraded=("n6",))
    try:
        lab.run("scontrol", "update", "PartitionName=main", "State=DOWN")
        env = placed.env(GPUFLEET_PIN_RELEASE_S="120")  # releases start after the run
        kinds = {
            "plain sbatch": ["sbatch", *JOB],
            "gpufleet sbatch, placement off": [GPUFLEET, "sbatch", "--gpufleet-no-place", *JOB],
            "gpufleet sbatch, placement on": [GPUFLEET, "sbatch", *JOB],
        }
        times: dict[str, list[float]] = {k: [] for k in kinds}
        for argv in kinds.values():  # warm-up: page cache, munged, controller
            _time(argv, env, lab.jobs_dir)
        for _ in range(a.rounds):
            for k, argv in kinds.items():
                times[k].append(_time(argv, env, lab.jobs_dir)[0])
        last = lab.run("squeue", "-h", "-o", "%i %R %N", "--sort=-i").stdout.splitlines()
        pinned = sum(1 for line in lab.run("scontrol", "show", "job", "-o").stdout.splitlines()
                     if "ReqNodeList=(null)" not in line)
        base = statistics.median(times["plain sbatch"])
        print(f"{a.rounds} submissions of each, interleaved; Slurm 22.05 lab, 8 nodes")
        print(f"{'kind':34} {'median ms':>10} {'p90 ms':>8} {'added (median) ms':>18}")
        for k, ts in times.items():
            p90 = statistics.quantiles(ts, n=10)[-1]
            med = statistics.median(ts)
            print(f"{k:34} {med:10.1f} {p90:8.1f} {med - base:18.1f}")
        print(f"jobs pinned by placement: {pinned} (expected {a.rounds + 1}); last: {last[0]}")
    finally:
        lab.run("scontrol", "update", "PartitionName=main", "State=UP", check=False)
        placed.close()
        lab.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
