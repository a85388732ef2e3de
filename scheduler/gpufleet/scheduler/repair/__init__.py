"""The repair loop: a node gpufleet drained is remediated as NVIDIA's catalog says (GPU reset
by the agent, `scontrol reboot`), diagnosed, and resumed on a pass or kept drained and
escalated on a fail. See docs/repair.md.

Domain code: no gRPC, protobuf or SQL here; Slurm through the SlurmClient protocol and the
two calls of `slurm.repair_calls`.
"""

from gpufleet.scheduler.repair.catalog import Resolution, resolve
from gpufleet.scheduler.repair.engine import (
    AgentCommand,
    CommandResult,
    RepairConfig,
    RepairManager,
)
from gpufleet.scheduler.repair.journal import Journal

__all__ = ["AgentCommand", "CommandResult", "Journal", "RepairConfig", "RepairManager",
           "Resolution", "resolve"]
