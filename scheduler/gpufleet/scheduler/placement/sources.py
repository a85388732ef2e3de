"""Builders of the engine's ClusterView: Slurm (through gpufleet.scheduler.slurm, the one
door: it runs the commands and reads each version's JSON), topology.conf text, the
controller's store (read-only), and the PlacementSource interface `gpufleet sbatch` asks.

Nothing here writes to Slurm or to the store. Every Slurm call has a deadline: the caller (an
interactive `gpufleet sbatch`) gives placement 2 s in all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
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
from gpufleet.scheduler.slurm import (
    CliSlurmClient,
    SlurmError,
    SlurmJob,
    SlurmNodeInfo,
    SlurmPartition,
)
from gpufleet.scheduler.slurm.gres import gpu_count, parse_gres_detail
from gpufleet.scheduler.slurm.topology_conf import TopologyConfError
from gpufleet.scheduler.slurm.topology_conf import parse_topology_conf as parse_topology_text
from gpufleet.scheduler.slurm.types import slurm_time_s
from gpufleet.scheduler.topology.inventory import NodeInventory

__all__ = [
    "InventorySource",
    "LocalPlacementSource",
    "PlacementSource",
    "PlacementUnavailable",
    "SlurmViewSource",
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
    try:
        secs = slurm_time_s(text)
    except ValueError as e:
        raise PlacementError(str(e)) from e
    return None if secs is None else max(1, -(-secs // 60))


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


# a pending job waiting for nodes (not for a dependency, a begin time or a hold): Slurm's
# backfill may hold the free nodes for it, so a job submitted now may not start on them
_WAITING_REASONS = frozenset({"Resources", "Priority"})


def waiting_jobs(jobs: Iterable[SlurmJob]) -> dict[str, int]:
    """partition -> jobs pending in it for nodes (a job naming several counts in each)."""
    out: dict[str, int] = {}
    for job in jobs:
        if job.state == "PENDING" and job.state_reason in _WAITING_REASONS:
            for part in job.partitions:
                out[part] = out.get(part, 0) + 1
    return out


def view_from_slurm(slurm: CliSlurmClient | None = None, timeout_s: float = 2.0,
                    topology_conf: str | None = None) -> ClusterView:
    """Nodes, GPUs held by jobs, partitions and the switch tree (topology_conf text if given,
    else `scontrol show topology`), read through the Slurm client (default: the commands
    on this host). A Slurm that fails, is slow, or prints what the client cannot read is
    PlacementUnavailable, with the client's message."""
    return SlurmViewSource(slurm, timeout_s, topology_conf, static_ttl_s=0.0,
                           jobs_max_age_s=0.0)()


def gpu_counts_agree(infos: Mapping[str, SlurmNodeInfo], used: Mapping[str, set[int]]) -> bool:
    """Whether GPU indices read from the jobs earlier still fit the nodes read now: on every
    node the count Slurm says is in use (gres_used, no indices) is the count of indices the
    jobs held. A node whose gres_used is unknown never agrees."""
    for name, info in infos.items():
        if not info.gres_used or gpu_count(info.gres_used) != len(used.get(name, ())):
            return False
    return True


class SlurmViewSource:
    """The cluster as Slurm sees it, for the controller's FleetUser.Place (one per controller).

    Nodes (`sinfo --json` / `scontrol --json show nodes`: state, CPUs, GPUs in use) are read
    on every call: a pin must fit what is free now. Which GPU indices the jobs hold is only
    in the jobs (`squeue --json`, whose cost grows with the queue, pending jobs too; no
    formatted squeue or sinfo field prints the indices on 22.05-26.05). So the jobs' indices
    are kept and used while they still fit the fresh node read (gpu_counts_agree: the same
    GPU count in use on every node) and are younger than `jobs_max_age_s`; they are re-read
    in the background once older than `jobs_refresh_s`, and waited for when they do not fit
    (a job started or ended since): then the call costs what reading both always cost, and
    for the next `jobs_refresh_s` every call reads the jobs beside the nodes again, so a busy
    cluster never waits for the two reads one after the other.
    Partitions and the switch tree (`scontrol show partition|topology`) change only when an
    admin edits slurm.conf and reconfigures, so they are kept for `static_ttl_s` (0: read
    every time). A stale tree or time limit costs at most a worse choice of nodes or a pin
    Slurm refuses to start (released after pin_release_s), never a job placed on a node
    health keeps jobs off."""

    def __init__(self, slurm: CliSlurmClient | None = None, timeout_s: float = 2.0,
                 topology_conf: str | None = None, static_ttl_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, jobs_max_age_s: float = 10.0,
                 jobs_refresh_s: float = 2.0) -> None:
        self.slurm = slurm or CliSlurmClient(timeout_s=timeout_s)
        self.timeout_s = timeout_s
        self.topology_conf = topology_conf
        self.static_ttl_s = static_ttl_s
        self.jobs_max_age_s = jobs_max_age_s
        self.jobs_refresh_s = jobs_refresh_s
        self.clock = clock
        self._lock = threading.Lock()
        self._static: tuple[float, list[SlurmPartition], str, str] | None = None
        # (when the read started, node -> GPU indices the holding jobs had)
        self._used: tuple[float, dict[str, set[int]]] | None = None
        self._reading: Future[dict[str, set[int]]] | None = None
        self._waiting: tuple[float, dict[str, int]] = (float("-inf"), {})  # the newest read
        self._churn_until = float("-inf")  # until then, jobs are read beside the nodes

    def _cached_static(self) -> tuple[list[SlurmPartition], str, str] | None:
        with self._lock:
            if self._static is None or self.clock() - self._static[0] >= self.static_ttl_s:
                return None
            return self._static[1], self._static[2], self._static[3]

    def _cached_used(self) -> tuple[float, dict[str, set[int]]] | None:
        with self._lock:
            if self._used is None or self.clock() - self._used[0] >= self.jobs_max_age_s:
                return None
            return self._used

    def _read_used(self, c: CliSlurmClient) -> Future[dict[str, set[int]]]:
        """The jobs' GPU indices, read in a thread of its own (one read at a time): a caller
        that has fitting ones answers without waiting for it."""
        with self._lock:
            if self._reading is not None and not self._reading.done():
                return self._reading
            fut: Future[dict[str, set[int]]] = Future()
            self._reading = fut
        started = self.clock()

        def run() -> None:
            try:
                jobs = c.jobs()
                used = used_gpus(jobs)
                waiting = waiting_jobs(jobs)
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits for it
                fut.set_exception(e)
                return
            with self._lock:
                if self._used is None or self._used[0] <= started:
                    self._used = (started, used)
                if self._waiting[0] <= started:
                    self._waiting = (started, waiting)
            fut.set_result(used)

        threading.Thread(target=run, name="slurm-jobs", daemon=True).start()
        return fut

    def __call__(self) -> ClusterView:
        deadline = self.clock() + self.timeout_s
        static = self._cached_static()
        cached = self._cached_used()
        try:
            # the version first (it picks the commands), then the reads side by side: the
            # caller's deadline is for all of them
            c = self.slurm.with_timeout(max(deadline - self.clock(), 0.05))
            reading = None
            # while jobs start and end (a recent call found the kept indices stale), read them
            # beside the nodes as every call did before: never slower than reading both
            if (cached is None or self.clock() - cached[0] >= self.jobs_refresh_s
                    or self.clock() < self._churn_until):
                reading = self._read_used(c)
            with ThreadPoolExecutor(max_workers=3, thread_name_prefix="slurm-read") as pool:
                f_infos = pool.submit(c.node_infos)
                if static is None:
                    f_parts = pool.submit(c.partitions)
                    f_topo = pool.submit(c.topology_text) if self.topology_conf is None \
                        else None
                infos = f_infos.result()
                if static is None:
                    topo_text, topo_source = (
                        (f_topo.result(), "scontrol show topology") if f_topo is not None
                        else (self.topology_conf or "", "topology.conf"))
                    static = (f_parts.result(), topo_text, topo_source)
                    if self.static_ttl_s > 0:
                        with self._lock:
                            self._static = (self.clock(), *static)
            if cached is not None and gpu_counts_agree(infos, cached[1]):
                used = cached[1]
            else:  # none kept, or a job started or ended since: wait for the jobs
                if cached is not None:
                    with self._lock:
                        self._churn_until = self.clock() + self.jobs_refresh_s
                reading = reading or self._read_used(c)
                used = reading.result(timeout=max(deadline - self.clock(), 0.05))
        except SlurmError as e:
            raise PlacementUnavailable(str(e)) from e
        except FutureTimeout as e:
            raise PlacementUnavailable(
                f"`squeue` gave no answer within {self.timeout_s:.1f} s") from e
        partitions, topo_text, topo_source = static
        view = _build_view(infos, used, partitions, topo_text, topo_source)
        with self._lock:
            view.waiting_jobs = dict(self._waiting[1])
        return view


def _build_view(infos: Mapping[str, SlurmNodeInfo], used: Mapping[str, set[int]],
                partitions: Iterable[SlurmPartition],
                topo_text: str, topo_source: str) -> ClusterView:
    leaf_of, parent = parse_topology_conf(topo_text, topo_source)
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
