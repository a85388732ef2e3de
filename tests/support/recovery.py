"""One recovery on a real Slurm lab: fault -> drain -> signal -> requeue -> running again.

A 2-node batch job (bench/recovery_job.py, the batch script itself via `exec`) saves a
checkpoint every K seconds and registers each one through a simulated node agent; Xid 79 is
injected on its batch host; gpufleet's controller drains the node, signals the job, requeues
it without that node and clears Slurm's 120 s requeue delay. A torn checkpoint (a step newer
than any the job saves, without a manifest, as a save killed mid-write leaves) is planted
before the fault: the requeued run must say it skips it and resume from the first run's
newest complete checkpoint. `run()` returns each step's time and the step the job resumed
from.

tests/e2e/test_recovery_slurm.py asserts on it; bench/recovery.py prints it.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gpufleet.agent.nvml_sim import append_fault
from gpufleet.scheduler.cli.simfleet import SimFleet
from gpufleet.scheduler.health.policy import PolicyConfig
from gpufleet.scheduler.recovery.manager import RecoveryConfig
from gpufleet.scheduler.service.server import Controller
from gpufleet.scheduler.slurm import CliSlurmClient, SlurmError
from gpufleet.scheduler.slurm.rest import RestSlurmClient
from gpufleet.scheduler.store import RecoveryRow, SqliteStore

from tests.slurm.harness import SlurmLab
from tests.support.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
FAULT_NODE, OTHER_NODE = "n1", "n2"
JOB_STEPS = 100_000_000  # the job never saves a step >= this: the torn one sits there
_START = re.compile(r"recovery-job start resumed_from_step=(-?\d+) restart_count=(\d+)")
_SAVED = re.compile(r"recovery-job checkpoint step=(\d+) ")


class BenchError(Exception):
    """The recovery did not happen as it should; the message says which step and why."""


@dataclass(frozen=True)
class Result:
    job_id: str
    recovery: RecoveryRow
    fault_wall_ms: int  # when the fault file was written (controller clock)
    registered_step_at_fault: int
    last_saved_step: int  # newest step the first run completed (its output says so)
    resumed_from_step: int
    torn_step: int
    torn_skipped: bool  # the requeued run logged that it ignores the torn checkpoint
    nodes_before: list[str]
    nodes_after: list[str]

    def ms_after_fault(self, at_ms: int | None) -> int | None:
        return None if at_ms is None else at_ms - self.fault_wall_ms

    def lines(self) -> list[str]:
        r = self.recovery

        def s(at: int | None) -> str:
            ms = self.ms_after_fault(at)
            return "-" if ms is None else f"{ms / 1000:.2f} s"

        lost = "-" if r.lost_work_ms is None else f"{r.lost_work_ms / 1000:.2f} s"
        return [
            f"job {self.job_id} on {','.join(self.nodes_before)}; Xid 79 on {FAULT_NODE}",
            f"fault -> drain:         {s(r.drain_ms)}",
            f"fault -> signal:        {s(r.signal_ms)}",
            f"fault -> requeue:       {s(r.requeue_ms)}",
            f"fault -> running again: {s(r.running_ms)} (on {','.join(self.nodes_after)})",
            f"resumed from step {self.resumed_from_step} (last complete save "
            f"{self.last_saved_step}; registered at the fault {self.registered_step_at_fault};"
            f" torn step-{self.torn_step} "
            f"{'skipped' if self.torn_skipped else 'NOT seen'}); lost work {lost}",
        ]


def _agent_args(work: Path, sock: Path) -> Callable[[str], list[str]]:
    def args(node: str) -> list[str]:
        conf = work / f"{node}.toml"
        # the job registers its checkpoints with n2's agent (the simulator leaves the job
        # socket off unless a path is given); all slurmd "nodes" share this one host
        conf.write_text(f'job_socket_path = "{sock}"\n' if node == OTHER_NODE else "")
        return ["--config", str(conf), "--insecure"]

    return args


def _cancel(lab: SlurmLab, job_id: str) -> None:
    with contextlib.suppress(SlurmError):  # already gone
        CliSlurmClient(env=lab.env()).cancel(job_id)


def _client(lab: SlurmLab, slurm: str) -> CliSlurmClient | RestSlurmClient:
    if slurm == "rest":  # the lab's slurmrestd must be up (lab.start_restd())
        return RestSlurmClient(socket_path=lab.rest_socket, token=lab.jwt_token(),
                               env=lab.env())
    return CliSlurmClient(env=lab.env())


def run(lab: SlurmLab, work: Path, ckpt_every_s: float = 1.0, grace_s: float = 3.0,
        run_before_fault_s: float = 3.0, slurm: str = "cli") -> Result:
    """One recovery on `lab` (running, clean); agents and controller live in `work`.
    `slurm`: the controller's client, cli or rest (jobs read from the lab's slurmrestd,
    which the caller starts)."""
    work.mkdir(parents=True, exist_ok=True)
    ckpt_dir, sock = work / "ckpt", work / "n2-job.sock"
    store = SqliteStore(work / "state.db")
    ctl = Controller(store, _client(lab, slurm), listen="127.0.0.1:0",
                     policy=PolicyConfig(), recovery=RecoveryConfig(poll_s=0.1))
    fleet = SimFleet(ctl, [FAULT_NODE, OTHER_NODE], work, agent_args=_agent_args(work, sock),
                     agent_logs=True)
    fleet.start()
    job_id = ""
    try:
        wait_for(lambda: {n.name for n in store.nodes()} >= {FAULT_NODE, OTHER_NODE}, 30,
              "both agents to say hello")
        wait_for(sock.exists, 15, f"n2's agent job socket {sock}")

        out = work / "job.out"
        job_id = str(lab.sbatch(
            # no --nodelist: a job that requires the bad node could never run again; an idle
            # lab gives the lowest names, n1 and n2 (checked below)
            "-N2", "--requeue",
            f"--comment=gpufleet-ckpt:grace_s={grace_s:g}", "--open-mode=append", f"-o{out}",
            "--export=ALL,GPUFLEET_CKPT_DIR=" + str(ckpt_dir) + ",GPUFLEET_AGENT_SOCKET="
            + str(sock) + f",PYTHONPATH={REPO}",
            # exec: the signal goes to the batch shell (scancel --batch), so python must be it
            # (a lab of Slurm 24.11+ runs jobs in its root: host_argv reaches this Python)
            "--wrap", f"exec {shlex.join(lab.host_argv([sys.executable]))} "
                      f"{REPO / 'bench' / 'recovery_job.py'} "
                      f"--steps {JOB_STEPS} --step-time-s 0.01 --ckpt-every-s {ckpt_every_s:g}",
        ))
        lab.wait_job_state(int(job_id), "RUNNING", 30)
        nodes_before = lab.job_nodes(int(job_id))
        if nodes_before != [FAULT_NODE, OTHER_NODE]:
            raise BenchError(f"job {job_id} got {nodes_before}, not n1,n2: is the lab idle?")
        wait_for(lambda: store.checkpoint(job_id) is not None, 30, "a registered checkpoint")
        time.sleep(run_before_fault_s)
        ck = store.checkpoint(job_id)
        assert ck is not None

        # A torn checkpoint newer than any the job can ever save (no manifest: a save killed
        # mid-write). Planted now, while the first run still runs, so it is there before the
        # requeued run looks, whenever that is: the first run never looks again, and its
        # saves (keep=3) leave a torn step above their newest complete one alone
        # (job.prune: it may be another process's save in progress).
        torn_step = JOB_STEPS
        torn = ckpt_dir / f"step-{torn_step}"
        torn.mkdir(parents=True)
        (torn / "model.json").write_text('{"step": ')

        fault_wall_ms = int(time.time() * 1000)
        append_fault(fleet.faults_path(FAULT_NODE), {"kind": "xid", "gpu": 3, "xid": 79})

        def final() -> RecoveryRow | None:
            rows = [r for r in store.recoveries(job_id)
                    if r.status not in {"requeued", "running"}]
            return rows[-1] if rows else None

        wait_for(lambda: final() is not None, 60, "the job to run again")
        rec = final()
        assert rec is not None
        if rec.status != "running_again":
            raise BenchError(f"recovery ended {rec.status}: {rec.detail}")
        wait_for(lambda: len(_START.findall(out.read_text())) >= 2, 30,
                 "the requeued job to print its start line")
        # The requeue is asynchronous: the first run goes on (and may save again) until
        # slurmd kills it, after the controller has recorded the requeue. Slurm starts the
        # requeued run only once the first one has ended, and the output is appended to
        # (--open-mode=append): everything before the second start line is the first run's.
        text = out.read_text()
        first, second = list(_START.finditer(text))[:2]
        before_second = text[first.end():second.start()]
        saved = [int(m) for m in _SAVED.findall(before_second)]
        return Result(
            job_id=job_id, recovery=rec, fault_wall_ms=fault_wall_ms,
            registered_step_at_fault=ck.step, last_saved_step=max(saved) if saved else -1,
            resumed_from_step=int(second.group(1)), torn_step=torn_step,
            # job.latest() warns about each torn checkpoint it skips (on stderr, which the
            # job's -o file takes too), before the run prints its start line
            torn_skipped=f"ignoring checkpoint {torn}: manifest missing" in before_second,
            nodes_before=nodes_before, nodes_after=lab.job_nodes(int(job_id)),
        )
    finally:
        if job_id:
            _cancel(lab, job_id)
        fleet.close()
