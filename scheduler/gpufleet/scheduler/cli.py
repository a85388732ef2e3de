"""`gpufleet`: the controller, and the commands admins and users run. Parses, then delegates.

Settings: flag > environment (GPUFLEET_<FLAG>, e.g. GPUFLEET_DB) > config file (--config,
default /etc/gpufleet/controller.toml) > built-in default.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import tomllib
from pathlib import Path
from typing import Any

import click
from gpufleet.scheduler import __version__
from gpufleet.scheduler.store import SqliteStore, StoreError, now_ms

DEFAULT_CONFIG = Path("/etc/gpufleet/controller.toml")
DEFAULT_DB = "/var/lib/gpufleet/state.db"
CONFIG_KEYS = {"listen", "db", "slurm", "shadow"}


def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    path = Path(value) if value else DEFAULT_CONFIG
    if value is None and not path.exists():
        return value
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as e:
        raise click.BadParameter(f"{path}: no such config file") from e
    except tomllib.TOMLDecodeError as e:
        raise click.BadParameter(f"{path}: not valid TOML: {e}") from e
    unknown = sorted(set(data) - CONFIG_KEYS)
    if unknown:
        raise click.BadParameter(
            f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(CONFIG_KEYS))}"
        )
    # every subcommand reads the same keys
    ctx.default_map = dict.fromkeys(("controller", "nodes"), data)
    return value


def _open_existing_store(db: str) -> SqliteStore:
    if not Path(db).exists():
        raise click.ClickException(
            f"no gpufleet store at {db}: is the controller running, or pass --db/GPUFLEET_DB"
        )
    try:
        return SqliteStore(db)
    except StoreError as e:
        raise click.ClickException(str(e)) from e


def _setup_logging(verbose: int) -> None:
    logging.basicConfig(
        level=logging.WARNING - 10 * min(verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


db_option = click.option(
    "--db",
    default=DEFAULT_DB,
    show_default=True,
    envvar="GPUFLEET_DB",
    type=click.Path(dir_okay=False),
    help="SQLite state store",
)


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "GPUFLEET"}
)
@click.version_option(__version__, prog_name="gpufleet")
@click.option(
    "--config",
    type=click.Path(dir_okay=False),
    callback=_load_config,
    is_eager=True,
    expose_value=False,
    help="TOML config file [default: /etc/gpufleet/controller.toml if present]",
)
def main() -> None:
    """gpufleet: GPU health, topology and recovery for Slurm clusters."""


@main.command()
@click.option(
    "--listen",
    default="0.0.0.0:50051",
    show_default=True,
    envvar="GPUFLEET_LISTEN",
    help="gRPC address agents connect to",
)
@db_option
@click.option(
    "--slurm",
    type=click.Choice(["cli", "none"]),
    default="cli",
    show_default=True,
    envvar="GPUFLEET_SLURM",
    help="how to act on Slurm; 'none' records actions without acting",
)
@click.option(
    "--shadow",
    is_flag=True,
    envvar="GPUFLEET_SHADOW",
    help="log and record what would be done; act on nothing",
)
@click.option("-v", "--verbose", count=True)
def controller(listen: str, db: str, slurm: str, shadow: bool, verbose: int) -> None:
    """Run the controller (the systemd service runs this)."""
    from gpufleet.scheduler.server import Controller
    from gpufleet.scheduler.slurm import CliSlurmClient

    _setup_logging(verbose)
    try:
        store = SqliteStore(db)
    except StoreError as e:
        raise click.ClickException(str(e)) from e
    ctl = Controller(store, CliSlurmClient() if slurm == "cli" else None, listen, shadow)
    try:
        ctl.start()
    except OSError as e:
        raise click.ClickException(f"cannot listen on {listen}: {e}") from e
    click.echo(
        f"gpufleet controller listening on {listen}, store {db}"
        f"{', shadow mode' if shadow or slurm == 'none' else ''}",
        err=True,
    )

    def _stop(signum: int, _frame: Any) -> None:
        ctl.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    ctl.wait()
    store.close()


def _age(ms: int) -> str:
    s = max(0.0, (now_ms() - ms) / 1000.0)
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h"


@main.command()
@db_option
@click.option(
    "--state",
    "health",
    type=click.Choice(["ok", "warn", "degraded", "fatal"]),
    help="only nodes in this health state",
)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def nodes(db: str, health: str | None, as_json: bool) -> None:
    """List nodes with GPU count, health and the age of their last report."""
    store = _open_existing_store(db)
    rows = [n for n in store.nodes() if health is None or n.health == health]
    store.close()
    if as_json:
        now = now_ms()
        click.echo(
            json.dumps(
                [
                    {
                        "name": n.name,
                        "hostname": n.hostname,
                        "gpus": n.gpu_count,
                        "health": n.health,
                        "reason": n.health_reason,
                        "evidence": n.health_evidence,
                        "last_seen_ms": n.last_seen_ms,
                        "last_seen_age_s": round((now - n.last_seen_ms) / 1000.0, 3),
                    }
                    for n in rows
                ],
                indent=2,
            )
        )
        return
    click.echo(f"{'NODE':<12} {'GPUS':>4} {'HEALTH':<9} {'LAST SEEN':>9}  REASON")
    for n in rows:
        reason = f"{n.health_reason}: {n.health_evidence}" if n.health_reason else ""
        click.echo(
            f"{n.name:<12} {n.gpu_count:>4} {n.health:<9} {_age(n.last_seen_ms):>9}  {reason}"
        )


@main.command()
@click.option(
    "--nodes",
    "node_count",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="simulated GPU nodes to start (named n1..nN)",
)
@click.option("--profile", default="dgx-h100", show_default=True, help="simulated hardware")
@click.option("--fault-node", default="n3", show_default=True, help="node that gets Xid 79")
@click.option(
    "--slurm",
    type=click.Choice(["auto", "cli", "none"]),
    default="auto",
    show_default=True,
    help="auto: act on the local Slurm if it answers and knows the nodes",
)
@click.option("--keep-drained", is_flag=True, help="leave the faulty node drained at the end")
def demo(node_count: int, profile: str, fault_node: str, slurm: str, keep_drained: bool) -> None:
    """A controller plus simulated agents on this machine: nodes, a fault, the drain."""
    from gpufleet.scheduler.demo import run_demo

    sys.exit(run_demo(node_count, profile, fault_node, slurm, keep_drained))


if __name__ == "__main__":
    main()
