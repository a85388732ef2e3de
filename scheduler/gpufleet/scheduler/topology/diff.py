"""Discovered fabric vs an intended one: a previous dump (port-level: miscabled, missing, new
and down-trained links) or a topology.conf (host-level: hosts under another leaf, switch
edges that are gone). Reports only; changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gpufleet.scheduler.topology.export import SlurmTopology
from gpufleet.scheduler.topology.fabric import Fabric, Link

__all__ = ["FabricDiff", "diff_fabrics", "diff_topology"]


@dataclass
class FabricDiff:
    miscabled: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    down_trained: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.miscabled or self.missing or self.unexpected or self.down_trained)

    def lines(self) -> list[str]:
        out = []
        for kind in ("miscabled", "missing", "down_trained", "unexpected"):
            out += [f"{kind.replace('_', '-')}: {x}" for x in getattr(self, kind)]
        return out


def _name(fab: Fabric, node_id: str) -> str:
    desc = fab.nodes[node_id].description if node_id in fab.nodes else ""
    return f"{node_id} ({desc})" if desc else node_id


def _ends(fab: Fabric) -> dict[tuple[str, int], tuple[tuple[str, int], Link]]:
    out: dict[tuple[str, int], tuple[tuple[str, int], Link]] = {}
    for lk in fab.links:
        out[(lk.a, lk.a_port)] = ((lk.b, lk.b_port), lk)
        out[(lk.b, lk.b_port)] = ((lk.a, lk.a_port), lk)
    return out


def diff_fabrics(intended: Fabric, found: Fabric) -> FabricDiff:
    """Port by port. Node ids carry GUIDs, so this compares the same hardware in both."""
    diff = FabricDiff()
    want, have = _ends(intended), _ends(found)
    done: set[frozenset[tuple[str, int]]] = set()
    for end, (peer, lk) in sorted(want.items()):
        key = frozenset((end, peer))
        if key in done:
            continue
        done.add(key)
        got = have.get(end)
        got_peer = have.get(peer)
        if got is None and got_peer is None:
            diff.missing.append(f"{_name(intended, end[0])}[{end[1]}] <-> "
                                f"{_name(intended, peer[0])}[{peer[1]}]")
        elif got is not None and got[0] != peer:
            diff.miscabled.append(
                f"{_name(found, end[0])}[{end[1]}] goes to {_name(found, got[0][0])}"
                f"[{got[0][1]}], intended {_name(intended, peer[0])}[{peer[1]}]")
        elif got is None and got_peer is not None:
            continue  # reported from the other end when that end's turn comes
        elif got is not None:
            now = got[1]
            if (lk.rate_gbps is not None and now.rate_gbps is not None
                    and now.rate_gbps < lk.rate_gbps):
                diff.down_trained.append(
                    f"{_name(found, end[0])}[{end[1]}] <-> {_name(found, peer[0])}[{peer[1]}]: "
                    f"{now.width}x{now.speed} ({now.rate_gbps:g} Gb/s), intended "
                    f"{lk.width}x{lk.speed} ({lk.rate_gbps:g} Gb/s)")
    for end, (peer, _lk) in sorted(have.items()):
        if end not in want and peer not in want and end < peer:
            diff.unexpected.append(f"{_name(found, end[0])}[{end[1]}] <-> "
                                   f"{_name(found, peer[0])}[{peer[1]}]")
    # links that are down-trained in themselves, whatever the intended dump said
    flagged = {d.split(":")[0] for d in diff.down_trained}
    for lk in found.links:
        label = f"{_name(found, lk.a)}[{lk.a_port}] <-> {_name(found, lk.b)}[{lk.b_port}]"
        if lk.down_trained and label not in flagged:
            diff.down_trained.append(f"{label}: {lk.down_trained}")
    return diff


def diff_topology(intended: SlurmTopology, found: SlurmTopology) -> FabricDiff:
    """Host and switch level, for an intended topology.conf."""
    diff = FabricDiff()
    want_at, have_at = intended.node_switch(), found.node_switch()
    for host in sorted(want_at):
        if host not in have_at:
            diff.missing.append(f"host {host} (intended under {want_at[host]}) not found")
        elif have_at[host] != want_at[host]:
            diff.miscabled.append(
                f"host {host} is under {have_at[host]}, intended {want_at[host]}")
    for host in sorted(set(have_at) - set(want_at)):
        diff.unexpected.append(f"host {host} under {have_at[host]} is not in the intended file")
    want_e, have_e = intended.switch_edges(), found.switch_edges()
    for e in sorted(want_e - have_e, key=sorted):
        diff.missing.append("switch link " + " <-> ".join(sorted(e)))
    for e in sorted(have_e - want_e, key=sorted):
        diff.unexpected.append("switch link " + " <-> ".join(sorted(e)))
    return diff
