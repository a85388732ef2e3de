"""cli | rest | pyslurm | none -> a SlurmClient (the controller's --slurm)."""

from __future__ import annotations

from typing import Any

from gpufleet.scheduler.slurm.cli import CliSlurmClient
from gpufleet.scheduler.slurm.types import SLURM_KINDS, SlurmClient, SlurmError


def make_slurm_client(kind: str, **options: Any) -> SlurmClient | None:
    """cli | rest | pyslurm -> that client (options go to its constructor); none -> None
    (the controller then records actions in shadow mode)."""
    if kind == "cli":
        return CliSlurmClient(**options)
    if kind == "rest":
        from gpufleet.scheduler.slurm.rest import RestSlurmClient

        return RestSlurmClient(**options)
    if kind == "pyslurm":
        from gpufleet.scheduler.slurm.pyslurm_client import PyslurmClient

        return PyslurmClient(**options)
    if kind == "none":
        return None
    raise SlurmError(f"unknown Slurm client kind {kind!r}: use one of {', '.join(SLURM_KINDS)}",
                     transient=False)
