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


def _proc_table() -> dict[int, tuple[str, int]]:
    """{pid: (comm, parent pid)} of every live (non-zombie) process, from /proc/PID/stat."""
    table: dict[int, tuple[str, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            head, _, rest = (entry / "stat").read_text().rpartition(")")
            fields = rest.split()
            if fields[0] != "Z":
                table[int(entry.name)] = (head.split("(", 1)[1], int(fields[1]))
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return table


def _descendants(table: dict[int, tuple[str, int]], roots: Iterable[int]) -> dict[int, str]:
    children: dict[int, list[int]] = {}
    for pid, (_comm, parent) in table.items():
        children.setdefault(parent, []).append(pid)
    found: dict[int, str] = {}
    todo = [pid for pid in roots if pid in table]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found[pid] = table[pid][0]
            todo.extend(children.get(pid, []))
    return found


def with_descendants(roots: Iterable[int]) -> dict[int, str]:
    """{pid: comm} of `roots` and every live descendant (a step's job processes)."""
    return _descendants(_proc_table(), roots)


def procs_with_env(name: str, value: str) -> dict[int, str]:
    """{pid: comm} of live processes started with `name=value` in their environment, except
    this process, its ancestors and its descendants (what a test runs itself is its own)."""
    needle = f"{name}={value}".encode()
    table = _proc_table()
    ours = set(_descendants(table, [os.getpid()]))
    pid = os.getpid()
    while pid in table and table[pid][1] > 0:  # ancestors
        pid = table[pid][1]
        ours.add(pid)
    found: dict[int, str] = {}
    for pid, (comm, _parent) in table.items():
        if pid in ours:
            continue
        try:
            if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found[pid] = comm
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return found


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
