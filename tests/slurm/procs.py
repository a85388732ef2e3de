"""Processes of a Slurm lab: pid files, liveness by /proc, stopping by pid (TERM, then KILL).

Only processes this lab recorded are signalled: a pid is checked against its /proc name first,
so a stale pid file never makes the lab signal a stranger."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("gpufleet.tests.slurmlab")


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def proc_alive(pid: int | None, comm: str | None = None) -> bool:
    """Alive and not a zombie (PID 1 here reaps orphans lazily); optionally check the name.

    The name check keeps a stale pid file (after a reboot) from making us signal a stranger.
    """
    if pid is None or pid <= 0:
        return False
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    state = stat_line.rsplit(")", 1)[-1].split()[0]
    return state != "Z" and (comm is None or name == comm)


def procs_named(comm: str) -> list[int]:
    """Live (non-zombie) pids whose /proc comm is `comm`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and proc_alive(int(entry.name), comm):
            pids.append(int(entry.name))
    return pids


def with_descendants(roots: Iterable[int]) -> dict[int, str]:
    """{pid: comm} of `roots` and every live descendant (a step's job processes)."""
    children: dict[int, list[int]] = {}
    comms: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text()
        except OSError:
            continue
        head, _, rest = stat_line.rpartition(")")
        fields = rest.split()
        if fields[0] == "Z":
            continue
        comms[int(entry.name)] = head.split("(", 1)[1]
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: dict[int, str] = {}
    todo = [pid for pid in roots if pid in comms]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found[pid] = comms[pid]
            todo.extend(children.get(pid, []))
    return found


def procs_with_env(name: str, value: str) -> dict[int, str]:
    """{pid: comm} of live processes started with `name=value` in their environment, except
    this process, its ancestors and its descendants (what a test runs itself is its own)."""
    needle = f"{name}={value}".encode()
    parents: dict[int, int] = {}
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            head, _, rest = (entry / "stat").read_text().rpartition(")")
            fields = rest.split()
            parents[pid] = int(fields[1])
            if fields[0] != "Z" and needle in (entry / "environ").read_bytes().split(b"\0"):
                found[pid] = head.split("(", 1)[1]
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile, or not ours to read
    ours = {os.getpid()}
    pid = os.getpid()
    while pid in parents and parents[pid] not in ours and parents[pid] > 0:  # ancestors
        pid = parents[pid]
        ours.add(pid)

    def mine(pid: int) -> bool:  # a descendant of this process
        seen = set()
        while pid > 1 and pid not in seen:
            if pid == os.getpid():
                return True
            seen.add(pid)
            pid = parents.get(pid, 0)
        return False

    return {pid: comm for pid, comm in found.items() if pid not in ours and not mine(pid)}


def port_free(port: int) -> bool:
    """Bind like the daemons do (SO_REUSEADDR): TIME_WAIT leftovers are fine, listeners are not."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))  # noqa: S104  (slurmd/slurmctld bind INADDR_ANY)
        except OSError:
            return False
    return True


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} not readable)"
    return "\n".join(text.splitlines()[-lines:])


def stop_pids(pids: dict[int, str], timeout_s: float) -> list[int]:
    """TERM {pid: comm}, wait, KILL stragglers; returns pids still alive after all that."""
    live = {pid: comm for pid, comm in pids.items() if proc_alive(pid, comm)}
    for pid in live:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while live and time.monotonic() < deadline:
        live = {pid: comm for pid, comm in live.items() if proc_alive(pid, comm)}
        if live:
            time.sleep(0.1)
    for pid in live:
        log.warning("pid %d (%s) ignored SIGTERM for %.0fs -> SIGKILL", pid, live[pid], timeout_s)
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while live and time.monotonic() < deadline:
        live = {pid: comm for pid, comm in live.items() if proc_alive(pid, comm)}
        if live:
            time.sleep(0.1)
    return sorted(live)
