"""`gpufleet jobs show JOBID`: a job's recoveries (fault -> drain -> signal -> requeue -> running
again, lost work) and its last registered checkpoint, read from the controller's store.

Read only: it never talks to Slurm and never changes the store. With `--controller HOST:PORT`
it asks the controller (MUNGE-authenticated): a user may read their own jobs, admins any.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from gpufleet.scheduler.cli.settings import DEFAULT_DB
from gpufleet.scheduler.service.user_client import (
    UserClientError,
    click_error,
    connect,
    controller_options,
)
from gpufleet.scheduler.store import CheckpointRow, RecoveryRow, StateStore, StoreError, open_store

STEPS = (("drain", "drain_ms"), ("signal", "signal_ms"), ("requeue", "requeue_ms"),
         ("running again", "running_ms"))


def _open(db: str) -> StateStore:
    if "://" not in db and not Path(db).exists():
        raise click.ClickException(
            f"no gpufleet store at {db}: is the controller running, or pass --db/GPUFLEET_DB")
    try:
        return open_store(db)
    except StoreError as e:
        raise click.ClickException(str(e)) from e


def _ts(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def format_recovery(r: RecoveryRow, n: int) -> list[str]:
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
    if not job_id.isdigit():
        raise click.BadParameter(f"{job_id!r}: a Slurm job id is digits", param_hint="JOBID")
    if controller:
        client = connect(controller, tls_ca, tls_cert, tls_key, insecure, munge_socket)
        try:
            with client:
                reply = client.show_job(job_id)
        except UserClientError as e:
            raise click_error(e) from e
        got_recs, got_ckpt, owner = _from_reply(reply)
        _show(job_id, got_recs, got_ckpt, as_json, owner)
        return
    store = _open(db)
    try:
        recs = store.recoveries(job_id)
        ckpt: CheckpointRow | None = store.checkpoint(job_id)
    except StoreError as e:
        raise click.ClickException(str(e)) from e
    finally:
        store.close()
    if not recs and ckpt is None:
        raise click.ClickException(
            f"job {job_id}: no recovery and no checkpoint recorded in the store at {db}")
    _show(job_id, recs, ckpt, as_json)


def _from_reply(reply: Any) -> tuple[list[RecoveryRow], CheckpointRow | None, str]:
    """The controller's ShowJobReply as the rows the store would have given."""
    def opt(msg: Any, name: str) -> Any:
        return getattr(msg, name) if msg.HasField(name) else None

    ckpt = None
    if reply.HasField("checkpoint_step"):
        ckpt = CheckpointRow(reply.job_id, "", reply.checkpoint_step, reply.checkpoint_path,
                             opt(reply, "checkpoint_ms") or 0, None, 0)
    recs = [RecoveryRow(0, reply.job_id, r.node, r.status, r.detail, r.restart,
                        opt(r, "fault_ms"), opt(r, "drain_ms"), opt(r, "signal_ms"),
                        opt(r, "requeue_ms"), opt(r, "running_ms"), opt(r, "checkpoint_step"),
                        opt(r, "checkpoint_ms"), opt(r, "lost_work_ms"), r.created_ms)
            for r in reply.recoveries]
    return recs, ckpt, reply.user


def _show(job_id: str, recs: list[RecoveryRow], ckpt: CheckpointRow | None, as_json: bool,
          owner: str | None = None) -> None:
    if as_json:
        doc: dict[str, Any] = {
            "job_id": job_id,
            "checkpoint": asdict(ckpt) if ckpt else None,
            "recoveries": [asdict(r) for r in recs],
        }
        if owner is not None:
            doc["user"] = owner
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"job {job_id}" + (f" (user {owner})" if owner else ""))
    if ckpt is not None:
        where = f" on {ckpt.node}" if ckpt.node else ""  # the controller's reply has no node
        click.echo(f"  last checkpoint: step {ckpt.step} at {_ts(ckpt.time_ms)}{where} "
                   f"({ckpt.path})")
    else:
        click.echo("  last checkpoint: none registered")
    if not recs:
        click.echo("  no recoveries")
    for n, r in enumerate(recs, 1):
        for line in format_recovery(r, n):
            click.echo(line)
