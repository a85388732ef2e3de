"""Fabric model, host -> leaf mapping, Slurm export and diff on generated fabrics (real dumps:
tests/conformance/test_fabric_export_real.py)."""

from __future__ import annotations

import pytest
from gpufleet.scheduler.topology.diff import diff_topology
from gpufleet.scheduler.topology.export import (
    QUARANTINE,
    export_block,
    export_tree,
    parse_topology_conf,
)
from gpufleet.scheduler.topology.fabric import build_fabric
from gpufleet.scheduler.topology.hostmap import host_from_description, map_hosts
from gpufleet.scheduler.topology.ibnetdiscover import parse_ibnetdiscover

from tests.topology.fabricgen import fat_tree, inventory

# ------------------------------------------------------------------ ltaulell X5 (acceptance)


# --------------------------------------------------------- NVIDIA topograph SuperPOD (acceptance)


def test_description_parsing() -> None:
    assert host_from_description("a06-p1-dgx-02-c12 HCA-1") == ("a06-p1-dgx-02-c12", "HCA-1")
    assert host_from_description("stage114 mlx4_0") == ("stage114", "mlx4_0")
    assert host_from_description("MT4129 ConnectX7   Mellanox Technologies") is None
    assert host_from_description("Mellanox Technologies Aggregation Node") is None
    assert host_from_description("MT25408 ConnectX Mellanox Technologies") is None


# ------------------------------------------------------------------ generated fabrics


HOSTS8 = [f"n{i}" for i in range(1, 9)]


def test_agent_guids_beat_default_descriptions_and_a_wrong_map() -> None:
    gen = fat_tree(HOSTS8, per_leaf=4, spines=2, default_descriptions=True)
    fab = build_fabric(parse_ibnetdiscover(gen.text))
    invs = [inventory(h, [("mlx5_0", g, "ACTIVE")]) for h, g in gen.host_guid.items()]
    wrong = {gen.host_guid["n1"]: ("n99", None)}
    hosts = map_hosts(fab, invs, guid_map=wrong)
    assert {h: p.leaf for h, p in hosts.placements.items()} == gen.host_leaf
    conf = parse_topology_conf(export_tree(fab, hosts))
    assert conf.switch_nodes == {gen.host_leaf["n1"]: set(HOSTS8[:4]),
                                 gen.host_leaf["n5"]: set(HOSTS8[4:])}
    assert {c for s in gen.spines for c in conf.switch_children[s]} == set(conf.switch_nodes)


def test_agent_reporting_guids_absent_from_the_fabric() -> None:
    gen = fat_tree(HOSTS8, per_leaf=4, spines=2)
    fab = build_fabric(parse_ibnetdiscover(gen.text))
    hosts = map_hosts(fab, [inventory("n42", [("mlx5_0", "0x00000000deadbeef", "ACTIVE")])])
    assert hosts.not_in_fabric == {"n42": ["0x00000000deadbeef"]}


def test_down_trained_uplink_report_and_exclude_policies() -> None:
    gen = fat_tree(HOSTS8, per_leaf=4, spines=2, slow_uplink=(1, 0))
    fab = build_fabric(parse_ibnetdiscover(gen.text))
    slow = [lk for lk in fab.links if lk.down_trained]
    assert len(slow) == 1 and "1x" in slow[0].down_trained and slow[0].rate_gbps == 100.0
    leaf1 = gen.host_leaf["n5"]
    assert set(fab.degraded_switches()) == {leaf1}
    hosts = map_hosts(fab)

    report = export_tree(fab, hosts, policy="report")
    assert f"# degraded {leaf1} (leaf): uplink" in report
    assert parse_topology_conf(report).switch_nodes[leaf1] == set(HOSTS8[4:])

    excluded = parse_topology_conf(export_tree(fab, hosts, policy="exclude"))
    assert excluded.switch_nodes[QUARANTINE] == set(HOSTS8[4:])
    assert leaf1 not in excluded.switch_nodes
    assert all(QUARANTINE not in c and leaf1 not in c
               for c in excluded.switch_children.values())


def test_expected_rate_marks_slow_host_links() -> None:
    gen = fat_tree(HOSTS8, per_leaf=4, spines=2, speed="HDR")
    fab = build_fabric(parse_ibnetdiscover(gen.text), expected_rate_gbps=400)
    assert all("below the expected 400" in lk.down_trained for lk in fab.links)


def test_block_export() -> None:
    gen = fat_tree([f"n{i}" for i in range(1, 13)], per_leaf=4, spines=2)
    fab = build_fabric(parse_ibnetdiscover(gen.text))
    conf = parse_topology_conf(export_block(fab, map_hosts(fab)))
    assert sorted(len(v) for v in conf.blocks.values()) == [4, 4, 4]
    assert conf.block_sizes == [4, 8]


# ------------------------------------------------------------------ diff


def test_diff_topology_conf_moved_host_and_lost_switch_link() -> None:
    want = parse_topology_conf("SwitchName=s1 Nodes=n[1-4]\nSwitchName=s2 Nodes=n[5-8]\n"
                               "SwitchName=top Switches=s[1-2]\n")
    have = parse_topology_conf("switchname = s1 nodes = n[1-3,5]\nSwitchName=s2 Nodes=n[6-9]\n"
                               "SwitchName=top Switches=s1")
    d = diff_topology(want, have)
    assert d.miscabled == ["host n5 is under s1, intended s2"]
    assert "host n4 (intended under s1) not found" in d.missing
    assert "switch link s2 <-> top" in d.missing
    assert d.unexpected == ["host n9 under s2 is not in the intended file"]


@pytest.mark.parametrize("bad", ["SwitchName=s1 Nodes=n[1-", "Foo=bar", "just words"])
def test_topology_conf_errors_name_the_line(bad: str) -> None:
    with pytest.raises(ValueError, match=r"t.conf:2:"):
        parse_topology_conf("# ok\n" + bad, "t.conf")
