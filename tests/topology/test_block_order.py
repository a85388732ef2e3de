"""topology/block export in fabric order, on a three-level fabric whose GUIDs interleave pods.

slurmctld (24.11, seen in its log) builds each higher BlockSizes level by joining consecutive
blocks in file order: pairs, then fours. Blocks written sorted by switch GUID would pair
leaves of different pods whenever the GUIDs interleave them; written in fabric order, each
aggregate slurmctld builds is exactly one of the fabric's pods (or a whole pair of pods).
"""

from __future__ import annotations

from collections import defaultdict

from gpufleet.scheduler.topology.export import export_block, parse_topology_conf
from gpufleet.scheduler.topology.fabric import build_fabric
from gpufleet.scheduler.topology.hostmap import map_hosts
from gpufleet.scheduler.topology.ibnetdiscover import parse_ibnetdiscover

PODS, LEAVES, HOSTS, SPINES, CORES = 4, 4, 2, 2, 2


def _guid(kind: int, n: int) -> str:
    return f"{0x0c42a10300000000 + kind * 0x100000 + n:016x}"


def three_level() -> tuple[str, dict[str, int]]:  # noqa: PLR0912 - one loop per part
    """ibnetdiscover text of PODS pods (LEAVES leaves and SPINES spines each, every leaf to
    every spine of its pod), CORES cores (core c to spine c of every pod), HOSTS hosts per
    leaf. Leaf GUIDs are numbered leaf-major (pod 0 leaf 0, pod 1 leaf 0, ...), so sorting by
    GUID interleaves the pods. Returns the text and leaf name -> pod."""
    ports: dict[str, list[tuple[str, int, str]]] = defaultdict(list)  # sw -> (peer, pport, d)
    desc: dict[str, str] = {}
    leaf = {(p, i): "S-" + _guid(1, i * PODS + p) for p in range(PODS) for i in range(LEAVES)}
    spine = {(p, j): "S-" + _guid(2, p * SPINES + j) for p in range(PODS) for j in range(SPINES)}
    core = {c: "S-" + _guid(4, c) for c in range(CORES)}
    for (p, i), s in leaf.items():
        desc[s] = f"MF0;pod{p}-leaf{i}:MQM9790/U1"
    for (p, j), s in spine.items():
        desc[s] = f"MF0;pod{p}-spine{j}:MQM9790/U1"
    for c, s in core.items():
        desc[s] = f"MF0;core{c}:MQM9790/U1"
    lids = {s: 1000 + n for n, s in enumerate([*leaf.values(), *spine.values(),
                                               *core.values()])}

    def link(a: str, b: str) -> None:
        pa, pb = len(ports[a]) + 1, len(ports[b]) + 1
        ports[a].append((b, pb, desc.get(b, "")))
        ports[b].append((a, pa, desc.get(a, "")))

    hosts: list[tuple[str, str, str, int]] = []  # name, guid, leaf, leaf port
    for (p, i), lf in sorted(leaf.items()):
        for h in range(HOSTS):
            name = f"n{(p * LEAVES + i) * HOSTS + h + 1:03d}"
            g = _guid(3, len(hosts))
            ports[lf].append(("H-" + g, 1, f"{name} mlx5_0"))
            hosts.append((name, g, lf, len(ports[lf])))
    for (p, _i), lf in leaf.items():
        for j in range(SPINES):
            link(lf, spine[(p, j)])
    for c, cs in core.items():
        for p in range(PODS):
            link(spine[(p, c)], cs)
    out = ["#", "# Topology file: three-level test fabric", "#", ""]
    for s in [*core.values(), *spine.values(), *leaf.values()]:
        g = s[2:]
        out += ["vendid=0x2c9", "devid=0xd2f2", f"switchguid=0x{g}({g})",
                f'Switch\t{len(ports[s])}\t"{s}"\t\t# "{desc[s]}" enhanced port 0 lid '
                f"{lids[s]} lmc 0"]
        for n, (peer, pport, pdesc) in enumerate(ports[s], 1):
            if peer.startswith("H-"):
                out.append(f'[{n}]\t"{peer}"[1]({peer[2:]}) \t\t# "{pdesc}" lid '
                           f"{3000 + n} 4xNDR")
            else:
                out.append(f'[{n}]\t"{peer}"[{pport}]\t\t# "{pdesc}" lid {lids[peer]} 4xNDR')
        out.append("")
    for hi, (name, g, lf, lport) in enumerate(hosts):
        out += ["vendid=0x2c9", "devid=0x1021", f"sysimgguid=0x{g}", f"caguid=0x{g}",
                f'Ca\t1 "H-{g}"\t\t# "{name} mlx5_0"',
                f'[1]({g}) \t"{lf}"[{lport}]\t\t# lid {3000 + hi} lmc 0 "{desc[lf]}" lid '
                f"{lids[lf]} 4xNDR", ""]
    return "\n".join(out) + "\n", {s: p for (p, _), s in leaf.items()}


def _blocks_in_file_order(conf: str) -> list[str]:
    return [line.split()[0].split("=", 1)[1] for line in conf.splitlines()
            if line.startswith("BlockName=")]


def test_blocks_are_written_pod_by_pod_so_slurms_aggregates_are_pods() -> None:
    text, pod_of = three_level()
    fab = build_fabric(parse_ibnetdiscover(text, "three-level"))
    assert max(fab.level.values()) == 2  # leaves, spines, cores: three levels
    conf = export_block(fab, map_hosts(fab))
    order = _blocks_in_file_order(conf)
    assert sorted(order) == sorted(pod_of)
    # what sorting by GUID would have written: consecutive pairs mix pods
    by_guid = sorted(pod_of)
    assert any(pod_of[a] != pod_of[b] for a, b in zip(by_guid[::2], by_guid[1::2], strict=True))
    # slurmctld's aggregates: consecutive runs of 2, then 4 blocks (BlockSizes base 2 hosts)
    assert parse_topology_conf(conf).block_sizes[:3] == [HOSTS, 2 * HOSTS, 4 * HOSTS]
    for size in (2, 4):
        runs = [order[k:k + size] for k in range(0, len(order), size)]
        assert all(len({pod_of[b] for b in run}) == 1 for run in runs), (size, runs)
    # a run of 8 blocks is two whole pods
    assert all(len({pod_of[b] for b in order[k:k + 8]}) == 2 for k in range(0, len(order), 8))


def test_block_order_is_stable_across_runs_and_dump_order() -> None:
    text, _ = three_level()
    first = export_block(build_fabric(parse_ibnetdiscover(text, "t")),
                         map_hosts(build_fabric(parse_ibnetdiscover(text, "t"))))
    # the same fabric with its switch sections in reverse order in the dump
    sections = text.strip().split("\n\n")
    head, body = sections[0], sections[1:]
    shuffled = "\n\n".join([head, *reversed(body)]) + "\n"
    fab = build_fabric(parse_ibnetdiscover(shuffled, "t"))
    assert _blocks_in_file_order(export_block(fab, map_hosts(fab))) == \
        _blocks_in_file_order(first)
