"""The placement engine's own input and output model.

Independent of the topology package's internals on purpose: the engine sees leaves, a switch
tree, and per node what Slurm has free plus what gpufleet knows about its health and GPU
topology. Builders (sources.py) fill it from Slurm, the store and topology.conf.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

# gpufleet health that may receive work; "unknown" = no agent reports for that node (Slurm's
# view alone): allowed, and the explanation says so.
USABLE_HEALTH = frozenset({"ok", "warn", "unknown"})
BLOCKED_HEALTH = frozenset({"degraded", "fatal", "unreachable"})
# what gpufleet KNOWS is wrong (a silent agent says nothing about its node): excluded from
# Slurm's choice when gpufleet falls back to Slurm's placement
KNOWN_UNHEALTHY = BLOCKED_HEALTH - {"unreachable"}
# Slurm node state words (base state or flag) that mean "no new job lands here"
UNSCHEDULABLE_STATES = frozenset({
    "DOWN", "DRAIN", "DRAINED", "DRAINING", "FAIL", "FAILING", "MAINT", "NOT_RESPONDING",
    "POWERED_DOWN", "POWERING_DOWN", "POWER_DOWN", "POWERING_UP", "REBOOT_REQUESTED",
    "REBOOT_ISSUED", "RESERVED", "FUTURE", "UNKNOWN", "NO_RESPOND", "INVALID_REG", "INVALID",
    "ALLOCATED", "COMPLETING", "PLANNED", "BLOCKED",
})

# PCIe distance of a GPU to its NIC, as in `nvidia-smi topo -m` (lower is closer)
PCIE_RANK = {"X": 0, "PIX": 1, "PXB": 2, "PHB": 3, "NODE": 4, "SYS": 5}
UNKNOWN_PCIE_RANK = 3  # no affinity reported: assume the middle, neither rewarded nor punished


class PlacementError(Exception):
    """A request or an input (topology.conf, Slurm JSON) is invalid; the message names it."""


@dataclass(frozen=True)
class NicAffinity:
    hca: str  # mlx5_0
    relation: str  # PIX / PXB / PHB / NODE / SYS


@dataclass(frozen=True)
class NodeView:
    """One node as the engine sees it."""

    name: str
    gpu_count: int
    free_gpus: frozenset[int]  # not allocated by any job (Slurm's view)
    slurm_state: str = "IDLE"  # IDLE, MIXED+DRAIN, ...
    health: str = "unknown"  # gpufleet: ok / warn / degraded / fatal / unreachable / unknown
    health_reason: str = ""
    unhealthy_gpus: Mapping[int, str] = field(default_factory=dict)  # index -> reason
    nvlink_islands: tuple[frozenset[int], ...] = ()  # () = not known
    gpu_nic: Mapping[int, NicAffinity] = field(default_factory=dict)
    partitions: frozenset[str] = frozenset()
    features: frozenset[str] = frozenset()
    cpus_free: int | None = None  # None = not known / not checked

    @cached_property
    def schedulable(self) -> bool:
        words = {w.upper() for w in self.slurm_state.replace("+", " ").split()}
        return not (words & UNSCHEDULABLE_STATES)

    @property
    def healthy(self) -> bool:
        return self.health in USABLE_HEALTH

    @cached_property
    def _island_index(self) -> dict[int, int]:
        return {g: i for i, island in enumerate(self.nvlink_islands) for g in island}

    @cached_property
    def sorted_free(self) -> tuple[int, ...]:
        """Free GPU indices in the order Slurm 22.05 hands them out (lowest first)."""
        return tuple(sorted(self.free_gpus))

    def island_of(self, gpu: int) -> int | None:
        return self._island_index.get(gpu)


@dataclass
class ClusterView:
    """Nodes, the leaf switch of each node, and the switch tree above the leaves."""

    nodes: dict[str, NodeView]
    leaf_of: dict[str, str]  # node -> leaf switch
    parent: dict[str, str] = field(default_factory=dict)  # switch -> parent switch
    default_partition: str | None = None
    partition_max_time_min: dict[str, int | None] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)  # what it was built from, for explanations
    # partition -> jobs pending in it for nodes (Resources/Priority), from the newest jobs
    # read: Slurm may hold the free nodes for them, so "free now" is not "starts now"
    waiting_jobs: dict[str, int] = field(default_factory=dict)
    # the engine's index of this view, built by the first place() and kept between requests
    # (gpufleet.scheduler.placement.engine.ViewIndex). Change nodes through update_node();
    # after changing leaf_of or parent, call invalidate().
    _index: Any = field(default=None, init=False, repr=False, compare=False)

    def update_node(self, node: NodeView) -> None:
        """Add or replace one node; the index follows (only that node's leaf is redone)."""
        old = self.nodes.get(node.name)
        self.nodes[node.name] = node
        if self._index is not None:
            self._index.node_changed(self, old, node)

    def remove_node(self, name: str) -> None:
        old = self.nodes.pop(name, None)
        if old is not None and self._index is not None:
            self._index.node_changed(self, old, None)

    def invalidate(self) -> None:
        """Drop the index (the next place() rebuilds it): after editing the tree."""
        self._index = None

    def leaves(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for node, leaf in self.leaf_of.items():
            if node in self.nodes:
                out.setdefault(leaf, []).append(node)
        return out

    def ancestors(self, switch: str) -> list[str]:
        """switch, its parent, ... up to the root (a loop in the tree is cut, not followed)."""
        chain = [switch]
        seen = {switch}
        while (up := self.parent.get(chain[-1])) is not None and up not in seen:
            chain.append(up)
            seen.add(up)
        return chain

    def hops(self, leaves: list[str]) -> int:
        """Switch-to-switch hops of the longest path between the given leaves (0 for one leaf);
        None of a common ancestor (disjoint trees) counts as 2 * the deepest chain + 2."""
        if len(set(leaves)) <= 1:
            return 0
        chains = [self.ancestors(leaf) for leaf in set(leaves)]
        common = set(chains[0]).intersection(*map(set, chains[1:]))
        if not common:
            return 2 * max(len(c) for c in chains)
        # the lowest common ancestor is the first common switch on any chain
        ups = [next(i for i, s in enumerate(c) if s in common) for c in chains]
        ups.sort(reverse=True)
        return ups[0] + ups[1]


@dataclass(frozen=True)
class PlacementRequest:
    """What the job asks for. Exactly one of gpus_per_node / total_gpus may be set (or none:
    a CPU-only job, placed by node count alone)."""

    nodes: int | None = None
    gpus_per_node: int | None = None
    total_gpus: int | None = None
    partition: str | None = None
    constraints: tuple[str, ...] = ()  # features every node must have (AND)
    time_limit_min: int | None = None
    exclude: frozenset[str] = frozenset()  # nodes the user excluded

    def check(self) -> None:
        if self.gpus_per_node is not None and self.total_gpus is not None:
            raise PlacementError("request: give GPUs per node or total GPUs, not both")
        for name in ("nodes", "gpus_per_node", "total_gpus", "time_limit_min"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise PlacementError(f"request: {name} must be >= 1, got {value}")


@dataclass(frozen=True)
class NodeChoice:
    node: str
    leaf: str
    gpus: tuple[int, ...]  # the indices the job will get (Slurm's pick, predicted)
    islands: int  # NVLink islands those GPUs span (0 = not known)
    nic_rank: int  # sum of PCIe ranks GPU -> nearest NIC (lower is closer)
    free_gpus_left: int


@dataclass
class Placement:
    """The engine's answer. `ok` False: no placement now; `flags` then is the fallback."""

    ok: bool
    request: PlacementRequest
    nodes: list[NodeChoice]
    flags: list[str]
    score: float
    cost: dict[str, float]
    explanation: list[str]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def nodelist(self) -> list[str]:
        return [c.node for c in self.nodes]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "nodes": [
                {"node": c.node, "leaf": c.leaf, "gpus": list(c.gpus), "nvlink_islands": c.islands,
                 "nic_rank": c.nic_rank, "free_gpus_left": c.free_gpus_left}
                for c in self.nodes
            ],
            "flags": self.flags,
            "env": self.env,
            "score": self.score,
            "cost": self.cost,
            "explanation": self.explanation,
        }
