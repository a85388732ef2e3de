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
