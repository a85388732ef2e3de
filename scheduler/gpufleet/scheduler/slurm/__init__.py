"""The one door to Slurm: the only code in gpufleet that runs a Slurm command, calls
slurmrestd or pyslurm, or parses what they print (tests/scheduler/test_slurm_door.py holds
every other module to it).

types.py      SlurmError, SlurmNode, SlurmJob, the client Protocols, input checks
schema.py     the Slurm version and one JSON reader per schema (22.05, data_parser v0.0.39..)
cli.py        CliSlurmClient over the Slurm commands; sbatch and sacct runners
rest.py       RestSlurmClient over slurmrestd
pyslurm_client.py  PyslurmClient over pyslurm
sacct.py      `sacct --json` records and their reconciliation with the ledger
topology_conf.py   topology.conf / `scontrol show topology` text
factory.py    make_slurm_client(kind)

Modules import types.py and schema.py, never this package's __init__, so there is no loop.
"""

from __future__ import annotations

from gpufleet.scheduler.slurm.cli import CliSlurmClient, slurm_version
from gpufleet.scheduler.slurm.factory import make_slurm_client
from gpufleet.scheduler.slurm.schema import SlurmVersion, reader_for
from gpufleet.scheduler.slurm.types import (
    MAX_WEIGHT,
    SIGNAL_SCOPES,
    SLURM_KINDS,
    SlurmClient,
    SlurmError,
    SlurmJob,
    SlurmJobClient,
    SlurmNode,
    SlurmNodeInfo,
    SlurmPartition,
    SlurmQueueClient,
    SwitchRequest,
    check_features,
    check_job_id,
    check_node_name,
    check_signal,
    check_weight,
    clean_reason,
    decode_exit_code,
    expand_hostlist,
    is_permanent_message,
    slurm_time_s,
    split_features,
)

__all__ = [
    "MAX_WEIGHT",
    "SIGNAL_SCOPES",
    "SLURM_KINDS",
    "CliSlurmClient",
    "SlurmClient",
    "SlurmError",
    "SlurmJob",
    "SlurmJobClient",
    "SlurmNode",
    "SlurmNodeInfo",
    "SlurmPartition",
    "SlurmQueueClient",
    "SlurmVersion",
    "SwitchRequest",
    "check_features",
    "check_job_id",
    "check_node_name",
    "check_signal",
    "check_weight",
    "clean_reason",
    "decode_exit_code",
    "expand_hostlist",
    "is_permanent_message",
    "make_slurm_client",
    "reader_for",
    "slurm_time_s",
    "slurm_version",
    "split_features",
]
