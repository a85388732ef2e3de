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
from gpufleet.scheduler.placement.model import (
    ClusterView,
    NicAffinity,
    NodeChoice,
    NodeView,
    Placement,
    PlacementError,
    PlacementRequest,
)
from gpufleet.scheduler.slurm import CliSlurmClient, SlurmError, SlurmJob
from gpufleet.scheduler.slurm.gres import gpu_count, parse_gres_detail
from gpufleet.scheduler.slurm.topology_conf import TopologyConfError
from gpufleet.scheduler.slurm.topology_conf import parse_topology_conf as parse_topology_text

__all__ = [
    "GrpcPlacementSource",
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
# Same names as NVML's topology levels, by the wire contract's PcieRelation enum numbers
_PCIE_NAMES = {1: "X", 2: "PIX", 3: "PXB", 4: "PHB", 5: "NODE", 6: "SYS"}
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

    def inventory(self, name: str) -> bytes | None: ...


def _islands_and_nics(inventory: bytes) -> tuple[tuple[frozenset[int], ...],
                                                 dict[int, NicAffinity]]:
    from gpufleet.rpc.v1 import fleet_pb2

    inv = fleet_pb2.NodeInventory()
    inv.ParseFromString(inventory)
    root = {g.index: g.index for g in inv.gpus}

    def find(x: int) -> int:
        while root[x] != x:
            root[x] = root[root[x]]
            x = root[x]
        return x

    for link in inv.gpu_links:
        if link.nvlink_count > 0 and link.gpu_a in root and link.gpu_b in root:
            root[find(link.gpu_a)] = find(link.gpu_b)
    groups: dict[int, set[int]] = {}
    for g in root:
        groups.setdefault(find(g), set()).add(g)
    islands = tuple(sorted((frozenset(s) for s in groups.values()), key=min))
    nics: dict[int, NicAffinity] = {}
    for aff in inv.gpu_nic_affinity:
        rel = _PCIE_NAMES.get(int(aff.pcie_relation), "SYS")
        old = nics.get(aff.gpu_index)
        order = list(_PCIE_NAMES.values())
        if old is None or order.index(rel) < order.index(old.relation):
            nics[aff.gpu_index] = NicAffinity(aff.hca, rel)
    return (islands if inv.gpu_links else ()), nics


def apply_store(view: ClusterView, store: HealthStore) -> ClusterView:
    """The view with gpufleet's health, per-GPU verdicts, NVLink islands and NIC affinity."""
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
        inv = store.inventory(row.name)
        islands, nics = _islands_and_nics(inv) if inv else ((), {})
        nodes[row.name] = replace(node, health=health, health_reason=row.health_reason,
                                  unhealthy_gpus=bad, nvlink_islands=islands, gpu_nic=nics)
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
    """

    store_path: str | None
    topology_conf: Path | None = None
    env: Mapping[str, str] | None = None
    timeout_s: float = 2.0
    stale_after_s: float = DEFAULT_STALE_AFTER_S
    slurm: CliSlurmClient | None = None
    now_s: Callable[[], float] = field(default=time.time)

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
            view = apply_store(view, self._open_store())
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


@dataclass
class GrpcPlacementSource:
    """Asks the controller's FleetUser.Place (MUNGE-authenticated; any user may ask).

    TLS settings and the munged socket come from `env` (default: this process's
    environment): GPUFLEET_TLS_CA / _CERT / _KEY or GPUFLEET_INSECURE, GPUFLEET_MUNGE_SOCKET.
    Anything that stops an answer (controller away, slow, no munge here, refused) is
    PlacementUnavailable, so `gpufleet sbatch` submits as plain sbatch with one warning; a
    request the controller calls invalid is a PlacementError.
    """

    address: str
    timeout_s: float = 2.0
    env: Mapping[str, str] | None = None

    def place(self, request: PlacementRequest) -> Placement:
        import grpc
        from gpufleet.rpc.v1 import fleet_pb2 as pb
        from gpufleet.scheduler.service.user_client import UserClient, UserClientError, tls_from_env

        msg = pb.PlaceRequest(partition=request.partition or "",
                              constraints=list(request.constraints),
                              exclude=sorted(request.exclude))
        for name in ("nodes", "gpus_per_node", "total_gpus", "time_limit_min"):
            value = getattr(request, name)
            if value is not None:
                setattr(msg, name, value)
        # None: munge.socket_path reads GPUFLEET_MUNGE_SOCKET from this process's environment
        sock = None if self.env is None else self.env.get("GPUFLEET_MUNGE_SOCKET")
        try:
            client = UserClient(self.address, tls_from_env(self.env), sock,
                                timeout_s=self.timeout_s)
            with client:
                reply = client.place(msg)
        except UserClientError as e:
            if e.code == grpc.StatusCode.INVALID_ARGUMENT:
                raise PlacementError(str(e)) from e
            raise PlacementUnavailable(str(e)) from e
        return Placement(
            ok=reply.ok, request=request,
            nodes=[NodeChoice(n.node, n.leaf, tuple(n.gpus), n.nvlink_islands, n.nic_rank,
                              n.free_gpus_left) for n in reply.nodes],
            flags=list(reply.flags), score=reply.score, cost=dict(reply.cost),
            explanation=list(reply.explanation), env=dict(reply.env))
