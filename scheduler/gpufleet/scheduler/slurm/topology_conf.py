"""topology.conf text, and `scontrol show topology` (the same KEY=VALUE lines plus Level=,
LinkSpeed=, BlockIndex=, BlockSize=): gpufleet's one parser of either.

topology/tree: `SwitchName=S Nodes=HOSTLIST` (a leaf) and `SwitchName=S Switches=LIST` (an
upper switch; scontrol also lists every node below it under Nodes=). topology/block (23.11+):
`BlockName=B Nodes=HOSTLIST`, `BlockSizes=4,8`; scontrol adds `AggregatedBlock=` lines, which
are derived from the blocks and skipped. Keys are case-insensitive, spaces around '=' allowed.
Every problem is a TopologyConfError naming the source, the line and the problem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gpufleet.scheduler.slurm.types import SlurmError

if TYPE_CHECKING:
    from ClusterShell.NodeSet import NodeSet

_KV = re.compile(r"(\w+)\s*=\s*(\S+)")
_KEYS = {"switchname", "switches", "nodes", "linkspeed", "level", "blockname", "blocksizes",
         "blockindex", "blocksize", "aggregatedblock"}


class TopologyConfError(SlurmError, ValueError):
    """A line of a topology.conf that cannot be read."""

    def __init__(self, source: str, line_no: int, problem: str, line: str = "") -> None:
        self.source = source
        self.line_no = line_no
        self.problem = problem
        self.line = line
        shown = f": {line.strip()[:120]!r}" if line.strip() else ""
        super().__init__(f"{source}:{line_no}: {problem}{shown}", transient=False)


@dataclass
class SlurmTopology:
    """A topology.conf as sets: the form export, diff and placement read."""

    switch_nodes: dict[str, set[str]] = field(default_factory=dict)
    switch_children: dict[str, set[str]] = field(default_factory=dict)
    blocks: dict[str, set[str]] = field(default_factory=dict)
    block_sizes: list[int] = field(default_factory=list)

    def switch_edges(self) -> set[frozenset[str]]:
        return {frozenset((s, c)) for s, cs in self.switch_children.items() for c in cs if s != c}

    def node_switch(self) -> dict[str, str]:
        return {n: s for s, ns in self.switch_nodes.items() for n in ns}

    def tree(self) -> tuple[dict[str, str], dict[str, str]]:
        """(node -> leaf switch or block, switch -> parent switch). A node's leaf is the
        switch listing it that has no Switches= (scontrol repeats every node below an upper
        switch in its Nodes=); a node listed only by an upper switch hangs from it. A switch
        under several (a fat tree's spines) takes the first in file order as its parent."""
        parent: dict[str, str] = {}
        for s, cs in self.switch_children.items():
            for c in sorted(cs):
                parent.setdefault(c, s)
        leaf_of: dict[str, str] = {}
        for s, nodes in self.switch_nodes.items():
            if not self.switch_children.get(s):
                leaf_of.update(dict.fromkeys(nodes, s))
        for s, nodes in self.switch_nodes.items():
            for n in nodes:
                leaf_of.setdefault(n, s)
        for b, nodes in self.blocks.items():
            for n in nodes:
                leaf_of.setdefault(n, b)
        return leaf_of, parent


MAX_HOSTLIST_NODES = 1_000_000  # far past any cluster; NodeSet expands a hostlist in memory
_BRACKET = re.compile(r"\[([^\]]*)\]")


def hostlist_size(text: str) -> int:
    """How many names a hostlist expands to, counted from its ranges without expanding it
    (n[1-99999999999] would fill the memory before NodeSet could say it is too large)."""
    total, depth, start = 0, 0, 0
    for i, c in enumerate(text + ","):
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            size = 1
            for group in _BRACKET.findall(text[start:i]):
                n = 0
                for part in group.split(","):
                    lo, _, hi = part.partition("-")
                    lo_s, hi_s = lo.split("/")[0].strip(), (hi or lo).split("/")[0].strip()
                    if lo_s.isdecimal() and hi_s.isdecimal():
                        n += max(int(hi_s) - int(lo_s) + 1, 1)
                    else:
                        n += 1  # not a range: NodeSet says what is wrong with it
                size *= n
            total += size
            start = i + 1
    return total


def _nodeset(text: str) -> NodeSet:  # the size guard first
    size = hostlist_size(text)
    if size > MAX_HOSTLIST_NODES:
        raise ValueError(f"hostlist {text[:80]!r} names {size} nodes, more than "
                         f"{MAX_HOSTLIST_NODES}")
    from ClusterShell.NodeSet import NodeSet  # here: the CLI loads without ClusterShell

    return NodeSet(text)


def _hostlist(value: str, source: str, i: int, raw: str) -> set[str]:
    from ClusterShell.NodeSet import NodeSetException

    try:
        return set(_nodeset(value))
    except (NodeSetException, ValueError) as e:
        raise TopologyConfError(source, i, f"invalid hostlist {value!r} ({e})", raw) from e


def _fields(raw: str, source: str, i: int) -> dict[str, str]:
    line = raw.split("#", 1)[0].strip()
    pairs = _KV.findall(line)
    rest = _KV.sub("", line).strip()
    if rest:
        raise TopologyConfError(source, i, f"expected KEY=VALUE, got {rest.split()[0]!r}", raw)
    out: dict[str, str] = {}
    for key, value in pairs:
        if key.lower() not in _KEYS:
            raise TopologyConfError(source, i, f"unknown key {key!r}", raw)
        out[key.lower()] = value
    return out


def parse_topology_conf(  # noqa: PLR0912 - one branch per check, each with its own message
        text: str, source: str = "<topology.conf>") -> SlurmTopology:
    """topology.conf or `scontrol show topology` text -> SlurmTopology."""
    topo = SlurmTopology()
    leaf_line: dict[str, str] = {}  # node -> the leaf switch that listed it
    for i, raw in enumerate(text.splitlines(), 1):
        if not raw.split("#", 1)[0].strip():
            continue
        f = _fields(raw, source, i)
        if "switchname" in f:
            name = f["switchname"]
            if name in topo.switch_nodes or name in topo.switch_children:
                raise TopologyConfError(source, i, f"switch {name} defined twice", raw)
            children = _hostlist(f["switches"], source, i, raw) if "switches" in f else set()
            nodes = _hostlist(f["nodes"], source, i, raw) if "nodes" in f else set()
            if not children:
                for n in sorted(nodes):
                    if n in leaf_line:
                        raise TopologyConfError(
                            source, i, f"node {n} is on leaf {leaf_line[n]} and on {name}", raw)
                    leaf_line[n] = name
            if "nodes" in f:
                topo.switch_nodes[name] = nodes
            if children:
                topo.switch_children[name] = children
        elif "blockname" in f:
            name = f["blockname"]
            if name in topo.blocks:
                raise TopologyConfError(source, i, f"block {name} defined twice", raw)
            topo.blocks[name] = _hostlist(f.get("nodes", ""), source, i, raw)
        elif "aggregatedblock" in f:
            continue  # scontrol's aggregates of the blocks above: nothing new
        elif "blocksizes" in f:
            try:
                topo.block_sizes = [int(x) for x in f["blocksizes"].split(",")]
            except ValueError:
                raise TopologyConfError(source, i, f"BlockSizes={f['blocksizes']!r}: not a "
                                        "list of numbers", raw) from None
        else:
            raise TopologyConfError(source, i, "no SwitchName=, BlockName= or BlockSizes=", raw)
    return topo
