"""The controller's repair commands, run on the node: GPU reset and diagnostic.

Commands arrive on the agent's stream (`gpufleet.agent.wire` turns them into `Command`s); each
runs on one worker thread, in order, and its `CommandResult` goes back through the outbox with
the command's request_id. It never sees protobuf: the wire is `wire`'s.

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
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path

from gpufleet.agent import diag
from gpufleet.agent.telemetry import GpuBackend

log = logging.getLogger(__name__)

RESET_TIMEOUT_S = 120.0
MAX_EVIDENCE = 1000  # the controller bounds strings at 1024 characters


def _ms() -> int:
    return int(time.time() * 1000)


class CommandKind(StrEnum):
    """The repair commands this agent runs (the wire has others it does not)."""

    RESET_GPU = "reset_gpu"  # reset gpu_indices (all when empty), only if no process holds them
    RUN_DIAG = "run_diag"  # `gpufleet-agent diag --level diag_level`


@dataclass(frozen=True)
class Command:
    kind: CommandKind
    request_id: str
    gpu_indices: tuple[int, ...] = ()
    diag_level: int = 0  # 0: not given, level 1


@dataclass(frozen=True)
class CommandResult:
    ok: bool
    detail: str
    could_not_run: bool = False  # reset refused (a process holds the GPU), diagnostic exit 2
    tool: str = ""  # a diagnostic's: "gpufleet" | "dcgmi"
    checks: tuple[diag.Check, ...] = ()  # a diagnostic's, failed first, bounded for the wire
    # set by CommandRunner.execute, from the command and the clock
    request_id: str = ""
    kind: CommandKind | None = None
    started_ms: int = 0
    finished_ms: int = 0


class CommandRunner:
    def __init__(
        self,
        backend: GpuBackend,
        send: Callable[[CommandResult], object],
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
        self._q: queue.Queue[Command] = queue.Queue()
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="commands", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)

    def submit(self, cmd: Command) -> None:
        """From the stream thread: queue a command (a repeated request_id runs once)."""
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

    def execute(self, cmd: Command) -> CommandResult:
        started = _ms()
        if cmd.kind == CommandKind.RESET_GPU:
            res = self.reset(list(cmd.gpu_indices))
        else:
            res = self.diagnose(cmd.diag_level or 1)
        res = replace(res, request_id=cmd.request_id, kind=cmd.kind, started_ms=started,
                      finished_ms=_ms())
        log.warning("command %s %s: %s %s", cmd.kind, cmd.request_id,
                    "ok" if res.ok else "could not run" if res.could_not_run else "failed",
                    res.detail)
        return res

    def reset(self, gpus: list[int]) -> CommandResult:
        if not gpus:
            gpus = [g.index for g in self.backend.inventory()]
        procs = self.backend.compute_pids(gpus)
        unknown = [i for i in gpus if i not in procs]
        held = {i: p for i, p in procs.items() if p}
        if held or unknown:
            why = "; ".join([f"GPU {i} held by pid(s) {list(p)}" for i, p in held.items()] +
                            [f"GPU {i}: process list unknown" for i in unknown])
            return CommandResult(ok=False, could_not_run=True,
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
                    return CommandResult(ok=False, detail=f"GPU {i}: nvidia-smi: {e}")
                if p.returncode != 0:
                    msg = " ".join((p.stderr or p.stdout).split())
                    return CommandResult(
                        ok=False, detail=f"GPU {i}: nvidia-smi --gpu-reset exited "
                        f"{p.returncode}: {msg}"[:MAX_EVIDENCE])
        self.clear_xids(gpus)
        return CommandResult(ok=True, detail=f"reset GPU(s) {gpus}")

    def diagnose(self, level: int) -> CommandResult:
        report = self.run_diag(level)
        failed = report.failed()
        # failed checks first: the controller names the first one in Slurm's reason
        checks = tuple(replace(c, name=c.name[:64], evidence=c.evidence[:MAX_EVIDENCE],
                               subject=c.subject[:64])
                       for c in sorted(report.checks, key=lambda c: c.passed)[:256])
        return CommandResult(
            ok=report.passed, could_not_run=bool(report.error), tool=report.tool,
            detail=(report.error or ("passed" if report.passed else
                    "failed: " + ", ".join(c.name for c in failed)))[:MAX_EVIDENCE],
            checks=checks)
