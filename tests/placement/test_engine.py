"""The placement engine on small hand-made trees where the right answer is known, and a
property test against a brute-force optimum."""

from __future__ import annotations

import itertools

import pytest
from gpufleet.scheduler.placement import (
    ClusterView,
    NicAffinity,
    NodeView,
    PlacementError,
    PlacementRequest,
    min_leaves,
    parse_gres_detail,
    parse_time_min,
    parse_topology_conf,
    place,
)
from hypothesis import given, settings
from hypothesis import strategies as st

TOPO = """\
# two leaves under one spine
SwitchName=leaf1 Nodes=n[1-4]
SwitchName=leaf2 Nodes=n[5-8]
SwitchName=spine Switches=leaf[1-2]
"""


def _view(free: dict[str, set[int]] | None = None, health: dict[str, str] | None = None,
          topo: str = TOPO, **node_kw: dict[str, object]) -> ClusterView:
    leaf_of, parent = parse_topology_conf(topo)
    nodes = {}
    for name in leaf_of:
        kw: dict[str, object] = {"gpu_count": 8, "free_gpus": frozenset(range(8)),
                                 "health": "ok", "partitions": frozenset({"main"})}
        if free and name in free:
            kw["free_gpus"] = frozenset(free[name])
        if health and name in health:
            kw["health"] = health[name]
        for key, per_node in node_kw.items():
            if name in per_node:
                kw[key] = per_node[name]
        nodes[name] = NodeView(name=name, **kw)  # type: ignore[arg-type]
    return ClusterView(nodes=nodes, leaf_of=leaf_of, parent=parent)


def test_four_nodes_land_on_one_leaf_and_avoid_the_degraded_node() -> None:
    # leaf1 half full (n1, n2 busy) + n6 degraded: leaf2 still has 3 healthy idle nodes -> no
    # single leaf holds 4 healthy free nodes... so make leaf2 whole and degrade n3 instead
    view = _view(free={"n1": set(), "n2": set()}, health={"n3": "degraded"})
    p = place(view, PlacementRequest(nodes=4, gpus_per_node=8))
    assert p.ok
    assert p.nodelist == ["n5", "n6", "n7", "n8"]
    assert p.cost["leaves"] == 1
    assert "--nodelist=n[5-8]" in p.flags


def test_never_a_degraded_fatal_or_unreachable_node_even_if_it_costs_a_leaf() -> None:
    view = _view(health={"n2": "fatal", "n3": "unreachable", "n6": "degraded"})
    p = place(view, PlacementRequest(nodes=4, gpus_per_node=8))
    assert p.ok
    assert not {"n2", "n3", "n6"} & set(p.nodelist)
    assert p.cost["leaves"] == 2  # 2+3 healthy nodes: two leaves is the best there is


def test_fewest_leaves_then_best_fit_fills_the_partly_used_leaf() -> None:
    # a 2-node job fits either leaf: leaf1 already has a busy node, leaf2 is idle -> leaf1
    view = _view(free={"n1": set()})
    p = place(view, PlacementRequest(nodes=2, gpus_per_node=8))
    assert {c.leaf for c in p.nodes} == {"leaf1"}
    assert p.cost["idle_leaves_opened"] == 0


def test_best_fit_picks_the_smallest_leaf_that_still_fits() -> None:
    # leaf1 has 3 free nodes, leaf2 4: a 3-node job takes leaf1 entirely
    view = _view(free={"n4": set()})
    p = place(view, PlacementRequest(nodes=3, gpus_per_node=8))
    assert p.nodelist == ["n1", "n2", "n3"]


def test_fewer_hops_win_between_equal_leaf_counts() -> None:
    topo = """\
SwitchName=l1 Nodes=a[1-2]
SwitchName=l2 Nodes=a[3-4]
SwitchName=l3 Nodes=a[5-6]
SwitchName=s1 Switches=l[1-2]
SwitchName=s2 Switches=l3
SwitchName=core Switches=s[1-2]
"""
    # a 3-node job needs 2 leaves; l1+l2 share s1 (2 hops), l1/l2+l3 cross the core (4 hops).
    # Make l3 the best fit otherwise (a busy node there) so only hops can decide.
    view = _view(topo=topo, free={"a6": set()})
    p = place(view, PlacementRequest(nodes=3, gpus_per_node=8))
    assert {c.leaf for c in p.nodes} == {"l1", "l2"}
    assert p.cost["hops"] == 2
    assert view.hops(["l1", "l3"]) == 4


def test_two_gpus_share_an_nvlink_island_on_a_partly_used_node() -> None:
    pairs = (frozenset({0, 1}), frozenset({2, 3}), frozenset({4, 5}), frozenset({6, 7}))
    islands = dict.fromkeys((f"n{i}" for i in range(1, 9)), pairs)
    # n1: GPU 0 busy -> Slurm would give 1,2 (two islands); n2: 0,1 busy -> 2,3 (one island);
    # every other node idle. Best: n2 (one island, and it is partly used).
    view = _view(free={"n1": set(range(1, 8)), "n2": set(range(2, 8))},
                 nvlink_islands=islands)  # type: ignore[arg-type]
    p = place(view, PlacementRequest(gpus_per_node=2))
    assert p.nodelist == ["n2"]
    assert p.nodes[0].gpus == (2, 3)
    assert p.nodes[0].islands == 1


def test_a_node_whose_next_free_gpu_is_unhealthy_is_skipped() -> None:
    # Slurm hands out the lowest free index: on n1 that is GPU 0, which gpufleet calls fatal
    view = _view(unhealthy_gpus={"n1": {0: "fatal xid79"}},  # type: ignore[arg-type]
                 free={"n1": set(range(8)), "n2": set(range(4, 8))})
    p = place(view, PlacementRequest(gpus_per_node=1))
    assert p.nodelist == ["n2"]
    assert p.nodes[0].gpus == (4,)
    assert any("n1 GPU 0 fatal xid79" in line for line in p.explanation)


def test_gpus_close_to_their_nic_are_preferred() -> None:
    far = {g: NicAffinity("mlx5_0", "SYS") for g in range(8)}
    near = {g: NicAffinity("mlx5_0", "PIX") for g in range(8)}
    view = _view(gpu_nic={"n1": far, "n2": near, "n3": far, "n4": far,  # type: ignore[arg-type]
                          "n5": far, "n6": far, "n7": far, "n8": far})
    p = place(view, PlacementRequest(gpus_per_node=4))
    assert p.nodelist == ["n2"]
    assert "mlx5_0 PIX" in "\n".join(p.explanation)


def test_partition_and_constraints_filter_nodes() -> None:
    view = _view(partitions={"n1": frozenset({"debug"}), "n2": frozenset({"debug"})},
                 features={"n2": frozenset({"h100"}), "n7": frozenset({"h100"})})
    p = place(view, PlacementRequest(nodes=1, partition="debug", constraints=("h100",)))
    assert p.nodelist == ["n2"]


def test_no_placement_now_falls_back_to_slurm_with_exclude_and_no_switch_count() -> None:
    view = _view(free={n: set() for n in ("n1", "n2", "n5")}, health={"n8": "degraded"})
    p = place(view, PlacementRequest(nodes=6, gpus_per_node=8))
    assert not p.ok
    assert p.nodes == []
    # a switch count would hold the job for fewer leaves than Slurm can give it later
    assert not [f for f in p.flags if f.startswith("--switches")]
    assert p.cost["leaves"] == 2  # what it would get on an idle cluster
    assert "--exclude=n8" in p.flags
    assert "cannot be placed now" in p.explanation[0]


def test_total_gpus_split_into_whole_nodes() -> None:
    view = _view()
    assert place(view, PlacementRequest(total_gpus=16)).nodelist == ["n1", "n2"]
    assert place(view, PlacementRequest(total_gpus=3)).nodes[0].gpus == (0, 1, 2)
    with pytest.raises(PlacementError, match="not a multiple"):
        place(view, PlacementRequest(total_gpus=12))


def test_time_limit_beyond_partition_max_is_refused() -> None:
    view = _view()
    view.partition_max_time_min["main"] = 60
    with pytest.raises(PlacementError, match="MaxTime"):
        place(view, PlacementRequest(nodes=1, partition="main", time_limit_min=61))


def test_topology_conf_errors_name_the_line() -> None:
    with pytest.raises(PlacementError, match="line 2: no SwitchName"):
        parse_topology_conf("SwitchName=a Nodes=n1\nNodes=n2\n")
    with pytest.raises(PlacementError, match="line 2: node n1 is on leaf a and on b"):
        parse_topology_conf("SwitchName=a Nodes=n1\nSwitchName=b Nodes=n[1-2]\n")
    with pytest.raises(PlacementError, match="line 1: invalid hostlist"):
        parse_topology_conf("SwitchName=a Nodes=n[1-\n")
    with pytest.raises(PlacementError, match="unknown key 'Bogus'"):
        parse_topology_conf("SwitchName=a Bogus=1\n")


def test_scontrol_show_topology_form_keeps_leaves() -> None:
    text = ("SwitchName=leaf1 Level=0 LinkSpeed=1 Nodes=n[1-4]\n"
            "SwitchName=leaf2 Level=0 LinkSpeed=1 Nodes=n[5-8]\n"
            "SwitchName=spine Level=1 LinkSpeed=1 Nodes=n[1-8] Switches=leaf[1-2]\n")
    leaf_of, parent = parse_topology_conf(text)
    assert leaf_of["n3"] == "leaf1" and leaf_of["n8"] == "leaf2"
    assert parent == {"leaf1": "spine", "leaf2": "spine"}


def test_gres_detail_and_time_parsing() -> None:
    assert parse_gres_detail("gpu:2(IDX:0,3)") == {0, 3}
    assert parse_gres_detail("gpu:h100:3(IDX:0-2)") == {0, 1, 2}
    assert parse_gres_detail("gpu:0(IDX:N/A)") == set()
    assert parse_time_min("90") == 90
    assert parse_time_min("1:30:00") == 90
    assert parse_time_min("2-00") == 2880
    assert parse_time_min("0:30") == 1
    assert parse_time_min("UNLIMITED") is None
    with pytest.raises(PlacementError, match="not a Slurm time"):
        parse_time_min("soon")


# ----------------------------------------------------------------- property vs brute force


@st.composite
def _cluster(draw: st.DrawFn) -> tuple[ClusterView, PlacementRequest]:
    n_leaves = draw(st.integers(1, 4))
    sizes = [draw(st.integers(1, 4)) for _ in range(n_leaves)]
    lines, idx = [], 1
    for i, size in enumerate(sizes, start=1):
        lines.append(f"SwitchName=l{i} Nodes=n[{idx}-{idx + size - 1}]")
        idx += size
    lines.append(f"SwitchName=top Switches=l[1-{n_leaves}]")
    leaf_of, parent = parse_topology_conf("\n".join(lines))
    nodes = {}
    for name in leaf_of:
        free = draw(st.frozensets(st.integers(0, 3)))
        bad = draw(st.dictionaries(st.integers(0, 3), st.just("fatal x"), max_size=1))
        health = draw(st.sampled_from(["ok", "ok", "ok", "warn", "degraded", "fatal",
                                       "unreachable", "unknown"]))
        nodes[name] = NodeView(name=name, gpu_count=4, free_gpus=free, health=health,
                               unhealthy_gpus=bad)
    req = PlacementRequest(nodes=draw(st.integers(1, 5)),
                           gpus_per_node=draw(st.integers(1, 4)))
    return ClusterView(nodes=nodes, leaf_of=leaf_of, parent=parent), req


def _brute_force_leaves(view: ClusterView, req: PlacementRequest) -> int | None:
    """Fewest leaves over every set of nodes that can take the job (exhaustive)."""
    assert req.nodes is not None and req.gpus_per_node is not None
    ok = [
        n.name for n in view.nodes.values()
        if n.health in {"ok", "warn", "unknown"} and len(n.free_gpus) >= req.gpus_per_node
        and not set(sorted(n.free_gpus)[: req.gpus_per_node]) & set(n.unhealthy_gpus)
    ]
    best = None
    for combo in itertools.combinations(ok, req.nodes):
        used = len({view.leaf_of[n] for n in combo})
        best = used if best is None else min(best, used)
    return best


@pytest.mark.slow  # 300 brute-force placements, ~26 s
@settings(max_examples=300, deadline=None)
@given(_cluster())
def test_never_unhealthy_and_never_more_leaves_than_brute_force(
    case: tuple[ClusterView, PlacementRequest],
) -> None:
    view, req = case
    p = place(view, req)
    optimum = _brute_force_leaves(view, req)
    assert p.ok == (optimum is not None)
    if not p.ok:
        return
    assert len(p.nodes) == req.nodes
    for c in p.nodes:
        node = view.nodes[c.node]
        assert node.health in {"ok", "warn", "unknown"}
        assert not set(c.gpus) & set(node.unhealthy_gpus)
        assert set(c.gpus) <= node.free_gpus and len(c.gpus) == req.gpus_per_node
    assert len({c.leaf for c in p.nodes}) == optimum


def test_min_leaves_is_exact_on_small_cases() -> None:
    counts = [3, 1, 2]
    for need in range(7):
        best = min((k for k in range(4) for combo in itertools.combinations(counts, k)
                    if sum(combo) >= need), default=None)
        assert min_leaves(counts, need) == best
    assert min_leaves(counts, 7) is None


def test_index_kept_between_requests_matches_a_fresh_view() -> None:
    """The index a view keeps between requests, updated one node at a time, answers exactly
    as a view indexed from scratch (random fat tree, random changes, random requests)."""
    import random
    from dataclasses import replace

    rng = random.Random(7)
    topo = "\n".join([f"SwitchName=leaf{i} Nodes=n[{i * 8 + 1}-{i * 8 + 8}]" for i in range(6)]
                     + ["SwitchName=spine0 Switches=leaf[0-2]",
                        "SwitchName=spine1 Switches=leaf[3-5]",
                        "SwitchName=core Switches=spine[0-1]"])
    kept = _view(topo=topo)
    shapes = [(1, 1), (1, 4), (2, 8), (3, 2), (5, 8), (9, 8), (20, 4)]
    for step in range(200):
        name = f"n{rng.randint(1, 48)}"
        node = kept.nodes[name]
        kept.update_node(replace(
            node, free_gpus=frozenset(rng.sample(range(8), rng.randint(0, 8))),
            health=rng.choice(["ok", "ok", "ok", "degraded", "unreachable"]),
            unhealthy_gpus={rng.randrange(8): "xid"} if rng.random() < 0.2 else {}))
        nodes, gpus = rng.choice(shapes)
        req = PlacementRequest(nodes=nodes, gpus_per_node=gpus)
        fresh = ClusterView(nodes=dict(kept.nodes), leaf_of=kept.leaf_of, parent=kept.parent)
        got, want = place(kept, req), place(fresh, req)
        assert got.ok == want.ok, step
        assert got.nodelist == want.nodelist, step
        assert got.cost == want.cost and got.flags == want.flags, step
