"""The types every Slurm client shares: the error, a node and a job as gpufleet sees them, the
client Protocols, and the checks that keep bad input out of Slurm's argv and URLs.

Nothing here runs Slurm or imports another module of this package (the clients import this).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

SLURM_KINDS = ("cli", "rest", "pyslurm", "none")


class SlurmError(Exception):
    """A Slurm call failed or timed out, or printed what gpufleet cannot read; `transient`
    says whether a retry may help."""

    def __init__(self, message: str, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class SlurmNode:
    name: str
    state: str  # compact, as scontrol prints it: IDLE, MIXED+DRAIN, DOWN+NOT_RESPONDING
    reason: str
    features: tuple[str, ...] = ()  # available features (what set_features sets)
    weight: int = 1

    @property
    def drained(self) -> bool:
        return "DRAIN" in self.state.split("+")


@dataclass(frozen=True)
class SlurmNodeInfo:
    """A node with what placement needs besides SlurmNode: its GPUs, partitions and CPUs."""

    node: SlurmNode
    gres: str  # "gpu:8", "gpu:h100:8(S:0-1)"
    partitions: tuple[str, ...]
    active_features: tuple[str, ...]
    cpus: int | None
    alloc_cpus: int | None
    # Slurm's LastBusyTime (Unix seconds): when the node last had a job; None: not read
    last_busy_s: int | None = None
    # what the node's jobs hold now ("gpu:5": a count, no indices on any version); "" when
    # the document has no such field
    gres_used: str = ""


@dataclass(frozen=True)
class SlurmJob:
    """One job as squeue/scontrol/slurmrestd describe it: what recovery needs to decide."""

    job_id: str
    state: str  # as squeue prints it: RUNNING, PENDING, COMPLETING, COMPLETED, FAILED, ...
    nodes: tuple[str, ...]  # expanded; () while pending
    requeue: bool  # submitted requeueable (--requeue, or JobRequeue=1 by default)
    batch: bool  # a batch job (only those can be requeued)
    comment: str
    restart_count: int  # Slurm's own count of requeues
    exit_status: int | None  # the process exit status (93 = do not requeue); None: killed
    exit_signal: int  # the signal that ended it, 0 if none
    excluded_nodes: tuple[str, ...]
    start_time_s: int  # Unix seconds; 0 if not started
    state_reason: str = ""
    end_time_s: int = 0  # Unix seconds; for a running job, its time limit's end
    gres_detail: tuple[str, ...] = ()  # per allocated node: "gpu:2(IDX:0-1)"
    partitions: tuple[str, ...] = ()  # a pending job may name several: "gpu,debug"
    required_nodes: tuple[str, ...] = ()  # --nodelist, expanded


@dataclass(frozen=True)
class SwitchRequest:
    """A pending job's `--switches=count@max-wait` (squeue's ReqSwitch and Wait4Switch), with
    what it asks per node: what the controller's switch holds (placement/switch_hold.py)
    read. 22.05's `squeue --json` has no switch fields, so this is its own read."""

    job_id: str
    switches: int  # leaf switches at most; 0: none asked
    wait_s: int  # how long Slurm keeps the job waiting for that count
    nodes: int  # 0: not one number (a range such as 2-4)
    tres_per_node: str  # as squeue prints it: "gres:gpu:8" (22.05), "gres/gpu:8" (23.02+)


def slurm_time_s(text: str) -> int | None:
    """Slurm's time format (`90` minutes, `MM:SS`, `HH:MM:SS`, `D-HH[:MM[:SS]]`) -> seconds;
    None for no limit (UNLIMITED, INFINITE, NONE, empty). ValueError for anything else."""
    value = text.strip()
    if value.upper() in {"UNLIMITED", "INFINITE", "NONE", ""}:
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value)
    if not m:
        raise ValueError(f"time {text!r}: not a Slurm time (MM, MM:SS, HH:MM:SS, D-HH...)")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        return days * 86400 + (a or 0) * 3600 + (b or 0) * 60 + (c or 0)
    if c is not None:  # HH:MM:SS
        return (a or 0) * 3600 + (b or 0) * 60 + c
    if b is not None:  # MM:SS
        return (a or 0) * 60 + b
    return (a or 0) * 60  # MM


@dataclass(frozen=True)
class SlurmPartition:
    name: str
    default: bool
    max_time: str  # as Slurm prints it: UNLIMITED, 1-00:00:00, 60


class SlurmClient(Protocol):
    def nodes(self) -> dict[str, SlurmNode]: ...

    def node(self, name: str) -> SlurmNode: ...

    def drain(self, name: str, reason: str) -> None: ...

    def resume(self, name: str) -> None: ...

    def set_weight(self, name: str, weight: int) -> None: ...

    def set_features(self, name: str, features: tuple[str, ...]) -> None: ...

    def ping(self) -> bool: ...


@runtime_checkable
class SlurmJobClient(Protocol):
    """What recovery needs from Slurm besides nodes. All three clients have it: the CLI
    client; the REST client reads jobs from slurmrestd and acts through scancel/scontrol;
    the pyslurm client through pyslurm's Job. Runtime-checkable so the controller refuses a
    client without it when recovery is asked for, at start, not at the first fault."""

    def jobs_on_node(self, node: str) -> list[SlurmJob]: ...

    def job(self, job_id: str) -> SlurmJob | None: ...

    def signal_job(self, job_id: str, signal: str, scope: str) -> None: ...

    def requeue(self, job_id: str) -> None: ...

    def update_job(self, job_id: str, *, start_now_plus_s: int | None = None,
                   excluded_nodes: tuple[str, ...] | None = None) -> None: ...


@runtime_checkable
class SlurmQueueClient(Protocol):
    """What routine diagnostics on idle nodes read: every node with its partitions and
    LastBusyTime, and the jobs waiting to start. The CLI and REST clients have it;
    runtime-checkable so the controller refuses a client without it at start."""

    def node_infos(self) -> dict[str, SlurmNodeInfo]: ...

    def pending_jobs(self) -> list[SlurmJob]: ...


_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_FEATURE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Slurm's weight is a uint32; 0 would be legal but means "first choice" to the scheduler,
# which no policy here wants to set by accident
MAX_WEIGHT = 2**32 - 2
SIGNAL_SCOPES = ("batch", "full", "steps")
_SIGNAL = re.compile(r"^(SIG)?[A-Z0-9]{1,8}$")
_JOB_ID = re.compile(r"^[0-9]{1,10}$")

# Slurm messages that no retry will fix (checked case-insensitively)
_PERMANENT = (
    "invalid node name",
    "invalid user",
    "access denied",
    "not a valid number",
    "invalid argument",
    "invalid feature",
    "permission denied",
    "user not found",
    "not found",  # "Node nX not found"
)


def is_permanent_message(msg: str) -> bool:
    low = msg.lower()
    return any(p in low for p in _PERMANENT)


def check_node_name(name: str) -> str:
    """Node names go into scontrol argv and URLs: allow only what Slurm node names look like."""
    if not isinstance(name, str) or not _NODE_NAME.match(name):
        raise SlurmError(f"invalid node name {name!r}", transient=False)
    return name


def check_weight(name: str, weight: int) -> int:
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
        raise SlurmError(f"node {name}: weight {weight!r} is not an integer in 1..{MAX_WEIGHT}",
                         transient=False)
    return weight


def check_features(name: str, features: Iterable[str]) -> tuple[str, ...]:
    """Features go into a comma-separated scontrol value: no commas, spaces or '=' inside."""
    out: list[str] = []
    for f in features:
        if not isinstance(f, str) or not _FEATURE.match(f):
            raise SlurmError(f"node {name}: invalid feature {f!r} (letters, digits, _ . - only)",
                             transient=False)
        if f not in out:
            out.append(f)
    return tuple(out)


def check_job_id(job_id: str) -> str:
    """Job ids go into scancel/scontrol argv: digits only (no array or het suffixes)."""
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
        raise SlurmError(f"invalid job id {job_id!r}: expected digits", transient=False)
    return job_id


def check_signal(sig: str) -> str:
    """USR1, SIGUSR1 or a number: what scancel --signal accepts; nothing else reaches argv."""
    if not isinstance(sig, str) or not _SIGNAL.match(sig.upper()):
        raise SlurmError(f"invalid signal {sig!r}: expected a name like USR1 or a number",
                         transient=False)
    return sig.upper()


def clean_reason(reason: str) -> str:
    """Slurm keeps the reason as free text; newlines would break `scontrol -o` parsing."""
    return " ".join(reason.split())[:200]


def split_features(text: str | None) -> tuple[str, ...]:
    if not text or text == "(null)":
        return ()
    return tuple(f for f in text.split(",") if f)


def expand_hostlist(expr: str) -> list[str]:
    """n[1-3],gpu07 -> [n1, n2, n3, gpu07] (Slurm hostlist syntax, via ClusterShell)."""
    # imported here: `gpufleet --help` on an install without ClusterShell must still load
    from ClusterShell.NodeSet import NodeSet, NodeSetParseError

    try:
        return list(NodeSet(expr))
    except NodeSetParseError as e:
        raise SlurmError(f"invalid hostlist {expr!r}: {e}", transient=False) from e


def fold_hostlist(names: Iterable[str]) -> str:
    """[n1, n2, n3] -> n[1-3] (what Slurm takes in ExcNodeList= and the like)."""
    from ClusterShell.NodeSet import NodeSet

    return str(NodeSet.fromlist(list(names)))


def decode_exit_code(raw: int) -> tuple[int | None, int]:
    """A raw wait status (22.05 and 23.02 print it so: 93 << 8 for `exit 93`) -> (exit
    status, signal). A job killed by a signal has no exit status."""
    sig = raw & 0x7F
    return (None if sig else (raw >> 8) & 0xFF), sig
