"""The part of a Slurm lab every daemon's module builds on: its version and root, its paths,
the environment its client commands need, and running one (`run`), spawning a daemon and
stopping daemons by pid file.

SlurmLab (harness.py) is this plus one mixin per daemon: slurmctld/slurmd (daemons.py), the
host they need (host.py), slurmdbd and MariaDB (slurmdbd.py), slurmrestd (slurmrestd.py), the
config files (slurmconf.py) and the queries tests make (queries.py). The mixins call each
other's methods through `self`, as parts of that one class."""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from .labconfig import (
    HOST_VERSION,
    SlurmCommandError,
    SlurmLabConfig,
    SlurmLabError,
    default_lab_dir,
)
from .procs import log, proc_alive, read_pid, stop_pids, tail
from .roots import HOST_VIEW, find_root, root_argv

CLIENT_TIMEOUT_S = 30.0
# the client commands client_bin_dir() wraps
CLIENT_COMMANDS = ("sinfo", "scontrol", "squeue", "sbatch", "sacct", "scancel", "sacctmgr",
                   "srun", "salloc", "sstat", "sprio", "sshare", "sreport", "sdiag")
ROOT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # PATH inside a root
# Ambient variables that would change what client commands do or print (e.g. when the tests run
# inside a Slurm job, or a developer has SQUEUE_FORMAT set): dropped from lab.env().
_AMBIENT_SLURM_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SQUEUE_", "SINFO_", "SACCT_")
# lab.env() marks every process started with it (and what those leave behind: cli_filter's
# background helpers, a job's processes) with the lab's dir, so reset() and stop() can find
# and stop what a test left running; the daemons' own environment (_slurm_env) is not marked
LAB_MARK = "GPUFLEET_SLURMLAB_CLIENT_OF"
# What a client prints when slurmctld is up but busy or restarting: asked again (run()).
# An unknown job or node, a bad option, a refused update are not among them.
TRANSIENT_ERRORS = ("Socket timed out", "Unable to contact slurm controller",
                    "Zero Bytes were transmitted", "Connection refused",
                    "Connection reset by peer", "Resource temporarily unavailable",
                    "Transport endpoint is not connected")
# Commands that only read (or, scancel, do the same thing however often they run): a
# transient error is retried for up to RETRY_S while slurmctld's process is alive
_READ_ONLY = frozenset({"sinfo", "squeue", "sacct", "sdiag", "sprio", "sshare", "sstat",
                        "scancel"})
RETRY_S = 30.0


def _read_only(argv: Sequence[str]) -> bool:
    """Whether running `argv` twice does no more than running it once."""
    if not argv:
        return False
    if argv[0] == "scontrol":  # `scontrol show ...`, `scontrol --json show ...`
        words = [a for a in argv[1:] if not a.startswith("-")]
        return bool(words) and words[0] == "show"
    return argv[0] in _READ_ONLY


class LabCore:
    """One lab's version, root, paths and client environment (see the module docstring)."""

    def __init__(self, config: SlurmLabConfig | None = None) -> None:
        self.config = config or SlurmLabConfig()
        self.last_start_s: float | None = None  # how long the last start() took
        # JWT auth in slurm.conf: only when slurmrestd is wanted (needs slurm-wlm-jwt-plugin)
        self._jwt = self.config.restd
        self._restd_proc: subprocess.Popen[bytes] | None = None
        self._db_proc: subprocess.Popen[bytes] | None = None
        self._root: Path | None = None
        self._root_known = False

    @property
    def root(self) -> Path | None:
        """The Debian root this lab's Slurm runs in; None for the host's 22.05.

        Raises roots.RootMissing when the version's root is not built."""
        if not self._root_known:
            self._root = find_root(self.config.version)
            self._root_known = True
        return self._root

    @property
    def version(self) -> str:
        return self.config.version

    def argv(self, argv: Sequence[str], *, cwd: Path | None = None,
             user: str | None = None) -> list[str]:
        """`argv` as it must run for this lab's Slurm (inside its root, if it has one)."""
        return root_argv(self.root, argv, cwd=cwd, user=user)

    def host_argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` for a job or hook of this lab that must run a host program (this Python,
        gpufleet-agent): inside a root that is `chroot /host ...` (as root only)."""
        return list(argv) if self.root is None else ["/usr/sbin/chroot", HOST_VIEW, *argv]

    def client_bin_dir(self) -> Path:
        """A directory of wrappers (sinfo, scontrol, squeue, sbatch, sacct, ...) that run the
        lab's client commands with its SLURM_CONF, inside its root for 24.11/26.05: put it
        first on PATH and code that runs `sinfo` etc. talks to this lab, whatever its version.
        """
        bin_dir = self.lab_dir / "bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        for name in CLIENT_COMMANDS:
            if self.root is None:
                line = f"exec /usr/bin/{name} \"$@\""
            else:
                # chroot starts in /: go back to the caller's directory (the same path inside);
                # the root's PATH (a job submitted through here inherits it)
                line = (f"PATH={ROOT_PATH}; export PATH\n"
                        f"exec /usr/sbin/chroot {shlex.quote(str(self.root))} /bin/sh -c "
                        f"'cd \"$0\" 2>/dev/null || cd /; exec /usr/bin/{name} \"$@\"' "
                        f"\"$PWD\" \"$@\"")
            path = bin_dir / name
            path.write_text(
                "#!/bin/sh\n"
                f"# generated by tests/slurm/harness.py: {name} of the Slurm {self.version} lab\n"
                # a caller's own SLURM_CONF wins (a client copy of the config, e.g. with
                # cli_filter/lua added, as a login node has); else the lab's
                f": \"${{SLURM_CONF:={shlex.quote(str(self.conf_path))}}}\"; export SLURM_CONF\n"
                f"{line}\n"
            )
            path.chmod(0o755)
        return bin_dir

    @classmethod
    def from_lab_dir(cls, lab_dir: Path | None = None) -> Self:
        """The lab recorded in lab_dir/lab.json (written by start); defaults if there is none."""
        lab_dir = Path(lab_dir or default_lab_dir())
        try:
            return cls(SlurmLabConfig.from_json((lab_dir / "lab.json").read_text()))
        except (OSError, ValueError, TypeError):
            return cls(SlurmLabConfig(lab_dir=lab_dir))

    @property
    def lab_dir(self) -> Path:
        return self.config.lab_dir

    @property
    def etc_dir(self) -> Path:
        return self.config.etc

    @property
    def conf_path(self) -> Path:
        """slurm.conf; export SLURM_CONF=this to use the lab from a shell."""
        return self.etc_dir / "slurm.conf"

    @property
    def log_dir(self) -> Path:
        return self.lab_dir / "log"

    @property
    def pid_dir(self) -> Path:
        return self.lab_dir / "pids"

    @property
    def jobs_dir(self) -> Path:
        """Working directory of sbatch(): job output files land here, not in the repo."""
        return self.lab_dir / "jobs"

    @property
    def node_names(self) -> list[str]:
        return [f"n{i}" for i in range(1, self.config.nodes + 1)]

    def log_file(self, daemon: str) -> Path:
        """Log of 'slurmctld' or a node name ('n3' -> slurmd-n3.log)."""
        name = daemon if daemon == "slurmctld" else f"slurmd-{daemon}"
        return self.log_dir / f"{name}.log"

    def env(self) -> dict[str, str]:
        """os.environ + SLURM_CONF, minus ambient SLURM_*/SQUEUE_*/... that change client output,
        with client_bin_dir() first on PATH: code that runs `sinfo` & co. by name with this
        environment (gpufleet's CLI Slurm client) reaches this lab's Slurm, whatever version."""
        env = self._slurm_env()
        env["PATH"] = f"{self.lab_dir / 'bin'}:{os.environ.get('PATH', os.defpath)}"
        env[LAB_MARK] = str(self.lab_dir)
        return env

    def _slurm_env(self) -> dict[str, str]:
        """The environment run() and the daemons get: no wrapper dir on PATH (inside a root
        the wrappers would chroot again), and the root's own PATH there."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(_AMBIENT_SLURM_PREFIXES)}
        env["SLURM_CONF"] = str(self.conf_path)
        if self.root is not None:
            env["PATH"] = ROOT_PATH
        return env

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout_s: float = CLIENT_TIMEOUT_S,
        cwd: Path | None = None,
        input_text: str | None = None,
        user: str | None = None,
        retry_s: float | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command against this lab (SLURM_CONF set, text output captured).

        It runs inside the lab's root for 24.11/26.05 (in `cwd`, whose path is the same
        there); `user`: as that user. A command that only reads (sinfo, squeue, `scontrol
        show`, ...) or scancel is asked again for up to `retry_s` (default RETRY_S; others 0)
        when it timed out or slurmctld answered as a busy one does ("Socket timed out on
        send/recv"), as long as slurmctld's process is alive (a stopped one fails at once)."""
        if retry_s is None:
            retry_s = RETRY_S if _read_only(argv) else 0.0
        give_up = time.monotonic() + retry_s
        pause_s = 0.2
        while True:
            try:
                proc = subprocess.run(
                    self.argv(argv, cwd=cwd, user=user),
                    env=self._slurm_env(),
                    cwd=cwd,
                    input=input_text,
                    capture_output=True,
                    text=True,
                    timeout=timeout_s,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                problem = f"timed out after {timeout_s}s"
                if not self._worth_retrying(give_up):
                    raise SlurmLabError(
                        f"`{shlex.join(argv)}` {problem}; is slurmctld up? "
                        f"read {self.log_file('slurmctld')}"
                    ) from exc
            else:
                said = proc.stderr + proc.stdout
                if proc.returncode == 0 or not any(t in said for t in TRANSIENT_ERRORS) \
                        or not self._worth_retrying(give_up):
                    break
                problem = said.strip().splitlines()[-1] if said.strip() else "failed"
            log.info("`%s`: %s; asking again in %.1fs", shlex.join(argv), problem, pause_s)
            time.sleep(pause_s)
            pause_s = min(pause_s * 2, 2.0)
        if check and proc.returncode != 0:
            raise SlurmCommandError(argv, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def _worth_retrying(self, give_up: float) -> bool:
        return time.monotonic() < give_up and self.ctld_alive()

    def ctld_alive(self) -> bool:
        return proc_alive(read_pid(self.pid_dir / "slurmctld.pid"), "slurmctld")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def legacy(self) -> bool:
        """Slurm 22.05, which still has the */none plugins that 23.11+ dropped (their
        absence is the default there)."""
        return self.config.version == HOST_VERSION

    def _spawn_daemon(self, name: str, argv: list[str]) -> None:
        """Run a self-daemonizing Slurm daemon; its stdio goes to log/NAME.out, not our pipes."""
        out = self.log_dir / f"{name}.out"
        with out.open("ab") as fh:
            proc = subprocess.run(
                self.argv(argv),
                env=self._slurm_env(),
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                timeout=30,
                check=False,
                start_new_session=True,
            )
        if proc.returncode != 0:
            raise SlurmLabError(
                f"`{shlex.join(argv)}` exited {proc.returncode}; read {out} and "
                f"{self.log_dir / (name + '.log')}:\n{tail(out)}"
            )

    def _await_daemon(self, name: str, answers: Callable[[], bool], deadline: float,
                      logfile: Path, step_s: float) -> None:
        """Until `answers()`; fails at once when `name`'s pid file names a dead process, or
        at `deadline`; either way with the tail of its log."""
        while not answers():
            pid = read_pid(self.pid_dir / f"{name}.pid")
            if pid is not None and not proc_alive(pid, name):
                raise SlurmLabError(f"{name} exited; read {logfile}:\n{tail(logfile)}")
            if time.monotonic() > deadline:
                raise SlurmLabError(f"{name} not up in time; read {logfile}:\n{tail(logfile)}")
            time.sleep(step_s)

    def _stop_pidfiles(self, files: Iterable[Path], comm: str, timeout_s: float) -> None:
        files = list(files)
        pids = {pid: comm for f in files if (pid := read_pid(f)) is not None}
        stuck = stop_pids(pids, timeout_s)
        if stuck:
            log.error("%s pids %s survived SIGKILL (uninterruptible?)", comm, stuck)
        for f in files:
            f.unlink(missing_ok=True)  # daemons remove their own pid file; this gets the rest
