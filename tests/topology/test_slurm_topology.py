"""The generated tree in a real slurmctld (each Slurm version, topology/tree): it starts with it,
`scontrol show topology` shows it, and `sbatch --switches=1 -N2` lands on one leaf."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpufleet.scheduler.topology.export import export_tree, parse_topology_conf
from gpufleet.scheduler.topology.fabric import build_fabric
from gpufleet.scheduler.topology.hostmap import map_hosts
from gpufleet.scheduler.topology.ibnetdiscover import parse_ibnetdiscover

from tests.slurm.fixtures import running_lab
from tests.slurm.harness import SlurmLab, SlurmLabConfig
from tests.topology.fabricgen import fat_tree, inventory

pytestmark = pytest.mark.slurm

HOSTS = [f"n{i}" for i in range(1, 9)]
# Leaves of 3 (not the harness's own 4 + 4) so the tree Slurm shows can only be ours.
GEN = fat_tree(HOSTS, per_leaf=3, spines=2, default_descriptions=True)


def _generated_conf() -> str:
    fab = build_fabric(parse_ibnetdiscover(GEN.text, "fabricgen"))
    invs = [inventory(h, [("mlx5_0", g, "ACTIVE")]) for h, g in GEN.host_guid.items()]
    return export_tree(fab, map_hosts(fab, invs, rails=["mlx5_0"]))


@pytest.fixture(scope="module")
def topo_lab(slurm_version: str) -> Iterator[tuple[SlurmLab, str]]:
    conf = _generated_conf()
    port = int(os.environ.get("GPUFLEET_SLURM_TEST_PORT", "7917"))
    with running_lab(SlurmLabConfig(
        lab_dir=Path(os.environ.get("GPUFLEET_SLURM_TEST_LAB", "/tmp/gf-lab-topo")),
        ctld_port=port, node_port0=port + 10183, topology_conf=conf, version=slurm_version)) as lab:
        yield lab, conf


def test_slurmctld_shows_the_generated_tree(topo_lab: tuple[SlurmLab, str]) -> None:
    lab, conf = topo_lab
    want = parse_topology_conf(conf)
    shown = lab.switches()
    assert set(shown) == set(want.switch_nodes) | set(want.switch_children)
    for leaf, nodes in want.switch_nodes.items():
        assert shown[leaf]["Level"] == "0"
        assert set(lab.hostnames(shown[leaf]["Nodes"])) == nodes
    for spine, children in want.switch_children.items():
        assert shown[spine]["Level"] == "1"
        assert set(lab.hostnames(shown[spine]["Switches"])) == children
    assert sorted(len(n) for n in want.switch_nodes.values()) == [2, 3, 3]


def test_switches_1_lands_on_one_leaf(topo_lab: tuple[SlurmLab, str]) -> None:
    lab, conf = topo_lab
    leaf_of = parse_topology_conf(conf).node_switch()
    jobs = [lab.sbatch("--switches=1", "-N2", "--wrap", "sleep 30") for _ in range(3)]
    try:
        for job in jobs:
            lab.wait_job_state(job, "RUNNING", timeout_s=60)
            nodes = lab.job_nodes(job)
            assert len(nodes) == 2
            assert len({leaf_of[n] for n in nodes}) == 1, (job, nodes)
    finally:
        lab.run("scancel", *map(str, jobs))
