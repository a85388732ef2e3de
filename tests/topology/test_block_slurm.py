"""gpufleet's topology/block export of a three-level fabric in a real slurmctld (24.11, 26.05):
the aggregates slurmctld builds for the higher BlockSizes levels are the fabric's pods.

slurmctld joins consecutive blocks of topology.conf, in file order, into each higher level
(pairs, then fours, ...) and logs every aggregate at debug level ("Aggregated Block name:...
nodes:..."). gpufleet writes the blocks in fabric order (export.py), so each pair is one pod
and each four two whole pods. The fabric is built so nothing else can pass: its leaf GUIDs
interleave the pods (GUID order pairs leaves of different pods) and its hosts are numbered
leaf-major (n1 and n5 share a pod), so neither switch-GUID nor host-name order makes pods.
topology/block needs Slurm 23.11+: the 22.05 parameter skips.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpufleet.scheduler.topology.export import export_block, parse_topology_conf
from gpufleet.scheduler.topology.fabric import build_fabric
from gpufleet.scheduler.topology.hostmap import map_hosts
from gpufleet.scheduler.topology.ibnetdiscover import parse_ibnetdiscover

from tests.slurm.fixtures import running_lab
from tests.slurm.harness import SlurmLab, SlurmLabConfig
from tests.topology import fabricgen

PODS, LEAVES, HOSTS = 4, 2, 1  # 8 leaves of one host: the harness's 8 nodes n1..n8


def _host(pod: int, leaf: int, _h: int) -> str:
    return f"n{leaf * PODS + pod + 1}"  # leaf-major: pod 0 is n1 and n5


GEN = fabricgen.three_level(PODS, LEAVES, HOSTS, spines=2, cores=2, host_name=_host)
POD_HOSTS = [frozenset(h for h, p in GEN.host_pod.items() if p == pod) for pod in range(PODS)]
AGGREGATE = re.compile(r"Aggregated Block name:(\S+) nodes:(\S+)")


def _conf() -> str:
    fab = build_fabric(parse_ibnetdiscover(GEN.text, "fabricgen three_level"))
    assert max(fab.level.values()) == 2  # leaves, spines, cores
    return export_block(fab, map_hosts(fab))


def test_the_fabric_defeats_guid_and_name_order() -> None:
    """What makes the real-Slurm test below able to fail: only fabric order pairs pods."""
    leaves_by_guid = sorted(GEN.leaf_pod)
    assert all(GEN.leaf_pod[a] != GEN.leaf_pod[b]
               for a, b in zip(leaves_by_guid[::2], leaves_by_guid[1::2], strict=True))
    by_name = sorted(GEN.host_pod, key=lambda h: int(h[1:]))
    assert all(GEN.host_pod[a] != GEN.host_pod[b]
               for a, b in zip(by_name[::2], by_name[1::2], strict=True))
    pods = [sorted(pod, key=lambda h: int(h[1:])) for pod in POD_HOSTS]
    assert pods == [["n1", "n5"], ["n2", "n6"], ["n3", "n7"], ["n4", "n8"]]
    assert parse_topology_conf(_conf()).block_sizes == [1, 2, 4, 8]


@pytest.fixture(scope="module")
def block_lab(slurm_version: str) -> Iterator[tuple[SlurmLab, str]]:
    if slurm_version == "22.05":
        pytest.skip("topology/block needs Slurm 23.11+")
    conf = _conf()
    port = int(os.environ.get("GPUFLEET_SLURM_TEST_PORT", "8317"))
    with running_lab(SlurmLabConfig(
        lab_dir=Path(os.environ.get("GPUFLEET_SLURM_TEST_LAB", "/tmp/gf-lab-block3")),
        ctld_port=port, node_port0=port + 10183, topology="block", topology_conf=conf,
        # the aggregates are logged at debug level
        extra_conf="SlurmctldDebug=debug\n", version=slurm_version)) as lab:
        yield lab, conf


@pytest.mark.slurm
def test_slurmctld_aggregates_are_the_fabrics_pods(block_lab: tuple[SlurmLab, str]) -> None:
    lab, _conf_text = block_lab
    log = lab.log_file("slurmctld").read_text(errors="replace")
    aggregates = [frozenset(lab.hostnames(nodes)) for _name, nodes in AGGREGATE.findall(log)]
    assert aggregates, f"no 'Aggregated Block' line in {lab.log_file('slurmctld')}"
    # the last start's aggregates (a restarted slurmctld logs them again)
    by_size: dict[int, set[frozenset[str]]] = {}
    for agg in aggregates[-7:]:
        by_size.setdefault(len(agg), set()).add(agg)
    assert sorted((size, len(aggs)) for size, aggs in by_size.items()) == [(2, 4), (4, 2), (8, 1)]
    assert by_size[2] == set(POD_HOSTS)  # each pair of blocks is one pod
    for four in by_size[4]:  # each four is two whole pods
        assert sum(pod <= four for pod in POD_HOSTS) == 2, sorted(four)


@pytest.mark.slurm
def test_two_node_job_lands_in_one_pod(block_lab: tuple[SlurmLab, str]) -> None:
    """Slurm's block scheduling uses the aggregates: a 2-node job gets one pod's two nodes
    (not n[1-2], which a topology-blind first fit gives)."""
    lab, _ = block_lab
    jobs = [lab.sbatch("-N2", "--wrap", "sleep 30") for _ in range(2)]
    try:
        for job in jobs:
            lab.wait_job_state(job, "RUNNING", timeout_s=60)
            nodes = frozenset(lab.job_nodes(job))
            assert nodes in POD_HOSTS, (job, sorted(nodes))
    finally:
        lab.run("scancel", *map(str, jobs))
