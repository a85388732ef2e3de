"""Which Slurm job a process belongs to, from /proc: the safety net under the prolog hooks.

The Prolog/Epilog hooks (see `gpufleet.agent.accounting`) are the exact source of job
attribution. Where they are missing (Prolog not configured, its spool file lost) a GPU can be
busy with a job the agent does not know. NVML names the GPU's compute processes by pid; this
module maps such a pid to its Slurm job:

1. ``/proc/<pid>/cgroup`` (readable by anyone): slurmstepd puts every task in a cgroup whose
   path names the job, e.g. cgroup v1 ``4:devices:/slurm/uid_1000/job_42/step_0/task_0``
   (``/slurm_<node>/...`` under multiple-slurmd) and cgroup v2
   ``0::/system.slice/slurmstepd.scope/job_42/step_0/user/task_0``
   (``<node>_slurmstepd.scope`` under multiple-slurmd).
2. failing that, ``SLURM_JOB_ID`` in ``/proc/<pid>/environ``: only root (or the process's
   own user) may read it, and a process can change its environment, so it comes second.

The pids are those of the agent's pid namespace: run the agent in the host's (as its systemd
unit does) or NVML's pids name nothing here.

Never does: raise for a pid that vanished, a file it may not read, or a process that is not
a Slurm job's (all three are ordinary on a busy node: the answer is None); nor write anything.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# slurm[_node]/uid_X/job_Y (v1) or [node_]slurmstepd.scope/job_Y (v2), as a whole path part
_CGROUP_JOB = re.compile(
    r"(?:^|/)(?:slurm(?:_[^/]+)?/uid_(?P<uid>[0-9]{1,10})|[^/]*slurmstepd\.scope)"
    r"/job_(?P<job>[0-9]{1,12})(?:/|$)"
)
_ENV_JOB = re.compile(rb"(?:^|\x00)SLURM_JOB_ID=([0-9]{1,12})(?:\x00|$)")
_STATUS_UID = re.compile(r"^Uid:\s+([0-9]+)", re.MULTILINE)
# environ of a process can be large (it is the whole environment): read no more than this
_ENVIRON_MAX_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class ProcJob:
    """A process found to belong to a Slurm job."""

    pid: int
    job_id: str  # the raw Slurm job id, as SLURM_JOB_ID names it
    uid: int | None  # the job's user where known (cgroup v1 path, else the process's real uid)
    via: str  # "cgroup" or "environ": how the job was found


def job_from_cgroup(text: str) -> tuple[str, int | None] | None:
    """(job id, uid or None) named by the contents of a /proc/<pid>/cgroup file, else None.

    Each line is ``hierarchy-id:controllers:path``; the first line whose path is a Slurm job
    cgroup decides (every hierarchy of one task names the same job).
    """
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        m = _CGROUP_JOB.search(parts[2])
        if m is not None:
            uid = m.group("uid")
            return str(int(m.group("job"))), int(uid) if uid is not None else None
    return None


def job_from_environ(data: bytes) -> str | None:
    """SLURM_JOB_ID from the NUL-separated contents of a /proc/<pid>/environ file, else None."""
    m = _ENV_JOB.search(data)
    return str(int(m.group(1))) if m is not None else None


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:  # vanished (ENOENT, ESRCH) or not ours to read (EACCES): no answer
        return None


def _real_uid(pid: int, proc_root: str) -> int | None:
    text = _read_text(f"{proc_root}/{pid}/status")
    m = _STATUS_UID.search(text) if text is not None else None
    return int(m.group(1)) if m is not None else None


def job_of_pid(pid: int, proc_root: str = "/proc") -> ProcJob | None:
    """The Slurm job of process `pid`, or None: not a Slurm process, gone, or unreadable."""
    cgroup = _read_text(f"{proc_root}/{pid}/cgroup")
    if cgroup is not None:
        found = job_from_cgroup(cgroup)
        if found is not None:
            job_id, uid = found
            return ProcJob(pid, job_id, uid if uid is not None else _real_uid(pid, proc_root),
                           "cgroup")
    try:
        with open(f"{proc_root}/{pid}/environ", "rb") as f:
            environ = f.read(_ENVIRON_MAX_BYTES)
    except PermissionError:
        log.debug("pid %d: %s/%d/environ not readable (agent not root?)", pid, proc_root, pid)
        return None
    except OSError:
        return None  # the process ended between NVML's list and now
    env_job = job_from_environ(environ)
    if env_job is None:
        return None
    return ProcJob(pid, env_job, _real_uid(pid, proc_root), "environ")


def jobs_of_pids(pids: Iterable[int], proc_root: str = "/proc") -> dict[int, ProcJob | None]:
    """`job_of_pid` for each pid (None where no job was found)."""
    return {pid: job_of_pid(pid, proc_root) for pid in pids}


def user_name(uid: int | None) -> str:
    """The login name of `uid` ("" when unknown), as SLURM_JOB_USER would name it."""
    if uid is None:
        return ""
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # no passwd entry on this node (e.g. users only in LDAP, nscd down)
        return str(uid)
