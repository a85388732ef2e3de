"""What `gpufleet sbatch` adds to a submission over plain `sbatch`, on a real Slurm 22.05 lab.

One run, five kinds of submission interleaved round-robin (so load noise hits all alike):
plain `sbatch`, `gpufleet sbatch --gpufleet-no-place` (the wrapper alone) and `gpufleet sbatch`
(cli_filter.lua -> gpufleet-sbatch-filter -> the controller's FleetUser.Place over loopback
gRPC with MUNGE -> a pin), the last two both through pip's console script and through the
site-less launcher the login-node role installs (gpufleet.scheduler.cli.entry.launcher).
All use the same client slurm.conf with cli_filter/lua enabled. The partition is DOWN so
every job stays pending and the cluster looks the same to each submission. Prints the
median and p90 wall time of each and the median added over plain.

    flock /tmp/gpufleet-slurm.lock .venv/bin/python bench/sbatch_overhead.py --rounds 30
(root: the lab starts slurmctld/slurmd; lab in /tmp/gpufleet-bench-sbatch, port 7317)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpufleet.scheduler.cli.entry import launcher

from tests.placement.sbatch_lab import GPUFLEET, Placed
from tests.slurm.harness import SlurmLab, SlurmLabConfig

JOB = ["--gres=gpu:1", "-N1", "--wrap", "true"]
# the options cli_filter.lua hands the helper for JOB (slurm.json_cli_options, trimmed)
JOB_JSON = '{"nodes":"1","gres":"gres:gpu:1","wrap":"true","ignore-pbs":"unset","argv":[]}'


def _time(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, check=False,
                       timeout=60)
    dt = (time.perf_counter() - t0) * 1000
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {p.stderr.strip()}")
    return dt, p.stdout


def _ms(fn: object) -> float:
    t0 = time.perf_counter()
    fn()  # type: ignore[operator]
    return (time.perf_counter() - t0) * 1000


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def breakdown(lab: SlurmLab, placed: Placed, env: dict[str, str], rounds: int) -> None:
    """The pieces of one placed submission, each timed alone, interleaved round-robin."""
    from gpufleet.scheduler.access import munge
    from gpufleet.scheduler.placement import PlacementRequest, apply_store, place, view_from_slurm
    from gpufleet.scheduler.placement.sources import SlurmViewSource
    from gpufleet.scheduler.service import placecall
    from gpufleet.scheduler.slurm import CliSlurmClient

    from tests.placement.sbatch_lab import filter_argv

    no_ctl = placed.client_toml.with_name("no-controller.toml")
    no_ctl.write_text("")
    env_no_ctl = {**env, "GPUFLEET_CLIENT_CONFIG": str(no_ctl)}
    sock = env.get("GPUFLEET_MUNGE_SOCKET") or "/run/munge/munge.socket.2"
    slurm = CliSlurmClient(env=lab.env(), timeout_s=5)
    cfg_port = placed.ctl.port
    req = placecall.PlaceRequest(nodes=1, gpus_per_node=1)

    def helper(argv: list[str]) -> None:
        subprocess.run([*argv, "place", "0", JOB_JSON], env=env_no_ctl, check=True,
                       capture_output=True)

    def credential() -> str:
        return subprocess.run(["munge", f"--socket={sock}", "--no-input"], check=True,
                              capture_output=True, text=True).stdout.strip()

    def call() -> None:
        placecall.place(f"127.0.0.1:{cfg_port}", req, credential(), 5.0, None)

    view = view_from_slurm(slurm, 5)
    # the controller's source with the jobs' indices never kept: what a Place costs when a
    # job started or ended since the last read (the kept ones no longer fit)
    reread = SlurmViewSource(slurm, 5, jobs_max_age_s=0.0)
    reread()
    pieces = {
        "helper, console script (start, imports; no controller)":
            lambda: helper([str(Path(GPUFLEET).with_name("gpufleet-sbatch-filter"))]),
        "helper, as gpufleet sbatch runs it (no controller)":
            lambda: helper(filter_argv()),
        "python -c pass": lambda: subprocess.run([sys.executable, "-c", "pass"], check=True),
        "python -I -S -c pass":
            lambda: subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], check=True),
        "munge credential (munge process)": credential,
        "unmunge (controller side)": lambda: munge.decode(credential(), sock, 5.0),
        "  sinfo --json": slurm.node_infos,
        "  squeue --json": slurm.jobs,
        "  scontrol show partition": slurm.partitions,
        "  scontrol show topology": slurm.topology_text,
        "view_from_slurm (4 reads side by side)": lambda: view_from_slurm(slurm, 5),
        "controller's view source (as Place calls it: jobs kept while they fit)":
            placed.ctl_view_source,
        "controller's view source, jobs read again (a job started/ended)": reread,
        "apply_store + engine": lambda: place(apply_store(view, placed.store),
                                              PlacementRequest(nodes=1, gpus_per_node=1)),
        "Place call, in-process client (munge + wire + controller)": call,
    }
    times: dict[str, list[float]] = {k: [] for k in pieces}
    for fn in pieces.values():
        fn()
    for _ in range(rounds):
        for k, fn in pieces.items():
            times[k].append(_ms(fn))
    print(f"\nwhere it goes ({rounds} rounds, interleaved; {_load()}):")
    print(f"{'piece':60} {'median ms':>10} {'p90 ms':>8}")
    for k, ts in times.items():
        print(f"{k:60} {statistics.median(ts):10.1f} {statistics.quantiles(ts, n=10)[-1]:8.1f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--lab", type=Path, default=Path("/tmp/gpufleet-bench-sbatch"))  # noqa: S108 - the harness's lab dirs live in /tmp
    ap.add_argument("--port", type=int, default=7317)
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the pieces of a placed submission one by one")
    a = ap.parse_args()
    lab = SlurmLab(SlurmLabConfig(lab_dir=a.lab, ctld_port=a.port, node_port0=a.port + 10183))
    lab.start()
    tmp = Path(tempfile.mkdtemp(prefix="gf-sbatch-bench-"))
    placed = Placed(lab, tmp, degraded=("n6",))
    try:
        lab.run("scontrol", "update", "PartitionName=main", "State=DOWN")
        env = placed.env(GPUFLEET_PIN_RELEASE_S="120")  # releases start after the run
        fast = tmp / "gpufleet"  # as the login-node role installs it
        fast.write_text(launcher(sys.executable))
        fast.chmod(0o755)
        kinds = {
            "plain sbatch": ["sbatch", *JOB],
            "gpufleet sbatch, placement off": [GPUFLEET, "sbatch", "--gpufleet-no-place", *JOB],
            "gpufleet sbatch, placement on": [GPUFLEET, "sbatch", *JOB],
            "launcher, placement off": [str(fast), "sbatch", "--gpufleet-no-place", *JOB],
            "launcher, placement on": [str(fast), "sbatch", *JOB],
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
        print(f"{a.rounds} submissions of each, interleaved; Slurm 22.05 lab, 8 nodes; "
              f"{_load()} at the end")
        print(f"{'kind':34} {'median ms':>10} {'p90 ms':>8} {'added (median) ms':>18}")
        for k, ts in times.items():
            p90 = statistics.quantiles(ts, n=10)[-1]
            med = statistics.median(ts)
            print(f"{k:34} {med:10.1f} {p90:8.1f} {med - base:18.1f}")
        # the controller holds each answer's GPUs and one CPU for HandedOut's 10 s and these
        # jobs never start: a run quicker than that pins at most (healthy nodes x CPUs)
        placed_runs = 2 * (a.rounds + 1)
        most = min(placed_runs, (lab.config.nodes - 1) * lab.config.cpus)
        print(f"jobs pinned by placement: {pinned} of {placed_runs} (at least {most} when "
              f"the run takes over 10 s); last: {last[0]}")
        if a.breakdown:
            breakdown(lab, placed, env, a.rounds)
    finally:
        lab.run("scontrol", "update", "PartitionName=main", "State=UP", check=False)
        placed.close()
        lab.stop()
        shutil.rmtree(tmp, ignore_errors=True)  # the store, client etc dir and launcher
    return 0


if __name__ == "__main__":
    sys.exit(main())
