"""The placement engine: a request + a ClusterView -> nodes, GPU indices, sbatch flags.

Objectives, strictly in this order:
  1. never a degraded/fatal/unreachable node, nor an unhealthy GPU;
  2. fewest leaf switches, then fewest switch hops between them;
  3. each node's GPUs inside one NVLink island, close to their NIC;
  4. least fragmentation: best fit (fill partly used leaves and nodes before opening idle ones).

GPU indices: Slurm 22.05 cannot be asked for particular GPU indices (`--gres`/`--gpus*` take
counts only; `--gres-flags=enforce-binding` is about CPU affinity). Its cons_tres plugin gives
a job the lowest free indices of a node (checked on the 22.05 harness: with 1-2 busy, a
2-GPU job gets 0,3). So the engine predicts that pick and chooses *nodes* whose pick is
healthy and NVLink-local; it never promises indices Slurm will not give.

Pure: reads nothing, runs nothing.

Cost per request does not grow with the cluster: the first place() on a view indexes it
(eligibility of every node per partition and GPU count, per leaf the eligible nodes in rank
order with prefix sums, the idle leaves), and the index is kept with the view between
requests; `ClusterView.update_node()` updates one node's entries (its leaf only). A request
with `exclude` or `constraints` gets a one-off index of its own (a pass over the nodes).

One module (~570 lines): eligibility, scoring and the explanation of a choice must agree, so
they are written together.
"""

from __future__ import annotations

import heapq
import itertools
import re
from collections import Counter
from dataclasses import dataclass

from gpufleet.scheduler.placement.model import (
    PCIE_RANK,
    UNKNOWN_PCIE_RANK,
    ClusterView,
    NodeChoice,
    NodeView,
    Placement,
    PlacementError,
    PlacementRequest,
)

__all__ = ["min_leaves", "place", "resolve_shape"]

_NO_SWITCH = "(no switch)"


def resolve_shape(view: ClusterView, req: PlacementRequest) -> tuple[int, int]:
    """(nodes, GPUs per node) the request means; total GPUs are split over whole nodes."""
    req.check()
    if req.total_gpus is None:
        return req.nodes or 1, req.gpus_per_node or 0
    total = req.total_gpus
    if req.nodes is not None:
        if total % req.nodes:
            raise PlacementError(
                f"request: {total} GPUs do not split evenly over {req.nodes} nodes; "
                "give --gpus-per-node instead"
            )
        return req.nodes, total // req.nodes
    per_node = _index(view).max_gpus
    if per_node == 0 or total <= per_node:
        return 1, total
    if total % per_node:
        raise PlacementError(
            f"request: {total} GPUs are not a multiple of the {per_node} GPUs a node has; "
            "give --nodes and --gpus-per-node"
        )
    return total // per_node, per_node


def min_leaves(counts: list[int], need: int) -> int | None:
    """Fewest leaves whose counts sum to `need` (None: impossible). Exact: any k leaves cover
    at most the sum of the k largest counts, and the k largest do reach it."""
    if need <= 0:
        return 0
    total = 0
    for k, c in enumerate(sorted(counts, reverse=True), start=1):
        total += c
        if total >= need:
            return k
    return None


def _node_choice(node: NodeView, leaf: str, gpus: int) -> NodeChoice:
    pick = node.sorted_free[:gpus]
    islands = {node.island_of(g) for g in pick} if node.nvlink_islands else set()
    ranks = []
    nic = node.gpu_nic
    for g in pick:
        aff = nic.get(g) if nic else None
        ranks.append(PCIE_RANK.get(aff.relation, UNKNOWN_PCIE_RANK) if aff else UNKNOWN_PCIE_RANK)
    return NodeChoice(
        node=node.name,
        leaf=leaf,
        gpus=pick,
        islands=len(islands),
        nic_rank=sum(ranks),
        free_gpus_left=len(node.free_gpus) - gpus,
    )


def _judge(  # noqa: PLR0911 - one return per reason, in the order they are decided
    view: ClusterView, node: NodeView, partition: str | None, wanted: set[str],
    exclude: frozenset[str], gpus: int,
) -> tuple[str, NodeChoice | None, str]:
    """(why it is skipped or "", its choice when eligible, its unhealthy note or "")."""
    if len(node.free_gpus) < gpus and node.healthy:
        return "busy", None, ""  # the common case on a full cluster: decided first
    if partition and node.partitions and partition not in node.partitions:
        return f"not in partition {partition}", None, ""
    if node.name in exclude:
        return "excluded by the request", None, ""
    if not node.healthy:
        why = f"{node.health}" + (f" ({node.health_reason})" if node.health_reason else "")
        return f"gpufleet health {node.health}", None, f"{node.name} {why}"
    if not wanted <= node.features:
        return f"lacks feature(s) {','.join(sorted(wanted - node.features))}", None, ""
    if not node.schedulable:
        return f"Slurm state {node.slurm_state}", None, ""
    if gpus > node.gpu_count:
        return f"has fewer than {gpus} GPUs", None, ""
    if len(node.free_gpus) < gpus:
        return "busy", None, ""
    if node.cpus_free is not None and node.cpus_free < 1:
        return "no free CPU", None, ""
    choice = _node_choice(node, view.leaf_of.get(node.name, _NO_SWITCH), gpus)
    bad = [g for g in choice.gpus if g in node.unhealthy_gpus]
    if bad:
        # Slurm would hand this job the unhealthy GPU(s): the node is out for this shape
        return ("its next free GPU is unhealthy", None,
                f"{node.name} GPU {','.join(map(str, bad))} {node.unhealthy_gpus[bad[0]]}")
    return "", choice, ""


class _Shape:
    """Every node judged for one (partition, GPUs per node, exclude, constraints), grouped
    by leaf in rank order with prefix sums: what place() needs, kept up to date per node."""

    def __init__(self, view: ClusterView, partition: str | None, wanted: set[str],
                 exclude: frozenset[str], gpus: int) -> None:
        self.args = (partition, wanted, exclude, gpus)
        self.skipped: Counter[str] = Counter()
        self.verdict: dict[str, tuple[str, NodeChoice | None, str]] = {}
        self.notes: dict[str, str] = {}  # node -> unhealthy note
        self.blocked: set[str] = set()  # nodes gpufleet says are unhealthy
        self.n_choices = 0
        self.by_leaf: dict[str, list[NodeChoice]] = {}
        # per leaf: prefix sums of (island splits, NIC rank, GPUs left free) in rank order
        self.prefix: dict[str, tuple[list[int], list[int], list[int]]] = {}
        self._notes_text: str | None = None
        self.sizes: Counter[int] = Counter()  # eligible nodes in a leaf -> leaves that many
        # need -> (key, leaf) of the best single leaf for `need` nodes (_best_single_leaf):
        # a changed leaf is compared in O(1), the whole scan only when the best one changed
        self.best_single: dict[int, tuple[tuple[int | str, ...], str]] = {}
        members: dict[str, list[NodeChoice]] = {}
        for node in view.nodes.values():
            self._set(view, node)
            choice = self.verdict[node.name][1]
            if choice is not None:
                members.setdefault(_leaf_key(choice.leaf, choice.node), []).append(choice)
        for leaf, cs in members.items():
            self._set_leaf(leaf, cs)

    def _set(self, view: ClusterView, node: NodeView) -> None:
        why, choice, note = verdict = _judge(view, node, *self.args)
        self.verdict[node.name] = verdict
        if why:
            self.skipped[why] += 1
        if note:
            self.notes[node.name] = note
            if not node.healthy:
                self.blocked.add(node.name)
        self.n_choices += choice is not None

    def _unset(self, name: str) -> None:
        why, choice, _note = self.verdict.pop(name)
        if why:
            self.skipped[why] -= 1
            if not self.skipped[why]:
                del self.skipped[why]
        self.notes.pop(name, None)
        self.blocked.discard(name)
        self.n_choices -= choice is not None

    def _set_leaf(self, leaf: str, choices: list[NodeChoice]) -> None:
        before = self.by_leaf.get(leaf)
        if before is not None:
            self.sizes[len(before)] -= 1
            if not self.sizes[len(before)]:
                del self.sizes[len(before)]
        if not choices:
            self.by_leaf.pop(leaf, None)
            self.prefix.pop(leaf, None)
            return
        self.sizes[len(choices)] += 1
        ranked = sorted(choices, key=_node_rank)
        self.by_leaf[leaf] = ranked
        split, nic, left = [0], [0], [0]
        for c in ranked:
            split.append(split[-1] + max(c.islands - 1, 0))
            nic.append(nic[-1] + c.nic_rank)
            left.append(left[-1] + c.free_gpus_left)
        self.prefix[leaf] = (split, nic, left)

    def update(self, view: ClusterView, old: NodeView | None, node: NodeView | None,
               leaf_members: list[str], idle: set[str]) -> None:
        """One node changed (None: added / removed); `leaf_members`: its leaf's nodes now;
        `idle`: the idle leaves, already updated."""
        name = (node or old).name  # type: ignore[union-attr]
        if old is not None and name in self.verdict:
            self._unset(name)
        if node is not None:
            self._set(view, node)
        self._notes_text = None
        if view.leaf_of.get(name, _NO_SWITCH) == _NO_SWITCH:
            key = _leaf_key(_NO_SWITCH, name)
            choice = self.verdict.get(name, ("", None, ""))[1]
            self._set_leaf(key, [choice] if choice is not None else [])
        else:
            key = view.leaf_of[name]
            self._set_leaf(key, [c for m in leaf_members
                                 if (c := self.verdict.get(m, ("", None, ""))[1]) is not None])
        for need, (best_key, best_leaf) in list(self.best_single.items()):
            if best_leaf == key:  # the best one changed: found again when next asked
                del self.best_single[need]
                continue
            mine = self.single_key(key, need, idle)
            if mine is not None and mine < best_key:
                self.best_single[need] = (mine, key)

    def single_key(self, leaf: str, need: int,
                   idle: set[str]) -> tuple[int | str, ...] | None:
        """_evaluate's key for `need` nodes on this leaf alone (None: too few)."""
        ranked = self.by_leaf.get(leaf)
        if ranked is None or len(ranked) < need:
            return None
        split, nic, left = self.prefix[leaf]
        return (0, split[need], nic[need], int(leaf in idle), len(ranked) - need, left[need],
                leaf)

    @property
    def counts(self) -> dict[str, int]:
        return {leaf: len(cs) for leaf, cs in self.by_leaf.items()}

    def min_leaves(self, need: int) -> int | None:
        """min_leaves over the leaves' counts, from the histogram of counts (a leaf holds
        at most a few dozen nodes: as many steps, whatever the cluster's size)."""
        if need <= 0:
            return 0
        total = k = 0
        for size in sorted(self.sizes, reverse=True):
            leaves = self.sizes[size]
            if total + size * leaves >= need:
                return k - (-(need - total) // size)
            total += size * leaves
            k += leaves
        return None

    def notes_text(self) -> str:
        """Node order at the index's build, then nodes in the order they changed."""
        if self._notes_text is None:
            self._notes_text = ", ".join(self.notes.values())
        return self._notes_text


class ViewIndex:
    """What place() keeps with a ClusterView between requests (`view._index`)."""

    def __init__(self, view: ClusterView) -> None:
        self.shapes: dict[tuple[str | None, int], _Shape] = {}
        self.order = {name: i for i, name in enumerate(view.nodes)}
        self.members = view.leaves()
        self.max_gpus = max((n.gpu_count for n in view.nodes.values()), default=0)
        self.idle = {leaf for leaf, ms in self.members.items() if self._leaf_idle(view, ms)}
        self.groups = _groups(view)
        # _fallback's healthy nodes per leaf, per (partition, GPUs): occupancy does not matter
        self.healthy_counts: dict[tuple[str | None, int], Counter[str]] = {}

    @staticmethod
    def _leaf_idle(view: ClusterView, members: list[str]) -> bool:
        return all(len(view.nodes[m].free_gpus) == view.nodes[m].gpu_count for m in members)

    def shape(self, view: ClusterView, partition: str | None, gpus: int) -> _Shape:
        key = (partition, gpus)
        found = self.shapes.get(key)
        if found is None:
            found = self.shapes[key] = _Shape(view, partition, set(), frozenset(), gpus)
        return found

    def node_changed(self, view: ClusterView, old: NodeView | None,
                     node: NodeView | None) -> None:
        name = (node or old).name  # type: ignore[union-attr]
        if name not in self.order:
            self.order[name] = len(self.order)
        if node is not None:
            self.max_gpus = max(self.max_gpus, node.gpu_count)
        if (old is None or node is None or old.healthy != node.healthy
                or old.gpu_count != node.gpu_count or old.partitions != node.partitions):
            self.healthy_counts.clear()
        leaf = view.leaf_of.get(name)
        members: list[str] = []
        if leaf is not None:
            if leaf not in self.members:  # a leaf the index has not seen: new subtrees too
                self.groups = _groups(view)
            members = self.members.setdefault(leaf, [])
            if node is None and name in members:
                members.remove(name)
            elif node is not None and name not in members:
                members.append(name)
            if members and self._leaf_idle(view, members):
                self.idle.add(leaf)
            else:
                self.idle.discard(leaf)
        for shape in self.shapes.values():
            shape.update(view, old, node, members, self.idle)


def _index(view: ClusterView) -> ViewIndex:
    idx = view._index  # the engine owns it; the model only carries it
    if not isinstance(idx, ViewIndex):
        idx = view._index = ViewIndex(view)
    return idx


def _leaf_key(leaf: str, node: str) -> str:
    # nodes outside every switch stand alone: each is its own "leaf"
    return f"{_NO_SWITCH}{node}" if leaf == _NO_SWITCH else leaf


def _node_rank(c: NodeChoice) -> tuple[int, int, int, str]:
    split = max(c.islands - 1, 0)
    return (split, c.nic_rank, c.free_gpus_left, c.node)


@dataclass
class _Candidate:
    key: tuple[int | str, ...]
    chosen: list[NodeChoice]
    leaves: list[str]
    hops: int
    splits: int
    nic_rank: int
    empty_leaves_opened: int
    leftover: int


def _evaluate(view: ClusterView, by_leaf: dict[str, list[NodeChoice]], leaves: list[str],
              idle_leaves: set[str], need: int) -> _Candidate:
    # each leaf's nodes are in rank order already: merge, take the first `need`
    chosen = list(itertools.islice(heapq.merge(*(by_leaf[leaf] for leaf in leaves),
                                               key=_node_rank), need))
    used = sorted({c.leaf if c.leaf != _NO_SWITCH else _leaf_key(c.leaf, c.node)
                   for c in chosen})
    hops = view.hops([u for u in used if not u.startswith(_NO_SWITCH)])
    hops += 2 * sum(1 for u in used if u.startswith(_NO_SWITCH)) if len(used) > 1 else 0
    splits = sum(max(c.islands - 1, 0) for c in chosen)
    nic = sum(c.nic_rank for c in chosen)
    opened = sum(1 for u in used if u in idle_leaves)
    leftover = sum(len(by_leaf[u]) for u in used) - need
    gpu_left = sum(c.free_gpus_left for c in chosen)
    key: tuple[int | str, ...] = (hops, splits, nic, opened, leftover, gpu_left, ",".join(used))
    return _Candidate(key, chosen, used, hops, splits, nic, opened, leftover)


def _best_single_leaf(view: ClusterView, el: _Shape, idle_leaves: set[str],
                      need: int) -> _Candidate:
    """_evaluate's best over every leaf that holds `need` alone, from the prefix sums (no
    sort, no merge): the same key, the same winner. Kept per `need` between requests."""
    found = el.best_single.get(need)
    if found is None:
        best_key: tuple[int | str, ...] | None = None
        best_leaf = ""
        for leaf in el.by_leaf:
            key = el.single_key(leaf, need, idle_leaves)
            if key is not None and (best_key is None or key < best_key):
                best_key, best_leaf = key, leaf
        assert best_key is not None  # noqa: S101 - min_leaves said one leaf holds it
        found = el.best_single[need] = (best_key, best_leaf)
    return _evaluate(view, el.by_leaf, [found[1]], idle_leaves, need)


def _groups(view: ClusterView) -> dict[str, list[str]]:
    """Every switch above the leaves -> the leaves under it (a subtree)."""
    groups: dict[str, list[str]] = {}
    for leaf in view.leaves():
        for sw in view.ancestors(leaf)[1:]:
            groups.setdefault(sw, []).append(leaf)
    return groups


def _candidate_leaf_sets(groups: dict[str, list[str]], counts: dict[str, int], k: int,
                         need: int) -> list[list[str]]:
    """Leaf sets of size k covering `need`: per subtree (and the whole cluster), the k-1
    largest leaves plus the best-fitting k-th. k == 1: every leaf that is big enough."""
    if k == 1:
        return [[leaf] for leaf, c in counts.items() if c >= need]
    sets = []
    for members in [list(counts), *([m for m in ms if m in counts] for ms in groups.values())]:
        if min_leaves([counts[m] for m in members], need) != k:
            continue
        ordered = sorted(members, key=lambda m: (-counts[m], m))
        head = ordered[: k - 1]
        rest_need = need - sum(counts[m] for m in head)
        fits = [m for m in ordered[k - 1:] if counts[m] >= rest_need]
        last = min(fits, key=lambda m: (counts[m], m))
        sets.append([*head, last])
    return sets


def _natural(name: str) -> tuple[str | int, ...]:
    """n2 before n10, as Slurm lists nodes."""
    return tuple(int(p) if p.isdecimal() else p for p in re.split(r"(\d+)", name))


_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def _hostlist(names: list[str]) -> str:
    """ClusterShell's folded form. Names are grouped as prefix[n1,n2,...] first: NodeSet then
    parses one range per prefix instead of every name (256 names: ~7 ms instead of ~20)."""
    groups: dict[tuple[str, int], list[str]] = {}
    plain = []
    for name in names:
        m = _NUMBERED.match(name)
        if m is None:
            plain.append(name)
        else:
            groups.setdefault((m.group(1), len(m.group(2))), []).append(m.group(2))
    parts = [f"{prefix}[{','.join(nums)}]" for (prefix, _w), nums in groups.items()]
    from ClusterShell.NodeSet import NodeSet  # here: `gpufleet --help` loads without it

    return str(NodeSet(",".join([*parts, *plain])))


def _gpu_flags(gpus: int) -> list[str]:
    return [f"--gres=gpu:{gpus}"] if gpus else []


def place(view: ClusterView, req: PlacementRequest) -> Placement:
    """Best placement for `req` now, or (ok=False) why not plus Slurm flags to fall back on."""
    need, gpus = resolve_shape(view, req)
    shape = f"{need} node(s) x {gpus} GPU(s)" if gpus else f"{need} node(s)"
    partition = req.partition or view.default_partition
    where = f" in partition {partition}" if partition else ""
    max_min = view.partition_max_time_min.get(partition or "")
    if req.time_limit_min is not None and max_min is not None and req.time_limit_min > max_min:
        raise PlacementError(
            f"request: time limit {req.time_limit_min} min exceeds partition {partition}'s "
            f"MaxTime of {max_min} min"
        )
    if req.exclude or req.constraints:  # a one-off index for this request's filters
        idx = None
        el = _Shape(view, partition, set(req.constraints), req.exclude, gpus)
        groups = _groups(view)
        idle_leaves = {
            leaf for leaf, members in view.leaves().items()
            if all(len(view.nodes[m].free_gpus) == view.nodes[m].gpu_count for m in members)
        }
    else:
        idx = _index(view)
        el = idx.shape(view, partition, gpus)
        groups, idle_leaves = idx.groups, idx.idle
    by_leaf = el.by_leaf
    k = el.min_leaves(need)
    skipped = "; ".join(f"{n} {why}" for why, n in el.skipped.most_common())
    notes = [f"unhealthy, avoided: {el.notes_text()}"] if el.notes else []
    if k is None:
        return _fallback(view, req, need, gpus, el, shape, where, skipped, notes, idx)
    if k == 1:
        best = _best_single_leaf(view, el, idle_leaves, need)
    else:
        counts = el.counts
        best = min(
            (_evaluate(view, by_leaf, s, idle_leaves, need)
             for s in _candidate_leaf_sets(groups, counts, k, need)),
            key=lambda cand: cand.key,
        )
    chosen = sorted(best.chosen, key=lambda c: _natural(c.node))
    flags = [f"--nodes={need}", f"--nodelist={_hostlist([c.node for c in chosen])}",
             *_gpu_flags(gpus)]
    if partition:
        flags.append(f"--partition={partition}")
    expl = [
        f"{shape}{where}: {k} leaf switch(es) ({', '.join(best.leaves)}), {best.hops} hop(s); "
        f"{k} is the fewest possible ({el.n_choices} eligible node(s) now)",
    ]
    waiting = view.waiting_jobs.get(partition or "", 0)
    if waiting:
        expl.append(f"{waiting} job(s) pending for nodes{where}: Slurm may hold these nodes "
                    "for them, so the job may not start on them now")
    if skipped:
        expl.append(f"not eligible: {skipped}")
    expl.extend(notes)
    for c in chosen:
        isl = ("NVLink island unknown" if c.islands == 0 else
               "one NVLink island" if c.islands == 1 else f"spans {c.islands} NVLink islands")
        nics = _nic_text(view.nodes[c.node], c.gpus)
        gtxt = f"GPUs {','.join(map(str, c.gpus))} ({isl}{nics})" if c.gpus else "no GPUs"
        expl.append(f"{c.node} on {c.leaf}: {gtxt}, {c.free_gpus_left} GPU(s) left free")
    fit = (f"best fit: {best.leftover} eligible node(s) left on the leaves used, "
           f"{best.empty_leaves_opened} idle leaf(s) opened")
    expl.append(fit)
    if gpus:
        expl.append("GPU indices are Slurm's own pick (lowest free indices in 22.05), "
                    "predicted; nodes were chosen so that pick is healthy and, where NVLink "
                    "islands are known, inside one island")
    score = 100.0 - 2.0 * best.hops - 10.0 * best.splits - 1.0 * best.empty_leaves_opened
    score = max(0.0, min(100.0, score - 10.0 * (k - 1)))
    return Placement(
        ok=True, request=req, nodes=chosen, flags=flags, score=round(score, 1),
        cost={"leaves": k, "hops": best.hops, "island_splits": best.splits,
              "nic_rank": best.nic_rank, "idle_leaves_opened": best.empty_leaves_opened,
              "leftover_nodes": best.leftover,
              "jobs_waiting": waiting},
        explanation=expl,
        env={"GPUFLEET_PLACEMENT": " ".join(
            f"{c.node}:{','.join(map(str, c.gpus))}" for c in chosen)},
    )


def _nic_text(node: NodeView, gpus: tuple[int, ...]) -> str:
    affs = [node.gpu_nic[g] for g in gpus if g in node.gpu_nic]
    if not affs:
        return ""
    parts = sorted({f"{a.hca} {a.relation}" for a in affs})
    return "; NIC " + ", ".join(parts)


def _fallback(view: ClusterView, req: PlacementRequest, need: int, gpus: int, el: _Shape,
              shape: str, where: str, skipped: str, notes: list[str],
              idx: ViewIndex | None) -> Placement:
    """No placement now: Slurm queues it and places it itself, never on an unhealthy node.
    No switch count: on a full cluster `--switches=1@10` held jobs for one leaf where Slurm
    alone started them sooner across leaves (bench/placement_vs_slurm.py --fill: mean wait
    23.9 s against 20.8 s); Slurm's topology/tree already keeps the leaves few. `cost`
    still says the leaf count the job would get on an idle cluster."""
    partition = req.partition or view.default_partition
    cached = idx.healthy_counts.get((partition, gpus)) if idx is not None else None
    if cached is None:
        healthy_counts: Counter[str] = Counter()
        for node in view.nodes.values():
            in_part = not partition or not node.partitions or partition in node.partitions
            if (in_part and node.healthy and node.gpu_count >= gpus
                    and set(req.constraints) <= node.features and node.name not in req.exclude):
                healthy_counts[_leaf_key(view.leaf_of.get(node.name, _NO_SWITCH),
                                         node.name)] += 1
        if idx is not None:
            idx.healthy_counts[(partition, gpus)] = healthy_counts
    else:
        healthy_counts = cached
    k_ideal = min_leaves(list(healthy_counts.values()), need)
    flags = [f"--nodes={need}", *_gpu_flags(gpus)]
    if partition:
        flags.append(f"--partition={partition}")
    blocked = sorted(set(el.blocked) - set(req.exclude))
    if blocked:
        flags.append(f"--exclude={_hostlist(sorted(set(blocked) | set(req.exclude)))}")
    why = (f"{shape}{where}: cannot be placed now, {el.n_choices} eligible node(s) "
           f"for {need} needed")
    expl = [why]
    if skipped:
        expl.append(f"not eligible: {skipped}")
    expl.extend(notes)
    if k_ideal is None:
        expl.append(f"never placeable as asked: only {sum(healthy_counts.values())} healthy "
                    f"node(s) can ever take {shape}{where}")
    else:
        expl.append(f"falling back to Slurm's placement (its topology: {k_ideal} leaf "
                    "switch(es) on an idle cluster), unhealthy nodes excluded; no switch "
                    "count, which could only make the job wait longer")
    return Placement(ok=False, request=req, nodes=[], flags=flags, score=0.0,
                     cost={"leaves": float(k_ideal or 0)}, explanation=expl)
