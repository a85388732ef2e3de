"""Placement engine on synthetic fat trees: latency and quality.

Fat trees of 256, 1024 and 4096 nodes (8 GPUs each, NVLink islands of two GPUs, 32 nodes per
leaf, 8 leaves per spine group under one core), random occupancy (idle / partly used / full)
and random unhealthy nodes and GPUs. Requests from 1 GPU to 256 nodes. Prints p50/p99 latency
of `place()` and quality = leaf switches used / lower bound, where the lower bound is the
fewest leaves whose free healthy nodes cover the request: it is exact, because k leaves hold at
most the sum of the k largest per-leaf counts and the k largest do hold it (computed here from
the raw state, not by the engine's code).

    .venv/bin/python bench/placement.py [--requests 300] [--seed 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from gpufleet.scheduler.placement import ClusterView, NodeView, PlacementRequest, place

TARGET = "target: ratio 1.0 in >= 99% of cases, p99 <= 50 ms at 4096 nodes"
NODES_PER_LEAF = 32
LEAVES_PER_GROUP = 8
GPUS = 8
ISLANDS = tuple(frozenset({i, i + 1}) for i in range(0, GPUS, 2))
SHAPES = [(1, 1), (1, 2), (1, 4), (1, 8), (2, 8), (4, 8), (8, 8), (16, 8), (32, 8),
          (64, 8), (128, 8), (256, 8)]


def build(n_nodes: int, rng: random.Random) -> ClusterView:
    nodes, leaf_of, parent = {}, {}, {}
    for i in range(n_nodes):
        name = f"gpu{i:05d}"
        leaf = f"leaf{i // NODES_PER_LEAF:04d}"
        leaf_of[name] = leaf
        parent[leaf] = f"spine{i // (NODES_PER_LEAF * LEAVES_PER_GROUP):03d}"
        r = rng.random()
        if r < 0.35:
            free = frozenset()  # a whole-node job
        elif r < 0.65:
            free = frozenset(rng.sample(range(GPUS), rng.randint(1, GPUS - 1)))
        else:
            free = frozenset(range(GPUS))
        h = rng.random()
        health = "fatal" if h < 0.01 else "degraded" if h < 0.03 else \
            "unreachable" if h < 0.035 else "ok"
        bad = {rng.randrange(GPUS): "degraded nvlink"} if rng.random() < 0.02 else {}
        nodes[name] = NodeView(name=name, gpu_count=GPUS, free_gpus=free, health=health,
                               unhealthy_gpus=bad, nvlink_islands=ISLANDS,
                               partitions=frozenset({"gpu"}))
    for spine in set(parent.values()):
        parent[spine] = "core"
    return ClusterView(nodes=nodes, leaf_of=leaf_of, parent=parent)


def lower_bound(view: ClusterView, nodes: int, gpus: int) -> int | None:
    """Fewest leaves whose free healthy nodes (able to take `gpus` healthy GPUs) cover it."""
    per_leaf: dict[str, int] = {}
    for n in view.nodes.values():
        pick = sorted(n.free_gpus)[:gpus]  # what Slurm 22.05 hands out
        if (n.health in {"ok", "warn", "unknown"} and len(pick) == gpus
                and not set(pick) & set(n.unhealthy_gpus)):
            per_leaf[view.leaf_of[n.name]] = per_leaf.get(view.leaf_of[n.name], 0) + 1
    covered = 0
    for k, count in enumerate(sorted(per_leaf.values(), reverse=True), start=1):
        covered += count
        if covered >= nodes:
            return k
    return None


def run(n_nodes: int, requests: int, rng: random.Random) -> None:
    view = build(n_nodes, rng)
    lat_ms: list[float] = []
    ratios: list[float] = []
    unplaceable = fallback_mismatch = 0
    for _ in range(requests):
        nodes, gpus = rng.choice([s for s in SHAPES if s[0] <= n_nodes // 2])
        req = PlacementRequest(nodes=nodes, gpus_per_node=gpus, partition="gpu")
        t0 = time.perf_counter()
        p = place(view, req)
        lat_ms.append((time.perf_counter() - t0) * 1000)
        lb = lower_bound(view, nodes, gpus)
        if lb is None or not p.ok:
            unplaceable += 1
            fallback_mismatch += (lb is None) != (not p.ok)
            continue
        ratios.append(len({c.leaf for c in p.nodes}) / lb)
    lat_ms.sort()
    p99 = lat_ms[min(len(lat_ms) - 1, int(0.99 * len(lat_ms)))]
    at_one = sum(1 for r in ratios if r == 1.0) / len(ratios) if ratios else float("nan")
    print(f"{n_nodes:5d} nodes: {requests} requests  p50 {statistics.median(lat_ms):6.2f} ms  "
          f"p99 {p99:6.2f} ms  quality ratio 1.0 in {100 * at_one:5.1f}% "
          f"(worst {max(ratios, default=float('nan')):.2f}) of {len(ratios)} placed; "
          f"{unplaceable} not placeable now (engine/lower-bound disagree: {fallback_mismatch})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    args = ap.parse_args()
    rng = random.Random(args.seed)
    print(TARGET)
    for size in args.sizes:
        run(size, args.requests, rng)


if __name__ == "__main__":
    main()
