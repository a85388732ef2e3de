"""Shared pieces of the spool fault tests: a TCP proxy that cuts an agent off its controller,
a real agent process on the simulated NVML, and a recorder of what the controller applied."""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpufleet.agent.accounting import write_hook_file
from gpufleet.agent.nvml_sim import append_fault
from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.scheduler.service.ingest import Ingestor

from tests.support.net import free_port


class TcpProxy:
    """127.0.0.1:port -> 127.0.0.1:target. `cut()` closes the listener and every connection
    (the agent sees the controller vanish); `restore()` listens on the same port again."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def restore(self) -> None:
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", self.port))
        lst.listen(16)
        self._listener = lst
        self._thread = threading.Thread(target=self._accept, args=(lst,), daemon=True)
        self._thread.start()

    start = restore

    def cut(self) -> None:
        lst, self._listener = self._listener, None
        if lst is not None:
            with contextlib.suppress(OSError):
                lst.shutdown(socket.SHUT_RDWR)
            lst.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            socks, self._socks = self._socks, set()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept(self, lst: socket.socket) -> None:
        while True:
            try:
                client, _ = lst.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        pair = {a: b, b: a}
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 1.0)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    pair[s].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()


@dataclass
class Applied:
    """What the controller's ingest was handed, in order: (instance, seq, body, duplicate)."""

    rows: list[tuple[str, int, str, bool]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # time.monotonic() of each row

    def stored(self) -> list[tuple[str, int, str]]:
        return [(i, s, b) for i, s, b, dup in self.rows if not dup]


def record_ingest(ingest: Ingestor) -> Applied:
    """Wrap `ingest.handle` (the servicer calls it per report) to log each report it applied."""
    applied = Applied()
    handle = ingest.handle

    def recording(node: str, msg: pb.AgentMessage) -> int:
        before = ingest.counters.duplicates
        seq = handle(node, msg)
        applied.rows.append((msg.agent_instance, msg.seq, msg.WhichOneof("body") or "",
                             ingest.counters.duplicates != before))
        applied.times.append(time.monotonic())
        return seq

    ingest.handle = recording  # type: ignore[method-assign]
    return applied


@dataclass
class AgentProc:
    """A real `gpufleet-agent run` process on the simulated NVML."""

    base: Path
    controller_port: int
    interval_s: float = 0.02
    node: str = "gpu01"
    extra: str = ""
    metrics_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[str] | None = None
    logs: list[str] = field(default_factory=list)

    @property
    def state_dir(self) -> Path:
        return self.base / "state"

    @property
    def faults(self) -> Path:
        return self.base / "faults.json"

    def start(self) -> None:
        cfg = self.base / "agent.toml"
        cfg.write_text(
            f'controller = "127.0.0.1:{self.controller_port}"\n'
            'gpu_backend = "simulated"\n'
            'sim_profile = "dgx-h100"\n'
            f'sim_faults_path = "{self.faults}"\n'
            f'node_name = "{self.node}"\n'
            f'state_dir = "{self.state_dir}"\n'
            f'sysfs_root = "{self.base / "no-sys"}"\n'
            f'metrics_listen = "127.0.0.1:{self.metrics_port}"\n'
            f"interval_s = {self.interval_s}\n"
            # every sample is a report (the pre-heartbeat wire): these tests count how many
            # queued reports come through a cut-off, so each cycle must queue one
            "heartbeat_interval_s = 0\n"
            f'disk_paths = ["{self.base}"]\n'
            f"{self.extra}"
        )
        log = (self.base / f"agent-{len(self.logs)}.log").open("w")
        self.logs.append(log.name)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpufleet.agent", "run", "--config", str(cfg)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
        log.close()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stop the process by its PID; its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=5)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return "".join(Path(p).read_text() for p in self.logs)

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            m = re.match(r"^(gpufleet_[a-z_]+(?:\{[^}]*\})?) (\S+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def metric(self, name: str, default: float = -1.0) -> float:
        try:
            return self.metrics().get(name, default)
        except OSError:
            return default

    def inject_xid(self, gpu: int, xid: int, fault_id: str) -> None:
        append_fault(self.faults, {"id": fault_id, "kind": "xid", "gpu": gpu, "xid": xid})

    def job(self, kind: str, job_id: str, gpus: list[int], now_ms: int) -> None:
        job: dict[str, Any] = {"job_id": job_id, "gpus": [str(g) for g in gpus],
                               "user": "alice", "account": "phys"}
        write_hook_file(self.state_dir, kind, job, now_ms)


def now_ms() -> int:
    return int(time.time() * 1000)
