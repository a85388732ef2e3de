"""`gpufleet place` (dry run) and `gpufleet sbatch`, as listed by `gpufleet --help`.

Both are the real sbatch: `gpufleet sbatch ARGS` runs `sbatch ARGS` unchanged and `gpufleet
place ARGS` runs `sbatch --test-only ARGS` with the placement explained on stderr. gpufleet
never parses sbatch's options: Slurm's cli_filter/lua plugin hands the options sbatch parsed
to gpufleet-sbatch-filter (sbatch_filter.py), which asks the controller. entry.py runs both
commands before this module (or click) is even imported; these click commands are the same
path for `gpufleet --help` and for callers that import the group.
"""

from __future__ import annotations

import os
import sys

import click
from gpufleet.scheduler.cli.entry import USAGE, exec_sbatch

__all__ = ["place_cmd", "sbatch_cmd"]

_PASS = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}


@click.command("sbatch", context_settings=_PASS, add_help_option=False,
               short_help="sbatch, with a healthy, topology-aware placement.", help=USAGE)
@click.argument("sbatch_args", nargs=-1, type=click.UNPROCESSED)
def sbatch_cmd(sbatch_args: tuple[str, ...]) -> None:
    sys.exit(exec_sbatch(list(sbatch_args)))


@click.command("place", context_settings=_PASS, add_help_option=False,
               short_help="Where `gpufleet sbatch` would place a job (sbatch --test-only).",
               help="gpufleet place SBATCH-ARGS...: sbatch --test-only with the placement "
                    "explained on stderr; submits nothing.")
@click.argument("sbatch_args", nargs=-1, type=click.UNPROCESSED)
def place_cmd(sbatch_args: tuple[str, ...]) -> None:
    os.environ["GPUFLEET_FILTER_VERBOSE"] = "1"
    sys.exit(exec_sbatch(list(sbatch_args), test_only=True))
