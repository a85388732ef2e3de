"""A controller in this process and simulated agents as `gpufleet-agent` programs on loopback:
what `gpufleet demo` runs, and what the end-to-end tests and benches start around a real or
fake Slurm. The controller never imports the agent: agents are separate processes of the
installed program, each with its own state directory (and so its own simulator fault file).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from gpufleet.scheduler.service.server import Controller
from gpufleet.scheduler.store import StateStore


def agent_argv() -> list[str]:
    """The agent program beside this Python (a virtual environment's script), else the module."""
    exe = shutil.which("gpufleet-agent", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "gpufleet.agent"]


class SimFleet:
    """`ctl` (built, not yet started) and one `gpufleet-agent run --gpu-backend simulated` per
    node, reporting to it. `start()` (or entering it as a context manager) starts the
    controller and then the agents; `close()` (or leaving it) stops the agents (SIGTERM,
    SIGKILL after 10 s), the controller, and closes the controller's store.

    `agent_args(node)`: more arguments for that node's agent. `agent_logs`: each agent's
    output goes to `work`/agent-NODE.log instead of this process's.
    """

    def __init__(self, ctl: Controller, nodes: Sequence[str], work: Path, *,
                 agent_args: Callable[[str], Sequence[str]] = lambda _node: (),
                 agent_logs: bool = False) -> None:
        self.ctl = ctl
        self.nodes = list(nodes)
        self.work = work
        self._agent_args = agent_args
        self._agent_logs = agent_logs
        self.agents: list[subprocess.Popen[bytes]] = []

    @property
    def store(self) -> StateStore:
        return self.ctl.store

    def state_dir(self, node: str) -> Path:
        return self.work / node

    def faults_path(self, node: str) -> Path:
        """The simulator's fault file of `node` (what `gpufleet-agent sim inject` appends to)."""
        return self.state_dir(node) / "sim-faults.json"

    def registered(self) -> bool:
        """Every node's agent has said hello to the controller."""
        return {n.name for n in self.store.nodes()} >= set(self.nodes)

    def _start_agent(self, node: str) -> subprocess.Popen[bytes]:
        argv = [*agent_argv(), "run", "--gpu-backend", "simulated", "--node-name", node,
                "--controller", f"127.0.0.1:{self.ctl.port}",
                "--state-dir", str(self.state_dir(node)), "--metrics-listen", "",
                *self._agent_args(node)]
        if not self._agent_logs:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        with (self.work / f"agent-{node}.log").open("wb") as log:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT)

    def start(self) -> None:
        """The controller, then the agents; if an agent cannot start, everything stops."""
        self.ctl.start()
        try:
            for node in self.nodes:
                self.agents.append(self._start_agent(node))
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> SimFleet:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for p in self.agents:
            p.terminate()
        for p in self.agents:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.ctl.stop()
        self.store.close()
