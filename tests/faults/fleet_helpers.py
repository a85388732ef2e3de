"""Shared pieces of the fault tests: real controller and agent processes, a GPU load the test
decides, job hooks at exact times, and readers for what the store ended up with.

Everything here runs the real programs: `gpufleet controller` and `gpufleet-agent run` as
processes (killed with SIGKILL by PID), the real `gpufleet-agent prolog|epilog` hooks, and the
real SQLite store. Two things are test devices, and say so:

* **Deterministic GPU load.** The NVML simulator's utilisation is a sine of the process's
  monotonic time and its energy counter integrates that, so no two runs would agree to the
  millijoule. `python -m tests.faults.fleet_helpers agent ARGS...` runs the agent's own
  `main(ARGS)` with the simulator's utilisation and total-energy counter read from a JSON
  file the test writes (`SimLoad`): utilisation per GPU, and the energy counter per GPU as an
  absolute value that only the test advances. The counter keeps its value across agent
  restarts, as a real GPU's does (it counts from driver load, not from agent start).
* **Exact hook times.** The hooks stamp the wall clock; the test runs them under libfaketime
  with a frozen clock (`FAKETIME=<epoch seconds>`), so a job's start and end are whole
  seconds the test chose and allocated time is the same in every run.

Simulated faults go through the simulator's fault file, one file per agent incarnation: a
restarted agent's simulator re-reads its whole fault file, and an XID in it would fire again
as a new event, which a real GPU never does. So a new incarnation gets the *state* an XID
left (Xid 48 -> one more double-bit ECC error, Xid 79 -> GPU lost), not the event.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support import wait_for as support_wait_for
from tests.support.net import free_port

REPO = Path(__file__).resolve().parents[2]
FAKETIME_LIBS = (
    Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"),
    Path("/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1"),
    Path("/usr/lib/faketime/libfaketime.so.1"),
)
# what an Xid leaves behind in the simulated GPU (for the next agent incarnation)
_XID_STATE: dict[int, dict[str, Any]] = {48: {"kind": "ecc_dbe"}, 79: {"kind": "gpu_lost"}}


def faketime_lib() -> Path | None:
    return next((p for p in FAKETIME_LIBS if p.exists()), None)


def faketime_env(spec: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment that runs a program under libfaketime with FAKETIME=spec.

    "+600" / "-600" / "+8d": the wall clock runs, offset; whole epoch seconds (e.g.
    "1709294407") freeze it at exactly that second (FAKETIME_FMT=%s).
    """
    lib = faketime_lib()
    if lib is None:
        raise RuntimeError("libfaketime not installed (Debian package faketime)")
    env = dict(os.environ if base is None else base)
    env["LD_PRELOAD"] = str(lib)
    env["FAKETIME"] = spec
    if spec.isdigit():
        env["FAKETIME_FMT"] = "%s"
    # only the wall clock is wrong, as on a node whose NTP is off: Python's and gRPC's
    # timed waits use CLOCK_MONOTONIC deadlines the kernel checks on the real clock, so a
    # faked monotonic clock makes every wait 10 minutes long (or zero)
    env["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"
    return env



# While processes start, die and restart, a read of the SQLite file, a state file or a socket
# can fail: that is "not yet", not a failure.
wait_for = functools.partial(support_wait_for, ignore=(OSError, ValueError, sqlite3.Error))


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _kill9(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    if proc is not None:
        proc.wait(10)


# ---------------------------------------------------------------- controller


@dataclass
class ControllerProc:
    """`gpufleet controller` on a fixed port, started, killed -9 and started again by PID."""

    db: str
    log_dir: Path
    port: int = field(default_factory=free_port)
    extra_args: Sequence[str] = ()
    env: Mapping[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> None:
        self.starts += 1
        log = (self.log_dir / f"controller-{self.starts}.log").open("wb")
        with log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gpufleet.scheduler", "controller", "--db", self.db,
                 "--listen", self.address, "--insecure", "--metrics-listen", "", "-v",
                 *self.extra_args],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
                env=dict(self.env) if self.env is not None else None,
            )
        if wait:
            wait_for(lambda: _port_open(self.port), 30, f"controller on {self.address}")

    def kill9(self) -> None:
        _kill9(self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                _kill9(self.proc)

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace")
                       for p in sorted(self.log_dir.glob("controller-*.log")))


# ---------------------------------------------------------------- simulated GPU load


class SimLoad:
    """The GPU load a node's simulator reports: utilisation % and energy counter (mJ) per GPU.

    Written atomically; the agent's simulator re-reads it when its mtime changes."""

    def __init__(self, path: Path, gpus: int) -> None:
        self.path = path
        self.util_pct = dict.fromkeys(range(gpus), 0)
        self.energy_mj = {g: 1_000_000_000 * (g + 1) for g in range(gpus)}
        self.write()

    def write(self) -> None:
        doc = {"util_pct": {str(g): u for g, u in self.util_pct.items()},
               "energy_mj": {str(g): e for g, e in self.energy_mj.items()}}
        tmp = self.path.with_suffix(f".{time.monotonic_ns()}.tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.path)

    def set_util(self, util: Mapping[int, int]) -> None:
        self.util_pct.update(util)
        self.write()

    def add_energy(self, add_mj: Mapping[int, int]) -> None:
        for g, e in add_mj.items():
            self.energy_mj[g] += e
        self.write()


def _install_sim_load(path: str) -> None:
    """Make the NVML simulator of this process report the load in `path` (see SimLoad)."""
    from gpufleet.agent import nvml_sim

    cache: dict[str, Any] = {"mtime": -1, "doc": {"util_pct": {}, "energy_mj": {}}}

    def doc() -> dict[str, Any]:
        try:
            mtime = os.stat(path).st_mtime_ns
            if mtime != cache["mtime"]:
                cache["doc"] = json.loads(Path(path).read_text())
                cache["mtime"] = mtime
        except (OSError, ValueError):
            pass  # replaced atomically; a failed read keeps the last good one
        return dict(cache["doc"])

    def utilization(_self: Any, g: Any) -> float:
        return float(doc()["util_pct"].get(str(g.index), 0))

    def energy(handle: Any) -> int:
        g = nvml_sim._s().gpu(handle)  # raises GpuIsLost for a lost GPU, as NVML does
        return int(doc()["energy_mj"].get(str(g.index), 0))

    nvml_sim._Simulator.utilization = utilization  # type: ignore[method-assign, assignment]
    nvml_sim.nvmlDeviceGetTotalEnergyConsumption = energy


# ---------------------------------------------------------------- agent


@dataclass
class AgentProc:
    """One node's `gpufleet-agent run` (simulated GPUs, load from SimLoad), killable by PID.

    `clock`: a libfaketime FAKETIME spec ("+600", "-600", "+8d") to skew the agent's clock."""

    node: str
    base: Path
    controller: str
    gpus: int = 4
    profile: str = "l40s-pcie"
    interval_s: float = 0.25
    # several heartbeats inside the shortest unreachable_after_s a test uses (3 s); 0 sends
    # every sample (the pre-heartbeat wire: a load generator)
    heartbeat_interval_s: float = 0.5
    clock: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    incarnation: int = 0
    state_faults: list[dict[str, Any]] = field(default_factory=list)
    load: SimLoad = field(init=False)

    def __post_init__(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.load = SimLoad(self.base / f"{self.node}-load.json", self.gpus)

    @property
    def state_dir(self) -> Path:
        return self.base / self.node

    @property
    def faults_path(self) -> Path:
        return self.base / f"{self.node}-faults-{self.incarnation}.json"

    def start(self) -> None:
        self.incarnation += 1
        self.faults_path.write_text(json.dumps({"faults": [
            {"id": f"state-{i}", **f} for i, f in enumerate(self.state_faults)]}))
        cfg = self.base / f"{self.node}.toml"
        cfg.write_text(
            f'node_name = "{self.node}"\ncontroller = "{self.controller}"\n'
            f'gpu_backend = "simulated"\nsim_profile = "{self.profile}"\n'
            f'sim_faults_path = "{self.faults_path}"\nstate_dir = "{self.state_dir}"\n'
            f'metrics_listen = ""\nkmsg_path = ""\njob_socket_path = ""\n'
            f"interval_s = {self.interval_s}\n"
            f"heartbeat_interval_s = {self.heartbeat_interval_s}\n"
            # every sample reads the energy counter: the test moves it when it likes
            "nvml_counter_interval_s = 0\n"
            f'disk_paths = ["{self.base}"]\n'
        )
        env = faketime_env(self.clock) if self.clock else dict(os.environ)
        log = (self.base / f"{self.node}-agent-{self.incarnation}.log").open("wb")
        with log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.faults.fleet_helpers", "agent",
                 str(self.load.path), "run", "--config", str(cfg), "-v"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
                env=env,
            )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        _kill9(self.proc)

    def stop(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                _kill9(self.proc)

    def pause(self) -> None:
        if self.alive:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.alive:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGCONT)

    def inject_xid(self, gpu: int, xid: int) -> None:
        from gpufleet.agent.nvml_sim import append_fault

        append_fault(self.faults_path, {"kind": "xid", "gpu": gpu, "xid": xid})
        if xid in _XID_STATE:
            self.state_faults.append({**_XID_STATE[xid], "gpu": gpu})

    def jobs(self) -> dict[str, dict[str, Any]]:
        """The jobs in the agent's accounting state file (what it has applied and saved)."""
        try:
            doc = json.loads((self.state_dir / "accounting.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return {str(j["job_id"]): j for j in doc.get("jobs", [])}

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace")
                       for p in sorted(self.base.glob(f"{self.node}-agent-*.log")))


def run_hook(kind: str, state_dir: Path, job_id: str, gpus: Sequence[int], at_s: int,
             user: str = "alice", account: str = "phys") -> subprocess.Popen[bytes]:
    """Start the real `gpufleet-agent prolog|epilog` with its clock frozen at `at_s`."""
    env = faketime_env(str(at_s))
    env.update(SLURM_JOB_ID=job_id, SLURM_JOB_GPUS=",".join(str(g) for g in gpus),
               SLURM_JOB_USER=user, SLURM_JOB_ACCOUNT=account)
    return subprocess.Popen(
        [sys.executable, "-m", "gpufleet.agent", kind, "--state-dir", str(state_dir)],
        env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def finish_hooks(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        out, _ = p.communicate(timeout=30)
        # the hooks exit 0 whatever happens and say why on stderr: silence is success
        assert p.returncode == 0 and not out.strip(), out.decode(errors="replace")


# ---------------------------------------------------------------- what the store holds


@dataclass(frozen=True)
class GpuUse:
    allocated_ms: int
    busy_ms: int
    energy_mj: int
    ended: bool


def ledger(db: str) -> dict[tuple[str, str, int], GpuUse]:
    """(job, node, gpu) -> totals, read from the SQLite store's ledger table."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT job_id, node, gpu_index, allocated_ms, busy_ms, energy_mj, "
                            "end_ms FROM acct_ledger").fetchall()
    return {(str(r[0]), str(r[1]), int(r[2])): GpuUse(int(r[3]), int(r[4]), int(r[5]),
                                                      r[6] is not None) for r in rows}


def sql(db: str, query: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return list(conn.execute(query, args).fetchall())


def acct_json(db: str, *args: str) -> dict[str, Any]:
    """`gpufleet acct --json` as a user runs it."""
    out = subprocess.run(
        [sys.executable, "-m", "gpufleet.scheduler", "acct", "--db", db, "--json",
         "-S", "2000-01-01", *args],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


@contextlib.contextmanager
def stopped_all(procs: Sequence[AgentProc | ControllerProc]) -> Iterator[None]:
    """Stop (SIGTERM) every process at the end, whatever happened."""
    try:
        yield
    finally:
        for p in procs:
            with contextlib.suppress(Exception):
                p.stop()


def _main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] != "agent":
        sys.exit("usage: python -m tests.faults.fleet_helpers agent LOAD.json AGENT-ARGS...")
    _install_sim_load(argv[1])
    from gpufleet.agent.cli import main

    main(argv[2:], prog_name="gpufleet-agent")


if __name__ == "__main__":
    _main(sys.argv[1:])
