"""The controller's Slurm view for FleetUser.Place (SlurmViewSource): nodes read on every call,
the jobs' GPU indices kept while they fit the nodes' GPU counts, partitions and the switch
tree kept static_ttl_s."""

from __future__ import annotations

import json

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


def _job3_ended(client: object, nodes_too: bool) -> None:
    """The canned documents after job 3 (2 GPUs on n1 and n2) ended: squeue says COMPLETED,
    and, with nodes_too, the nodes' gres_used says no GPU is in use any more."""
    answers = client.answers  # type: ignore[attr-defined]
    jobs = json.loads(answers[("squeue", "--json")])
    for j in jobs["jobs"]:
        if j["job_id"] == 3:
            j["job_state"] = "COMPLETED"
    answers[("squeue", "--json")] = json.dumps(jobs)
    if nodes_too:
        nodes = json.loads(answers[("sinfo", "--json")])
        for n in nodes["nodes"]:
            n["gres_used"] = "gpu:0"
        answers[("sinfo", "--json")] = json.dumps(nodes)


def _source(client: object, clock: Clock) -> SlurmViewSource:
    client.answers[("scontrol", "show", "topology")] = TOPOLOGY  # type: ignore[attr-defined]
    return SlurmViewSource(client, 5, static_ttl_s=30, clock=clock,  # type: ignore[arg-type]
                           jobs_max_age_s=10, jobs_refresh_s=2)


def test_jobs_indices_kept_while_the_nodes_gpu_counts_agree() -> None:
    client, clock = client_of("22.05"), Clock()
    source = _source(client, clock)
    first = source()
    assert first.nodes["n1"].free_gpus == frozenset(range(2, 8))  # job 3 holds 0-1
    client.asked.clear()
    clock.t += 1
    _job3_ended(client, nodes_too=False)  # squeue would say otherwise, the nodes do not
    again = source()
    assert _asked(client) == ["sinfo --json"]  # no squeue: the kept indices still fit
    assert again == first


def test_jobs_read_again_when_a_nodes_gpu_count_changed() -> None:
    client, clock = client_of("22.05"), Clock()
    source = _source(client, clock)
    source()
    client.asked.clear()
    clock.t += 1
    _job3_ended(client, nodes_too=True)
    view = source()
    assert sorted(_asked(client)) == ["sinfo --json", "squeue --json"]
    assert view.nodes["n1"].free_gpus == frozenset(range(8))
    # jobs are starting and ending: the next calls read them beside the nodes (not after)
    client.asked.clear()
    clock.t += 1
    source()
    reading = source._reading  # the read started beside the nodes (not waited for: they fit)
    assert reading is not None
    reading.result(timeout=30)
    assert sorted(_asked(client)) == ["sinfo --json", "squeue --json"]


def test_jobs_read_again_when_older_than_their_max_age() -> None:
    client, clock = client_of("22.05"), Clock()
    source = _source(client, clock)
    source()
    client.asked.clear()
    clock.t += 10
    _job3_ended(client, nodes_too=False)
    view = source()
    assert "squeue --json" in _asked(client)
    assert view.nodes["n1"].free_gpus == frozenset(range(8))  # the fresh jobs, not the kept


def test_a_node_without_gres_used_never_keeps_the_jobs() -> None:
    client, clock = client_of("22.05"), Clock()
    nodes = json.loads(client.answers[("sinfo", "--json")])
    for n in nodes["nodes"]:
        del n["gres_used"]
    client.answers[("sinfo", "--json")] = json.dumps(nodes)
    source = _source(client, clock)
    source()
    client.asked.clear()
    clock.t += 1
    source()
    assert "squeue --json" in _asked(client)


def test_jobs_waiting_for_nodes_are_counted_per_partition_and_stop_pins() -> None:
    from gpufleet.scheduler.placement import PlacementRequest, place
    from gpufleet.scheduler.placement.model import ClusterView, NodeView
    from gpufleet.scheduler.placement.sources import waiting_jobs
    from gpufleet.scheduler.slurm import SlurmJob

    def job(state: str, reason: str, parts: tuple[str, ...]) -> SlurmJob:
        return SlurmJob("1", state, (), True, True, "", 0, None, 0, (), 0,
                        state_reason=reason, partitions=parts)

    jobs = [job("PENDING", "Resources", ("main",)), job("PENDING", "Priority", ("main", "gpu")),
            job("PENDING", "Dependency", ("main",)), job("PENDING", "JobHeldUser", ("main",)),
            job("RUNNING", "None", ("main",))]
    assert waiting_jobs(jobs) == {"main": 2, "gpu": 1}
    view = ClusterView(
        nodes={n: NodeView(name=n, gpu_count=8, free_gpus=frozenset(range(8)), cpus_free=4)
               for n in ("n1", "n2")},
        leaf_of={"n1": "leaf1", "n2": "leaf1"}, default_partition="main",
        waiting_jobs={"main": 2})
    p = place(view, PlacementRequest(nodes=1, gpus_per_node=1))
    # free now, but Slurm may hold it for the jobs ahead: the answer says so
    assert p.ok and p.cost["jobs_waiting"] == 2
    assert any("2 job(s) pending for nodes" in line for line in p.explanation)
    assert place(view, PlacementRequest(nodes=1, gpus_per_node=1,
                                         partition="gpu")).cost["jobs_waiting"] == 0
