"""Fault -> drain -> signal -> requeue -> running again, on the real Slurm 22.05 harness.

A 2-node batch job (bench/recovery_job.py, the batch script itself via `exec`) saves a
checkpoint every K seconds and registers each one through a simulated node agent; Xid 79 is
injected on its batch host; gpufleet's controller drains the node, signals the job, requeues
it without that node and clears Slurm's 120 s requeue delay. Prints each step's time after the
fault and the step the job resumed from. A torn checkpoint (a newer step without a manifest,
as a save killed mid-write leaves) is planted while the job is down: it must not be picked.

    sudo .venv/bin/python bench/recovery.py [--lab /tmp/gf-lab-rec --port 11917] [--ckpt-every-s 1]

Needs root (the harness starts slurmctld/slurmd). tests/e2e/test_recovery_slurm.py runs the
same `run()` under pytest.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make `tests.slurm.harness` importable
    sys.path.insert(0, str(REPO))

from gpufleet.agent.nvml_sim import append_fault  # noqa: E402
from gpufleet.scheduler.health.policy import PolicyConfig  # noqa: E402
from gpufleet.scheduler.recovery.manager import RecoveryConfig  # noqa: E402
from gpufleet.scheduler.service.server import Controller  # noqa: E402
from gpufleet.scheduler.slurm import CliSlurmClient, SlurmError  # noqa: E402
from gpufleet.scheduler.slurm.rest import RestSlurmClient  # noqa: E402
from gpufleet.scheduler.store import RecoveryRow, SqliteStore  # noqa: E402

from tests.slurm.harness import SlurmLab, SlurmLabConfig  # noqa: E402

FAULT_NODE, OTHER_NODE = "n1", "n2"
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
            f" torn step-{self.torn_step} ignored); lost work {lost}",
        ]


def _wait(cond: object, timeout_s: float, what: str, step_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(step_s)
    raise BenchError(f"timed out after {timeout_s:g} s waiting for {what}")


def _start_agents(work: Path, port: int, sock: Path) -> list[subprocess.Popen[bytes]]:
    agents = []
    for node in (FAULT_NODE, OTHER_NODE):
        conf = work / f"{node}.toml"
        # the job registers its checkpoints with n2's agent (the simulator leaves the job
        # socket off unless a path is given); all slurmd "nodes" share this one host
        conf.write_text(f'job_socket_path = "{sock}"\n' if node == OTHER_NODE else "")
        with (work / f"agent-{node}.log").open("wb") as log_file:
            agents.append(subprocess.Popen(
                [sys.executable, "-m", "gpufleet.agent", "run", "--config", str(conf),
                 "--gpu-backend", "simulated", "--node-name", node,
                 "--controller", f"127.0.0.1:{port}", "--insecure",
                 "--state-dir", str(work / node), "--metrics-listen", ""],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_file,
            ))
    return agents


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
    ctl.start()
    agents: list[subprocess.Popen[bytes]] = []
    job_id = ""
    try:
        agents.extend(_start_agents(work, ctl.port, sock))
        _wait(lambda: {n.name for n in store.nodes()} >= {FAULT_NODE, OTHER_NODE}, 30,
              "both agents to say hello")
        _wait(sock.exists, 15, f"n2's agent job socket {sock}")

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
                      f"--steps 100000000 --step-time-s 0.01 --ckpt-every-s {ckpt_every_s:g}",
        ))
        lab.wait_job_state(int(job_id), "RUNNING", 30)
        nodes_before = lab.job_nodes(int(job_id))
        if nodes_before != [FAULT_NODE, OTHER_NODE]:
            raise BenchError(f"job {job_id} got {nodes_before}, not n1,n2: is the lab idle?")
        _wait(lambda: store.checkpoint(job_id) is not None, 30, "a registered checkpoint")
        time.sleep(run_before_fault_s)
        ck = store.checkpoint(job_id)
        assert ck is not None

        fault_wall_ms = int(time.time() * 1000)
        append_fault(work / FAULT_NODE / "sim-faults.json", {"kind": "xid", "gpu": 3, "xid": 79})

        def requeued() -> bool:
            return any(r.requeue_ms is not None for r in store.recoveries(job_id))

        _wait(requeued, 60, "the controller to requeue the job")
        # the first run is gone: plant a torn checkpoint newer than anything saved
        text = out.read_text()
        saved = [int(m) for m in _SAVED.findall(text)]
        torn_step = (max(saved) if saved else 0) + 1_000_000
        torn = ckpt_dir / f"step-{torn_step}"
        torn.mkdir(parents=True)
        (torn / "model.json").write_text('{"step": ')  # no manifest: killed mid-write

        def final() -> RecoveryRow | None:
            rows = [r for r in store.recoveries(job_id)
                    if r.status not in {"requeued", "running"}]
            return rows[-1] if rows else None

        _wait(lambda: final() is not None, 60, "the job to run again")
        rec = final()
        assert rec is not None
        if rec.status != "running_again":
            raise BenchError(f"recovery ended {rec.status}: {rec.detail}")
        _wait(lambda: len(_START.findall(out.read_text())) >= 2, 30,
              "the requeued job to print its start line")
        starts = _START.findall(out.read_text())
        return Result(
            job_id=job_id, recovery=rec, fault_wall_ms=fault_wall_ms,
            registered_step_at_fault=ck.step, last_saved_step=max(saved) if saved else -1,
            resumed_from_step=int(starts[1][0]), torn_step=torn_step,
            nodes_before=nodes_before, nodes_after=lab.job_nodes(int(job_id)),
        )
    finally:
        if job_id:
            _cancel(lab, job_id)
        for p in agents:
            p.terminate()
        for p in agents:
            p.wait(timeout=10)
        ctl.stop()
        store.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # fixed /tmp paths on purpose: a root-only lab that the next run cleans up
    ap.add_argument("--lab", type=Path, default=Path("/tmp/gf-lab-rec"))  # noqa: S108
    ap.add_argument("--port", type=int, default=11917, help="slurmctld port (slurmd: +10183)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/gf-bench-recovery"))  # noqa: S108
    ap.add_argument("--ckpt-every-s", type=float, default=1.0)
    ap.add_argument("--grace-s", type=float, default=3.0)
    args = ap.parse_args()
    lab = SlurmLab(SlurmLabConfig(lab_dir=args.lab, ctld_port=args.port,
                                  node_port0=args.port + 10183))
    lab.start()
    try:
        import shutil

        shutil.rmtree(args.work, ignore_errors=True)
        result = run(lab, args.work, args.ckpt_every_s, args.grace_s)
    finally:
        lab.stop()
    for line in result.lines():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
