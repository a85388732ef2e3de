"""`gpufleet`: the click group; each command lives in a module of its own and is added here.

Settings (gpufleet.scheduler.cli.settings): flag > environment (GPUFLEET_<FLAG>) > config
file (--config, default /etc/gpufleet/controller.toml) > built-in default.
"""

from __future__ import annotations

import click
from gpufleet.rpc.extras import ExtrasGroup, unavailable
from gpufleet.scheduler import __version__
from gpufleet.scheduler.cli.controller import controller
from gpufleet.scheduler.cli.nodes import drain, events, nodes, resume
from gpufleet.scheduler.cli.repair import nodes_history_command, repair_group
from gpufleet.scheduler.cli.settings import db_option, load_config, open_existing_store


@click.group(
    cls=ExtrasGroup,
    context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "GPUFLEET"},
)
@click.version_option(__version__, prog_name="gpufleet")
@click.option(
    "--config",
    type=click.Path(dir_okay=False),
    callback=load_config,
    is_eager=True,
    expose_value=False,
    help="TOML config file [default: /etc/gpufleet/controller.toml if present]",
)
def main() -> None:
    """gpufleet: GPU health, topology and recovery for Slurm clusters."""



for _cmd in (controller, nodes, drain, resume, events):
    main.add_command(_cmd)


def _add(module: str, attr: str, name: str, what: str) -> click.Command | None:
    """Add the command `attr` of `module`; a stand-in naming the extra when it cannot load."""
    import importlib

    try:
        cmd: click.Command = getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as e:
        main.add_command(unavailable(name, e, what))
        return None
    main.add_command(cmd)
    return cmd


def _register_command_groups() -> None:
    """Groups that live in their own modules (each module is the group's whole CLI)."""
    _add("gpufleet.scheduler.cli.topology", "topology", "topology",
         "Slurm topology.conf from the InfiniBand fabric")
    _add("gpufleet.scheduler.cli.certs", "certs_group", "certs",
         "The cluster CA and node certificates")
    _add("gpufleet.scheduler.cli.place", "place_cmd", "place", "Where a job would be placed")
    _add("gpufleet.scheduler.cli.place", "sbatch_cmd", "sbatch", "sbatch with gpufleet placement")
    _add("gpufleet.scheduler.cli.jobs", "jobs", "jobs", "Job checkpoints and recoveries")
    _add("gpufleet.scheduler.cli.whoami", "whoami", "whoami", "Who the controller takes you for")
    acct = _add("gpufleet.scheduler.cli.acct", "acct", "acct", "GPU accounting")
    if isinstance(acct, click.Group):
        from gpufleet.scheduler.cli.acct_reconcile import reconcile

        acct.add_command(reconcile)  # `gpufleet acct reconcile`: against sacct
    _add("gpufleet.scheduler.cli.demo", "demo", "demo", "The whole loop on this machine")
    main.add_command(repair_group)
    nodes.add_command(nodes_history_command(open_existing_store, db_option))


_register_command_groups()

if __name__ == "__main__":
    main()
