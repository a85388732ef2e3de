"""`gpufleet controller`: run the controller (the systemd service runs this)."""

from __future__ import annotations

import signal
from typing import Any

import click
from gpufleet.rpc.settings import FiniteRange, HostPort
from gpufleet.scheduler.cli.repair import alert_sender, repair_config, repair_options
from gpufleet.scheduler.cli.settings import db_option, setup_logging
from gpufleet.scheduler.store import StoreError, open_store


@click.command()
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
              help="signal and requeue checkpointing jobs on a node that turns fatal (every "
              "Slurm client; off with --slurm none)")
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
@click.option("--standby-ingests", is_flag=True, envvar="GPUFLEET_STANDBY_INGESTS",
              help="while not the leader (PostgreSQL store), still take agents' streams and "
              "store their reports; only the leader acts in Slurm (several ingest processes: "
              "docs/scaling.md). Default: a standby refuses agents")
@click.option("--switch-holds", is_flag=True,
              help="have `gpufleet sbatch` keep multi-node jobs on one leaf switch, waiting "
              "for one at most --switch-hold-grace-s past the moment they could start across "
              "leaves: fewer leaves per job for a little more wait on a full cluster "
              "(docs/placement.md). Default: off, a job never waits for a leaf")
@click.option("--switch-hold-grace-s", type=FiniteRange(0, 119), default=1.0,
              show_default=True,
              help="with --switch-holds: how long a held job may wait for one leaf once it "
              "could start across leaves; then its switch count is dropped")
@repair_options
@click.option("-v", "--verbose", count=True)
def controller(  # noqa: PLR0915 - every option to its part, then the process's life, in order
    listen: str, db: str, slurm: str, slurm_rest_socket: str | None, slurm_rest_url: str | None,
    slurm_jwt_file: str | None, shadow: bool, resume_quiet_s: float,
    unreachable_after_s: float, reassert_s: float, drain_unreachable: bool,
    degraded_weight: int,
    degraded_feature: str, metrics_listen: str, tls_ca: str | None, tls_cert: str | None,
    tls_key: str | None, insecure: bool, recover: bool, recovery_grace_s: float,
    recovery_max_restarts: int, recovery_signal: str, munge_socket: str, admin_group: str,
    audit_log: str | None, standby_ingests: bool, switch_holds: bool,
    switch_hold_grace_s: float, verbose: int,
    **repair_opts: Any,
) -> None:
    """Run the controller (the systemd service runs this).

    Users' calls (gpufleet acct/jobs/sbatch/drain/resume --controller) are authenticated by
    MUNGE through --munge-socket, also with --insecure: a user's identity never comes from
    TLS or from anything the request says.
    """
    from gpufleet.rpc.daemon import notify as sd_notify
    from gpufleet.scheduler.access import audit
    from gpufleet.scheduler.access.tls import TlsConfigError, from_options
    from gpufleet.scheduler.health.policy import PolicyConfig
    from gpufleet.scheduler.service.server import Controller, tune_gc
    from gpufleet.scheduler.slurm import CliSlurmClient

    setup_logging(verbose)
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
    if standby_ingests and not db.startswith(("postgresql://", "postgres://")):
        raise click.UsageError("--standby-ingests needs a PostgreSQL store (--db "
                               "postgresql://...): only it can be shared by several processes")
    try:
        store = open_store(db)
    except StoreError as e:
        raise click.ClickException(str(e)) from e
    recovery = None
    if recover and slurm != "none":  # none: no jobs to read, nothing to requeue
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
            repair=repair, repair_journal=journal, alerts=alert_sender(repair_opts),
            standby_ingests=standby_ingests,
            # the sbatch filter's switch holds are judged on the commands Place reads
            switch_holds_slurm=CliSlurmClient() if switch_holds and slurm != "none" else None,
            switch_hold_grace_s=switch_hold_grace_s)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    try:
        ctl.start()
    except OSError as e:
        raise click.ClickException(f"cannot listen on {listen}: {e}") from e
    tune_gc()  # started: the young generation collected less often (docs/scaling.md)
    click.echo(
        f"gpufleet controller listening on {listen} ({'plaintext' if tls is None else 'mTLS'}), "
        f"store {db}{', shadow mode' if shadow or slurm == 'none' else ''}"
        f"{'' if ctl.active else ', standby'}"
        f"{', ingesting as standby' if ctl.standby_ingests and not ctl.active else ''}",
        err=True,
    )

    sd_notify("READY=1")  # systemd Type=notify: started once agents can connect

    def _stop(signum: int, _frame: Any) -> None:
        sd_notify("STOPPING=1")
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


