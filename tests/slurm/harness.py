"""A real single-machine Slurm cluster for tests (22.05 from the host, 24.11/26.05 from a root).

`version` picks the Slurm: "22.05" runs the host's Debian bookworm packages; "24.11" and
"26.05" run every daemon and client command inside a Debian root built by
.ci/slurm-root.sh (see roots.py: chroot, bind mounts recorded and undone on stop).

Why a real Slurm: the controller's Slurm adapter parses `sinfo --json`, `scontrol show ...` and
drives drain/resume/requeue; fakes drift from what 22.05 actually prints. This module starts
munged (only if none works), one slurmctld and N `slurmd -N nX` daemons on distinct ports, with
fake GPU GRES backed by dummy character devices and a topology/tree of leaf switches + a spine.
With `accounting=True` it also starts its own MariaDB server (own datadir, socket, port and pid
file under lab_dir; never the system service) and its own slurmdbd, and registers the cluster,
accounts and users with `sacctmgr`. `prolog`/`epilog` name Prolog=/Epilog= programs
(`write_gpufleet_hooks()` writes ones that run `gpufleet-agent prolog|epilog` per node).

All runtime state lives under `lab_dir`; configs go to `etc_dir` (never /etc/slurm), so client
commands need SLURM_CONF: use `lab.env()` or `lab.run(...)`.

Code that runs Slurm commands itself (gpufleet's CLI Slurm client) gets wrappers with the
lab's SLURM_CONF (and chroot) from `lab.client_bin_dir()`: put it first on PATH.

CLI:  python tests/slurm/harness.py up [--lab DIR] [--nodes N] [--version V] | down | status
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

try:  # as a package module (pytest) or as a script (python tests/slurm/harness.py)
    from .roots import (
        HOST_VERSION,
        HOST_VIEW,
        VERSIONS,
        find_root,
        mount_root,
        root_argv,
        unmount_recorded,
    )
except ImportError:
    from roots import (  # type: ignore[no-redef,import-not-found]
        HOST_VERSION,
        HOST_VIEW,
        VERSIONS,
        find_root,
        mount_root,
        root_argv,
        unmount_recorded,
    )

__all__ = [
    "SlurmCommandError",
    "SlurmLab",
    "SlurmLabConfig",
    "SlurmLabError",
    "default_lab_dir",
]

log = logging.getLogger("gpufleet.tests.slurmlab")

PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client", "slurm-wlm-basic-plugins")
# only for start_restd(): slurmrestd, and auth/jwt for slurmctld (Debian splits it out)
REST_PACKAGES = ("slurmrestd", "slurm-wlm-jwt-plugin")
# slurmrestd refuses to run as root or as SlurmUser: an unprivileged user it can be
REST_USER = "nobody"  # run with its own primary group: root's group is refused too
REST_API = "v0.0.38"  # Slurm 22.05's openapi plugin
# only for accounting=True: slurmdbd and a private MariaDB server (CI's .ci/setup installs them)
ACCT_PACKAGES = ("slurmdbd", "mariadb-server")
MARIADBD = Path("/usr/sbin/mariadbd")
MYSQL_USER = "mysql"  # mariadbd refuses to run as root; the Debian package made this user
ACCT_DB = "slurm_acct_db"
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN = Path("/run/munge")
CLIENT_TIMEOUT_S = 30.0
# the client commands client_bin_dir() wraps
CLIENT_COMMANDS = ("sinfo", "scontrol", "squeue", "sbatch", "sacct", "scancel", "sacctmgr",
                   "srun", "salloc", "sstat", "sprio", "sshare", "sreport", "sdiag")
TOPOLOGIES = ("tree", "block", "yaml")
ROOT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # PATH inside a root
# Job states after which a job never changes again (wait_job_state fails fast on them).
TERMINAL_JOB_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)
# A node's base state (23.02+ list it among the flags: ["IDLE", "DRAIN"])
_BASE_NODE_STATES = frozenset(
    {"IDLE", "DOWN", "ALLOCATED", "MIXED", "ERROR", "FUTURE", "UNKNOWN"}
)
# Ambient variables that would change what client commands do or print (e.g. when the tests run
# inside a Slurm job, or a developer has SQUEUE_FORMAT set): dropped from lab.env().
_AMBIENT_SLURM_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SQUEUE_", "SINFO_", "SACCT_")


def default_lab_dir() -> Path:
    """$GPUFLEET_SLURM_LAB or /tmp/gpufleet-slurm-lab: one well-known place so `down` finds it."""
    return Path(os.environ.get("GPUFLEET_SLURM_LAB", "/tmp/gpufleet-slurm-lab"))


class SlurmLabError(Exception):
    """The lab could not be started, stopped or queried; the message names the log to read."""


class SlurmCommandError(SlurmLabError, subprocess.CalledProcessError):
    """A Slurm client command failed; also a CalledProcessError so callers can use either."""

    def __init__(self, cmd: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        subprocess.CalledProcessError.__init__(self, returncode, list(cmd), stdout, stderr)

    def __str__(self) -> str:
        detail = (self.stderr or self.stdout or "").strip()
        return f"`{shlex.join(self.cmd)}` exited {self.returncode}: {detail}"


@dataclass(frozen=True)
class SlurmLabConfig:
    """Shape of the fake cluster. Paths are made absolute (slurm.conf needs absolute paths)."""

    lab_dir: Path = dataclasses.field(default_factory=default_lab_dir)
    etc_dir: Path | None = None  # None -> lab_dir / "etc"
    nodes: int = 8
    leaves: int = 2
    cpus: int = 4
    mem_mb: int = 2000
    gpus: int = 8
    ctld_port: int = 6817
    node_port0: int = 17000  # node nX listens on node_port0 + X
    slurmd_timeout_s: int = 60
    topology_conf: str | None = None  # written verbatim instead of the generated tree
    extra_conf: str = ""  # appended to slurm.conf (a later key overrides an earlier one)
    cluster_name: str = "lab"
    restd: bool = False  # also start slurmrestd (JWT auth, unix socket) in start()
    # slurmdbd on a private MariaDB: sacct, AllocTRES with gres/gpu (accounting_storage/none
    # without it)
    accounting: bool = False
    dbd_port: int = 0  # 0 -> ctld_port + 2 (as 6817/6819 upstream)
    db_port: int = 0  # MariaDB's TCP port; 0 -> ctld_port + 3
    # (user, account) associations registered with sacctmgr; a user's first is its default
    associations: tuple[tuple[str, str], ...] = (("root", "physics"), ("nobody", "chemistry"))
    prolog: str = ""  # Prolog= program (absolute path), '' -> none
    epilog: str = ""  # Epilog= program (absolute path), '' -> none
    # Alloc: the Prolog runs when the job is allocated (Slurm's Start time), not at its first
    # step, so hook times and sacct's Start/End describe the same interval
    prolog_flags: str = "Alloc"
    # which Slurm: "22.05" (host), "24.11" (trixie root), "26.05" (sid root)
    version: str = HOST_VERSION
    # tree: topology/tree, leaf switches + spine; block: topology/block, one block per leaf
    # (BlockSizes=leaf size, all nodes); yaml: topology.yaml (25.05+) with a tree and a block
    # topology, the partition "main" on the tree and "blocks" on the block one
    topology: str = "tree"

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            raise ValueError(f"version {self.version!r}: known are {', '.join(VERSIONS)}")
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"topology {self.topology!r}: one of {', '.join(TOPOLOGIES)}")
        if self.topology == "block" and self.version == "22.05":
            raise ValueError("topology/block needs Slurm 23.11+ (version 24.11 or 26.05)")
        if self.topology == "yaml" and self.version in ("22.05", "24.11"):
            raise ValueError("topology.yaml needs Slurm 25.05+ (version 26.05)")
        lab_dir = Path(self.lab_dir).absolute()
        object.__setattr__(self, "lab_dir", lab_dir)
        etc = lab_dir / "etc" if self.etc_dir is None else Path(self.etc_dir).absolute()
        object.__setattr__(self, "etc_dir", etc)
        if self.nodes < 1 or not 1 <= self.leaves <= self.nodes:
            raise ValueError(f"need 1 <= leaves ({self.leaves}) <= nodes ({self.nodes})")
        if self.cpus < 1 or self.mem_mb < 1 or self.gpus < 0:
            raise ValueError("cpus and mem_mb must be >= 1, gpus >= 0")
        if self.node_port0 <= self.ctld_port <= self.node_port0 + self.nodes:
            raise ValueError("ctld_port collides with the slurmd port range")
        object.__setattr__(self, "dbd_port", self.dbd_port or self.ctld_port + 2)
        object.__setattr__(self, "db_port", self.db_port or self.ctld_port + 3)
        object.__setattr__(
            self, "associations", tuple((str(u), str(a)) for u, a in self.associations)
        )
        for what, path in (("prolog", self.prolog), ("epilog", self.epilog)):
            if path and not Path(path).is_absolute():
                raise ValueError(f"{what}={path!r}: slurmd needs an absolute path")
        if self.accounting:
            ports = {self.ctld_port, self.dbd_port, self.db_port}
            if len(ports) != 3 or any(
                self.node_port0 < p <= self.node_port0 + self.nodes for p in ports
            ):
                raise ValueError(
                    f"ctld_port {self.ctld_port}, dbd_port {self.dbd_port}, db_port "
                    f"{self.db_port} and the slurmd ports must all differ"
                )

    @property
    def etc(self) -> Path:
        """etc_dir after defaulting (typed as Path, which the field cannot be)."""
        assert self.etc_dir is not None  # set in __post_init__
        return self.etc_dir

    def to_json(self) -> str:
        """Saved in lab_dir so `down`/`status` (another process) know etc_dir and the shape."""
        return json.dumps(
            {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()},
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> SlurmLabConfig:
        """Inverse of to_json; unknown keys (from another harness version) are ignored."""
        raw: dict[str, Any] = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in names}
        for key in ("lab_dir", "etc_dir"):
            if kwargs.get(key) is not None:
                kwargs[key] = Path(kwargs[key])
        if "associations" in kwargs:  # JSON made the pairs lists
            kwargs["associations"] = tuple(tuple(pair) for pair in kwargs["associations"])
        return cls(**kwargs)


# ------------------------------------------------------------------------------------ helpers


def _hostlist(prefix: str, first: int, last: int) -> str:
    """n[1-4] / n3: Slurm rejects nothing here, but a 1-element range reads badly in logs."""
    return f"{prefix}{first}" if first == last else f"{prefix}[{first}-{last}]"


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _proc_alive(pid: int | None, comm: str | None = None) -> bool:
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


def _procs_named(comm: str) -> list[int]:
    """Live (non-zombie) pids whose /proc comm is `comm`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _proc_alive(int(entry.name), comm):
            pids.append(int(entry.name))
    return pids


def _with_descendants(roots: Iterable[int]) -> dict[int, str]:
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


def _port_free(port: int) -> bool:
    """Bind like the daemons do (SO_REUSEADDR): TIME_WAIT leftovers are fine, listeners are not."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))  # noqa: S104  (slurmd/slurmctld bind INADDR_ANY)
        except OSError:
            return False
    return True


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} not readable)"
    return "\n".join(text.splitlines()[-lines:])


def _munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10, check=False)
        if cred.returncode != 0:
            return False
        out = subprocess.run(
            ["unmunge"], input=cred.stdout, capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


def _stop_pids(pids: dict[int, str], timeout_s: float) -> list[int]:
    """TERM {pid: comm}, wait, KILL stragglers; returns pids still alive after all that."""
    live = {pid: comm for pid, comm in pids.items() if _proc_alive(pid, comm)}
    for pid in live:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while live and time.monotonic() < deadline:
        live = {pid: comm for pid, comm in live.items() if _proc_alive(pid, comm)}
        if live:
            time.sleep(0.1)
    for pid in live:
        log.warning("pid %d (%s) ignored SIGTERM for %.0fs -> SIGKILL", pid, live[pid], timeout_s)
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while live and time.monotonic() < deadline:
        live = {pid: comm for pid, comm in live.items() if _proc_alive(pid, comm)}
        if live:
            time.sleep(0.1)
    return sorted(live)


def write_gpufleet_hooks(
    hook_dir: Path, state_dir: str, agent_argv: Sequence[str] | None = None
) -> tuple[Path, Path]:
    """Prolog and Epilog scripts running `gpufleet-agent prolog|epilog --state-dir STATE_DIR`.

    STATE_DIR may hold '{node}': the agent puts SLURMD_NODENAME there, because in a lab every
    `slurmd -N nX` is a node of its own and each simulated node has its own agent state dir.
    Each run also keeps the environment Slurm gave it in hook_dir/env/KIND-JOB-NODE (what
    22.05 passes to a Prolog is checked from there) and appends its output to hook_dir/KIND.log.
    Returns (prolog, epilog), for SlurmLabConfig(prolog=..., epilog=...).
    """
    argv = list(agent_argv or [sys.executable, "-m", "gpufleet.agent"])
    hook_dir = Path(hook_dir).absolute()
    (hook_dir / "env").mkdir(parents=True, exist_ok=True)
    paths = []
    for kind in ("prolog", "epilog"):
        path = hook_dir / f"{kind}.sh"
        env_file = shlex.quote(str(hook_dir / "env" / kind)) + '-"$SLURM_JOB_ID-$SLURMD_NODENAME"'
        path.write_text(
            "#!/bin/sh\n"
            f"# generated by tests/slurm/harness.py: Slurm {kind} -> gpufleet-agent {kind}\n"
            f"/usr/bin/env > {env_file}\n"
            # the moment Slurm ran the hook, before Python starts (0.2-1.3 s on a busy
            # machine): for an agent that takes its hook time from here
            "GPUFLEET_HOOK_TIME_MS=$(/bin/date +%s%3N); export GPUFLEET_HOOK_TIME_MS\n"
            f"exec {shlex.join(argv)} {kind} --state-dir {shlex.quote(state_dir)} "
            f">> {shlex.quote(str(hook_dir / (kind + '.log')))} 2>&1\n"
        )
        path.chmod(0o755)
        paths.append(path)
    return paths[0], paths[1]


# ---------------------------------------------------------------------------------------- lab


class SlurmLab:
    """Start/stop/query one lab cluster. Needs root (daemons, mknod, munge key, /etc/hosts)."""

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
    def from_lab_dir(cls, lab_dir: Path | None = None) -> SlurmLab:
        """The lab recorded in lab_dir/lab.json (written by start); defaults if there is none."""
        lab_dir = Path(lab_dir or default_lab_dir())
        try:
            return cls(SlurmLabConfig.from_json((lab_dir / "lab.json").read_text()))
        except (OSError, ValueError, TypeError):
            return cls(SlurmLabConfig(lab_dir=lab_dir))

    # ---------------------------------------------------------------- paths and environment

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
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command against this lab (SLURM_CONF set, text output captured).

        It runs inside the lab's root for 24.11/26.05 (in `cwd`, whose path is the same
        there); `user`: as that user."""
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
            raise SlurmLabError(
                f"`{shlex.join(argv)}` timed out after {timeout_s}s; "
                f"is slurmctld up? read {self.log_file('slurmctld')}"
            ) from exc
        if check and proc.returncode != 0:
            raise SlurmCommandError(argv, proc.returncode, proc.stdout, proc.stderr)
        return proc

    # ---------------------------------------------------------------------------- lifecycle

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
            SlurmLab.from_lab_dir(self.lab_dir).stop()
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
            self._cancel_all_jobs()
        self.stop_restd()
        pidfiles = sorted(self.pid_dir.glob("slurmd-*.pid"))
        self._stop_pidfiles(pidfiles, "slurmd", 20)
        self._stop_pidfiles([self.pid_dir / "slurmctld.pid"], "slurmctld", 30)
        self.stop_accounting()
        munged = self.pid_dir / "munged.pid"
        if munged.exists():
            others = _procs_named("slurmctld") + _procs_named("slurmd") + _procs_named("slurmdbd")
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
            victims = _with_descendants(leftovers)
            log.warning("killing leftover slurmstepd %s and their jobs %s", leftovers, victims)
            _stop_pids(victims, 1)  # slurmstepd ignores SIGTERM by design
        self._unmount()

    @property
    def mounts_record(self) -> Path:
        """The bind mounts this lab made in its root (one target a line), undone by stop()."""
        return self.lab_dir / "mounts.txt"

    def _unmount(self) -> None:
        stuck = unmount_recorded(self.mounts_record)
        if stuck:
            log.error("could not unmount %s", stuck)

    def reset(self, timeout_s: float = 60) -> None:
        """Back to a clean idle cluster between tests: restart dead daemons, cancel all jobs,
        resume drained/down nodes. Node features/weights changed by a test are not restored.
        """
        deadline = time.monotonic() + timeout_s
        if not self.ctld_alive():
            self.start_slurmctld(timeout_s)
        for node in self.node_names:
            if not self.slurmd_alive(node):
                self._start_slurmd(node)
        self._cancel_all_jobs()
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
            pid = _read_pid(path)
            out[path.stem] = pid if _proc_alive(pid, comm) else None
        return out

    def ctld_alive(self) -> bool:
        return _proc_alive(_read_pid(self.pid_dir / "slurmctld.pid"), "slurmctld")

    def slurmd_alive(self, node: str) -> bool:
        return _proc_alive(_read_pid(self.pid_dir / f"slurmd-{node}.pid"), "slurmd")

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

    # ---------------------------------------------------------------------------- slurmrestd

    @property
    def jwt_key_path(self) -> Path:
        return self.etc_dir / "jwt_hs256.key"

    @property
    def rest_socket(self) -> Path:
        """slurmrestd's unix socket (every request still needs a JWT: see jwt_token())."""
        return self.lab_dir / "rest" / "slurmrestd.sock"

    def jwt_enabled(self) -> bool:
        """slurm.conf of this lab accepts JWTs (AuthAltTypes=auth/jwt)."""
        try:
            return "AuthAltTypes=auth/jwt" in self.conf_path.read_text()
        except OSError:
            return False

    def restd_alive(self) -> bool:
        return _proc_alive(_read_pid(self.pid_dir / "slurmrestd.pid"), "slurmrestd")

    def start_restd(self, timeout_s: float = 60) -> None:
        """Start slurmrestd (as REST_USER, unix socket, rest_auth/jwt) against this lab.

        slurmctld must accept JWTs for that: if this lab's slurm.conf does not yet, a key is
        made, the config rewritten with AuthAltTypes=auth/jwt and slurmctld restarted (its
        state is saved and recovered; munge stays the main auth). Idempotent.
        """
        if self.restd_alive():
            return
        deadline = time.monotonic() + timeout_s
        self._ensure_packages(REST_PACKAGES)
        self._jwt = True
        if not self.jwt_enabled():
            self._write_configs()  # slurm_conf_text() now adds the JWT lines
            if self.ctld_alive():
                self.stop_slurmctld()
            self.start_slurmctld(max(deadline - time.monotonic(), 1.0))
        sock_dir = self.rest_socket.parent
        sock_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(sock_dir, REST_USER)
        self.rest_socket.unlink(missing_ok=True)
        logfile = self.log_dir / "slurmrestd.log"
        env = {**self._slurm_env(), "SLURM_JWT": "daemon"}  # 22.05: use auth/jwt, not munge
        # 22.05 serves one openapi plugin by its API version; 23.02+ name theirs by daemon
        api = f"openapi/{REST_API}" if self.root is None else "openapi/slurmctld"
        argv = ["/usr/sbin/slurmrestd", "-f", str(self.conf_path), "-a", "rest_auth/jwt",
                "-s", api, f"unix:{self.rest_socket}"]
        with logfile.open("ab") as fh:
            # slurmrestd stays in the foreground: Popen's pid is the daemon's pid (chroot
            # execs it)
            if self.root is None:
                proc = subprocess.Popen(
                    argv, env=env, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                    user=REST_USER, group=pwd.getpwnam(REST_USER).pw_gid, extra_groups=[],
                    start_new_session=True,
                )
            else:
                proc = subprocess.Popen(
                    self.argv(argv, user=REST_USER), env=env, stdin=subprocess.DEVNULL,
                    stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                )
        self._restd_proc = proc  # reaped in stop_restd()
        (self.pid_dir / "slurmrestd.pid").write_text(f"{proc.pid}\n")
        while not self.rest_socket.exists():
            if proc.poll() is not None:
                raise SlurmLabError(
                    f"slurmrestd exited {proc.returncode}; read {logfile}:\n{_tail(logfile)}"
                )
            if time.monotonic() > deadline:
                self.stop_restd()
                raise SlurmLabError(f"slurmrestd made no socket in time; read {logfile}")
            time.sleep(0.05)
        log.info("slurmrestd up (pid %d, %s)", proc.pid, self.rest_socket)

    def stop_restd(self, timeout_s: float = 10) -> None:
        """Stop slurmrestd by its pid file (no-op when it is not running)."""
        self._stop_pidfiles([self.pid_dir / "slurmrestd.pid"], "slurmrestd", timeout_s)
        if self._restd_proc is not None:
            self._restd_proc.wait(timeout_s)  # already dead: only reaps the zombie
            self._restd_proc = None

    def jwt_token(self, user: str = "root", lifespan_s: int = 3600) -> str:
        """A JWT for `user` from `scontrol token` (needs jwt_enabled())."""
        out = self.run("scontrol", "token", f"username={user}", f"lifespan={lifespan_s}").stdout
        token = out.strip().removeprefix("SLURM_JWT=")
        if not token:
            raise SlurmLabError(f"`scontrol token` printed no token: {out!r}")
        return token

    # ------------------------------------------------------------------- slurmdbd + MariaDB

    @property
    def db_dir(self) -> Path:
        """MariaDB's datadir, socket and pid file. Kept across starts: mariadb-install-db
        takes seconds, so an installed datadir is reused and only the Slurm database is
        dropped and made again (slurmctld's state is wiped, so job ids start again at 1)."""
        return self.lab_dir / "mysql"

    @property
    def db_socket(self) -> Path:
        return self.db_dir / "mysqld.sock"

    @property
    def dbd_conf_path(self) -> Path:
        """slurmdbd.conf: slurmdbd has no -f and reads it next to $SLURM_CONF."""
        return self.etc_dir / "slurmdbd.conf"

    def mariadbd_alive(self) -> bool:
        return _proc_alive(_read_pid(self.pid_dir / "mariadbd.pid"), "mariadbd")

    def slurmdbd_alive(self) -> bool:
        return _proc_alive(_read_pid(self.pid_dir / "slurmdbd.pid"), "slurmdbd")

    def _db_password(self) -> str:
        """The slurm DB user's password: random per lab, readable by root only."""
        path = self.lab_dir / "db.secret"
        if not path.exists():
            path.write_text(os.urandom(12).hex())
            path.chmod(0o600)
        return path.read_text().strip()

    def slurmdbd_conf_text(self) -> str:
        cfg, lab = self.config, self.lab_dir
        return f"""\
# generated by tests/slurm/harness.py
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={cfg.dbd_port}
SlurmUser=slurm
DebugLevel=info
LogFile={lab}/log/slurmdbd.log
PidFile={lab}/pids/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={cfg.db_port}
StorageUser=slurm
StoragePass={self._db_password()}
StorageLoc={ACCT_DB}
"""

    def _mysql(self, sql: str) -> None:
        """Run SQL as MariaDB's root over the socket (unix_socket auth: we are root)."""
        proc = subprocess.run(
            ["mysql", f"--socket={self.db_socket}", "-u", "root"],
            input=sql, capture_output=True, text=True, timeout=60, check=False,
        )
        if proc.returncode != 0:
            raise SlurmLabError(f"mysql failed ({proc.returncode}): {proc.stderr.strip()}")

    def _start_mariadb(self, deadline: float) -> None:
        db, logfile = self.db_dir, self.db_dir / "mariadb.log"
        db.mkdir(parents=True, exist_ok=True)
        shutil.chown(db, MYSQL_USER, MYSQL_USER)
        if not (db / "data" / "mysql").is_dir():
            shutil.rmtree(db / "data", ignore_errors=True)
            with (self.log_dir / "mariadb-install.log").open("wb") as fh:
                install = subprocess.run(
                    ["mariadb-install-db", f"--user={MYSQL_USER}", f"--datadir={db / 'data'}",
                     "--auth-root-authentication-method=socket", "--skip-test-db"],
                    stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                    timeout=max(deadline - time.monotonic(), 30), check=False,
                )
            if install.returncode != 0:
                raise SlurmLabError(
                    f"mariadb-install-db failed; read {self.log_dir / 'mariadb-install.log'}")
        (db / "mariadbd.pid").unlink(missing_ok=True)
        self.db_socket.unlink(missing_ok=True)
        # --no-defaults: nothing from /etc/mysql (the system service's port, socket, datadir)
        proc = subprocess.Popen(
            [str(MARIADBD), "--no-defaults", f"--user={MYSQL_USER}", f"--datadir={db / 'data'}",
             f"--socket={self.db_socket}", f"--pid-file={db / 'mariadbd.pid'}",
             "--bind-address=127.0.0.1", f"--port={self.config.db_port}",
             "--innodb-buffer-pool-size=64M", "--innodb-lock-wait-timeout=900",
             "--skip-name-resolve", f"--log-error={logfile}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._db_proc = proc  # reaped in stop_accounting()
        (self.pid_dir / "mariadbd.pid").write_text(f"{proc.pid}\n")
        while True:
            ping = subprocess.run(
                ["mysqladmin", f"--socket={self.db_socket}", "ping"],
                capture_output=True, timeout=10, check=False,
            )
            if ping.returncode == 0:
                break
            if proc.poll() is not None:
                raise SlurmLabError(
                    f"mariadbd exited {proc.returncode}; read {logfile}:\n{_tail(logfile)}")
            if time.monotonic() > deadline:
                raise SlurmLabError(f"mariadbd not up in time; read {logfile}")
            time.sleep(0.2)
        # a fresh Slurm database each start: job ids restart at 1 with slurmctld's state
        self._mysql(f"""\
DROP DATABASE IF EXISTS {ACCT_DB};
CREATE DATABASE {ACCT_DB};
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{self._db_password()}';
GRANT ALL ON {ACCT_DB}.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;
""")
        log.info("mariadbd up (pid %d, 127.0.0.1:%d)", proc.pid, self.config.db_port)

    def _start_accounting(self, deadline: float) -> None:
        """MariaDB, then slurmdbd, then cluster/accounts/users: all before slurmctld starts,
        so it registers with a slurmdbd that already knows the cluster."""
        self._start_mariadb(deadline)
        self.dbd_conf_path.write_text(self.slurmdbd_conf_text())
        shutil.chown(self.dbd_conf_path, "slurm", "slurm")
        self.dbd_conf_path.chmod(0o600)  # slurmdbd refuses a conf others can read
        self._spawn_daemon("slurmdbd", ["/usr/sbin/slurmdbd"])  # in the root, if any
        logfile = self.log_dir / "slurmdbd.log"
        while True:
            proc = self.run("sacctmgr", "-n", "-P", "list", "cluster", check=False,
                            timeout_s=10)
            if proc.returncode == 0:
                break
            pid = _read_pid(self.pid_dir / "slurmdbd.pid")
            if pid is not None and not _proc_alive(pid, "slurmdbd"):
                raise SlurmLabError(f"slurmdbd exited; read {logfile}:\n{_tail(logfile)}")
            if time.monotonic() > deadline:
                raise SlurmLabError(f"slurmdbd not answering; read {logfile}:\n{_tail(logfile)}")
            time.sleep(0.2)
        cluster = self.config.cluster_name
        self.run("sacctmgr", "-i", "add", "cluster", cluster)
        accounts = sorted({account for _user, account in self.config.associations})
        if accounts:
            self.run("sacctmgr", "-i", "add", "account", ",".join(accounts),
                     f"Cluster={cluster}")
        defaults: dict[str, str] = {}
        for user, account in self.config.associations:
            defaults.setdefault(user, account)
            self.run("sacctmgr", "-i", "add", "user", user, f"Account={account}",
                     f"Cluster={cluster}")
        for user, account in defaults.items():
            self.run("sacctmgr", "-i", "modify", "user", user, "set",
                     f"DefaultAccount={account}")
        log.info("slurmdbd up (pid %s, port %d)", _read_pid(self.pid_dir / "slurmdbd.pid"),
                 self.config.dbd_port)

    def stop_accounting(self) -> None:
        """Stop slurmdbd, then MariaDB, by pid file (no-op for what is not running)."""
        self._stop_pidfiles([self.pid_dir / "slurmdbd.pid"], "slurmdbd", 30)
        self._stop_pidfiles([self.pid_dir / "mariadbd.pid"], "mariadbd", 60)
        if self._db_proc is not None:
            self._db_proc.wait(10)  # already dead: only reaps the zombie
            self._db_proc = None

    def sacct_jobs(self, *job_ids: int | str) -> list[dict[str, Any]]:
        """`sacct --json -j IDS` jobs (filtered here too: 22.05's --json may return more)."""
        out = self.run("sacct", "--json", "-j", ",".join(str(j) for j in job_ids)).stdout
        wanted = {str(j) for j in job_ids}
        return [j for j in json.loads(out)["jobs"] if str(j.get("job_id")) in wanted]

    def wait_sacct_ended(self, *job_ids: int, timeout_s: float = 30) -> list[dict[str, Any]]:
        """Until slurmdbd holds every job with an end time (slurmctld sends it a moment
        after the job ends); returns their sacct --json records."""
        deadline = time.monotonic() + timeout_s
        while True:
            jobs = self.sacct_jobs(*job_ids)
            ended = {str(j["job_id"]) for j in jobs if j["time"]["end"]}
            if ended >= {str(j) for j in job_ids}:
                return jobs
            if time.monotonic() > deadline:
                raise SlurmLabError(
                    f"slurmdbd has no end for jobs {sorted({str(j) for j in job_ids} - ended)} "
                    f"after {timeout_s}s; read {self.log_dir / 'slurmdbd.log'}")
            time.sleep(0.5)

    # ------------------------------------------------------------------------------ queries

    def sinfo_nodes(self) -> dict[str, dict[str, Any]]:
        """Nodes by name in 22.05's `sinfo --json` shape: state 'idle' + state_flags ['DRAIN'],
        reason, gres, cpus. 23.02+ have no nodes in `sinfo --json`: there they come from
        `scontrol show nodes --json` (state ['IDLE', 'DRAIN']), put into that shape."""
        if self.legacy:
            data = json.loads(self.run("sinfo", "--json").stdout)
            return {node["name"]: node for node in data["nodes"]}
        data = json.loads(self.run("scontrol", "show", "nodes", "--json").stdout)
        out = {}
        for node in data["nodes"]:
            flags = list(node["state"])
            base = next((f for f in flags if f in _BASE_NODE_STATES), "UNKNOWN")
            if base in flags:
                flags.remove(base)
            out[node["name"]] = {**node, "state": base.lower(), "state_flags": flags}
        return out

    def show_node(self, name: str) -> str:
        """Raw `scontrol show node NAME` (22.05 has no `scontrol --json`)."""
        return self.run("scontrol", "show", "node", name).stdout

    def node_state(self, name: str) -> str:
        """Compact state as scontrol prints it: IDLE, IDLE+DRAIN, DOWN+NOT_RESPONDING, ..."""
        match = re.search(r"\bState=(\S+)", self.show_node(name))
        if not match:
            raise SlurmLabError(f"no State= in `scontrol show node {name}`")
        return match.group(1)

    def wait_node_state(self, name: str, states: str | Iterable[str], timeout_s: float = 30) -> str:
        """Poll node_state() until it is one of `states` (exact, e.g. 'IDLE').

        Needed after `state=resume`: 22.05 shows IDLE+NOT_RESPONDING until its next ping.
        """
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout_s
        while (state := self.node_state(name)) not in wanted:
            if time.monotonic() > deadline:
                raise SlurmLabError(
                    f"node {name} still {state} after {timeout_s}s, wanted {sorted(wanted)}; "
                    f"read {self.log_file(name)}"
                )
            time.sleep(0.2)
        return state

    def node_reason(self, name: str) -> str:
        """Reason text without the ' [user@time]' suffix scontrol adds; '' when none."""
        suffix = r"(?: \[[^\]@]*@[^\]]*\])?"  # " [root@2024-05-01T12:00:00]"
        match = re.search(rf"^\s*Reason=(.*?){suffix}\s*$", self.show_node(name), re.M)
        return match.group(1) if match else ""

    def hostnames(self, hostlist: str) -> list[str]:
        """Expand a Slurm hostlist ('n[1-3,5]') with scontrol itself."""
        return self.run("scontrol", "show", "hostnames", hostlist).stdout.split()

    def switches(self) -> dict[str, dict[str, str]]:
        """`scontrol show topology` as {switch: {'Level': '0', 'Nodes': 'n[1-4]', ...}}."""
        out: dict[str, dict[str, str]] = {}
        for line in self.run("scontrol", "show", "topology").stdout.splitlines():
            fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            if "SwitchName" in fields:
                out[fields.pop("SwitchName")] = fields
        return out

    def sbatch(self, *args: str, user: str | None = None) -> int:
        """Submit with --parsable and return the job id; runs in jobs_dir so output stays there.

        `user`: submit as that user (through runuser; jobs_dir is world-writable)."""
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        out = self.run("sbatch", "--parsable", *args, cwd=self.jobs_dir, user=user).stdout.strip()
        try:
            return int(out.split(";", 1)[0])
        except ValueError as exc:
            raise SlurmLabError(f"sbatch printed {out!r}, not a job id") from exc

    def show_job(self, jobid: int) -> str:
        return self.run("scontrol", "show", "job", str(jobid)).stdout

    def job_state(self, jobid: int) -> str:
        """JobState (RUNNING, PENDING, COMPLETED, ...); MinJobAge=300 keeps finished jobs."""
        match = re.search(r"\bJobState=(\S+)", self.show_job(jobid))
        if not match:
            raise SlurmLabError(f"no JobState= in `scontrol show job {jobid}`")
        return match.group(1)

    def job_nodes(self, jobid: int) -> list[str]:
        """Expanded NodeList of a job ([] while pending)."""
        match = re.search(r"^\s*NodeList=(\S+)", self.show_job(jobid), re.M)
        if not match or match.group(1) == "(null)":
            return []
        return self.hostnames(match.group(1))

    def wait_job_state(self, jobid: int, states: str | Iterable[str], timeout_s: float = 30) -> str:
        """Poll until the job is in one of `states`; fails fast on another terminal state."""
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.job_state(jobid)
            if state in wanted:
                return state
            if state in TERMINAL_JOB_STATES:
                raise SlurmLabError(f"job {jobid} ended {state}, wanted {sorted(wanted)}")
            if time.monotonic() > deadline:
                raise SlurmLabError(
                    f"job {jobid} still {state} after {timeout_s}s, wanted {sorted(wanted)}; "
                    f"read {self.log_file('slurmctld')}"
                )
            time.sleep(0.2)

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
                    + _tail(self.log_file("slurmctld"))
                )
            for node in self.node_names:
                pid = _read_pid(self.pid_dir / f"slurmd-{node}.pid")
                if pid is not None and not _proc_alive(pid, "slurmd"):
                    raise SlurmLabError(
                        f"slurmd of {node} died; read {self.log_file(node)}:\n"
                        + _tail(self.log_file(node))
                    )
            time.sleep(0.2)
        bad = {node: state for node, state in states.items() if state != "idle"} or states
        logs = ", ".join(str(self.log_file(node)) for node in bad if node in self.node_names)
        raise SlurmLabError(
            f"nodes not idle after {timeout_s:.0f}s: {bad or 'sinfo failed'}; "
            f"read {logs or self.log_file('slurmctld')}"
        )

    # ------------------------------------------------------------------------------ internals

    def _check_ports(self) -> None:
        ports = {"slurmctld": self.config.ctld_port}
        if self.config.accounting:
            ports.update(slurmdbd=self.config.dbd_port, mariadbd=self.config.db_port)
        for i, node in enumerate(self.node_names, start=1):
            ports[f"slurmd {node}"] = self.config.node_port0 + i
        busy = [f"{who}:{port}" for who, port in ports.items() if not _port_free(port)]
        if busy:
            raise SlurmLabError(
                f"ports in use: {', '.join(busy)}. Another Slurm (another lab dir?) is running; "
                "stop it (`python tests/slurm/harness.py down --lab DIR`) or pick other ports "
                "(ctld_port, node_port0, dbd_port, db_port)"
            )

    def _ensure_packages(self, packages: Sequence[str] = PACKAGES) -> None:
        if shutil.which("dpkg-query") is None:
            daemons = ("/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged")
            if all(Path(d).exists() for d in daemons):
                return  # not Debian, but Slurm is there: try it
            raise SlurmLabError(f"no dpkg-query and no {daemons}: install Slurm 22.05 + munge")
        missing = []
        for pkg in packages:
            proc = subprocess.run(
                ["dpkg-query", "-W", "-f=${Status}", pkg],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.stdout.strip() != "install ok installed":
                missing.append(pkg)
        if not missing:
            return
        log.info("installing %s", " ".join(missing))
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        ):
            proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                err = proc.stderr.strip()[-2000:]
                raise SlurmLabError(f"`{shlex.join(argv)}` failed ({proc.returncode}): {err}")
        if Path("/run/systemd/system").is_dir():
            # The packages start their services with the stock config; they would hold 6817.
            subprocess.run(
                ["systemctl", "stop", "slurmctld", "slurmd"], capture_output=True, check=False
            )

    def _ensure_hostname(self) -> None:
        """SlurmctldHost/NodeHostname use the short host name, which must resolve."""
        host = socket.gethostname().split(".", 1)[0]
        try:
            socket.getaddrinfo(host, None)
        except socket.gaierror:
            log.info("adding %s to /etc/hosts", host)
            with Path("/etc/hosts").open("a") as hosts:
                hosts.write(f"127.0.0.1 {host}\n")

    def _prepare_dirs(self) -> None:
        """Fresh state/spool/logs; slurmctld runs as user slurm and needs state and log."""
        for sub in ("state", "spool", "log"):
            shutil.rmtree(self.lab_dir / sub, ignore_errors=True)
        for sub in ("state", "spool", "log", "pids", "dev", "jobs"):
            (self.lab_dir / sub).mkdir(parents=True, exist_ok=True)
        self.etc_dir.mkdir(parents=True, exist_ok=True)
        self.lab_dir.chmod(0o755)
        for sub in ("spool", "log", "pids", "dev"):
            (self.lab_dir / sub).chmod(0o755)
        (self.lab_dir / "jobs").chmod(0o1777)  # jobs of non-root test users write output here
        for sub in ("state", "log"):
            shutil.chown(self.lab_dir / sub, "slurm", "slurm")
        for node in self.node_names:
            (self.lab_dir / "spool" / node).mkdir()
        (self.lab_dir / "lab.json").write_text(self.config.to_json())
        for idx in range(self.config.gpus):
            dev = self.lab_dir / "dev" / f"nvidia{idx}"
            if dev.exists():
                continue
            try:
                # Slurm 22.05 drops GPUs without File= and needs a real char device for
                # CUDA_VISIBLE_DEVICES; major 195 is what the nvidia driver uses.
                os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(195, idx))
            except OSError:
                dev.touch()  # nodes still show gpu:N; jobs just get no CUDA_VISIBLE_DEVICES

    def _ensure_munge(self) -> None:
        if not MUNGE_KEY.exists() or MUNGE_KEY.stat().st_size == 0:
            log.info("creating %s", MUNGE_KEY)
            MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
            MUNGE_KEY.write_bytes(os.urandom(1024))
        shutil.chown(MUNGE_KEY, "munge", "munge")
        MUNGE_KEY.chmod(0o400)
        MUNGE_RUN.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_RUN, "munge", "munge")
        MUNGE_RUN.chmod(0o755)
        if _munge_works():
            log.info("reusing the running munged (stop() leaves it alone)")
            return
        pidfile = MUNGE_RUN / "munged.pid"
        if _proc_alive(_read_pid(pidfile), "munged"):
            raise SlurmLabError(
                "munged is running but `munge -n | unmunge` fails; read /var/log/munge/munged.log"
            )
        for stale in (pidfile, MUNGE_RUN / "munge.socket.2", MUNGE_RUN / "munge.socket.2.lock"):
            stale.unlink(missing_ok=True)
        proc = subprocess.run(
            ["runuser", "-u", "munge", "--", "/usr/sbin/munged"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if proc.returncode != 0:
            raise SlurmLabError(
                f"munged failed ({proc.returncode}): {proc.stderr.strip()}; "
                "read /var/log/munge/munged.log"
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _read_pid(pidfile) is None:
            time.sleep(0.05)
        pid = _read_pid(pidfile)
        if pid is None:
            raise SlurmLabError(f"munged wrote no {pidfile}; read /var/log/munge/munged.log")
        (self.pid_dir / "munged.pid").write_text(f"{pid}\n")  # marks "we started it"
        if not _munge_works():
            raise SlurmLabError("`munge -n | unmunge` fails; read /var/log/munge/munged.log")
        log.info("munged started (pid %d)", pid)

    def slurm_conf_text(self) -> str:
        """slurm.conf for this lab (cgroup-free, no health check, no accounting)."""
        cfg, lab = self.config, self.lab_dir
        host = socket.gethostname().split(".", 1)[0]
        gres = f" Gres=gpu:{cfg.gpus}" if cfg.gpus else ""
        ports = f"[{cfg.node_port0 + 1}-{cfg.node_port0 + cfg.nodes}]"
        if cfg.nodes == 1:
            ports = str(cfg.node_port0 + 1)
        nodes = _hostlist("n", 1, cfg.nodes)
        return f"""\
# generated by tests/slurm/harness.py
ClusterName={cfg.cluster_name}
SlurmctldHost={host}(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
SlurmctldPort={cfg.ctld_port}
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={lab}/state
SlurmdSpoolDir={lab}/spool/%n
SlurmctldPidFile={lab}/pids/slurmctld.pid
SlurmdPidFile={lab}/pids/slurmd-%n.pid
SlurmctldLogFile={lab}/log/slurmctld.log
SlurmdLogFile={lab}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups: works in containers / VMs without a delegated cgroup tree
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
{self._legacy_none_plugins()}MpiDefault=none
MailProg=/bin/true
# node hardware is fake: trust slurm.conf, not the host's cores/memory
SlurmdParameters=config_overrides
ReturnToService=2
SchedulerType=sched/backfill
# react within ~1 s instead of the 60 s / 30 s / 3 s defaults
SchedulerParameters=sched_interval=1,bf_interval=1,batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
{self._topology_plugin_conf()}{self._accounting_conf()}MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout={cfg.slurmd_timeout_s}
InactiveLimit=0
KillWait=10
NodeName={nodes} NodeHostname={host} NodeAddr=127.0.0.1 Port={ports} CPUs={cfg.cpus} \
RealMemory={cfg.mem_mb}{gres} State=UNKNOWN
{self._partitions_conf()}{self._hooks_conf()}{self._jwt_conf()}{cfg.extra_conf}
"""

    @property
    def legacy(self) -> bool:
        """Slurm 22.05, which still has the */none plugins that 23.11+ dropped (their
        absence is the default there)."""
        return self.config.version == HOST_VERSION

    def _legacy_none_plugins(self) -> str:
        return "SwitchType=switch/none\nJobCompType=jobcomp/none\n" if self.legacy else ""

    def _topology_plugin_conf(self) -> str:
        if self.config.topology == "yaml":
            return ""  # topology.yaml names each topology's plugin itself
        return f"TopologyPlugin=topology/{self.config.topology}\n"

    def _partitions_conf(self) -> str:
        main = "PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
        if self.config.topology != "yaml":
            return main + "\n"
        return (f"{main} Topology=tree\n"
                "PartitionName=blocks Nodes=ALL MaxTime=INFINITE State=UP Topology=blocks\n")

    def _accounting_conf(self) -> str:
        cfg = self.config
        if not cfg.accounting:
            if not self.legacy:
                return ""
            return ("AccountingStorageType=accounting_storage/none\n"
                    "JobAcctGatherType=jobacct_gather/none\n")
        # gres/gpu in AllocTRES is what reconciliation compares with; jobacct_gather/none
        # because no test needs per-step memory/CPU samples (they cost CPU on small machines)
        return f"""\
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={cfg.dbd_port}
AccountingStorageTRES=gres/gpu
{"JobAcctGatherType=jobacct_gather/none" + chr(10) if self.legacy else ""}"""

    def _hooks_conf(self) -> str:
        cfg = self.config
        lines = [f"{key}={value}" for key, value in (("Prolog", cfg.prolog), ("Epilog", cfg.epilog))
                 if value]
        if cfg.prolog and cfg.prolog_flags:
            lines.append(f"PrologFlags={cfg.prolog_flags}")
        return "".join(line + "\n" for line in lines)

    def _jwt_conf(self) -> str:
        """JWT as an alternative auth (for slurmrestd) once start_restd() has made the key."""
        if not self._jwt:
            return ""
        if not self.jwt_key_path.exists():
            self.jwt_key_path.write_bytes(os.urandom(32))
        shutil.chown(self.jwt_key_path, "slurm", "slurm")  # slurmctld reads it, nobody else
        self.jwt_key_path.chmod(0o600)
        return f"AuthAltTypes=auth/jwt\nAuthAltParameters=jwt_key={self.jwt_key_path}\n"

    def leaf_ranges(self) -> list[tuple[int, int]]:
        """(first, last) node number of each leaf: consecutive, sizes differ by <= 1."""
        cfg = self.config
        base, extra = divmod(cfg.nodes, cfg.leaves)
        ranges, first = [], 1
        for leaf in range(1, cfg.leaves + 1):
            last = first + base - 1 + (1 if leaf <= extra else 0)
            ranges.append((first, last))
            first = last + 1
        return ranges

    def topology_conf_text(self) -> str:
        """tree: `leaves` leaf switches over leaf_ranges() + a spine; block: one block per leaf
        with BlockSizes=<smallest leaf>,<all nodes> (topology/block needs equal-sized base
        blocks: nodes beyond the smallest leaf's size are left out of the blocks)."""
        cfg = self.config
        if cfg.topology_conf is not None:
            return cfg.topology_conf
        lines = []
        if cfg.topology == "block":
            size = min(last - first + 1 for first, last in self.leaf_ranges())
            for leaf, (first, _last) in enumerate(self.leaf_ranges(), start=1):
                nodes = _hostlist("n", first, first + size - 1)
                lines.append(f"BlockName=block{leaf} Nodes={nodes}")
            sizes = [size] if cfg.leaves == 1 else [size, size * cfg.leaves]
            lines.append("BlockSizes=" + ",".join(map(str, sizes)))
            return "\n".join(lines) + "\n"
        for leaf, (first, last) in enumerate(self.leaf_ranges(), start=1):
            lines.append(f"SwitchName=leaf{leaf} Nodes={_hostlist('n', first, last)}")
        lines.append(f"SwitchName=spine Switches={_hostlist('leaf', 1, cfg.leaves)}")
        return "\n".join(lines) + "\n"

    def topology_yaml_text(self) -> str:
        """topology.yaml (25.05+): "tree" (the default; leaves + spine) and "blocks" (one block
        per leaf), for topology="yaml"."""
        size = min(last - first + 1 for first, last in self.leaf_ranges())
        out = ["---", "- topology: tree", "  cluster_default: true", "  tree:",
               "    switches:"]
        out += ["      - switch: spine", f"        children: leaf[1-{self.config.leaves}]"]
        for leaf, (first, last) in enumerate(self.leaf_ranges(), start=1):
            nodes = _hostlist("n", first, last)
            out += [f"      - switch: leaf{leaf}", f"        nodes: {nodes}"]
        out += ["- topology: blocks", "  cluster_default: false", "  block:",
                "    block_sizes:", f"      - {size}", "    blocks:"]
        for leaf, (first, _last) in enumerate(self.leaf_ranges(), start=1):
            out += [f"      - block: block{leaf}",
                    f"        nodes: {_hostlist('n', first, first + size - 1)}"]
        return "\n".join(out) + "\n"

    def gres_conf_text(self) -> str:
        cfg = self.config
        text = "AutoDetect=off\n"
        if cfg.gpus:
            files = _hostlist(f"{self.lab_dir}/dev/nvidia", 0, cfg.gpus - 1)
            text += f"NodeName={_hostlist('n', 1, cfg.nodes)} Name=gpu File={files}\n"
        return text

    def _write_configs(self) -> None:
        self.conf_path.write_text(self.slurm_conf_text())
        (self.etc_dir / "gres.conf").write_text(self.gres_conf_text())
        yaml_path = self.etc_dir / "topology.yaml"
        if self.config.topology == "yaml":
            yaml_path.write_text(self.topology_yaml_text())
            (self.etc_dir / "topology.conf").unlink(missing_ok=True)
        else:
            yaml_path.unlink(missing_ok=True)  # 25.05+ would prefer it to topology.conf
            (self.etc_dir / "topology.conf").write_text(self.topology_conf_text())
        cgroup = self.etc_dir / "cgroup.conf"
        if self.legacy:
            cgroup.unlink(missing_ok=True)
        else:
            # 23.11+ slurmd insists on a mounted cgroup tree unless told there is none
            cgroup.write_text("CgroupPlugin=disabled\n")

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
                f"{self.log_dir / (name + '.log')}:\n{_tail(out)}"
            )

    def _start_ctld(self, deadline: float) -> None:
        self._spawn_daemon("slurmctld", ["/usr/sbin/slurmctld", "-f", str(self.conf_path)])
        logfile = self.log_file("slurmctld")
        while True:
            proc = self.run("scontrol", "ping", check=False, timeout_s=10)
            if "is UP" in proc.stdout:
                log.info("slurmctld up (pid %s)", _read_pid(self.pid_dir / "slurmctld.pid"))
                return
            pid = _read_pid(self.pid_dir / "slurmctld.pid")
            if pid is not None and not _proc_alive(pid, "slurmctld"):
                raise SlurmLabError(f"slurmctld exited; read {logfile}:\n{_tail(logfile)}")
            if time.monotonic() > deadline:
                raise SlurmLabError(f"slurmctld not up in time; read {logfile}:\n{_tail(logfile)}")
            time.sleep(0.1)

    def _start_slurmd(self, node: str) -> None:
        self._spawn_daemon(
            f"slurmd-{node}", ["/usr/sbin/slurmd", "-f", str(self.conf_path), "-N", node]
        )

    def _stop_pidfiles(self, files: Iterable[Path], comm: str, timeout_s: float) -> None:
        files = list(files)
        pids = {pid: comm for f in files if (pid := _read_pid(f)) is not None}
        stuck = _stop_pids(pids, timeout_s)
        if stuck:
            log.error("%s pids %s survived SIGKILL (uninterruptible?)", comm, stuck)
        for f in files:
            f.unlink(missing_ok=True)  # daemons remove their own pid file; this gets the rest

    def _cancel_all_jobs(self, timeout_s: float = 20) -> None:
        """scancel everything and wait until nothing runs/completes (no slurmstepd left)."""
        proc = self.run("squeue", "-h", "-o", "%i", check=False, timeout_s=10)
        jobs = proc.stdout.split()
        if proc.returncode != 0 or not jobs:
            return
        self.run("scancel", *jobs, check=False, timeout_s=10)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            proc = self.run("squeue", "-h", "-t", "R,CG,S,CF,PD", "-o", "%i", check=False)
            if proc.returncode != 0 or not proc.stdout.strip():
                return
            time.sleep(0.2)
        log.warning("jobs still active %ss after scancel: %s", timeout_s, proc.stdout.split())

    def _our_stepds(self) -> list[int]:
        """slurmstepd processes of this lab. Their environ is empty, but cwd and the log fd
        point into lab_dir (a slurmstepd outlives a killed slurmd and keeps its job running).
        """
        prefixes = [str(self.lab_dir) + "/"]
        if self.root is not None:  # seen from outside, a chrooted cwd carries the root's path
            prefixes.append(f"{self.root}{self.lab_dir}/")
        mine = []
        for pid in _procs_named("slurmstepd"):
            proc = Path(f"/proc/{pid}")
            try:
                links = [proc / "cwd", *(proc / "fd").iterdir()]
                targets = [os.readlink(link) for link in links]
            except OSError:
                continue
            if any(target.startswith(tuple(prefixes)) for target in targets):
                mine.append(pid)
        return mine


# ---------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """up / down / status, for poking at the lab by hand."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a fresh lab and leave it running")
    down = sub.add_parser("down", help="stop the lab in --lab")
    status = sub.add_parser("status", help="daemons and sinfo of the lab in --lab")
    for p in (up, down, status):
        p.add_argument("--lab", type=Path, default=None, help="lab dir (default %(default)s)")
    up.add_argument("--nodes", type=int, default=8)
    up.add_argument("--leaves", type=int, default=2)
    up.add_argument("--timeout", type=float, default=90)
    up.add_argument("--port", type=int, default=6817, help="slurmctld port (slurmdbd +2, DB +3)")
    up.add_argument("--accounting", action="store_true", help="slurmdbd on a private MariaDB")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="[slurmlab %(relativeCreated)6.0fms] %(message)s"
    )
    lab_dir: Path = args.lab or default_lab_dir()
    try:
        if args.cmd == "up":
            lab = SlurmLab(SlurmLabConfig(
                lab_dir=lab_dir, nodes=args.nodes, leaves=args.leaves, ctld_port=args.port,
                node_port0=args.port + 10183, accounting=args.accounting))
            lab.start(timeout_s=args.timeout)
            print(f"export SLURM_CONF={lab.conf_path}")
        elif args.cmd == "down":
            SlurmLab.from_lab_dir(lab_dir).stop()
        else:
            lab = SlurmLab.from_lab_dir(lab_dir)
            for daemon, pid in lab.status().items():
                print(f"{daemon:16} {pid if pid else 'not running'}")
            if lab.ctld_alive():
                print(lab.run("sinfo", "-N", "-o", "%N %T %G %E", check=False).stdout, end="")
            print(f"export SLURM_CONF={lab.conf_path}")
    except SlurmLabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
