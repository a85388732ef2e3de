"""Talking to Slurm: the `SlurmClient` Protocol, its CLI implementation, and the factory that
picks one of the three (CLI, slurmrestd, pyslurm).

The CLI client reads with the `--json` output of sinfo (stable across 22.05+) and `scontrol -o
show node`, and changes nodes with `scontrol update`: 22.05 has neither `scontrol --json`
(23.02+) nor a node-update endpoint in slurmrestd (v0.0.38 has GET only, checked against
22.05.8's own /openapi/v3). Every call has a timeout: a slow slurmctld must never hang the
caller. Errors become `SlurmError` naming the node and the command, with `transient` saying
whether a retry may help (controller down or slow: yes; unknown node, bad value: no).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from ClusterShell.NodeSet import NodeSet, NodeSetParseError

SLURM_KINDS = ("cli", "rest", "pyslurm", "none")


class SlurmError(Exception):
    """A Slurm call failed or timed out; `transient` says whether a retry may help."""

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


class SlurmClient(Protocol):
    def nodes(self) -> dict[str, SlurmNode]: ...

    def node(self, name: str) -> SlurmNode: ...

    def drain(self, name: str, reason: str) -> None: ...

    def resume(self, name: str) -> None: ...

    def set_weight(self, name: str, weight: int) -> None: ...

    def set_features(self, name: str, features: tuple[str, ...]) -> None: ...

    def ping(self) -> bool: ...


_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_FEATURE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Slurm's weight is a uint32; 0 would be legal but means "first choice" to the scheduler,
# which no policy here wants to set by accident
MAX_WEIGHT = 2**32 - 2

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
    if not _NODE_NAME.match(name):
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


def clean_reason(reason: str) -> str:
    """Slurm keeps the reason as free text; newlines would break `scontrol -o` parsing."""
    return " ".join(reason.split())[:200]


def split_features(text: str | None) -> tuple[str, ...]:
    if not text or text == "(null)":
        return ()
    return tuple(f for f in text.split(",") if f)


def node_from_json(n: Mapping[str, Any]) -> SlurmNode:
    """A node of `sinfo --json` or slurmrestd v0.0.38 (the same data_parser output in 22.05):
    state 'idle' + state_flags ['DRAIN'] -> 'IDLE+DRAIN'."""
    flags = [str(f) for f in n.get("state_flags", []) or [] if f]
    state = "+".join([str(n.get("state", "")).upper(), *flags])
    return SlurmNode(str(n["name"]), state, str(n.get("reason", "") or ""),
                     split_features(n.get("features")), int(n.get("weight", 1) or 1))


T = TypeVar("T")


def parse_each(items: Any, parse: Callable[[Mapping[str, Any]], T], what: str) -> list[T]:
    """`parse` over a list of objects from Slurm's JSON; a list or an object that is not as
    22.05 prints it is a SlurmError naming `what` (the command and the list), never a
    KeyError or TypeError out of the caller's loop."""
    if not isinstance(items, list):
        raise SlurmError(f"{what}: expected a list, got {json.dumps(items)[:80]}")
    try:
        return [parse(item) for item in items]
    except SlurmError as e:
        raise SlurmError(f"{what}: {e}", transient=e.transient) from e
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise SlurmError(f"{what}: unexpected entry ({type(e).__name__}: {e})") from e


def _json_object(text: str, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise SlurmError(f"{what} printed no JSON: {e}") from e
    if not isinstance(doc, dict):
        raise SlurmError(f"{what} printed JSON that is not an object: {text[:80]!r}")
    return doc


def expand_hostlist(expr: str) -> list[str]:
    """n[1-3],gpu07 -> [n1, n2, n3, gpu07] (Slurm hostlist syntax, via ClusterShell)."""
    try:
        return list(NodeSet(expr))
    except NodeSetParseError as e:
        raise SlurmError(f"invalid hostlist {expr!r}: {e}", transient=False) from e


def _reason_from_scontrol(text: str) -> str:
    # `Reason=gpufleet:xid79 GPU 3 ... [root@2026-11-23T10:00:00]` - free text up to the
    # [user@time] suffix Slurm appends, on one line of `scontrol -o`.
    m = re.search(r"\bReason=(.*?)(?: \[[^\]]*@[^\]]*\])?(?= \w+=|$)", text)
    return m.group(1).strip() if m else ""


class CliSlurmClient:
    """SlurmClient over `sinfo --json`, `scontrol -o show node` and `scontrol update`."""

    def __init__(self, env: Mapping[str, str] | None = None, timeout_s: float = 10.0) -> None:
        self.env = dict(env) if env is not None else None
        self.timeout_s = timeout_s

    def _run(self, *argv: str, node: str | None = None) -> str:
        what = f"`{' '.join(argv)}`" + (f" for node {node}" if node else "")
        try:
            p = subprocess.run(
                argv, capture_output=True, text=True, timeout=self.timeout_s, env=self.env,
                check=False,
            )
        except FileNotFoundError as e:
            raise SlurmError(f"{argv[0]} not found: is the Slurm client installed?",
                             transient=False) from e
        except subprocess.TimeoutExpired as e:
            raise SlurmError(f"{what} timed out after {self.timeout_s} s") from e
        if p.returncode != 0:
            msg = " ".join((p.stderr or p.stdout).split())
            raise SlurmError(f"{what} failed: {msg}", transient=not is_permanent_message(msg))
        return p.stdout

    def ping(self) -> bool:
        try:
            out = self._run("scontrol", "ping")
        except SlurmError:
            return False
        return "is UP" in out

    def nodes(self) -> dict[str, SlurmNode]:
        doc = _json_object(self._run("sinfo", "--json"), "`sinfo --json`")
        return {n.name: n for n in parse_each(doc.get("nodes", []), node_from_json,
                                              "`sinfo --json` nodes")}

    def node(self, name: str) -> SlurmNode:
        text = self._run("scontrol", "-o", "show", "node", check_node_name(name), node=name)
        m = re.search(r"\bState=(\S+)", text)
        if not m:
            # 22.05 prints "Node nX not found" with exit status 0 for an unknown node
            raise SlurmError(f"`scontrol -o show node {name}`: node {name} not found: "
                             f"{text.strip()[:200]}", transient=False)
        fm = re.search(r"\bAvailableFeatures=(\S*)", text)
        wm = re.search(r"\bWeight=(\d+)", text)
        return SlurmNode(name, m.group(1), _reason_from_scontrol(text),
                         split_features(fm.group(1) if fm else ""),
                         int(wm.group(1)) if wm else 1)

    def drain(self, name: str, reason: str) -> None:
        self._run("scontrol", "update", f"nodename={check_node_name(name)}", "state=drain",
                  f"reason={clean_reason(reason)}", node=name)

    def resume(self, name: str) -> None:
        self._run("scontrol", "update", f"nodename={check_node_name(name)}", "state=resume",
                  node=name)

    def set_weight(self, name: str, weight: int) -> None:
        self._run("scontrol", "update", f"nodename={check_node_name(name)}",
                  f"weight={check_weight(name, weight)}", node=name)

    def set_features(self, name: str, features: tuple[str, ...]) -> None:
        # Available and active together: without a node_features plugin (the usual case on
        # GPU clusters) the two must agree, and a constraint matches the active set.
        value = ",".join(check_features(name, features))
        self._run("scontrol", "update", f"nodename={check_node_name(name)}",
                  f"availablefeatures={value}", f"activefeatures={value}", node=name)

    # ------------------------------------------------------------ jobs (recovery)

    def _jobs(self, *args: str, what: str) -> list[SlurmJob]:
        doc = _json_object(self._run("squeue", "--json", *args), f"`squeue --json` for {what}")
        return parse_each(doc.get("jobs", []), job_from_json, f"`squeue --json` for {what}")

    def jobs_on_node(self, node: str) -> list[SlurmJob]:
        """Jobs in any state slurmctld still holds (MinJobAge) whose allocation has `node`:
        a job the fault already killed is as much recovery's business as a running one."""
        jobs = self._jobs("-t", "all", "-w", check_node_name(node), what=f"node {node}")
        return [j for j in jobs if node in j.nodes]

    def job(self, job_id: str) -> SlurmJob | None:
        """The job in any state while slurmctld still holds it (MinJobAge); None after."""
        try:
            jobs = self._jobs("-t", "all", "-j", check_job_id(job_id), what=f"job {job_id}")
        except SlurmError as e:
            if "invalid job id" in str(e).lower():
                return None
            raise
        return next((j for j in jobs if j.job_id == job_id), None)

    def signal_job(self, job_id: str, signal: str, scope: str) -> None:
        """scope batch: the batch shell only; full: shell and every step; steps: steps only."""
        if scope not in SIGNAL_SCOPES:
            raise SlurmError(f"signal scope {scope!r}: use one of {', '.join(SIGNAL_SCOPES)}",
                             transient=False)
        argv = ["scancel", f"--signal={check_signal(signal)}"]
        if scope != "steps":
            argv.append(f"--{scope}")
        self._run(*argv, check_job_id(job_id))

    def requeue(self, job_id: str) -> None:
        self._run("scontrol", "requeue", check_job_id(job_id))

    def update_job(self, job_id: str, *, start_now_plus_s: int | None = None,
                   excluded_nodes: tuple[str, ...] | None = None) -> None:
        """StartTime=now[+N] clears the 120 s BeginTime Slurm puts on a requeued job (it only
        sticks once the job is PENDING: set while COMPLETING, Slurm overwrites it)."""
        argv = ["scontrol", "update", f"JobId={check_job_id(job_id)}"]
        if start_now_plus_s is not None:
            if start_now_plus_s < 0:
                raise SlurmError(f"job {job_id}: start delay {start_now_plus_s} s < 0",
                                 transient=False)
            argv.append("StartTime=now" + (f"+{start_now_plus_s}" if start_now_plus_s else ""))
        if excluded_nodes is not None:
            names = [check_node_name(n) for n in excluded_nodes]
            argv.append(f"ExcNodeList={NodeSet.fromlist(names)}" if names else "ExcNodeList=")
        if len(argv) == 3:
            return
        self._run(*argv)


# ---------------------------------------------------------------- jobs (recovery)

SIGNAL_SCOPES = ("batch", "full", "steps")
_SIGNAL = re.compile(r"^(SIG)?[A-Z0-9]{1,8}$")
_JOB_ID = re.compile(r"^[0-9]{1,10}$")


@dataclass(frozen=True)
class SlurmJob:
    """One job as `squeue --json` (22.05) describes it: what recovery needs to decide."""

    job_id: str
    state: str  # RUNNING, PENDING, COMPLETING, COMPLETED, FAILED, ...
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


def decode_exit_code(raw: int) -> tuple[int | None, int]:
    """`squeue --json` (22.05) prints the raw wait status: 93 << 8 for `exit 93`; -> (exit
    status, signal). A job killed by a signal has no exit status."""
    sig = raw & 0x7F
    return (None if sig else (raw >> 8) & 0xFF), sig


def job_from_json(j: Mapping[str, Any]) -> SlurmJob:
    nodes_expr = str(j.get("nodes", "") or "")
    excluded = str(j.get("excluded_nodes", "") or "")
    status, sig = decode_exit_code(int(j.get("exit_code", 0) or 0))
    return SlurmJob(
        job_id=str(j["job_id"]),
        state=str(j.get("job_state", "")).upper(),
        nodes=tuple(expand_hostlist(nodes_expr)) if nodes_expr else (),
        requeue=bool(j.get("requeue", False)),
        batch=bool(j.get("batch_flag", False)),
        comment=str(j.get("comment", "") or ""),
        restart_count=int(j.get("restart_cnt", 0) or 0),
        exit_status=status,
        exit_signal=sig,
        excluded_nodes=tuple(expand_hostlist(excluded)) if excluded else (),
        start_time_s=int(j.get("start_time", 0) or 0),
        state_reason=str(j.get("state_reason", "") or ""),
        end_time_s=int(j.get("end_time", 0) or 0),
    )


class SlurmJobClient(Protocol):
    """What recovery needs from Slurm besides nodes. The CLI client has it; the REST client
    reads jobs from slurmrestd and acts through scancel/scontrol (22.05's v0.0.38 cannot
    requeue); the pyslurm client does not have it yet."""

    def jobs_on_node(self, node: str) -> list[SlurmJob]: ...

    def job(self, job_id: str) -> SlurmJob | None: ...

    def signal_job(self, job_id: str, signal: str, scope: str) -> None: ...

    def requeue(self, job_id: str) -> None: ...

    def update_job(self, job_id: str, *, start_now_plus_s: int | None = None,
                   excluded_nodes: tuple[str, ...] | None = None) -> None: ...


def make_slurm_client(kind: str, **options: Any) -> SlurmClient | None:
    """cli | rest | pyslurm -> that client (options go to its constructor); none -> None
    (the controller then records actions in shadow mode)."""
    if kind == "cli":
        return CliSlurmClient(**options)
    if kind == "rest":
        from gpufleet.scheduler.slurm_rest import RestSlurmClient

        return RestSlurmClient(**options)
    if kind == "pyslurm":
        from gpufleet.scheduler.slurm_pyslurm import PyslurmClient

        return PyslurmClient(**options)
    if kind == "none":
        return None
    raise SlurmError(f"unknown Slurm client kind {kind!r}: use one of {', '.join(SLURM_KINDS)}",
                     transient=False)
