"""Topology-aware placement of researchers' jobs: which healthy nodes and GPUs, and the sbatch
flags that make Slurm use them. The engine is pure; builders read Slurm and the store; nothing
here submits a job (that is `gpufleet sbatch`, cli/place.py), and nothing here speaks gRPC
or protobuf (the controller's placement over gRPC is service/user_remote.py).
"""

from gpufleet.scheduler.placement.engine import min_leaves, place, resolve_shape
from gpufleet.scheduler.placement.layout import GpuLayout, gpu_layout
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
    InventorySource,
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
    "GpuLayout",
    "InventorySource",
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
    "gpu_layout",
    "min_leaves",
    "parse_gres_detail",
    "parse_time_min",
    "parse_topology_conf",
    "place",
    "resolve_shape",
    "view_from_slurm",
]
