"""Fault -> back in service through the repair loop: a fault injected into a simulated agent,
drained, remediated, diagnosed, resumed. Prints p50/max over the rounds, and the share of each
step (fault -> drain, drain -> remedy sent, remedy -> diag sent, diag -> resumed).

`--fault xid95` (default): GPU reset by the agent. `--fault xid79`: `scontrol reboot ASAP
nextstate=DOWN` through the lab's RebootProgram (tests/slurm/reboot.py: slurmd restarted with
a new boot time, the agent back with a new boot id); needs `--real-slurm`.

Default: the controller with the in-memory Slurm of the tests (no root needed), over real
gRPC on loopback. `--real-slurm` runs against the real Slurm 22.05 lab (root; takes
/tmp/gpufleet-slurm.lock like the tests).

    .venv/bin/python bench/repair.py [--rounds 5] [--diag-level 1] [--real-slurm] [--fault xid79]
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


LAB_DIR = Path("/tmp/gf-lab-repair")  # noqa: S108 - the bench's own lab
XIDS = {"xid95": 95, "xid79": 79}


@contextlib.contextmanager
def _slurm(real: bool) -> Iterator[tuple[Any, Callable[[str], str], dict[str, str] | None]]:
    if not real:
        from tests.scheduler.fakes import FakeSlurm

        fake = FakeSlurm(["n1"])
        yield fake, lambda n: fake.state[n][0], None
        return
    import dataclasses
    import fcntl
    import shutil

    from gpufleet.scheduler.slurm import CliSlurmClient

    from tests.slurm.harness import SlurmLab, SlurmLabConfig
    from tests.slurm.reboot import stop_reboots, write_reboot_program

    # the lock the real-Slurm tests take (fixed ports, /run/munge): one lab at a time
    with open("/tmp/gpufleet-slurm.lock", "w") as lock:  # noqa: S108 - the shared lock
        fcntl.flock(lock, fcntl.LOCK_EX)
        cfg = SlurmLabConfig(lab_dir=LAB_DIR, nodes=2, leaves=1, ctld_port=9927,
                             node_port0=20201)
        program = write_reboot_program(LAB_DIR, cfg.etc / "slurm.conf")
        lab = SlurmLab(dataclasses.replace(
            cfg, extra_conf=f"RebootProgram={program}\nResumeTimeout=600\n"))
        lab.start()
        try:
            yield CliSlurmClient(env=lab.env()), lab.node_state, lab.env()
        finally:
            stop_reboots(LAB_DIR)
            lab.stop()
            shutil.rmtree(LAB_DIR, ignore_errors=True)


@contextlib.contextmanager
def _agent(ctl: Controller, real: bool, work: Path) -> Iterator[tuple[Callable[[], bool], Path]]:
    """n1's agent: (registered?, its fault file). On the real lab it is one that the lab's
    RebootProgram can reboot."""
    def agent_args(_node: str) -> tuple[str, ...]:
        return ("--interval-s", "0.1")

    if not real:
        with SimFleet(ctl, ["n1"], work, agent_args=agent_args) as fleet:
            yield fleet.registered, fleet.faults_path("n1")
        return
    from tests.slurm.reboot import RebootingAgents

    ctl.start()
    agents = RebootingAgents(LAB_DIR, ["n1"], ctl.port, agent_args=agent_args)
    agents.start()
    try:
        yield lambda: bool(ctl.store.nodes()), agents.faults_path("n1")
    finally:
        agents.close()
        ctl.stop()
        ctl.store.close()


def one_round(real: bool, level: int, fault: str, work: Path) -> dict[str, float]:
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
        with _agent(ctl, real, work) as (registered, faults_path):
            wait_for(registered, 30, "the agent's hello", step_s=0.005)
            t0 = time.time()
            append_fault(faults_path, {"kind": "xid", "gpu": 2, "xid": XIDS[fault]})
            wait_for(lambda: "DRAIN" in state("n1"), 30, lambda: f"n1 drained ({state('n1')})",
                     step_s=0.005)
            t_drain = time.time()
            # back: resumed by the loop (a rebooted node is DOWN, not DRAIN, until then)
            wait_for(lambda: any(r.get("step") == "resumed" for r in journal.history("n1")),
                     300, lambda: f"n1 resumed ({state('n1')})", step_s=0.005)
            wait_for(lambda: state("n1").split("+")[0] == "IDLE" and "DRAIN" not in state("n1"),
                     60, lambda: f"n1 idle ({state('n1')})", step_s=0.005)
            t_back = time.time()
            at = {r["step"]: r["ts_ms"] / 1000 for r in journal.history("n1")
                  if r.get("type") == "step"}
            return {"total": t_back - t0, "fault->drain": t_drain - t0,
                    "drain->remedy sent": at["remediating"] - t_drain,
                    "remedy->diag sent": at["diagnosing"] - at["remediating"],
                    "diag->resumed": at["resumed"] - at["diagnosing"]}

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--diag-level", type=int, choices=(1, 2, 3), default=1)
    ap.add_argument("--real-slurm", action="store_true")
    ap.add_argument("--fault", choices=tuple(XIDS), default="xid95")
    a = ap.parse_args()
    if a.fault == "xid79" and not a.real_slurm:
        ap.error("--fault xid79 (the reboot path) needs --real-slurm: the in-memory Slurm "
                 "has no RebootProgram")
    results = []
    for i in range(a.rounds):
        with tempfile.TemporaryDirectory(prefix="gf-repair-") as d:
            r = one_round(a.real_slurm, a.diag_level, a.fault, Path(d))
        results.append(r)
        print(f"round {i + 1}: fault -> back in service {r['total']:.2f} s", flush=True)
    where = "real Slurm 22.05" if a.real_slurm else "in-memory Slurm, loopback gRPC"
    remedy = "scontrol reboot (RebootProgram)" if a.fault == "xid79" else "GPU reset"
    print(f"\nXid {XIDS[a.fault]} -> drain -> {remedy} -> diag level {a.diag_level} -> "
          f"resumed, {where}, {a.rounds} rounds:")
    for key in results[0]:
        vals = [r[key] for r in results]
        print(f"  {key:<18} p50 {statistics.median(vals):6.2f} s   max {max(vals):6.2f} s")


if __name__ == "__main__":
    main()
