"""Fabric model, host -> leaf mapping, Slurm export and diff on real dumps (X5, SuperPOD)."""

from __future__ import annotations

import re

from gpufleet.scheduler.topology.diff import diff_fabrics
from gpufleet.scheduler.topology.export import export_tree, parse_topology_conf
from gpufleet.scheduler.topology.fabric import Fabric, build_fabric
from gpufleet.scheduler.topology.hostmap import host_from_description, load_guid_map, map_hosts
from gpufleet.scheduler.topology.ibnetdiscover import parse_ibnetdiscover

from tests.conformance.corpus import real_data
from tests.topology.fabricgen import inventory


def _fabric(rel: str) -> tuple[str, Fabric]:
    text = real_data(f"ibnetdiscover/{rel}").read_text()
    return text, build_fabric(parse_ibnetdiscover(text, rel))


def test_x5_tree_equals_the_authors_topology_conf() -> None:
    _, fab = _fabric("ltaulell_HPC_toolset/X5.topofile")
    gmap = load_guid_map(real_data("ibnetdiscover/ltaulell_HPC_toolset/X5.map").read_text())
    hosts = map_hosts(fab, guid_map=gmap)
    ours = parse_topology_conf(export_tree(fab, hosts, include_unnamed=True))
    theirs = parse_topology_conf(
        real_data("slurm_conf/ltaulell_HPC_toolset/X5.topology.conf").read_text())
    assert ours.switch_nodes == theirs.switch_nodes
    assert ours.switch_edges() == theirs.switch_edges()
    assert len(theirs.switch_nodes) == 6 and len(theirs.switch_edges()) == 24  # not vacuous
    # the map, not the vendor-default descriptions, named them
    assert {p.source for p in hosts.placements.values()} == {"map"}


def test_x5_levels_and_hops() -> None:
    _, fab = _fabric("ltaulell_HPC_toolset/X5.topofile")
    spine_file = real_data("ibnetdiscover/ltaulell_HPC_toolset/X5.spine").read_text()
    spines = {ln.strip() for ln in spine_file.splitlines() if ln.startswith("S-")}
    assert {s for s in fab.switches if fab.level[s] >= 1} == spines
    assert fab.level["S-0008f105001086a2"] == 2  # only reaches leaves through other spines
    assert len(fab.leaves) == 6
    a, b = "H-003048c74e4a0000", "H-003048c7488b0000"  # x5570comp1/2, same leaf
    assert fab.switch_hops(a, b) == 1
    assert fab.switch_hops(a, "H-78e7d10300227744") == 3  # leaf -> spine -> leaf


def test_x5_without_map_keeps_unnamed_hosts_out_and_says_so() -> None:
    _, fab = _fabric("ltaulell_HPC_toolset/X5.topofile")
    hosts = map_hosts(fab)
    # every HCA description is a vendor default: nothing can be named from them
    assert hosts.placements == {}
    assert len(hosts.unnamed) == 89
    assert "Nodes=" not in export_tree(fab, hosts)


def _superpod_truth(text: str) -> dict[str, dict[str, tuple[str, str]]]:
    """host -> rail word -> (CA node id, leaf id), read straight from the dump's CA records."""
    truth: dict[str, dict[str, tuple[str, str]]] = {}
    record = r'^Ca\t\d+ "(H-[0-9a-f]+)"\t+# "([^"]*)"\n\[\d+\]\([0-9a-f]+\) \t"(S-[0-9a-f]+)"'
    for m in re.finditer(record, text, re.M):
        named = host_from_description(m.group(2))
        if named and named[1]:
            truth.setdefault(named[0], {})[named[1]] = (m.group(1), m.group(3))
    return truth


def test_superpod_hosts_land_under_their_compute_rail_leaf_by_guid() -> None:
    text, fab = _fabric("nvidia_topograph/example.out")
    truth = _superpod_truth(text)
    # agents report their HCAs' GUIDs (as the dump's descriptions name them, not more)
    invs = [inventory(h, [(rail, "0x" + ca[2:], "ACTIVE") for rail, (ca, _) in rails.items()])
            for h, rails in truth.items()]
    rails = ["HCA-1", "mlx5_0", "HCA-2", "mlx5_1", "HCA-5", "mlx5_4", "HCA-6", "mlx5_5"]
    hosts = map_hosts(fab, invs, rails=rails, use_descriptions=False)

    assert len(truth) == 122  # distinct hosts named in the dump
    assert set(hosts.placements) == set(truth)
    for h, p in hosts.placements.items():
        want_rail = next(r for r in rails if r in truth[h])  # first compute rail it has
        assert (p.rail, p.leaf, p.source) == (want_rail, truth[h][want_rail][1], "agent"), h
    assert len(fab.switches) == text.count("\nSwitch\t") == 40
    assert (len(fab.leaves), len(fab.switches) - len(fab.leaves)) == (31, 9)
    assert len(fab.hosts) + len(fab.aggregation) == text.count("\nCa\t") == 582
    assert len(fab.aggregation) == 40  # SHARP nodes are not hosts
    # hosts the dump could not name (all HCAs on vendor defaults) are reported, not lost
    named_cas = {ca for rails_ in truth.values() for ca, _ in rails_.values()}
    assert set(hosts.unnamed) == fab.hosts - named_cas


def test_superpod_rail_failover_when_the_compute_rail_is_down() -> None:
    text, fab = _fabric("nvidia_topograph/example.out")
    truth = _superpod_truth(text)
    host = "b05-p1-dgx-05-c08"
    ports = [(r, "0x" + ca[2:], "DOWN" if r == "HCA-1" else "ACTIVE")
             for r, (ca, _) in truth[host].items()]
    hosts = map_hosts(fab, [inventory(host, ports)], rails=["HCA-1", "HCA-2"],
                      use_descriptions=False)
    p = hosts.placements[host]
    assert (p.rail, p.leaf, p.rail_failover) == ("HCA-2", truth[host]["HCA-2"][1], True)
    assert p.other_leaves == (truth[host]["HCA-1"][1],)
    assert "preferred rail down" in export_tree(fab, hosts)


def test_superpod_without_rails_places_by_first_hca_and_warns() -> None:
    _, fab = _fabric("nvidia_topograph/example.out")
    hosts = map_hosts(fab)  # descriptions only, no rails configured
    p = hosts.placements["a06-p1-dgx-02-c12"]
    assert p.rail == "HCA-1" and len(p.other_leaves) == 3
    assert "no compute rail configured" in export_tree(fab, hosts)


def test_switch_with_hosts_and_children_gets_a_hosts_child() -> None:
    # 3.topo: the SwitchIB has hosts and the SX6012 below it (which also has hosts)
    _, fab = _fabric("jabl_ibtopotool/3.topo")
    conf = parse_topology_conf(export_tree(fab, map_hosts(fab)))
    assert not set(conf.switch_nodes) & set(conf.switch_children)
    assert len(fab.self_loops) == 3  # ports cabled back into the same switch, left out


def test_diff_fabrics_miscabled_missing_down_trained() -> None:
    text = real_data("ibnetdiscover/ltaulell_HPC_toolset/X5.topofile").read_text()
    intended = build_fabric(parse_ibnetdiscover(text, "before"))
    assert diff_fabrics(intended, intended).clean
    # swap two host cables on leaf 0b50, unplug one, and let one uplink train at 1x
    now = text
    now = now.replace('[4]\t"H-003048c749cd0000"[1](3048c749cd0001)', "[4]\tSWAP_A")
    now = now.replace('[5]\t"H-003048c749bb0000"[1](3048c749bb0001)',
                      '[5]\t"H-003048c749cd0000"[1](3048c749cd0001)')
    now = now.replace("[4]\tSWAP_A", '[4]\t"H-003048c749bb0000"[1](3048c749bb0001)')
    ca_port = r'(Ca\t1 "H-003048c749{0}0000".*\n\[1\]\(3048c749{0}0001\) \t"S-0008f10500200b50")'
    now = re.sub(ca_port.format("cd") + r"\[4\]", r"\1[5]", now)
    now = re.sub(ca_port.format("bb") + r"\[5\]", r"\1[4]", now)
    now = now.replace('[1]\t"S-0008f10500108c5c"[15]\t\t# "Voltaire 4036 # 4036-8C5C" lid 16 4xQDR',
                      '[1]\t"S-0008f10500108c5c"[15]\t\t# "Voltaire 4036 # 4036-8C5C" lid 16 1xQDR')
    now = re.sub(r'\[6\]\t"H-003048c74abf0000".*\n', "", now)
    now = re.sub(r'\[1\]\(3048c74abf0001\).*\n', "", now)
    d = diff_fabrics(intended, build_fabric(parse_ibnetdiscover(now, "after")))
    assert len(d.miscabled) == 2 and all("S-0008f10500200b50" in m for m in d.miscabled)
    assert len(d.missing) == 1 and "H-003048c74abf0000" in d.missing[0]
    assert len(d.down_trained) == 1 and "1xQDR" in d.down_trained[0]
    assert d.unexpected == []

