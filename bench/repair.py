"""Fault -> back in service through the repair loop: Xid 95 injected into a simulated agent,
drained, GPU reset by the agent, diagnosed, resumed. Prints p50/max over the rounds, and the
share of each step (fault -> drain, drain -> reset sent, reset -> diag sent, diag -> resumed).

Default: the controller with the in-memory Slurm of the tests (no root needed), over real
gRPC on loopback. `--real-slurm` runs against the real Slurm 22.05 lab (root; takes
/tmp/gpufleet-slurm.lock like the tests).

    .venv/bin/python bench/repair.py [--rounds 5] [--diag-level 1] [--real-slurm]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gpufleet.agent.nvml_sim import append_fault  # noqa: E402
from gpufleet.scheduler.cli.simfleet import SimFleet  # noqa: E402
from gpufleet.scheduler.health.policy import PolicyConfig  # noqa: E402
from gpufleet.scheduler.repair import Journal, RepairConfig  # noqa: E402
from gpufleet.scheduler.service.server import Controller  # noqa: E402
from gpufleet.scheduler.store import SqliteStore  # noqa: E402

from tests.support import wait_for  # noqa: E402

STEPS = ("drain", "remediating", "diagnosing", "resumed")


@contextlib.contextmanager
def _slurm(real: bool) -> Iterator[tuple[Any, Callable[[str], str], dict[str, str] | None]]:
    if not real:
        from tests.scheduler.fakes import FakeSlurm

        fake = FakeSlurm(["n1"])
        yield fake, lambda n: fake.state[n][0], None
        return
    import fcntl

    from gpufleet.scheduler.slurm import CliSlurmClient

    from tests.slurm.harness import SlurmLab, SlurmLabConfig

    # the lock the real-Slurm tests take (fixed ports, /run/munge): one lab at a time
    with open("/tmp/gpufleet-slurm.lock", "w") as lock:  # noqa: S108 - the shared lock
        fcntl.flock(lock, fcntl.LOCK_EX)
        lab = SlurmLab(SlurmLabConfig(lab_dir=Path("/tmp/gf-lab-repair"),  # noqa: S108 - a lab
                                      nodes=2, leaves=1, ctld_port=9927, node_port0=20201))
        lab.start()
        try:
            yield CliSlurmClient(env=lab.env()), lab.node_state, lab.env()
        finally:
            lab.stop()


def one_round(real: bool, level: int, work: Path) -> dict[str, float]:
    with _slurm(real) as (slurm, state, env):
        journal = Journal(work / "repair.jsonl")
        kw: dict[str, Any] = {}
        if env is not None:
            from gpufleet.scheduler.slurm.repair_calls import CliPartitions, CliRebooter

            kw = {"rebooter": CliRebooter(env=env), "partition_of": CliPartitions(env=env)}
        else:
            kw = {"rebooter": None, "partition_of": lambda _n: "gpu"}
        ctl = Controller(SqliteStore(work / "state.db"), slurm, listen="127.0.0.1:0",
                         metrics_listen=None,
                         policy=PolicyConfig(tick_s=0.05, resume_quiet_s=60),
                         repair=RepairConfig(tick_s=0.05, diag_level=level),
                         repair_journal=str(journal.path), **kw)
        with SimFleet(ctl, ["n1"], work, agent_args=lambda _: ("--interval-s", "0.1")) as fleet:
            wait_for(fleet.registered, 30, "the agent's hello", step_s=0.005)
            t0 = time.time()
            append_fault(fleet.faults_path("n1"), {"kind": "xid", "gpu": 2, "xid": 95})
            wait_for(lambda: "DRAIN" in state("n1"), 30, lambda: f"n1 drained ({state('n1')})",
                     step_s=0.005)
            t_drain = time.time()
            wait_for(lambda: "DRAIN" not in state("n1"), 120,
                     lambda: f"n1 resumed ({state('n1')})", step_s=0.005)
            t_back = time.time()
            at = {r["step"]: r["ts_ms"] / 1000 for r in journal.history("n1")
                  if r.get("type") == "step"}
            return {"total": t_back - t0, "fault->drain": t_drain - t0,
                    "drain->reset sent": at["remediating"] - t_drain,
                    "reset->diag sent": at["diagnosing"] - at["remediating"],
                    "diag->resumed": at["resumed"] - at["diagnosing"]}

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--diag-level", type=int, choices=(1, 2, 3), default=1)
    ap.add_argument("--real-slurm", action="store_true")
    a = ap.parse_args()
    results = []
    for i in range(a.rounds):
        with tempfile.TemporaryDirectory(prefix="gf-repair-") as d:
            r = one_round(a.real_slurm, a.diag_level, Path(d))
        results.append(r)
        print(f"round {i + 1}: fault -> back in service {r['total']:.2f} s", flush=True)
    where = "real Slurm 22.05" if a.real_slurm else "in-memory Slurm, loopback gRPC"
    print(f"\nXid 95 -> drain -> GPU reset -> diag level {a.diag_level} -> resumed, {where}, "
          f"{a.rounds} rounds:")
    for key in results[0]:
        vals = [r[key] for r in results]
        print(f"  {key:<18} p50 {statistics.median(vals):6.2f} s   max {max(vals):6.2f} s")


if __name__ == "__main__":
    main()
