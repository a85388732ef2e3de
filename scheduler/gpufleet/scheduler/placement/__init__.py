"""Topology-aware placement of researchers' jobs: which healthy nodes and GPUs, and the sbatch
flags that make Slurm use them. The engine is pure; builders read Slurm and the store; nothing
here submits a job (that is cli_place.py's `gpufleet sbatch`).
"""

from gpufleet.scheduler.placement.engine import min_leaves, place, resolve_shape
from gpufleet.scheduler.placement.model import (
    ClusterView,
    NicAffinity,
    NodeChoice,
    NodeView,
    Placement,
    PlacementError,
    PlacementRequest,
)
from gpufleet.scheduler.placement.sources import (
    GrpcPlacementSource,
    LocalPlacementSource,
    PlacementSource,
    PlacementUnavailable,
    apply_store,
    parse_gres_detail,
    parse_time_min,
    parse_topology_conf,
    view_from_slurm,
)

__all__ = [
    "ClusterView",
    "GrpcPlacementSource",
    "LocalPlacementSource",
    "NicAffinity",
    "NodeChoice",
    "NodeView",
    "Placement",
    "PlacementError",
    "PlacementRequest",
    "PlacementSource",
    "PlacementUnavailable",
    "apply_store",
    "min_leaves",
    "parse_gres_detail",
    "parse_time_min",
    "parse_topology_conf",
    "place",
    "resolve_shape",
    "view_from_slurm",
]
