"""`gpufleet topology` through click, with a real SQLite store holding agents' inventories."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from gpufleet.scheduler.cli.topology import topology
from gpufleet.scheduler.store import SqliteStore

from tests.support.inventory import sim_inventory_pb
from tests.topology.fabricgen import fat_tree, inventory_pb

HOSTS = [f"n{i}" for i in range(1, 9)]


def _setup(tmp_path: Path) -> tuple[Path, Path]:
    gen = fat_tree(HOSTS, per_leaf=4, spines=2, default_descriptions=True)
    dump = tmp_path / "fabric.out"
    dump.write_text(gen.text)
    db = tmp_path / "state.db"
    store = SqliteStore(db)
    for h, g in gen.host_guid.items():
        inv = inventory_pb(h, [("mlx5_0", g, "ACTIVE")])
        if h == "n1":
            inv.MergeFrom(sim_inventory_pb("a100-pcie-bridged"))
            inv.node_name = "n1"
        store.upsert_node(h, h, len(inv.gpus), inv.SerializeToString(), "i", 1)
    store.close()
    return dump, db


def test_export_hosts_node_and_diff(tmp_path: Path) -> None:
    dump, db = _setup(tmp_path)
    r = CliRunner()
    out = r.invoke(topology, ["export", "--ibnetdiscover", str(dump), "--db", str(db),
                              "--format", "tree"])
    assert out.exit_code == 0, out.output
    assert "Nodes=n[1-4]" in out.output and "Nodes=n[5-8]" in out.output
    block = r.invoke(topology, ["export", "--ibnetdiscover", str(dump), "--db", str(db),
                                "--format", "block"])
    assert "BlockSizes=4,8" in block.output
    # without agents' GUIDs the default descriptions name nobody
    bare = r.invoke(topology, ["export", "--ibnetdiscover", str(dump)])
    assert "Nodes=" not in bare.output and "has no name" in bare.output

    hosts = r.invoke(topology, ["hosts", "--ibnetdiscover", str(dump), "--db", str(db),
                                "--json"])
    rows = json.loads(hosts.output)["hosts"]
    assert [(x["host"], x["source"]) for x in rows] == [(h, "agent") for h in HOSTS]

    node = r.invoke(topology, ["node", "n1", "--db", str(db)])
    assert node.exit_code == 0, node.output
    assert "GPU0\t X \tNV12\t" in node.output
    assert "NVLink island 0: GPU0,GPU1" in node.output

    conf = tmp_path / "topology.conf"
    conf.write_text(out.output.replace("n[1-4]", "n[1-3,5]").replace("n[5-8]", "n[4,6-8]"))
    d = r.invoke(topology, ["diff", "--ibnetdiscover", str(dump), "--db", str(db),
                            "--intended-conf", str(conf)])
    assert d.exit_code == 1
    assert "miscabled: host n4 is under" in d.output and "miscabled: host n5" in d.output
    same = r.invoke(topology, ["diff", "--ibnetdiscover", str(dump),
                               "--intended-dump", str(dump)])
    assert same.exit_code == 0 and "no differences" in same.output


def test_fabric_view_and_bad_dump(tmp_path: Path) -> None:
    r = CliRunner()
    dump = tmp_path / "slow.topo"
    dump.write_text(fat_tree(HOSTS, per_leaf=4, spines=2, slow_uplink=(0, 1)).text)
    out = r.invoke(topology, ["fabric", "--ibnetdiscover", str(dump)])
    assert out.exit_code == 0
    assert "down-trained:" in out.output and "1x" in out.output
    bad = tmp_path / "bad.out"
    bad.write_text("Switch 8 \"S-0000000000000001\" # \"x\" lid 1\nwhat is this\n")
    err = r.invoke(topology, ["export", "--ibnetdiscover", str(bad)])
    assert err.exit_code == 1 and f"{bad}:2: not an ibnetdiscover line" in err.output
