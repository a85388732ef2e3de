"""Talking to Slurm: a `SlurmClient` Protocol and its implementation over the Slurm CLI.

Reads use the `--json` output of sinfo/squeue (stable across 22.05+); node updates use
`scontrol update`, since neither `scontrol --json` (23.02+) nor a node-update endpoint in
slurmrestd v0.0.38 exists on 22.05. Every call has a timeout: a slow slurmctld must never
hang the caller. Errors become `SlurmError` with the command and Slurm's own message.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from ClusterShell.NodeSet import NodeSet, NodeSetParseError


class SlurmError(Exception):
    """A Slurm command failed or timed out; `transient` says whether a retry may help."""

    def __init__(self, message: str, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class SlurmNode:
    name: str
    state: str  # compact, as scontrol prints it: IDLE, MIXED+DRAIN, DOWN+NOT_RESPONDING
    reason: str
    features: tuple[str, ...] = ()
    weight: int = 1

    @property
    def drained(self) -> bool:
        return "DRAIN" in self.state.split("+")


class SlurmClient(Protocol):
    def nodes(self) -> dict[str, SlurmNode]: ...

    def node(self, name: str) -> SlurmNode: ...

    def drain(self, name: str, reason: str) -> None: ...

    def resume(self, name: str) -> None: ...

    def ping(self) -> bool: ...


_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_node_name(name: str) -> str:
    """Node names go into scontrol argv: allow only what Slurm node names look like."""
    if not _NODE_NAME.match(name):
        raise SlurmError(f"invalid node name {name!r}", transient=False)
    return name


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
    """SlurmClient over sinfo/squeue --json and scontrol."""

    def __init__(self, env: Mapping[str, str] | None = None, timeout_s: float = 10.0) -> None:
        self.env = dict(env) if env is not None else None
        self.timeout_s = timeout_s

    def _run(self, *argv: str) -> str:
        try:
            p = subprocess.run(
                argv, capture_output=True, text=True, timeout=self.timeout_s, env=self.env,
                check=False,
            )
        except FileNotFoundError as e:
            raise SlurmError(f"{argv[0]} not found: is the Slurm client installed?",
                             transient=False) from e
        except subprocess.TimeoutExpired as e:
            raise SlurmError(f"`{' '.join(argv[:3])}` timed out after {self.timeout_s} s") from e
        if p.returncode != 0:
            msg = (p.stderr or p.stdout).strip()
            # "Invalid node name specified" will not get better by retrying
            transient = "Invalid node name" not in msg and "Invalid user" not in msg
            raise SlurmError(f"`{' '.join(argv[:3])}` failed: {msg}", transient=transient)
        return p.stdout

    def ping(self) -> bool:
        try:
            out = self._run("scontrol", "ping")
        except SlurmError:
            return False
        return "is UP" in out

    def nodes(self) -> dict[str, SlurmNode]:
        try:
            doc = json.loads(self._run("sinfo", "--json"))
        except ValueError as e:
            raise SlurmError(f"sinfo --json printed no JSON: {e}") from e
        out: dict[str, SlurmNode] = {}
        for n in doc.get("nodes", []):
            flags = [f for f in n.get("state_flags", []) if f]
            state = "+".join([str(n.get("state", "")).upper(), *flags])
            features = tuple(f for f in str(n.get("active_features", "")).split(",") if f)
            out[n["name"]] = SlurmNode(n["name"], state, n.get("reason", "") or "",
                                       features, int(n.get("weight", 1) or 1))
        return out

    def node(self, name: str) -> SlurmNode:
        text = self._run("scontrol", "-o", "show", "node", check_node_name(name))
        m = re.search(r"\bState=(\S+)", text)
        if not m:
            raise SlurmError(f"scontrol show node {name}: no State= in output", transient=False)
        fm = re.search(r"\bActiveFeatures=(\S+)", text)
        wm = re.search(r"\bWeight=(\d+)", text)
        features = tuple(f for f in (fm.group(1) if fm else "").split(",") if f and f != "(null)")
        return SlurmNode(name, m.group(1), _reason_from_scontrol(text), features,
                         int(wm.group(1)) if wm else 1)

    def drain(self, name: str, reason: str) -> None:
        # Slurm keeps the reason as free text; newlines would break `scontrol -o` parsing
        reason = " ".join(reason.split())[:200]
        self._run("scontrol", "update", f"nodename={check_node_name(name)}", "state=drain",
                  f"reason={reason}")

    def resume(self, name: str) -> None:
        self._run("scontrol", "update", f"nodename={check_node_name(name)}", "state=resume")
