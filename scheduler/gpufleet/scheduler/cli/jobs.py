"""`gpufleet jobs show JOBID`: a job's recoveries (fault -> drain -> signal -> requeue -> running
again, lost work) and its last registered checkpoint, as the controller's store has them.

Read only: it never talks to Slurm and never changes the store. Two ways in, one answer
(cli/userapi.py): `--db` reads the store, `--controller HOST:PORT` asks the controller
(MUNGE-authenticated): a user may read their own jobs, admins any. A job nothing is recorded
about is an error (exit 1) either way.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import click
from gpufleet.scheduler.cli.settings import DEFAULT_DB
from gpufleet.scheduler.cli.userapi import ask, user_api
from gpufleet.scheduler.service.user_client import controller_options
from gpufleet.scheduler.userapi.model import JobRecovery, JobReport

STEPS = (("drain", "drain_ms"), ("signal", "signal_ms"), ("requeue", "requeue_ms"),
         ("running again", "running_ms"))


def _ts(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def format_recovery(r: JobRecovery, n: int) -> list[str]:
    """Human-readable lines of one recovery: each step as seconds after the fault."""
    lines = [f"recovery {n}: node {r.node}, status {r.status}, restart {r.restart}"]
    base = r.fault_ms if r.fault_ms is not None else r.created_ms
    label = "fault" if r.fault_ms is not None else "noticed"
    lines.append(f"  {label:<14} {_ts(base)}")
    for name, field in STEPS:
        at = getattr(r, field)
        shown = f"+{(at - base) / 1000:.2f} s" if at is not None else "-"
        lines.append(f"  {name:<14} {shown}")
    if r.lost_work_ms is not None:
        since = (f"checkpoint step {r.checkpoint_step}" if r.checkpoint_step is not None
                 else "the job's start (no checkpoint registered)")
        lines.append(f"  {'lost work':<14} {r.lost_work_ms / 1000:.2f} s (since {since})")
    if r.detail:
        lines.append(f"  {'detail':<14} {r.detail}")
    return lines


@click.group("jobs")
def jobs() -> None:
    """Jobs as gpufleet saw them: checkpoints registered, recoveries from node faults."""


@jobs.command("show")
@click.argument("job_id")
@click.option("--db", default=DEFAULT_DB, show_default=True, envvar="GPUFLEET_DB",
              help="state store: a SQLite file, or postgresql://USER@HOST/DB")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@controller_options
def jobs_show(job_id: str, db: str, as_json: bool, controller: str | None,
              tls_ca: str | None, tls_cert: str | None, tls_key: str | None, insecure: bool,
              munge_socket: str | None) -> None:
    """One job's recoveries, step by step, and its last registered checkpoint."""
    if not job_id.isdecimal():
        raise click.BadParameter(f"{job_id!r}: a Slurm job id is digits", param_hint="JOBID")
    with user_api(db, controller, tls_ca, tls_cert, tls_key, insecure, munge_socket) as api:
        job = ask(lambda: api.show_job(job_id))
    _show(job, as_json)


def _show(job: JobReport, as_json: bool) -> None:
    if as_json:
        doc: dict[str, Any] = asdict(job)
        doc["recoveries"] = list(doc["recoveries"])
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"job {job.job_id}" + (f" (user {job.user})" if job.user else ""))
    ckpt = job.checkpoint
    if ckpt is not None:
        where = f" on {ckpt.node}" if ckpt.node else ""
        click.echo(f"  last checkpoint: step {ckpt.step} at {_ts(ckpt.time_ms)}{where} "
                   f"({ckpt.path})")
    else:
        click.echo("  last checkpoint: none registered")
    if not job.recoveries:
        click.echo("  no recoveries")
    for n, r in enumerate(job.recoveries, 1):
        for line in format_recovery(r, n):
            click.echo(line)
