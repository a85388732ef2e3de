"""`gpufleet topology`: fabric, hosts -> leaf, Slurm topology.conf, diff, node GPU topology.

Parses options and delegates to gpufleet.scheduler.topology; reads agents' inventories from
the controller's store (read only) and the fabric from an `ibnetdiscover` dump file.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from gpufleet.scheduler.service.convert import inventory_from_blob
from gpufleet.scheduler.topology import diff as tdiff
from gpufleet.scheduler.topology import export, gputopo
from gpufleet.scheduler.topology.fabric import Fabric, build_fabric
from gpufleet.scheduler.topology.hostmap import HostMap, load_guid_map, map_hosts
from gpufleet.scheduler.topology.ibnetdiscover import IbParseError, parse_ibnetdiscover
from gpufleet.scheduler.topology.inventory import NodeInventory

F = TypeVar("F", bound=Callable[..., Any])


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError as e:
        raise click.ClickException(f"{path}: {e.strerror}") from e


def _fabric(path: str, expected_rate_gbps: float | None) -> Fabric:
    try:
        return build_fabric(parse_ibnetdiscover(_read(path), path), expected_rate_gbps)
    except IbParseError as e:
        raise click.ClickException(str(e)) from e


def _inventories(db: str | None) -> dict[str, NodeInventory]:
    if not db:
        return {}
    if not Path(db).exists():
        raise click.ClickException(f"no gpufleet store at {db}")
    from gpufleet.scheduler.store import StoreError, open_store

    try:
        store = open_store(db)
    except StoreError as e:
        raise click.ClickException(str(e)) from e
    try:
        out = {}
        for row in store.nodes():
            blob = store.inventory(row.name)
            if blob:
                out[row.name] = inventory_from_blob(blob)
        return out
    finally:
        store.close()


def _fabric_options(f: F) -> F:
    for opt in reversed([
        click.option("--ibnetdiscover", "dump", required=True, metavar="FILE",
                     envvar="GPUFLEET_IBNETDISCOVER",
                     help="`ibnetdiscover` (or `-p`) output of the fabric."),
        click.option("--db", envvar="GPUFLEET_DB", default=None,
                     help="Controller store: agents' HCA GUIDs name the hosts."),
        click.option("--guid-map", metavar="FILE", help="Lines 'GUID HOST [RAIL]'."),
        click.option("--rail", "rails", multiple=True, metavar="HCA",
                     help="Compute rail(s) in order of preference (repeat): mlx5_0, HCA-1..."),
        click.option("--no-descriptions", is_flag=True,
                     help="Never name hosts from node descriptions."),
        click.option("--expected-rate-gbps", type=float, default=None,
                     help="A link slower than this is down-trained (e.g. 400 for NDR)."),
    ]):
        f = opt(f)
    return f


def _hosts(fab: Fabric, db: str | None, guid_map: str | None, rails: tuple[str, ...],
           no_descriptions: bool) -> HostMap:
    gmap = None
    if guid_map:
        try:
            gmap = load_guid_map(_read(guid_map), guid_map)
        except IbParseError as e:
            raise click.ClickException(str(e)) from e
    return map_hosts(fab, _inventories(db).values(), gmap, rails, not no_descriptions)


@click.group("topology")
def topology() -> None:
    """InfiniBand fabric and GPU topology; Slurm topology.conf."""


@topology.command("export")
@_fabric_options
@click.option("--format", "fmt", type=click.Choice(["tree", "block"]), default="tree")
@click.option("--policy", type=click.Choice(export.POLICIES), default="report",
              help="Switches with down/down-trained uplinks: list them, or exclude them.")
@click.option("--include-unnamed", is_flag=True,
              help="List hosts nobody named under their H-<guid> id (must exist in Slurm).")
@click.option("-o", "--output", default="-", help="File to write (default stdout).")
def export_cmd(dump: str, db: str | None, guid_map: str | None, rails: tuple[str, ...],
               no_descriptions: bool, expected_rate_gbps: float | None, fmt: str, policy: str,
               include_unnamed: bool, output: str) -> None:
    """Write topology.conf (topology/tree or topology/block)."""
    fab = _fabric(dump, expected_rate_gbps)
    hosts = _hosts(fab, db, guid_map, rails, no_descriptions)
    fn = export.export_tree if fmt == "tree" else export.export_block
    text = fn(fab, hosts, policy, include_unnamed)
    for ca in hosts.unnamed:
        click.echo(f"warning: host CA {ca} ({fab.nodes[ca].description}) has no name; "
                   "give agents' GUIDs (--db) or --guid-map", err=True)
    for host, why in hosts.unplaced.items():
        click.echo(f"warning: {host} not placed: {why}", err=True)
    if output == "-":
        click.echo(text, nl=False)
    else:
        Path(output).write_text(text)


@topology.command("hosts")
@_fabric_options
@click.option("--json", "as_json", is_flag=True)
def hosts_cmd(dump: str, db: str | None, guid_map: str | None, rails: tuple[str, ...],
              no_descriptions: bool, expected_rate_gbps: float | None, as_json: bool) -> None:
    """Hosts -> leaf switch, and how each was named."""
    fab = _fabric(dump, expected_rate_gbps)
    hm = _hosts(fab, db, guid_map, rails, no_descriptions)
    rows = [{"host": p.host, "leaf": p.leaf, "leaf_description": fab.nodes[p.leaf].description,
             "hca": p.ca, "rail": p.rail, "source": p.source,
             "other_leaves": list(p.other_leaves), "rail_failover": p.rail_failover}
            for p in sorted(hm.placements.values(), key=lambda p: p.host)]
    if as_json:
        click.echo(json.dumps({"hosts": rows, "unnamed": hm.unnamed,
                               "not_in_fabric": hm.not_in_fabric, "unplaced": hm.unplaced,
                               "conflicts": hm.conflicts}, indent=2))
        return
    click.echo(f"{'HOST':<24} {'LEAF':<20} {'RAIL':<8} {'SOURCE':<12} LEAF DESCRIPTION")
    for r in rows:
        click.echo(f"{r['host']:<24} {r['leaf']:<20} {r['rail'] or '-':<8} {r['source']:<12} "
                   f"{r['leaf_description']}")
    for ca in hm.unnamed:
        click.echo(f"{'?':<24} {fab.leaf_of(ca)[0][0]:<20} {'-':<8} {'unnamed':<12} {ca}")
    for c in hm.conflicts:
        click.echo(f"conflict: {c}", err=True)


@topology.command("fabric")
@click.option("--ibnetdiscover", "dump", required=True, metavar="FILE",
              envvar="GPUFLEET_IBNETDISCOVER")
@click.option("--expected-rate-gbps", type=float, default=None)
@click.option("--json", "as_json", is_flag=True)
def fabric_cmd(dump: str, expected_rate_gbps: float | None, as_json: bool) -> None:
    """Switches with their level, and links that are down or down-trained."""
    fab = _fabric(dump, expected_rate_gbps)
    switches = [{"switch": s, "level": fab.level.get(s), "role": fab.level_name(s),
                 "description": fab.nodes[s].description,
                 "hosts": sum(1 for h in fab.hosts for t, _ in fab.leaf_of(h) if t == s)}
                for s in sorted(fab.switches, key=lambda s: (-(fab.level.get(s) or 0), s))]
    bad = [{"a": lk.a, "a_port": lk.a_port, "b": lk.b, "b_port": lk.b_port,
            "rate_gbps": lk.rate_gbps, "why": lk.down_trained}
           for lk in fab.links if lk.down_trained]
    down = [{"node": n, "port": p} for n, p in fab.down_ports]
    if as_json:
        click.echo(json.dumps({"switches": switches, "host_cas": len(fab.hosts),
                               "down_trained": bad, "down_ports": down}, indent=2))
        return
    click.echo(f"{len(fab.switches)} switches, {len(fab.hosts)} host CAs, "
               f"{len(fab.aggregation)} aggregation nodes, {len(fab.links)} links")
    for s in switches:
        click.echo(f"{s['role']:<8} {s['switch']:<20} hosts={s['hosts']:<4} {s['description']}")
    for b in bad:
        click.echo(f"down-trained: {b['a']}[{b['a_port']}] <-> {b['b']}[{b['b_port']}] "
                   f"{b['why']}")
    for d in down:
        click.echo(f"down: {d['node']}[{d['port']}]")


@topology.command("diff")
@click.option("--ibnetdiscover", "dump", required=True, metavar="FILE",
              envvar="GPUFLEET_IBNETDISCOVER", help="The fabric as it is now.")
@click.option("--intended-dump", metavar="FILE", help="A previous dump: compared port by port.")
@click.option("--intended-conf", metavar="FILE", help="A topology.conf: compared by host.")
@click.option("--db", envvar="GPUFLEET_DB", default=None)
@click.option("--guid-map", metavar="FILE")
@click.option("--rail", "rails", multiple=True, metavar="HCA")
def diff_cmd(dump: str, intended_dump: str | None, intended_conf: str | None, db: str | None,
             guid_map: str | None, rails: tuple[str, ...]) -> None:
    """Miscabled, missing, unexpected and down-trained links. Exit 1 when anything differs."""
    if bool(intended_dump) == bool(intended_conf):
        raise click.UsageError("give exactly one of --intended-dump, --intended-conf")
    found = _fabric(dump, None)
    if intended_dump:
        result = tdiff.diff_fabrics(_fabric(intended_dump, None), found)
    else:
        try:
            want = export.parse_topology_conf(_read(intended_conf or ""), intended_conf or "")
        except IbParseError as e:
            raise click.ClickException(str(e)) from e
        have = export.parse_topology_conf(
            export.export_tree(found, _hosts(found, db, guid_map, rails, False)))
        result = tdiff.diff_topology(want, have)
    for line in result.lines():
        click.echo(line)
    if result.clean:
        click.echo("no differences")
    sys.exit(0 if result.clean else 1)


@topology.command("node")
@click.argument("node")
@click.option("--db", envvar="GPUFLEET_DB", required=True)
def node_cmd(node: str, db: str) -> None:
    """A node's GPU topology, as `nvidia-smi topo -m` shows it, and its NVLink islands."""
    invs = _inventories(db)
    if node not in invs:
        raise click.ClickException(f"no inventory for node {node!r} in {db}")
    m = gputopo.from_inventory(invs[node])
    click.echo(gputopo.render_topo_m(m), nl=False)
    click.echo("")
    for i, island in enumerate(gputopo.nvlink_islands(m)):
        click.echo(f"NVLink island {i}: {','.join(island)}")
