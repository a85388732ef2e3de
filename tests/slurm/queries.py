"""What tests ask a lab: node and job states as scontrol prints them (and waits for one),
sinfo's nodes in one shape for every version, hostlists, the topology, sbatch."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from typing import Any

from .labconfig import SlurmLabError
from .labcore import LabCore

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


class Queries(LabCore):
    """Client-command reads of the lab, and submitting jobs."""

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
