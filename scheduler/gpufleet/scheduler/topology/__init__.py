"""InfiniBand fabric and node GPU topology, and the Slurm topology.conf made from them.

Pure functions over parsed data: nothing here runs `ibnetdiscover`, touches NVML or writes to
Slurm. The CLI (`gpufleet topology`) feeds it files and the controller's store.
"""

from gpufleet.scheduler.topology.ibnetdiscover import IbParseError, parse_ibnetdiscover

__all__ = ["IbParseError", "parse_ibnetdiscover"]
