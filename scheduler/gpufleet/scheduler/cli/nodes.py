"""`gpufleet nodes|drain|resume|events`: the admin's view of nodes and hands on them.

drain and resume are user-API calls (cli/userapi.py): the same answer on the head node
(store + scontrol) and through the controller (--controller, MUNGE, admins only)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click
from gpufleet.scheduler.cli.settings import db_option, open_existing_store
from gpufleet.scheduler.cli.userapi import ask, user_api
from gpufleet.scheduler.service.user_client import controller_options
from gpufleet.scheduler.slurm import SlurmClient
from gpufleet.scheduler.store import now_ms


def _age(ms: int) -> str:
    s = max(0.0, (now_ms() - ms) / 1000.0)
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h"


@click.group(invoke_without_command=True)
@db_option
@click.option(
    "--state",
    "health",
    type=click.Choice(["ok", "warn", "degraded", "fatal", "unreachable"]),
    help="only nodes in this health state (unreachable: silent nodes)",
)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def nodes(ctx: click.Context, db: str, health: str | None, as_json: bool) -> None:
    """List nodes with GPU count, health and the age of their last report.

    `gpufleet nodes show NODE` shows one node's verdicts, actions and events.
    """
    if ctx.invoked_subcommand is not None:
        return
    store = open_existing_store(db)
    rows = [
        n for n in store.nodes()
        if health is None or n.health == health or (health == "unreachable" and not n.reachable)
    ]
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
                        "reachable": n.reachable,
                        "last_seen_ms": n.last_seen_ms,
                        "last_seen_age_s": round((now - n.last_seen_ms) / 1000.0, 3),
                    }
                    for n in rows
                ],
                indent=2,
            )
        )
        return
    click.echo(f"{'NODE':<12} {'GPUS':>4} {'HEALTH':<11} {'LAST SEEN':>9}  REASON")
    for n in rows:
        reason = f"{n.health_reason}: {n.health_evidence}" if n.health_reason else ""
        shown = n.health if n.reachable else f"{n.health}/unr"
        click.echo(
            f"{n.name:<12} {n.gpu_count:>4} {shown:<11} {_age(n.last_seen_ms):>9}  {reason}"
        )


@nodes.command("show")
@click.argument("node")
@db_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def nodes_show(node: str, db: str, as_json: bool) -> None:
    """One node: health, current verdicts, gpufleet's actions and recent events."""
    from gpufleet.scheduler.health.admin import format_ts, timeline

    store = open_existing_store(db)
    row = store.node(node)
    if row is None:
        store.close()
        raise click.ClickException(f"no node {node!r} in the store at {db}")
    verdicts = [v for v in store.verdicts(node) if v.severity != "ok"]
    entries = timeline(store, node, 0, limit=50)
    store.close()
    if as_json:
        click.echo(json.dumps({
            "name": row.name, "hostname": row.hostname, "gpus": row.gpu_count,
            "health": row.health, "reason": row.health_reason, "evidence": row.health_evidence,
            "reachable": row.reachable, "unreachable_since_ms": row.unreachable_since_ms,
            "first_seen_ms": row.first_seen_ms, "last_seen_ms": row.last_seen_ms,
            "verdicts": [
                {"check": v.check_name, "gpu": v.gpu_index, "subject": v.subject,
                 "severity": v.severity, "reason_code": v.reason_code, "evidence": v.evidence,
                 "since_ms": v.since_ms}
                for v in verdicts
            ],
            "timeline": [e.as_dict() for e in entries],
        }, indent=2))
        return
    click.echo(f"node {row.name} ({row.hostname}), {row.gpu_count} GPUs")
    cause = f"  {row.health_reason}: {row.health_evidence}" if row.health_reason else ""
    click.echo(f"  health    {row.health}{'' if row.reachable else ' (unreachable)'}{cause}")
    click.echo(
        f"  last seen {_age(row.last_seen_ms)} ago; first seen {format_ts(row.first_seen_ms)}"
    )
    click.echo("  verdicts not ok:" if verdicts else "  verdicts: all ok")
    for v in verdicts:
        where = f"GPU {v.gpu_index}" if v.gpu_index is not None else (v.subject or "node")
        click.echo(f"    {v.severity:<9} {v.check_name:<14} {where:<10} {v.evidence}")
    click.echo("  timeline (newest last):" if entries else "  timeline: nothing recorded")
    for e in entries:
        click.echo(f"    {format_ts(e.ts_ms)} {e.what:<6} {e.kind:<8} {e.severity_or_status:<8} "
                   f"{e.actor:<8} {e.text}")


def _slurm_for_admin(slurm: str) -> Callable[[], SlurmClient]:
    def make() -> SlurmClient:
        from gpufleet.scheduler.slurm import CliSlurmClient

        if slurm == "none":
            raise click.UsageError("drain/resume act on Slurm: --slurm none cannot do that")
        return CliSlurmClient()

    return make


slurm_option = click.option(
    "--slurm",
    type=click.Choice(["cli"]),
    default="cli",
    show_default=True,
    envvar="GPUFLEET_SLURM",
    help="how to reach Slurm",
)


def _node_action(action: str, node_expr: str, reason: str, db: str, slurm: str,
                 options: dict[str, Any]) -> None:
    """drain/resume, on this host's store and Slurm or through the controller (admins only
    there: root or the admin group); NODE may be a hostlist (n[1-4]) either way."""
    from gpufleet.scheduler.slurm import SlurmError, expand_hostlist

    try:
        nodes = expand_hostlist(node_expr)
    except SlurmError as e:
        raise click.BadParameter(str(e), param_hint="NODE") from e
    with user_api(db, slurm=_slurm_for_admin(slurm), **options) as api:
        result = ask(lambda: api.drain(nodes, reason) if action == "drain"
                     else api.resume(nodes))
    for n in result.changed:
        click.echo(f"{action} {n}: done")
    state = "drained for that reason" if action == "drain" else "not drained"
    for n in result.unchanged:
        click.echo(f"{action} {n}: unchanged (already {state})")


@click.command()
@click.argument("node")
@click.option("--reason", required=True, help="why (kept verbatim as Slurm's reason)")
@db_option
@slurm_option
@controller_options
def drain(node: str, reason: str, db: str, slurm: str, **options: Any) -> None:
    """Drain NODE (a hostlist: n[1-4]) by hand. gpufleet never resumes a node drained this way.

    With --controller it asks the controller (admins only: root or the admin group)."""
    _node_action("drain", node, reason, db, slurm, options)


@click.command()
@click.argument("node")
@db_option
@slurm_option
@controller_options
def resume(node: str, db: str, slurm: str, **options: Any) -> None:
    """Resume NODE (a hostlist: n[1-4]) by hand, whoever drained it (recorded with your name).

    With --controller it asks the controller (admins only: root or the admin group)."""
    _node_action("resume", node, "", db, slurm, options)


@click.command()
@db_option
@click.option("--since", default="1d", show_default=True,
              help="how far back: 30m, 2h, 1d, 1w or an ISO time")
@click.option("--node", help="only this node")
@click.option("--limit", type=click.IntRange(1, 100_000), default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def events(db: str, since: str, node: str | None, limit: int, as_json: bool) -> None:
    """Health events from the agents and gpufleet's actions, oldest first."""
    from gpufleet.scheduler.health.admin import AdminError, format_ts, parse_since, timeline

    try:
        since_ms = parse_since(since)
    except AdminError as err:
        raise click.BadParameter(str(err), param_hint="--since") from err
    store = open_existing_store(db)
    entries = timeline(store, node, since_ms, limit)
    store.close()
    if as_json:
        click.echo(json.dumps([t.as_dict() for t in entries], indent=2))
        return
    click.echo(f"{'TIME':<19} {'NODE':<10} {'WHAT':<6} {'KIND':<8} {'STATUS':<8} {'ACTOR':<8} TEXT")
    for t in entries:
        click.echo(f"{format_ts(t.ts_ms)} {t.node:<10} {t.what:<6} {t.kind:<8} "
                   f"{t.severity_or_status:<8} {t.actor:<8} {t.text}")


