"""SlurmClient over the Slurm commands: the only place gpufleet runs one.

The client learns the Slurm version once (`scontrol --version`, which needs no slurmctld) and
reads with that version's JSON (schema.py): `sinfo --json` on 22.05, `scontrol --json show
nodes` from 23.02 on (whose `sinfo --json` lists aggregates, not nodes), `squeue --json` for
jobs. One node on 22.05 comes from `scontrol -o show node` text (22.05 has no `scontrol
--json`). Nodes change with `scontrol update`, jobs with `scancel` / `scontrol`. Every call has
a timeout: a slow slurmctld must never hang the caller. Errors become `SlurmError` naming the
node and the command, with `transient` saying whether a retry may help (controller down or
slow: yes; unknown node, bad value, a document it cannot read: no).
"""

from __future__ import annotations

import copy
import re
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from gpufleet.scheduler.slurm.schema import (
    Reader,
    Reader2205,
    SlurmVersion,
    json_object,
    reader_for,
)
from gpufleet.scheduler.slurm.types import (
    SIGNAL_SCOPES,
    SlurmError,
    SlurmJob,
    SlurmNode,
    SlurmNodeInfo,
    SlurmPartition,
    SwitchRequest,
    check_features,
    check_job_id,
    check_node_name,
    check_signal,
    check_weight,
    clean_reason,
    fold_hostlist,
    is_permanent_message,
    slurm_time_s,
    split_features,
)


def _reason_from_scontrol(text: str) -> str:
    # `Reason=gpufleet:xid79 GPU 3 ... [root@2026-11-23T10:00:00]` - free text up to the
    # [user@time] suffix Slurm appends, on one line of `scontrol -o`.
    m = re.search(r"\bReason=(.*?)(?: \[[^\]]*@[^\]]*\])?(?= \w+=|$)", text)
    return m.group(1).strip() if m else ""


def run_command(argv: Sequence[str], timeout_s: float, env: Mapping[str, str] | None = None,
                what: str | None = None, stdin_text: str | None = None
                ) -> subprocess.CompletedProcess[str]:
    """Run one Slurm command with a timeout; a missing program or a timeout is a SlurmError.
    The exit status is the caller's to judge."""
    what = what or f"`{' '.join(argv)}`"
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, check=False,
                              timeout=max(timeout_s, 0.05), input=stdin_text,
                              env=dict(env) if env is not None else None)
    except FileNotFoundError as e:
        raise SlurmError(f"{argv[0]} not found: is the Slurm client installed?",
                         transient=False) from e
    except subprocess.TimeoutExpired as e:
        raise SlurmError(f"{what} timed out after {timeout_s:.1f} s") from e


def slurm_version(env: Mapping[str, str] | None = None, timeout_s: float = 10.0) -> SlurmVersion:
    """`scontrol --version` ('slurm 24.11.5'): the client's own version, no slurmctld needed."""
    p = run_command(("scontrol", "--version"), timeout_s, env)
    if p.returncode != 0:
        raise SlurmError(f"`scontrol --version` failed: {' '.join(p.stderr.split())[:200]}",
                         transient=False)
    return SlurmVersion.parse(p.stdout, "`scontrol --version`")


class CliSlurmClient:
    """SlurmClient (and SlurmJobClient) over the Slurm commands of the version installed."""

    def __init__(self, env: Mapping[str, str] | None = None, timeout_s: float = 10.0,
                 version: SlurmVersion | str | None = None) -> None:
        self.env = dict(env) if env is not None else None
        self.timeout_s = timeout_s
        self._version = (SlurmVersion.parse(version, "version") if isinstance(version, str)
                         else version)
        self._reader: Reader | None = None

    # ------------------------------------------------------------ version and schema

    @property
    def version(self) -> SlurmVersion:
        """Learnt once, on first use."""
        if self._version is None:
            self._version = slurm_version(self.env, self.timeout_s)
        return self._version

    @property
    def reader(self) -> Reader:
        if self._reader is None:
            self._reader = reader_for(self.version)
        return self._reader

    def with_timeout(self, timeout_s: float) -> CliSlurmClient:
        """The same client (version already learnt) with another per-call timeout."""
        _ = self.version  # learnt once, here, and shared with the copy
        other = copy.copy(self)
        other.timeout_s = timeout_s
        return other

    def _run(self, *argv: str, node: str | None = None) -> str:
        what = f"`{' '.join(argv)}`" + (f" for node {node}" if node else "")
        p = run_command(argv, self.timeout_s, self.env, what)
        if p.returncode != 0:
            msg = " ".join((p.stderr or p.stdout).split())
            raise SlurmError(f"{what} failed: {msg}", transient=not is_permanent_message(msg))
        return p.stdout

    def _json(self, argv: Sequence[str], node: str | None = None) -> dict[str, Any]:
        return json_object(self._run(*argv, node=node), f"`{' '.join(argv)}`")

    # ------------------------------------------------------------ nodes

    def ping(self) -> bool:
        try:
            out = self._run("scontrol", "ping")
        except SlurmError:
            return False
        return "is UP" in out

    def node_infos(self) -> dict[str, SlurmNodeInfo]:
        """Every node with its GPUs, partitions and CPUs (what placement reads)."""
        argv = self.reader.nodes_argv
        infos = self.reader.read_nodes(self._json(argv), f"`{' '.join(argv)}`")
        return {i.node.name: i for i in infos}

    def nodes(self) -> dict[str, SlurmNode]:
        return {name: i.node for name, i in self.node_infos().items()}

    def node(self, name: str) -> SlurmNode:
        check_node_name(name)
        argv = self.reader.node_argv(name)
        if isinstance(self.reader, Reader2205):
            return self._node_2205(name, self._run(*argv, node=name))
        what = f"`{' '.join(argv)}`"
        found = [i.node for i in self.reader.read_nodes(self._json(argv, node=name), what)
                 if i.node.name == name]
        if not found:
            raise SlurmError(f"{what}: node {name} not found", transient=False)
        return found[0]

    @staticmethod
    def _node_2205(name: str, text: str) -> SlurmNode:
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

    # ------------------------------------------------------------ partitions, topology

    def partitions(self) -> list[SlurmPartition]:
        """`scontrol -o show partition` (the same text on every version)."""
        out: list[SlurmPartition] = []
        for line in self._run("scontrol", "-o", "show", "partition").splitlines():
            kv = dict(t.split("=", 1) for t in line.split() if "=" in t)
            if "PartitionName" not in kv:
                continue
            out.append(SlurmPartition(kv["PartitionName"], kv.get("Default") == "YES",
                                      kv.get("MaxTime", "UNLIMITED")))
        return out

    def topology_text(self) -> str:
        """`scontrol show topology`: topology.conf-like lines (topology/tree)."""
        return self._run("scontrol", "show", "topology")

    # ------------------------------------------------------------ jobs (recovery)

    def jobs(self) -> list[SlurmJob]:
        """Every job slurmctld holds (`squeue --json`: 23.02+ ignores squeue's filters with
        --json, so callers filter the list)."""
        return self._jobs(what="all jobs")

    def _jobs(self, *args: str, what: str) -> list[SlurmJob]:
        argv = ("squeue", "--json", *args)
        label = f"`squeue --json` for {what}"
        return self.reader.read_jobs(json_object(self._run(*argv), label), label)

    def pending_jobs(self) -> list[SlurmJob]:
        """Jobs waiting to start, with their partitions and required/excluded nodes (what
        routine diagnostics must never hold back). One `squeue --json`: 23.02+ ignores
        `-t PENDING` with --json, so the state is filtered here on every version."""
        return [j for j in self._jobs(what="pending jobs") if j.state == "PENDING"]

    def switch_requests(self) -> list[SwitchRequest]:
        """Pending jobs that ask for a switch count (`--switches`), one `squeue -O` line each
        (22.05's --json has no switch fields). Array and hetjob components (ids such as
        `7_[1-3]`, `7+1`) are left out: gpufleet's filter never asks a count for an array,
        and a component is not updated on its own."""
        label = "`squeue -O ReqSwitch,Wait4Switch`"
        text = self._run("squeue", "-h", "-t", "PD", "-O",
                         "JobID:|,ReqSwitch:|,Wait4Switch:|,NumNodes:|,tres-per-node:")
        out: list[SwitchRequest] = []
        for line in text.splitlines():
            if not line.strip():
                continue
            parts = [p.strip() for p in line.split("|")]
            if len(parts) != 5:
                raise SlurmError(f"{label}: line {line[:120]!r}: expected 5 fields",
                                 transient=False)
            job_id, switches, wait, nodes, tres = parts
            if not job_id.isdigit() or not switches.isdigit() or switches == "0":
                continue
            try:
                wait_s = slurm_time_s(wait) or 0
            except ValueError:
                wait_s = 0  # not a wait this client can read: nobody's hold it knows
            # a node range ("2-4") or anything else: 0, which the switch holds take as doubt
            out.append(SwitchRequest(job_id, int(switches), wait_s,
                                     int(nodes) if nodes.isdigit() else 0, tres))
        return out

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

    def cancel(self, job_id: str) -> None:
        self._run("scancel", check_job_id(job_id))

    def requeue(self, job_id: str) -> None:
        self._run("scontrol", "requeue", check_job_id(job_id))

    def update_job(self, job_id: str, *, start_now_plus_s: int | None = None,
                   excluded_nodes: tuple[str, ...] | None = None,
                   switches: int | None = None) -> None:
        """StartTime=now[+N] clears the 120 s BeginTime Slurm puts on a requeued job (it only
        sticks once the job is PENDING: set while COMPLETING, Slurm overwrites it).
        `switches=0` drops a pending job's switch count: Slurm may start it across leaves
        at its next scheduling pass (22.05, 24.11, 26.05)."""
        argv = ["scontrol", "update", f"JobId={check_job_id(job_id)}"]
        if switches is not None:
            if switches < 0:
                raise SlurmError(f"job {job_id}: switch count {switches} < 0", transient=False)
            argv.append(f"Switches={switches}")
        if start_now_plus_s is not None:
            if start_now_plus_s < 0:
                raise SlurmError(f"job {job_id}: start delay {start_now_plus_s} s < 0",
                                 transient=False)
            argv.append("StartTime=now" + (f"+{start_now_plus_s}" if start_now_plus_s else ""))
        if excluded_nodes is not None:
            names = [check_node_name(n) for n in excluded_nodes]
            argv.append(f"ExcNodeList={fold_hostlist(names)}" if names else "ExcNodeList=")
        if len(argv) == 3:
            return
        self._run(*argv)


# ---------------------------------------------------------------- sbatch and sacct


def run_sbatch(argv: Sequence[str], env: Mapping[str, str], stdin_text: str | None
               ) -> subprocess.CompletedProcess[str]:
    """The real sbatch with the user's arguments (no timeout: sbatch waits for slurmctld the
    way the user expects). A missing sbatch is a SlurmError."""
    try:
        return subprocess.run(["sbatch", *argv], input=stdin_text, capture_output=True,
                              text=True, env=dict(env), check=False)
    except FileNotFoundError as e:
        raise SlurmError("sbatch not found on PATH: is the Slurm client installed?",
                         transient=False) from e


def run_sacct_json(sacct: str, args: Sequence[str], timeout_s: float
                   ) -> tuple[str, SlurmVersion]:
    """`SACCT --json --allusers --duplicates ARGS` (every user's jobs: needs an operator or
    SlurmUser; every run of a requeued job) and the version of that sacct, for its schema."""
    vp = run_command((sacct, "--version"), timeout_s)
    if vp.returncode != 0:
        raise SlurmError(f"`{sacct} --version` failed: {vp.stderr.strip()[:200]}",
                         transient=False)
    version = SlurmVersion.parse(vp.stdout, f"`{sacct} --version`")
    argv = [sacct, "--json", "--allusers", "--duplicates", *args]
    p = run_command(argv, timeout_s, what=f"`{' '.join(argv)}` (is slurmdbd up?)")
    if p.returncode != 0:
        raise SlurmError(f"`{' '.join(argv)}` exited {p.returncode}: {p.stderr.strip()[:500]}",
                         transient=True)
    return p.stdout, version
