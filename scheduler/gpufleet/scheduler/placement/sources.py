"""Builders of the engine's ClusterView: Slurm (through gpufleet.scheduler.slurm, the one
door: it runs the commands and reads each version's JSON), topology.conf text, the
controller's store (read-only), and the PlacementSource interface `gpufleet sbatch` asks.

Nothing here writes to Slurm or to the store. Every Slurm call has a deadline: the caller (an
interactive `gpufleet sbatch`) gives placement 2 s in all.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from gpufleet.scheduler.placement.engine import place
from gpufleet.scheduler.placement.layout import GpuLayout, gpu_layout
from gpufleet.scheduler.placement.model import (
    ClusterView,
    NodeView,
    Placement,
    PlacementError,
    PlacementRequest,
)
from gpufleet.scheduler.slurm import CliSlurmClient, SlurmError, SlurmJob
from gpufleet.scheduler.slurm.gres import gpu_count, parse_gres_detail
from gpufleet.scheduler.slurm.topology_conf import TopologyConfError
from gpufleet.scheduler.slurm.topology_conf import parse_topology_conf as parse_topology_text
from gpufleet.scheduler.topology.inventory import NodeInventory

__all__ = [
    "InventorySource",
    "LocalPlacementSource",
    "PlacementSource",
    "PlacementUnavailable",
    "apply_store",
    "parse_gres_detail",
    "parse_time_min",
    "parse_topology_conf",
    "view_from_slurm",
]

# states in which a job holds its GPUs
_HOLDING_STATES = frozenset({"RUNNING", "SUSPENDED", "COMPLETING", "CONFIGURING", "STOPPED"})
# A store whose newest agent report is older than this means the controller (or every agent)
# is away: its health is no basis for a placement.
DEFAULT_STALE_AFTER_S = 120.0


class PlacementUnavailable(Exception):
    """The source cannot answer now (controller away, Slurm slow): submit without placement."""


def parse_topology_conf(text: str, source: str = "topology.conf",
                        ) -> tuple[dict[str, str], dict[str, str]]:
    """topology.conf or `scontrol show topology` text -> (node -> leaf switch or block,
    switch -> parent switch), read by gpufleet.scheduler.slurm's one topology parser."""
    try:
        return parse_topology_text(text, source).tree()
    except TopologyConfError as e:
        raise PlacementError(f"{e.source} line {e.line_no}: {e.problem}") from e


def parse_time_min(text: str) -> int | None:
    """Slurm time (`90`, `1:30:00`, `2-00`, `UNLIMITED`) -> minutes (None: no limit)."""
    value = text.strip()
    if value.upper() in {"UNLIMITED", "INFINITE", "NONE", ""}:
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value)
    if not m:
        raise PlacementError(f"time {text!r}: not a Slurm time (MM, MM:SS, HH:MM:SS, D-HH...)")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        secs = days * 86400 + (a or 0) * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        secs = (a or 0) * 3600 + (b or 0) * 60 + c
    elif b is not None:  # MM:SS
        secs = (a or 0) * 60 + b
    else:  # MM
        secs = (a or 0) * 60
    return max(1, -(-secs // 60))


def used_gpus(jobs: Iterable[SlurmJob]) -> dict[str, set[int]]:
    """node -> GPU indices held by jobs (gres_detail is per node, in the order of the job's
    node list)."""
    used: dict[str, set[int]] = {}
    for job in jobs:
        if job.state not in _HOLDING_STATES:
            continue
        for node, detail in zip(job.nodes, job.gres_detail, strict=False):
            used.setdefault(node, set()).update(parse_gres_detail(detail))
    return used


def view_from_slurm(slurm: CliSlurmClient | None = None, timeout_s: float = 2.0,
                    topology_conf: str | None = None) -> ClusterView:
    """Nodes, GPUs held by jobs, partitions and the switch tree (topology_conf text if given,
    else `scontrol show topology`), read through the Slurm client (default: the commands
    on this host). A Slurm that fails, is slow, or prints what the client cannot read is
    PlacementUnavailable, with the client's message."""
    deadline = time.monotonic() + timeout_s
    client = slurm or CliSlurmClient(timeout_s=timeout_s)
    try:
        # the version first (it picks the commands), then the four reads side by side: the
        # caller's 2 s is for all of them
        c = client.with_timeout(max(deadline - time.monotonic(), 0.05))
        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="slurm-read") as pool:
            f_infos, f_jobs = pool.submit(c.node_infos), pool.submit(c.jobs)
            f_parts = pool.submit(c.partitions)
            f_topo = pool.submit(c.topology_text) if topology_conf is None else None
            infos, jobs, partitions = f_infos.result(), f_jobs.result(), f_parts.result()
            topo_text, topo_source = (
                (f_topo.result(), "scontrol show topology") if f_topo is not None
                else (topology_conf or "", "topology.conf"))
    except SlurmError as e:
        raise PlacementUnavailable(str(e)) from e
    leaf_of, parent = parse_topology_conf(topo_text, topo_source)
    used = used_gpus(jobs)
    nodes: dict[str, NodeView] = {}
    for name, info in infos.items():
        count = gpu_count(info.gres)
        cpus, alloc = info.cpus, info.alloc_cpus
        nodes[name] = NodeView(
            name=name,
            gpu_count=count,
            free_gpus=frozenset(set(range(count)) - used.get(name, set())),
            slurm_state=info.node.state,
            partitions=frozenset(info.partitions),
            features=frozenset(info.active_features or info.node.features),
            cpus_free=cpus - alloc if cpus is not None and alloc is not None else None,
        )
    default_partition, max_time = None, {}
    for p in partitions:
        max_time[p.name] = parse_time_min(p.max_time)
        if p.default:
            default_partition = p.name
    return ClusterView(nodes=nodes, leaf_of=leaf_of, parent=parent,
                       default_partition=default_partition, partition_max_time_min=max_time,
                       sources=["slurm"])


class HealthStore(Protocol):
    """What the engine reads from gpufleet's state store (a StateStore satisfies it)."""

    def nodes(self) -> Sequence[Any]: ...

    def verdicts(self, node: str) -> Sequence[Any]: ...


# node -> its inventory (None: none stored); the caller converts what the store keeps
InventorySource = Callable[[str], NodeInventory | None]


def apply_store(view: ClusterView, store: HealthStore,
                inventories: InventorySource | None = None) -> ClusterView:
    """The view with gpufleet's health, per-GPU verdicts and, from the nodes' `inventories`,
    NVLink islands and NIC affinity."""
    nodes = dict(view.nodes)
    for row in store.nodes():
        node = nodes.get(row.name)
        if node is None:
            continue  # gpufleet knows a node Slurm does not: nothing to place there
        health = row.health if getattr(row, "reachable", True) else "unreachable"
        bad: dict[int, str] = {}
        for v in store.verdicts(row.name):
            if v.gpu_index is not None and v.severity in {"degraded", "fatal"}:
                bad[int(v.gpu_index)] = f"{v.severity} {v.reason_code}"
        inv = inventories(row.name) if inventories is not None else None
        layout = gpu_layout(inv) if inv is not None else GpuLayout()
        nodes[row.name] = replace(node, health=health, health_reason=row.health_reason,
                                  unhealthy_gpus=bad, nvlink_islands=layout.islands,
                                  gpu_nic=layout.nics)
    return replace(view, nodes=nodes, sources=[*view.sources, "gpufleet store"])


class PlacementSource(Protocol):
    """Where `gpufleet sbatch` / `gpufleet place` get a placement from."""

    def place(self, request: PlacementRequest) -> Placement:
        """A placement (ok or fallback); PlacementUnavailable when there is no answer now."""
        ...


@dataclass
class LocalPlacementSource:
    """Computes in this process from Slurm + the controller's store (+ topology.conf).

    The store stands for the controller: missing, unreadable, or with no agent report newer
    than `stale_after_s`, it means the controller is away -> PlacementUnavailable.
    `inventories_from`: the opened store -> each node's inventory (e.g.
    gpufleet.scheduler.service.convert.stored_inventories); None: islands and NICs not known.
    """

    store_path: str | None
    topology_conf: Path | None = None
    env: Mapping[str, str] | None = None
    timeout_s: float = 2.0
    stale_after_s: float = DEFAULT_STALE_AFTER_S
    slurm: CliSlurmClient | None = None
    now_s: Callable[[], float] = field(default=time.time)
    inventories_from: Callable[[Any], InventorySource] | None = None

    def view(self) -> ClusterView:
        t0 = time.monotonic()
        topo = None
        if self.topology_conf is not None:
            try:
                topo = self.topology_conf.read_text()
            except (OSError, UnicodeDecodeError) as e:
                raise PlacementError(f"topology file {self.topology_conf}: {e}") from e
        slurm = self.slurm or CliSlurmClient(env=self.env, timeout_s=self.timeout_s)
        view = view_from_slurm(slurm, self.timeout_s, topo)
        if self.store_path is not None:
            store = self._open_store()
            inventories = (self.inventories_from(store) if self.inventories_from is not None
                           else None)
            view = apply_store(view, store, inventories)
        if time.monotonic() - t0 > self.timeout_s:
            raise PlacementUnavailable(f"reading the cluster took over {self.timeout_s} s")
        return view

    def _open_store(self) -> HealthStore:
        from gpufleet.scheduler.store import SqliteStore, StoreError

        path = str(self.store_path)
        if not Path(path).exists():
            raise PlacementUnavailable(f"no gpufleet store at {path}: is the controller running?")
        try:
            store = SqliteStore(path)
            rows = store.nodes()
        except StoreError as e:
            raise PlacementUnavailable(f"gpufleet store {path}: {e}") from e
        newest_ms = max((r.last_seen_ms for r in rows), default=0)
        age_s = self.now_s() - newest_ms / 1000
        if age_s > self.stale_after_s:
            raise PlacementUnavailable(
                f"gpufleet store {path}: newest agent report is {age_s:.0f} s old "
                f"(> {self.stale_after_s:.0f} s): controller away")
        return store

    def place(self, request: PlacementRequest) -> Placement:
        return place(self.view(), request)
