"""The controller's Slurm view for FleetUser.Place (SlurmViewSource): nodes and jobs read on
every call, partitions and the switch tree kept static_ttl_s."""

from __future__ import annotations

from gpufleet.scheduler.placement.sources import SlurmViewSource, view_from_slurm

from tests.scheduler.test_slurm_versions import TOPOLOGY, client_of


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _asked(client: object) -> list[str]:
    return [" ".join(a) for a in client.asked]  # type: ignore[attr-defined]


def test_partitions_and_topology_kept_for_the_ttl() -> None:
    client = client_of("22.05")
    client.answers[("scontrol", "show", "topology")] = TOPOLOGY
    clock = Clock()
    source = SlurmViewSource(client, 5, static_ttl_s=30, clock=clock)
    first = source()
    assert sorted(_asked(client)) == ["scontrol -o show partition", "scontrol show topology",
                                      "sinfo --json", "squeue --json"]
    client.asked.clear()
    clock.t += 29
    again = source()
    assert sorted(_asked(client)) == ["sinfo --json", "squeue --json"]  # fresh: what is free
    assert again == first
    client.asked.clear()
    clock.t += 1
    source()
    assert "scontrol show topology" in _asked(client)  # the TTL is over: read again


def test_view_from_slurm_reads_everything_every_time() -> None:
    client = client_of("22.05")
    view = view_from_slurm(client, 5, topology_conf=TOPOLOGY)
    view_from_slurm(client, 5, topology_conf=TOPOLOGY)
    assert _asked(client).count("scontrol -o show partition") == 2
    assert view.leaf_of["n1"] == "leaf1"


def test_handed_out_gpus_are_held_until_hold_s() -> None:
    from gpufleet.scheduler.placement import PlacementRequest, place
    from gpufleet.scheduler.placement.handed_out import HandedOut
    from gpufleet.scheduler.placement.model import ClusterView, NodeView

    view = ClusterView(
        nodes={n: NodeView(name=n, gpu_count=8, free_gpus=frozenset(range(8)), cpus_free=4)
               for n in ("n1", "n2")},
        leaf_of={"n1": "leaf1", "n2": "leaf1"})
    clock = Clock()
    held = HandedOut(hold_s=10, clock=clock)
    first = place(held.apply(view), PlacementRequest(nodes=1, gpus_per_node=1))
    held.add(first)
    node = first.nodelist[0]
    other = "n2" if node == "n1" else "n1"
    later = held.apply(view)
    assert later.nodes[node].free_gpus == frozenset(range(8)) - set(first.nodes[0].gpus)
    assert later.nodes[node].cpus_free == 3
    # a whole node asked right after: not the node the 1-GPU job was just pinned to
    assert place(later, PlacementRequest(nodes=1, gpus_per_node=8)).nodelist == [other]
    clock.t += 10
    assert held.apply(view) == view
