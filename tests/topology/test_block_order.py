"""topology/block export in fabric order, on a three-level fabric whose GUIDs interleave pods.

slurmctld (24.11, seen in its log) builds each higher BlockSizes level by joining consecutive
blocks in file order: pairs, then fours. Blocks written sorted by switch GUID would pair
leaves of different pods whenever the GUIDs interleave them; written in fabric order, each
aggregate slurmctld builds is exactly one of the fabric's pods (or a whole pair of pods).
"""

from __future__ import annotations

from gpufleet.scheduler.topology.export import export_block, parse_topology_conf
from gpufleet.scheduler.topology.fabric import build_fabric
from gpufleet.scheduler.topology.hostmap import map_hosts
from gpufleet.scheduler.topology.ibnetdiscover import parse_ibnetdiscover

from tests.topology import fabricgen

PODS, LEAVES, HOSTS, SPINES, CORES = 4, 4, 2, 2, 2


def three_level() -> tuple[str, dict[str, int]]:
    """PODS pods of LEAVES leaves (GUIDs interleaving the pods), HOSTS hosts per leaf; the
    ibnetdiscover text and leaf name -> pod."""
    gen = fabricgen.three_level(PODS, LEAVES, HOSTS, SPINES, CORES)
    return gen.text, gen.leaf_pod


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
