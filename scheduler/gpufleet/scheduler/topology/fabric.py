"""The InfiniBand fabric as a graph: switches with inferred levels, host CAs, links with their
rate, links that are down or down-trained, and switch hops between any two CAs.

Built from a parsed dump (`ibnetdiscover.IbDump`); it never guesses host names (hostmap.py
does that) and never changes the dump it was built from.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from gpufleet.scheduler.topology.ibnetdiscover import SPEED_RANK, DumpNode, IbDump

__all__ = ["LEVEL_NAMES", "Fabric", "Link", "build_fabric", "is_aggregation_node"]

LEVEL_NAMES = {0: "leaf", 1: "spine", 2: "core"}


def is_aggregation_node(node: DumpNode) -> bool:
    """SHARP aggregation nodes are CAs inside a switch, never a host."""
    return node.kind == "ca" and "aggregation node" in node.description.lower()


@dataclass(frozen=True)
class Link:
    a: str
    a_port: int
    b: str
    b_port: int
    width: int | None
    speed: str | None
    rate_gbps: float | None
    down_trained: str = ""  # why, or "" for a link at full width and speed

    def other(self, node_id: str) -> str:
        return self.b if node_id == self.a else self.a


@dataclass
class Fabric:
    source: str
    nodes: dict[str, DumpNode]
    links: list[Link]
    switches: set[str] = field(default_factory=set)
    hosts: set[str] = field(default_factory=set)  # CA node ids that are not aggregation nodes
    aggregation: set[str] = field(default_factory=set)
    level: dict[str, int] = field(default_factory=dict)  # switch -> 0 leaf, 1 spine, 2 core...
    switch_adj: dict[str, set[str]] = field(default_factory=dict)
    ca_links: dict[str, list[Link]] = field(default_factory=dict)  # CA -> its switch links
    down_ports: list[tuple[str, int]] = field(default_factory=list)
    self_loops: list[Link] = field(default_factory=list)
    by_guid: dict[str, str] = field(default_factory=dict)  # node or port GUID -> node id

    @property
    def leaves(self) -> set[str]:
        return {s for s, lvl in self.level.items() if lvl == 0}

    def leaf_of(self, ca_id: str) -> list[tuple[str, int]]:
        """(switch, CA port) for every switch port the CA is cabled to."""
        return [(lk.other(ca_id), lk.a_port if lk.a == ca_id else lk.b_port)
                for lk in self.ca_links.get(ca_id, []) if lk.other(ca_id) in self.switches]

    def switch_hops(self, ca_a: str, ca_b: str) -> int | None:
        """Switches on the shortest path between two CAs (1 = same leaf); None if apart."""
        starts = {s for s, _ in self.leaf_of(ca_a)}
        goals = {s for s, _ in self.leaf_of(ca_b)}
        if not starts or not goals:
            return None
        dist = dict.fromkeys(starts, 1)
        queue = deque(starts)
        while queue:
            s = queue.popleft()
            if s in goals:
                return dist[s]
            for t in self.switch_adj.get(s, ()):
                if t not in dist:
                    dist[t] = dist[s] + 1
                    queue.append(t)
        return None

    def uplinks(self, switch: str) -> list[Link]:
        lvl = self.level.get(switch)
        return [lk for lk in self.links
                if switch in (lk.a, lk.b) and lk.other(switch) in self.switches
                and lvl is not None and self.level.get(lk.other(switch), -1) > lvl]

    def degraded_switches(self) -> dict[str, list[str]]:
        """Switch -> reasons: a down-trained uplink, or a down port seen on it."""
        out: dict[str, list[str]] = {}
        for s in sorted(self.switches):
            for lk in self.uplinks(s):
                if lk.down_trained:
                    other = lk.other(s)
                    out.setdefault(s, []).append(
                        f"uplink port {lk.a_port if lk.a == s else lk.b_port} to {other} "
                        f"{lk.down_trained}")
        for node_id, port in self.down_ports:
            if node_id in self.switches:
                out.setdefault(node_id, []).append(f"port {port} down")
        return out

    def level_name(self, switch: str) -> str:
        lvl = self.level.get(switch)
        if lvl is None:
            return "isolated"
        return LEVEL_NAMES.get(lvl, f"level{lvl}")


def build_fabric(  # noqa: PLR0912 - one pass over nodes, links, levels; splitting hides it
        dump: IbDump, expected_rate_gbps: float | None = None) -> Fabric:
    """Graph of the dump. A link is down-trained when it runs narrower than 4x, slower than
    both of its ends can run elsewhere, or below `expected_rate_gbps` (if given)."""
    fab = Fabric(dump.source, dump.nodes, [])
    for node in dump.nodes.values():
        if node.kind == "switch":
            fab.switches.add(node.node_id)
            fab.switch_adj.setdefault(node.node_id, set())
        elif is_aggregation_node(node):
            fab.aggregation.add(node.node_id)
        elif node.kind == "ca":
            fab.hosts.add(node.node_id)
        if node.guid:
            fab.by_guid.setdefault(node.guid, node.node_id)
        for p in node.ports.values():
            if p.port_guid:
                fab.by_guid.setdefault(p.port_guid, node.node_id)
            if not p.connected:
                fab.down_ports.append((node.node_id, p.port))

    # best speed / width each node reaches on any port: a link below both ends' best is slow
    best: dict[str, int] = {}
    for dl in dump.links:
        if dl.speed in SPEED_RANK:
            for n in (dl.a, dl.b):
                best[n] = max(best.get(n, -1), SPEED_RANK[dl.speed])
    for dl in dump.links:
        why = []
        if dl.width is not None and dl.width < 4:
            why.append(f"{dl.width}x")
        if dl.speed in SPEED_RANK:
            floor = min(best.get(dl.a, -1), best.get(dl.b, -1))
            if SPEED_RANK[dl.speed] < floor:
                why.append(f"{dl.speed} below the {list(SPEED_RANK)[floor]} both ends run")
        rate = dl.rate_gbps
        if expected_rate_gbps is not None and rate is not None and rate < expected_rate_gbps:
            why.append(f"{rate:g} Gb/s below the expected {expected_rate_gbps:g}")
        lk = Link(dl.a, dl.a_port, dl.b, dl.b_port, dl.width, dl.speed, rate,
                  "down-trained: " + ", ".join(why) if why else "")
        if lk.a == lk.b:
            fab.self_loops.append(lk)  # a port cabled back into its own switch
            continue
        fab.links.append(lk)
        if lk.a in fab.switches and lk.b in fab.switches:
            fab.switch_adj[lk.a].add(lk.b)
            fab.switch_adj[lk.b].add(lk.a)
        for n in (lk.a, lk.b):
            if n not in fab.switches:
                fab.ca_links.setdefault(n, []).append(lk)

    # levels: leaves carry hosts; every other switch is as high as its distance from a leaf
    leaves = {lk.other(h) for h in fab.hosts for lk in fab.ca_links.get(h, [])
              if lk.other(h) in fab.switches}
    queue = deque(sorted(leaves))
    fab.level = dict.fromkeys(leaves, 0)
    while queue:
        s = queue.popleft()
        for t in sorted(fab.switch_adj[s]):
            if t not in fab.level:
                fab.level[t] = fab.level[s] + 1
                queue.append(t)
    return fab
