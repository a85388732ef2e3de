"""The controller's repair commands, run on the node: GPU reset and diagnostic.

Commands arrive on the agent's stream; each runs on one worker thread, in order, and its
result goes back through the outbox as a CommandResult with the command's request_id.

A GPU reset runs only when no compute process holds the GPU (NVML's process list; a GPU
that cannot tell counts as held), with `nvidia-smi --gpu-reset -i N` on real GPUs and the
simulator's "reset" fault on simulated ones. After a reset the XID verdicts of the reset GPUs
are cleared: a reset GPU starts clean, as a rebooted one does. It never touches Slurm.
"""

from __future__ import annotations

import logging
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from gpufleet.agent import diag
from gpufleet.agent.telemetry import GpuBackend
from gpufleet.rpc.v1 import fleet_pb2 as pb

log = logging.getLogger(__name__)

RESET_TIMEOUT_S = 120.0
MAX_EVIDENCE = 1000  # the controller bounds strings at 1024 characters


def _ms() -> int:
    return int(time.time() * 1000)


class CommandRunner:
    def __init__(
        self,
        backend: GpuBackend,
        send: Callable[[pb.CommandResult], object],
        run_diag: Callable[[int], diag.DiagReport],
        clear_xids: Callable[[Sequence[int]], None],
        sim_faults_path: Path | None = None,
        run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
    ) -> None:
        self.backend = backend
        self.send = send
        self.run_diag = run_diag
        self.clear_xids = clear_xids
        self.sim_faults_path = sim_faults_path
        self._run = run
        self._q: queue.Queue[pb.Command] = queue.Queue()
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="commands", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)

    def submit(self, cmd: pb.Command) -> None:
        """From the stream thread: queue a command (a repeated request_id runs once)."""
        if cmd.kind not in (pb.Command.KIND_RESET_GPU, pb.Command.KIND_RUN_DIAG):
            return
        if cmd.request_id in self._seen:
            return
        self._seen.add(cmd.request_id)
        self._q.put(cmd)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                cmd = self._q.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.send(self.execute(cmd))
            except Exception:  # one bad command must not stop the next
                log.exception("command %s failed", cmd.request_id)

    def execute(self, cmd: pb.Command) -> pb.CommandResult:
        started = _ms()
        if cmd.kind == pb.Command.KIND_RESET_GPU:
            res = self.reset(list(cmd.gpu_indices))
        else:
            res = self.diagnose(cmd.diag_level or 1)
        res.request_id, res.kind = cmd.request_id, cmd.kind
        res.started_ms, res.finished_ms = started, _ms()
        log.warning("command %s %s: %s %s", pb.Command.Kind.Name(cmd.kind), cmd.request_id,
                    "ok" if res.ok else "could not run" if res.could_not_run else "failed",
                    res.detail)
        return res

    def reset(self, gpus: list[int]) -> pb.CommandResult:
        if not gpus:
            gpus = [g.index for g in self.backend.inventory()]
        procs = self.backend.compute_pids(gpus)
        unknown = [i for i in gpus if i not in procs]
        held = {i: p for i, p in procs.items() if p}
        if held or unknown:
            why = "; ".join([f"GPU {i} held by pid(s) {list(p)}" for i, p in held.items()] +
                            [f"GPU {i}: process list unknown" for i in unknown])
            return pb.CommandResult(ok=False, could_not_run=True,
                                    detail=f"not reset: {why}"[:MAX_EVIDENCE])
        if self.sim_faults_path is not None:
            from gpufleet.agent.nvml_sim import append_fault

            for i in gpus:
                append_fault(self.sim_faults_path, {"kind": "reset", "gpu": i})
            time.sleep(0.05)  # the simulator re-reads its fault file every 20 ms
        else:
            for i in gpus:
                try:
                    p = self._run(["nvidia-smi", "--gpu-reset", "-i", str(i)],
                                  capture_output=True, text=True, timeout=RESET_TIMEOUT_S,
                                  check=False)
                except (OSError, subprocess.TimeoutExpired) as e:
                    return pb.CommandResult(ok=False, detail=f"GPU {i}: nvidia-smi: {e}")
                if p.returncode != 0:
                    msg = " ".join((p.stderr or p.stdout).split())
                    return pb.CommandResult(
                        ok=False, detail=f"GPU {i}: nvidia-smi --gpu-reset exited "
                        f"{p.returncode}: {msg}"[:MAX_EVIDENCE])
        self.clear_xids(gpus)
        return pb.CommandResult(ok=True, detail=f"reset GPU(s) {gpus}")

    def diagnose(self, level: int) -> pb.CommandResult:
        report = self.run_diag(level)
        failed = report.failed()
        res = pb.CommandResult(
            ok=report.passed, could_not_run=bool(report.error), tool=report.tool,
            detail=(report.error or ("passed" if report.passed else
                    "failed: " + ", ".join(c.name for c in failed)))[:MAX_EVIDENCE])
        # failed checks first: the controller names the first one in Slurm's reason
        for c in sorted(report.checks, key=lambda c: c.passed)[:256]:
            chk = pb.DiagCheck(name=c.name[:64], passed=c.passed,
                               evidence=c.evidence[:MAX_EVIDENCE], subject=c.subject[:64])
            if c.gpu_index is not None:
                chk.gpu_index = c.gpu_index
            res.checks.append(chk)
        return res
