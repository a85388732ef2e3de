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
from gpufleet.rpc.settings import FiniteRange, HostPort
from gpufleet.scheduler import __version__
from gpufleet.scheduler.cli.extras import ExtrasGroup, unavailable
from gpufleet.scheduler.cli.repair import (
    alert_sender,
    nodes_history_command,
    repair_config,
    repair_group,
    repair_options,
)
from gpufleet.scheduler.service.user_client import controller_options
from gpufleet.scheduler.store import StateStore, StoreError, now_ms, open_store

DEFAULT_CONFIG = Path("/etc/gpufleet/controller.toml")
DEFAULT_DB = "/var/lib/gpufleet/state.db"
# keys of controller.toml: the `controller` command's options (the admin commands read `db`
# and `slurm` from the same file)
CONFIG_KEYS = {
    "listen", "db", "slurm", "slurm_rest_socket", "slurm_rest_url", "slurm_jwt_file", "shadow",
    "resume_quiet_s", "unreachable_after_s", "reassert_s",
    "drain_unreachable", "degraded_weight", "degraded_feature", "metrics_listen",
    "tls_ca", "tls_cert", "tls_key", "insecure",
    "recover", "recovery_grace_s", "recovery_max_restarts", "recovery_signal",
    "munge_socket", "admin_group", "audit_log",
    # the repair loop (gpufleet.scheduler.cli.repair)
    "repair", "repair_journal", "repair_policy", "repair_max_per_partition",
    "repair_fail_limit", "repair_fail_window_s", "repair_diag_level", "repair_shadow",
    "alertmanager_url", "alert_webhook_url",
}
_ADMIN_KEYS = {"db", "slurm"}
# the agent simulator's profiles (gpufleet.agent.nvml_sim.PROFILES; the controller does not
# import the agent: tests/test_cli_bad_input.py checks the two agree)
DEMO_PROFILES = ("dgx-h100", "hgx-a100", "l40s-pcie", "a100-pcie-bridged")


def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    path = Path(value) if value else DEFAULT_CONFIG
    if value is None and not path.exists():
        return value
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as e:
        raise click.BadParameter(f"{path}: no such config file") from e
    except UnicodeDecodeError as e:
        raise click.BadParameter(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except PermissionError as e:
        if value is None:  # the controller's own file (0640 root:slurm): not for users
            return value
        raise click.BadParameter(f"{path}: cannot read: {e.strerror}") from e
    except OSError as e:
        raise click.BadParameter(f"{path}: cannot read: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise click.BadParameter(f"{path}: not valid TOML: {e}") from e
    unknown = sorted(set(data) - CONFIG_KEYS)
    if unknown:
        raise click.BadParameter(
            f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(CONFIG_KEYS))}"
        )
    if isinstance(data.get("repair_policy"), dict):  # {reboot = "ask"} -> ["reboot=ask"]
        data["repair_policy"] = [f"{k}={v}" for k, v in data["repair_policy"].items()]
    admin = {k: v for k, v in data.items() if k in _ADMIN_KEYS}
    journal = {k: v for k, v in data.items() if k == "repair_journal"}
    ctx.default_map = {
        "controller": data,
        "nodes": {"db": admin.get("db", DEFAULT_DB), "show": {"db": admin.get("db", DEFAULT_DB)},
                  "history": {"db": admin.get("db", DEFAULT_DB), **journal}},
        "repair": dict.fromkeys(("approve", "skip", "cancel", "list"), journal),
        "drain": admin,
        "resume": admin,
        "events": {k: v for k, v in admin.items() if k == "db"},
        "jobs": {"show": {"db": admin.get("db", DEFAULT_DB)}},
    }
    return value


def _open_existing_store(db: str) -> StateStore:
    if "://" not in db and not Path(db).exists():
        raise click.ClickException(
            f"no gpufleet store at {db}: is the controller running, or pass --db/GPUFLEET_DB"
        )
    try:
        return open_store(db)
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
    help="state store: a SQLite file, or postgresql://USER@HOST/DB (standby controllers share one)",
)


@click.group(
    cls=ExtrasGroup,
    context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "GPUFLEET"},
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
    type=HostPort(),
    default="0.0.0.0:50051",
    show_default=True,
    envvar="GPUFLEET_LISTEN",
    help="gRPC address agents connect to",
)
@db_option
@click.option(
    "--slurm",
    type=click.Choice(["cli", "rest", "pyslurm", "none"]),
    default="cli",
    show_default=True,
    envvar="GPUFLEET_SLURM",
    help="how to reach Slurm: its commands, slurmrestd, pyslurm; 'none' records actions "
    "without acting",
)
@click.option("--slurm-rest-socket", envvar="GPUFLEET_SLURM_REST_SOCKET",
              help="slurmrestd unix socket (with --slurm rest)")
@click.option("--slurm-rest-url", envvar="GPUFLEET_SLURM_REST_URL",
              help="slurmrestd http://HOST:PORT (with --slurm rest)")
@click.option("--slurm-jwt-file", envvar="GPUFLEET_SLURM_JWT_FILE",
              help="file holding the JWT for slurmrestd (re-read on every call)")
@click.option(
    "--shadow",
    is_flag=True,
    envvar="GPUFLEET_SHADOW",
    help="log and record what would be done; act on nothing",
)
@click.option(
    "--resume-quiet-s",
    type=FiniteRange(0, 30 * 86400),
    default=300.0,
    show_default=True,
    help="healthy this long before gpufleet resumes a node it drained / undoes 'degraded'",
)
@click.option(
    "--unreachable-after-s",
    type=FiniteRange(1, 86400),
    default=30.0,
    show_default=True,
    help="a node silent this long is 'unreachable' (alerted, not drained)",
)
@click.option(
    "--reassert-s",
    type=FiniteRange(0.1, 86400),
    default=30.0,
    show_default=True,
    help="how often degraded nodes' weight/feature are checked in Slurm and put back if "
         "lost (slurmctld forgets them when it restarts)",
)
@click.option("--drain-unreachable", is_flag=True, help="also drain unreachable nodes")
@click.option(
    "--degraded-weight",
    type=click.IntRange(0, 2**31 - 2),
    default=1000,
    show_default=True,
    help="Slurm Weight for degraded nodes (higher is chosen later)",
)
@click.option(
    "--degraded-feature",
    default="gf_degraded",
    show_default=True,
    help="Slurm feature added to degraded nodes; '' for none",
)
@click.option(
    "--metrics-listen",
    type=HostPort(allow_empty=True),
    default="0.0.0.0:9836",
    show_default=True,
    envvar="GPUFLEET_METRICS_LISTEN",
    help="Prometheus /metrics address; '' turns it off",
)
@click.option("--tls-ca", envvar="GPUFLEET_TLS_CA",
              help="cluster CA certificate: agents must present a certificate it signed")
@click.option("--tls-cert", envvar="GPUFLEET_TLS_CERT",
              help="this controller's certificate (`gpufleet certs issue HEAD --role controller`)")
@click.option("--tls-key", envvar="GPUFLEET_TLS_KEY", help="this controller's key")
@click.option("--insecure", is_flag=True, envvar="GPUFLEET_INSECURE",
              help="serve plaintext without client certificates (demo only: any client can "
              "claim any node)")
@click.option("--recover/--no-recover", default=True, show_default=True,
              help="signal and requeue checkpointing jobs on a node that turns fatal (cli Slurm "
              "client only)")
@click.option("--recovery-grace-s", type=FiniteRange(0, 3600), default=5.0,
              show_default=True, help="default time a job gets to checkpoint after the signal")
@click.option("--recovery-max-restarts", type=click.IntRange(0, 1000), default=3,
              show_default=True, help="default restarts per job")
@click.option("--recovery-signal", default="USR1", show_default=True,
              help="signal sent to the job's batch shell (GPUFLEET_CKPT_SIGNAL)")
@click.option("--munge-socket", default="/run/munge/munge.socket.2", show_default=True,
              envvar="GPUFLEET_MUNGE_SOCKET",
              help="munged socket that verifies users' MUNGE credentials (acct, jobs, sbatch "
              "placement, drain/resume over gRPC)")
@click.option("--admin-group", default="gpufleet-admins", show_default=True,
              envvar="GPUFLEET_ADMIN_GROUP",
              help="Unix group whose members may drain, resume and read everything; root "
              "always may. A group missing on this host (or '') leaves root the only admin")
@click.option("--audit-log", type=click.Path(dir_okay=False), envvar="GPUFLEET_AUDIT_LOG",
              help="also append audit records (JSON lines) to this file [default: the "
              "gpufleet.audit logger only]")
@repair_options
@click.option("-v", "--verbose", count=True)
def controller(
    listen: str, db: str, slurm: str, slurm_rest_socket: str | None, slurm_rest_url: str | None,
    slurm_jwt_file: str | None, shadow: bool, resume_quiet_s: float,
    unreachable_after_s: float, reassert_s: float, drain_unreachable: bool,
    degraded_weight: int,
    degraded_feature: str, metrics_listen: str, tls_ca: str | None, tls_cert: str | None,
    tls_key: str | None, insecure: bool, recover: bool, recovery_grace_s: float,
    recovery_max_restarts: int, recovery_signal: str, munge_socket: str, admin_group: str,
    audit_log: str | None, verbose: int, **repair_opts: Any,
) -> None:
    """Run the controller (the systemd service runs this).

    Users' calls (gpufleet acct/jobs/sbatch/drain/resume --controller) are authenticated by
    MUNGE through --munge-socket, also with --insecure: a user's identity never comes from
    TLS or from anything the request says.
    """
    from gpufleet.scheduler.access import audit
    from gpufleet.scheduler.access.tls import TlsConfigError, from_options
    from gpufleet.scheduler.health.policy import PolicyConfig
    from gpufleet.scheduler.observability import sdnotify
    from gpufleet.scheduler.service.server import Controller

    _setup_logging(verbose)
    if audit_log:
        audit.configure(audit_log)
    try:
        tls = from_options(tls_ca, tls_cert, tls_key, insecure)
        if tls is not None:
            tls.credentials()  # unreadable files are a start-up error, not a silent port
    except TlsConfigError as e:
        raise click.UsageError(str(e)) from e
    try:
        policy = PolicyConfig(
            resume_quiet_s=resume_quiet_s, unreachable_after_s=unreachable_after_s,
            drain_unreachable=drain_unreachable, degraded_weight=degraded_weight,
            degraded_feature=degraded_feature, reassert_s=reassert_s,
        ).validate()
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    try:
        store = open_store(db)
    except StoreError as e:
        raise click.ClickException(str(e)) from e
    recovery = None
    if recover and slurm == "cli":
        from gpufleet.scheduler.recovery.manager import RecoveryConfig

        recovery = RecoveryConfig(signal=recovery_signal, grace_s=recovery_grace_s,
                                  max_restarts=recovery_max_restarts)
    journal = repair_opts.pop("repair_journal")
    repair = repair_config(repair_opts)
    if repair is not None and slurm != "cli":
        raise click.UsageError("--repair needs --slurm cli (it runs `scontrol reboot`)")
    try:
        ctl = Controller(
            store, _make_slurm(slurm, slurm_rest_socket, slurm_rest_url, slurm_jwt_file),
            listen, shadow, policy=policy, metrics_listen=metrics_listen or None, tls=tls,
            recovery=recovery, munge_socket=munge_socket, admin_group=admin_group or None,
            repair=repair, repair_journal=journal, alerts=alert_sender(repair_opts))
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    try:
        ctl.start()
    except OSError as e:
        raise click.ClickException(f"cannot listen on {listen}: {e}") from e
    click.echo(
        f"gpufleet controller listening on {listen} ({'plaintext' if tls is None else 'mTLS'}), "
        f"store {db}{', shadow mode' if shadow or slurm == 'none' else ''}"
        f"{'' if ctl.active else ', standby'}",
        err=True,
    )

    sdnotify.notify("READY=1")  # systemd Type=notify: started once agents can connect

    def _stop(signum: int, _frame: Any) -> None:
        sdnotify.notify("STOPPING=1")
        ctl.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    ctl.wait()
    store.close()


def _make_slurm(
    kind: str, rest_socket: str | None, rest_url: str | None, jwt_file: str | None
) -> Any:
    from gpufleet.scheduler.slurm import SlurmError, make_slurm_client

    options: dict[str, Any] = {}
    if kind == "rest":
        if not (rest_socket or rest_url):
            raise click.UsageError("--slurm rest needs --slurm-rest-socket or --slurm-rest-url")
        options = {"socket_path": rest_socket, "url": rest_url, "token_file": jwt_file}
        options = {k: v for k, v in options.items() if v}
    try:
        return make_slurm_client(kind, **options)
    except (SlurmError, ImportError) as e:
        raise click.ClickException(str(e)) from e


def _age(ms: int) -> str:
    s = max(0.0, (now_ms() - ms) / 1000.0)
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h"


@main.group(invoke_without_command=True)
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
    store = _open_existing_store(db)
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

    store = _open_existing_store(db)
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


def _slurm_for_admin(slurm: str) -> Any:
    from gpufleet.scheduler.slurm import CliSlurmClient

    if slurm == "none":
        raise click.UsageError("drain/resume act on Slurm: --slurm none cannot do that")
    return CliSlurmClient()


slurm_option = click.option(
    "--slurm",
    type=click.Choice(["cli"]),
    default="cli",
    show_default=True,
    envvar="GPUFLEET_SLURM",
    help="how to reach Slurm",
)


def _node_action_via_controller(action: str, node_expr: str, reason: str,
                                 options: dict[str, Any]) -> None:
    """drain/resume through the controller's FleetUser service (MUNGE-authenticated; admins
    only). NODE may be a hostlist (n[1-4]) there."""
    from gpufleet.scheduler.service.user_client import UserClientError, click_error, connect
    from gpufleet.scheduler.slurm import SlurmError, expand_hostlist

    try:
        nodes = expand_hostlist(node_expr)
    except SlurmError as e:
        raise click.BadParameter(str(e), param_hint="NODE") from e
    client = connect(**options)
    try:
        with client:
            reply = (client.drain(nodes, reason) if action == "drain"
                     else client.resume(nodes))
    except UserClientError as e:
        raise click_error(e) from e
    for n in reply.changed:
        click.echo(f"{action} {n}: done")
    state = "drained" if action == "drain" else "not drained"
    for n in reply.unchanged:
        click.echo(f"{action} {n}: unchanged (already {state})")


@main.command()
@click.argument("node")
@click.option("--reason", required=True, help="why (kept verbatim as Slurm's reason)")
@db_option
@slurm_option
@controller_options
def drain(node: str, reason: str, db: str, slurm: str, controller: str | None,
          **options: Any) -> None:
    """Drain NODE by hand. gpufleet never resumes a node drained this way.

    With --controller it asks the controller (admins only: root or the admin group)."""
    from gpufleet.scheduler.health.admin import AdminError, caller_name
    from gpufleet.scheduler.health.admin import drain as do_drain

    if controller:
        _node_action_via_controller("drain", node, reason, {"controller": controller,
                                                           **options})
        return
    store = _open_existing_store(db)
    try:
        click.echo(do_drain(store, _slurm_for_admin(slurm), node, reason, caller_name()))
    except AdminError as e:
        raise click.ClickException(str(e)) from e
    finally:
        store.close()


@main.command()
@click.argument("node")
@db_option
@slurm_option
@controller_options
def resume(node: str, db: str, slurm: str, controller: str | None, **options: Any) -> None:
    """Resume NODE by hand, whoever drained it (recorded with your name).

    With --controller it asks the controller (admins only: root or the admin group)."""
    from gpufleet.scheduler.health.admin import AdminError, caller_name
    from gpufleet.scheduler.health.admin import resume as do_resume

    if controller:
        _node_action_via_controller("resume", node, "", {"controller": controller, **options})
        return
    store = _open_existing_store(db)
    try:
        click.echo(do_resume(store, _slurm_for_admin(slurm), node, caller_name()))
    except AdminError as e:
        raise click.ClickException(str(e)) from e
    finally:
        store.close()


@main.command()
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
    store = _open_existing_store(db)
    entries = timeline(store, node, since_ms, limit)
    store.close()
    if as_json:
        click.echo(json.dumps([t.as_dict() for t in entries], indent=2))
        return
    click.echo(f"{'TIME':<19} {'NODE':<10} {'WHAT':<6} {'KIND':<8} {'STATUS':<8} {'ACTOR':<8} TEXT")
    for t in entries:
        click.echo(f"{format_ts(t.ts_ms)} {t.node:<10} {t.what:<6} {t.kind:<8} "
                   f"{t.severity_or_status:<8} {t.actor:<8} {t.text}")


@main.command()
@click.option(
    "--nodes",
    "node_count",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="simulated GPU nodes to start (named n1..nN)",
)
@click.option("--profile", type=click.Choice(DEMO_PROFILES), default="dgx-h100",
              show_default=True, help="simulated hardware")
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
    import importlib.util

    from gpufleet.scheduler.cli.demo import run_demo

    lacking = [m for m in ("psutil", "prometheus_client") if importlib.util.find_spec(m) is None]
    if lacking:  # the agents it starts would each die on the import
        raise click.ClickException(
            f"`gpufleet demo` runs simulated agents here too, and they need {', '.join(lacking)}: "
            "pip install 'gpufleet[agent,controller]'")

    sys.exit(run_demo(node_count, profile, fault_node, slurm, keep_drained))


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
    acct = _add("gpufleet.scheduler.cli.acct", "acct", "acct", "GPU accounting")
    if isinstance(acct, click.Group):
        from gpufleet.scheduler.cli.acct_reconcile import reconcile

        acct.add_command(reconcile)  # `gpufleet acct reconcile`: against sacct
    main.add_command(repair_group)
    nodes.add_command(nodes_history_command(_open_existing_store, db_option))


_register_command_groups()

if __name__ == "__main__":
    main()
