"""Which host sits under which leaf switch, without trusting node descriptions.

Sources, strongest first: the HCA node/port GUIDs each agent reports from sysfs (joined with
the fabric's GUIDs), an optional GUID -> host map file, and last the node description
("host HCA-1"), which vendors' defaults ("MT4129 ConnectX7 Mellanox Technologies") defeat.
Multi-rail hosts pick their leaf through `rails`: HCA names in order of preference; the first
rail whose port is up wins, so a host fails over to its next rail when one is down.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from gpufleet.scheduler.topology.fabric import Fabric
from gpufleet.scheduler.topology.ibnetdiscover import IbParseError, norm_guid
from gpufleet.scheduler.topology.inventory import NodeInventory

__all__ = ["HostMap", "Placement", "host_from_description", "load_guid_map", "map_hosts"]

# "host HCA-1", "host mlx5_0", "host ibp11s0f0": a host name then one interface word.
_DESC = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s+([A-Za-z][\w-]*)$")
_DEFAULT_DESC = re.compile(r"^MT\d+\b|Mellanox Technologies|ConnectX|InfiniHost|Aggregation Node",
                           re.IGNORECASE)


def host_from_description(desc: str) -> tuple[str, str | None] | None:
    """('host', 'HCA-1') from 'host HCA-1'; None for vendor defaults or odd text."""
    desc = desc.strip()
    if not desc or _DEFAULT_DESC.search(desc):
        return None
    m = _DESC.match(desc)
    if m:
        return m.group(1), m.group(2)
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", desc):
        return desc, None
    return None


def load_guid_map(text: str, source: str = "<guid map>") -> dict[str, tuple[str, str | None]]:
    """GUID -> (host, rail or None).

    Lines: `GUID HOST [RAIL]` (GUID as 0x..., bare hex or ibnetdiscover's H-...), `#` comments;
    also the `VM_hostname HOST` + GUID line pairs some cloud tools write.
    """
    out: dict[str, tuple[str, str | None]] = {}
    pending_host: tuple[str, int] | None = None
    for i, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        if words[0] == "VM_hostname" and len(words) == 2:
            pending_host = (words[1], i)
            continue
        try:
            guid = norm_guid(re.sub(r"^[SHR]-", "", words[0]))
        except ValueError as e:
            raise IbParseError(source, i, f"first word is not a GUID ({e})", raw) from e
        if pending_host is not None and len(words) == 1:
            out[guid] = (pending_host[0], None)
            pending_host = None
            continue
        if len(words) not in (2, 3):
            raise IbParseError(source, i, "want 'GUID HOST [RAIL]'", raw)
        if guid in out and out[guid][0] != words[1]:
            raise IbParseError(source, i, f"{guid} already maps to {out[guid][0]}", raw)
        out[guid] = (words[1], words[2] if len(words) == 3 else None)
    if pending_host is not None:
        raise IbParseError(source, pending_host[1], "VM_hostname without a GUID line after it")
    return out


@dataclass(frozen=True)
class Placement:
    host: str
    leaf: str
    ca: str  # fabric node id of the HCA that decided
    rail: str | None
    source: str  # "agent", "map", "description"
    other_leaves: tuple[str, ...] = ()  # leaves of the host's other HCAs (other rails)
    rail_failover: bool = False  # the preferred rail was down; a later one was used


@dataclass
class HostMap:
    placements: dict[str, Placement] = field(default_factory=dict)
    unnamed: list[str] = field(default_factory=list)  # host CAs nobody could name
    not_in_fabric: dict[str, list[str]] = field(default_factory=dict)  # host -> its GUIDs
    conflicts: list[str] = field(default_factory=list)
    unplaced: dict[str, str] = field(default_factory=dict)  # host -> why
    rails: tuple[str, ...] = ()  # the compute rails it was made with, in preference order

    def by_leaf(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for p in self.placements.values():
            out.setdefault(p.leaf, []).append(p.host)
        return out


@dataclass(frozen=True)
class _Naming:
    host: str
    rail: str | None
    source: str
    up: bool = True


def map_hosts(  # noqa: PLR0912 - the precedence of naming sources is one decision
    fabric: Fabric,
    inventories: Iterable[NodeInventory] = (),
    guid_map: Mapping[str, tuple[str, str | None]] | None = None,
    rails: Sequence[str] = (),
    use_descriptions: bool = True,
) -> HostMap:
    """Place every host CA of the fabric under a leaf; see the module docstring."""
    result = HostMap(rails=tuple(rails))
    agent: dict[str, _Naming] = {}
    agent_guids: dict[str, list[str]] = {}
    for inv in inventories:
        for p in inv.ib_ports:
            if p.link_layer and p.link_layer != "InfiniBand":
                continue
            up = p.state.upper() in ("ACTIVE", "4: ACTIVE") or p.state.upper().endswith("ACTIVE")
            for g in (p.node_guid, p.port_guid):
                if not g:
                    continue
                try:
                    agent[norm_guid(g)] = _Naming(inv.node_name, p.hca or None, "agent", up)
                except ValueError:
                    result.conflicts.append(f"{inv.node_name}: {p.hca} reports bad GUID {g!r}")
                    continue
                agent_guids.setdefault(inv.node_name, []).append(norm_guid(g))
    gmap = dict(guid_map or {})

    named: dict[str, list[tuple[str, _Naming]]] = {}
    seen_agent_hosts: set[str] = set()
    for ca in sorted(fabric.hosts):
        node = fabric.nodes[ca]
        guids = [g for g in [node.guid, *(p.port_guid for p in node.ports.values())] if g]
        naming = next((agent[g] for g in guids if g in agent), None)
        if naming is None:
            hit = next((gmap[g] for g in guids if g in gmap), None)
            if hit is not None:
                naming = _Naming(hit[0], hit[1], "map")
        desc = host_from_description(node.description) if use_descriptions else None
        if naming is None and desc is not None:
            naming = _Naming(desc[0], desc[1], "description")
        elif naming is not None and desc is not None and desc[0] != naming.host:
            result.conflicts.append(
                f"{ca}: {naming.source} says {naming.host}, node description says {desc[0]}")
        if naming is None:
            if fabric.leaf_of(ca):
                result.unnamed.append(ca)
            continue
        if naming.source == "agent":
            seen_agent_hosts.add(naming.host)
        named.setdefault(naming.host, []).append((ca, naming))

    for host, guids in agent_guids.items():
        if host not in seen_agent_hosts:
            result.not_in_fabric[host] = sorted(set(guids))

    for host, cas in sorted(named.items()):
        _place(fabric, host, cas, rails, result)
    return result


def _place(fabric: Fabric, host: str, cas: list[tuple[str, _Naming]], rails: Sequence[str],
           result: HostMap) -> None:
    def rank(item: tuple[str, _Naming]) -> tuple[int, str, str]:
        rail = item[1].rail
        return (rails.index(rail) if rail in rails else len(rails), rail or "", item[0])

    candidates = [c for c in cas if fabric.leaf_of(c[0])]
    if rails:
        # HCAs named by a map line without a rail stay candidates: nothing says they are not
        candidates = [c for c in candidates if c[1].rail is None or c[1].rail in rails]
    if not candidates:
        result.unplaced[host] = (
            f"none of its HCAs ({', '.join(sorted(c[1].rail or c[0] for c in cas))}) is a "
            f"configured compute rail ({', '.join(rails)})" if rails and cas
            else "its HCAs are cabled to no switch")
        return
    candidates.sort(key=rank)
    chosen = next((c for c in candidates if c[1].up), candidates[0])
    leaf = fabric.leaf_of(chosen[0])[0][0]
    others = tuple(sorted({fabric.leaf_of(c)[0][0] for c, _ in candidates} - {leaf}))
    result.placements[host] = Placement(host, leaf, chosen[0], chosen[1].rail, chosen[1].source,
                                        others, rail_failover=chosen is not candidates[0])
