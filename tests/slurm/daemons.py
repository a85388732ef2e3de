"""slurmctld and the slurmd of every node: starting the lab, stopping it, resetting it between
tests, and the outages tests make (one daemon stopped and started again)."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

from .labconfig import SlurmLabError
from .labcore import LAB_MARK, TRANSIENT_ERRORS, LabCore
from .procs import (
    log,
    port_free,
    proc_alive,
    procs_named,
    procs_with_env,
    read_pid,
    stop_pids,
    tail,
    with_descendants,
)
from .queries import TERMINAL_JOB_STATES
from .roots import mount_root, unmount_recorded
from .slurmdbd import ACCT_PACKAGES

# squeue -t all lists ended jobs too (MinJobAge keeps them 300 s)
ENDED_JOB_STATES = TERMINAL_JOB_STATES | {"REVOKED"}


class Daemons(LabCore):
    """slurmctld + slurmd: lifecycle of the whole lab."""

    def start(self, timeout_s: float = 90) -> None:
        """Fresh cluster (state and spool wiped), returning once every node is idle.

        A previous instance recorded in lab_dir is stopped first; on failure, whatever this call
        started is stopped again and SlurmLabError names the log to read.
        """
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        if os.geteuid() != 0:
            raise SlurmLabError(
                "SlurmLab needs root: it starts slurmd/slurmctld/munged, creates device nodes "
                "and the munge key"
            )
        if any(self.pid_dir.glob("*.pid")):
            log.info("previous instance in %s: stopping it", self.lab_dir)
            type(self).from_lab_dir(self.lab_dir).stop()
        self._check_ports()
        if self.root is None:
            self._ensure_packages()
        if self.config.accounting:
            self._ensure_packages(ACCT_PACKAGES if self.root is None else ACCT_PACKAGES[1:])
        self._ensure_hostname()
        self._prepare_dirs()
        try:
            self._ensure_munge()
            if self.root is not None:
                mount_root(self.root, self.lab_dir, self.mounts_record)
            self.client_bin_dir()
            self._write_configs()
            if self.config.accounting:
                self._start_accounting(deadline)
            self._start_ctld(deadline)
            for node in self.node_names:
                self._start_slurmd(node)
            self.wait_nodes_idle(max(deadline - time.monotonic(), 1.0))
            if self.config.restd:
                self.start_restd(max(deadline - time.monotonic(), 1.0))
        except BaseException as exc:
            log.warning("start failed (%s); stopping what was started", type(exc).__name__)
            self.stop()
            raise
        self.last_start_s = time.monotonic() - t0
        log.info(
            "Slurm %s: %d nodes idle after %.1fs (SLURM_CONF=%s)",
            self.version,
            self.config.nodes,
            self.last_start_s,
            self.conf_path,
        )

    def stop(self) -> None:
        """Cancel jobs, then stop slurmd, slurmctld and munged (if we started it) by pid file.

        Idempotent: with no pid files it does nothing. A root lab's bind mounts are undone
        last.
        """
        if not self.pid_dir.is_dir():
            self._unmount()
            return
        if self.ctld_alive():
            try:
                self._cancel_all_jobs(time.monotonic() + 20)
            except SlurmLabError as exc:  # stopping goes on: slurmstepds are killed below
                log.warning("%s", exc)
        self._stop_leftovers()
        self.stop_restd()
        pidfiles = sorted(self.pid_dir.glob("slurmd-*.pid"))
        self._stop_pidfiles(pidfiles, "slurmd", 20)
        self._stop_pidfiles([self.pid_dir / "slurmctld.pid"], "slurmctld", 30)
        self.stop_accounting()
        munged = self.pid_dir / "munged.pid"
        if munged.exists():
            others = procs_named("slurmctld") + procs_named("slurmd") + procs_named("slurmdbd")
            if others:
                # Another lab (or a real Slurm) on this machine may authenticate through the
                # munged we started: leave it running; it is harmless.
                log.info("leaving munged running: other Slurm daemons use it (pids %s)", others)
                munged.unlink(missing_ok=True)
            else:
                self._stop_pidfiles([munged], "munged", 10)
        leftovers = self._our_stepds()
        if leftovers:
            # slurmctld was already down (no scancel): the steps outlived their slurmd.
            victims = with_descendants(leftovers)
            log.warning("killing leftover slurmstepd %s and their jobs %s", leftovers, victims)
            stop_pids(victims, 1)  # slurmstepd ignores SIGTERM by design
        self._unmount()

    @property
    def mounts_record(self) -> Path:
        """The bind mounts this lab made in its root (one target a line), undone by stop()."""
        return self.lab_dir / "mounts.txt"

    def _unmount(self) -> None:
        stuck = unmount_recorded(self.mounts_record)
        if stuck:
            log.error("could not unmount %s", stuck)

    def reset(self, timeout_s: float = 90) -> None:
        """Back to a clean idle cluster between tests, whatever a test left: restart dead
        daemons (and a slurmctld that is alive but does not answer), cancel every job of
        every user (pending, held, arrays, hetjobs too) and wait until none is left, stop the
        processes a test started through lab.env() that outlived it, resume drained/down
        nodes, wait until every node is idle. Nothing is waited for on a lab already clean.
        Node features/weights changed by a test are not restored.
        """
        deadline = time.monotonic() + timeout_s
        if not self.ctld_alive():
            self.start_slurmctld(timeout_s)
        for node in self.node_names:
            if not self.slurmd_alive(node):
                self._start_slurmd(node)
        self._cancel_all_jobs(deadline)
        self._stop_leftovers()
        for name, info in self.sinfo_nodes().items():
            flags = set(info.get("state_flags") or [])
            if info.get("state") == "down" or flags & {"DRAIN", "FAIL"}:
                self.run("scontrol", "update", f"nodename={name}", "state=resume", check=False)
        self.wait_nodes_idle(max(deadline - time.monotonic(), 1.0))

    def status(self) -> dict[str, int | None]:
        """{daemon: pid if alive else None} for everything with a pid file."""
        out: dict[str, int | None] = {}
        for path in sorted(self.pid_dir.glob("*.pid")):
            comm = path.stem.split("-", 1)[0]
            pid = read_pid(path)
            out[path.stem] = pid if proc_alive(pid, comm) else None
        return out

    def slurmd_alive(self, node: str) -> bool:
        return proc_alive(read_pid(self.pid_dir / f"slurmd-{node}.pid"), "slurmd")

    def stop_slurmctld(self, timeout_s: float = 30) -> None:
        """Controller outage: TERM slurmctld (state is saved and recovered by start_slurmctld)."""
        self._stop_pidfiles([self.pid_dir / "slurmctld.pid"], "slurmctld", timeout_s)

    def start_slurmctld(self, timeout_s: float = 30, *, wait_nodes: bool = True) -> None:
        """Bring the controller back, recovering saved state (jobs, node drains).

        Right after a restart every node reads UNKNOWN(+DRAIN...) until its slurmd registers
        again (0.1-4 s here); wait_nodes waits for that so node states are meaningful.
        """
        deadline = time.monotonic() + timeout_s
        if not self.ctld_alive():
            self._start_ctld(deadline)
        while wait_nodes:
            states = re.findall(r"\bState=(\S+)", self.run("scontrol", "show", "nodes").stdout)
            if not any(s.startswith("UNKNOWN") for s in states):
                return
            if time.monotonic() > deadline:
                raise SlurmLabError(
                    f"nodes did not re-register after slurmctld restart ({states}); "
                    f"read {self.log_file('slurmctld')}"
                )
            time.sleep(0.1)

    def stop_slurmd(self, node: str, timeout_s: float = 20) -> None:
        """Node loss: IDLE+NOT_RESPONDING after ~slurmd_timeout_s, DOWN+NOT_RESPONDING later."""
        self._stop_pidfiles([self.pid_dir / f"slurmd-{node}.pid"], "slurmd", timeout_s)

    def start_slurmd(self, node: str) -> None:
        """Restart one node's slurmd (ReturnToService=2 brings a DOWN node back by itself)."""
        if not self.slurmd_alive(node):
            self._start_slurmd(node)

    def wait_nodes_idle(self, timeout_s: float = 60) -> None:
        """Until sinfo shows every node 'idle'; fails fast if a slurmd dies or a node is INVAL."""
        deadline = time.monotonic() + timeout_s
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            proc = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
            if proc.returncode == 0:
                states = dict(line.split(None, 1) for line in proc.stdout.splitlines() if line)
                if len(states) == self.config.nodes and set(states.values()) == {"idle"}:
                    return
                for node, state in states.items():
                    if state.startswith("inval"):
                        raise SlurmLabError(
                            f"node {node} is {state} (config/GRES mismatch); "
                            f"read {self.log_file(node)} and {self.log_file('slurmctld')}"
                        )
            if not self.ctld_alive():
                raise SlurmLabError(
                    f"slurmctld died; read {self.log_file('slurmctld')}:\n"
                    + tail(self.log_file("slurmctld"))
                )
            for node in self.node_names:
                pid = read_pid(self.pid_dir / f"slurmd-{node}.pid")
                if pid is not None and not proc_alive(pid, "slurmd"):
                    raise SlurmLabError(
                        f"slurmd of {node} died; read {self.log_file(node)}:\n"
                        + tail(self.log_file(node))
                    )
            time.sleep(0.2)
        bad = {node: state for node, state in states.items() if state != "idle"} or states
        seen = ", ".join(f"{node} {state}" for node, state in sorted(bad.items()))
        jobs = self.run("squeue", "-h", "-t", "all", "-o", "%A:%T", check=False, retry_s=0)
        active = [j for j in jobs.stdout.split() if j.split(":")[-1] not in ENDED_JOB_STATES]
        raise SlurmLabError(
            f"nodes not idle after {timeout_s:.0f}s: {seen or 'sinfo failed'}; "
            f"jobs not ended: {' '.join(active[:10]) or 'none'}; "
            f"read {self.log_file('slurmctld')}"
        )

    def _check_ports(self) -> None:
        ports = {"slurmctld": self.config.ctld_port}
        if self.config.accounting:
            ports.update(slurmdbd=self.config.dbd_port, mariadbd=self.config.db_port)
        for i, node in enumerate(self.node_names, start=1):
            ports[f"slurmd {node}"] = self.config.node_port0 + i
        busy = [f"{who}:{port}" for who, port in ports.items() if not port_free(port)]
        if busy:
            raise SlurmLabError(
                f"ports in use: {', '.join(busy)}. Another Slurm (another lab dir?) is running; "
                "stop it (`python tests/slurm/harness.py down --lab DIR`) or pick other ports "
                "(ctld_port, node_port0, dbd_port, db_port)"
            )

    def _start_ctld(self, deadline: float) -> None:
        self._spawn_daemon("slurmctld", ["/usr/sbin/slurmctld", "-f", str(self.conf_path)])
        self._await_daemon(
            "slurmctld", lambda: "is UP" in self.run("scontrol", "ping", check=False,
                                                     timeout_s=10).stdout,
            deadline, self.log_file("slurmctld"), step_s=0.1)
        log.info("slurmctld up (pid %s)", read_pid(self.pid_dir / "slurmctld.pid"))

    def _start_slurmd(self, node: str) -> None:
        self._spawn_daemon(
            f"slurmd-{node}", ["/usr/sbin/slurmd", "-f", str(self.conf_path), "-N", node]
        )

    def _active_jobs(self, deadline: float) -> list[tuple[str, str, str]]:
        """(job id, uid, state) of every job not ended yet, every user's, pending and held
        ones, array tasks and hetjob components included. A slurmctld whose process is alive
        but that does not answer squeue (after run()'s retries) is restarted once."""
        argv = ("squeue", "-h", "-t", "all", "-o", "%A|%U|%T")
        proc: subprocess.CompletedProcess[str] | None = None
        try:
            proc = self.run(*argv, check=False, timeout_s=15)
            said = proc.stderr + proc.stdout
            wedged = proc.returncode != 0 and any(t in said for t in TRANSIENT_ERRORS)
        except SlurmLabError as exc:  # timed out, every time run() asked
            said, wedged = str(exc), True
        if wedged and self.ctld_alive():
            log.warning("slurmctld does not answer squeue (%s): restarting it",
                        " ".join(said.split()))
            self.stop_slurmctld()
            self.start_slurmctld(max(deadline - time.monotonic(), 10.0))
            proc = self.run(*argv, check=False, timeout_s=15)
            said = proc.stderr + proc.stdout
        if proc is None or proc.returncode != 0:
            alive = "" if self.ctld_alive() else " (slurmctld is not running)"
            raise SlurmLabError(
                f"squeue failed{alive}: {' '.join(said.split()) or 'no message'}; "
                f"read {self.log_file('slurmctld')}"
            )
        jobs = []
        for line in proc.stdout.splitlines():
            job, _, rest = line.strip().partition("|")
            uid, _, state = rest.partition("|")
            if state and state not in ENDED_JOB_STATES:
                jobs.append((job, uid, state))
        return jobs

    def _cancel_all_jobs(self, deadline: float) -> None:
        """scancel every user's jobs and wait until none is left (running, completing,
        pending, held): by user, since a job id as squeue prints it is not always one scancel
        takes (an array throttled with %N: `12_[5%2]` makes scancel refuse every id given)."""
        jobs = self._active_jobs(deadline)
        asked = float("-inf")
        while jobs:
            now = time.monotonic()
            if now > deadline:
                counts = Counter(state for _, _, state in jobs)
                raise SlurmLabError(
                    f"{len(jobs)} job(s) still there after scancel "
                    f"({', '.join(f'{n} {st}' for st, n in sorted(counts.items()))}: "
                    f"{' '.join(j for j, _, _ in jobs[:10])}); read {self.log_file('slurmctld')}"
                )
            if now - asked >= 5:  # again now and then: a job requeued, or submitted late
                for uid in sorted({uid for _, uid, _ in jobs}):
                    self.run("scancel", "-u", uid, check=False, timeout_s=15)
                asked = now
            time.sleep(0.2)
            jobs = self._active_jobs(deadline)

    def _stop_leftovers(self) -> None:
        """Stop what a test started through lab.env() and left running, outside this process:
        cli_filter's background helpers (`sleep 60; gpufleet-sbatch-filter release ...` that
        would run scontrol against whatever lab is up a minute later), a job's processes."""
        left = procs_with_env(LAB_MARK, str(self.lab_dir))
        if left:
            log.info("stopping processes a test left: %s", left)
            stuck = stop_pids(left, 2)
            if stuck:
                log.error("leftover pids %s survived SIGKILL", stuck)

    def _our_stepds(self) -> list[int]:
        """slurmstepd processes of this lab. Their environ is empty, but cwd and the log fd
        point into lab_dir (a slurmstepd outlives a killed slurmd and keeps its job running).
        """
        prefixes = [str(self.lab_dir) + "/"]
        if self.root is not None:  # seen from outside, a chrooted cwd carries the root's path
            prefixes.append(f"{self.root}{self.lab_dir}/")
        mine = []
        for pid in procs_named("slurmstepd"):
            proc = Path(f"/proc/{pid}")
            try:
                links = [proc / "cwd", *(proc / "fd").iterdir()]
                targets = [os.readlink(link) for link in links]
            except OSError:
                continue
            if any(target.startswith(tuple(prefixes)) for target in targets):
                mine.append(pid)
        return mine
