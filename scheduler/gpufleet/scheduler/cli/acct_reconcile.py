"""`gpufleet acct reconcile`: the ledger's allocated GPU-seconds against Slurm's accounting.

Reads `sacct --json` (or a saved copy) and the store; prints per job Slurm's GPU-seconds
(AllocTRES gres/gpu x Elapsed), gpufleet's, and the difference. Exit status: 0 all jobs
agree, 1 a job differs or is missing on one side, 2 nothing could be compared (sacct or the
store failed, or sacct's output is unreadable). Never changes the store or Slurm.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from datetime import datetime
from pathlib import Path
from typing import TextIO

import click
from gpufleet.rpc.settings import FiniteRange
from gpufleet.scheduler.accounting.ledger import UsageQuery, UsageTotal
from gpufleet.scheduler.cli.acct import parse_window
from gpufleet.scheduler.cli.settings import DEFAULT_DB
from gpufleet.scheduler.slurm import SlurmError, SlurmVersion
from gpufleet.scheduler.slurm.cli import run_sacct_json
from gpufleet.scheduler.slurm.sacct import (
    BAD_STATUSES,
    Reconciled,
    SacctJob,
    SacctParseError,
    parse_sacct_json,
    reconcile_jobs,
)
from gpufleet.scheduler.store import StoreError, open_store

EXIT_MISMATCH = 1
_JOB_ID = re.compile(r"^[0-9]{1,12}([_+][0-9]{1,9})?$")  # as the ledger and sacct write them
SACCT_TIMEOUT_S = 120.0
_COLUMNS = ("job_id", "user", "account", "state", "slurm_runs", "slurm_gpus", "slurm_elapsed_s",
            "slurm_gpu_s", "gpufleet_runs", "gpufleet_gpus", "gpufleet_gpu_s", "diff_gpu_s",
            "status")


class ReconcileError(click.ClickException):
    """Nothing could be compared: exit 2, so scripts tell it from a mismatch (1)."""

    exit_code = 2


def _sacct_time(ms: int) -> str:
    """sacct's -S/-E in local time, to the second (what sacct parses unambiguously)."""
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%dT%H:%M:%S")


def run_sacct(sacct: str, args: list[str]) -> tuple[str, SlurmVersion]:
    """`sacct --json --allusers --duplicates ARGS` and that sacct's version (for its
    schema): every user's jobs (needs an operator or SlurmUser), every run of a requeued job."""
    exe = shutil.which(sacct)
    if exe is None:
        raise ReconcileError(f"{sacct!r} not found: install the Slurm client or pass --sacct")
    try:
        return run_sacct_json(exe, args, SACCT_TIMEOUT_S)
    except SlurmError as e:
        raise ReconcileError(str(e)) from e


def _parse(text: str, source: str, job_ids: tuple[str, ...],
           version: SlurmVersion | None = None) -> list[SacctJob]:
    try:
        jobs = parse_sacct_json(text, source, version)
    except SacctParseError as e:
        raise ReconcileError(str(e)) from e
    if job_ids:  # 22.05's --json output may ignore filters: filter here as well
        jobs = [j for j in jobs if j.job_id in job_ids]
    return jobs


def _ledger(db: str, q: UsageQuery) -> list[UsageTotal]:
    if "://" not in db and not Path(db).exists():
        raise ReconcileError(f"no gpufleet store at {db}: pass --db or GPUFLEET_DB")
    try:
        store = open_store(db)
    except StoreError as e:
        raise ReconcileError(str(e)) from e
    try:
        return store.usage(q)
    finally:
        store.close()


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _print_table(rows: list[Reconciled]) -> None:
    table = [[_fmt(r.to_json()[c]) for c in _COLUMNS] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(_COLUMNS)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(_COLUMNS, widths, strict=True)))
    click.echo("  ".join("-" * w for w in widths))
    for r, t in zip(rows, table, strict=True):
        line = "  ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)).rstrip()
        click.echo(line + (f"  ({r.reason})" if r.reason else ""))


@click.command("reconcile")
@click.option("--db", default=DEFAULT_DB, show_default=True, envvar="GPUFLEET_DB",
              help="state store: a SQLite file, or postgresql://USER@HOST/DB")
@click.option("-j", "--jobs", "jobs", help="only these job ids (comma-separated)")
@click.option("-S", "--starttime", "start", help="window start [default: now-1day; all with -j]")
@click.option("-E", "--endtime", "end", help="window end [default: now]")
@click.option("--tolerance-s", type=FiniteRange(0, 86400), default=1.0, show_default=True,
              help="allowed difference per allocated GPU and per run, in seconds (Slurm "
              "keeps whole seconds)")
@click.option("--sacct", "sacct", default="sacct", show_default=True,
              help="the sacct program (SLURM_CONF in the environment picks the cluster)")
@click.option("--sacct-json", "sacct_json", type=click.File("r"),
              help="read a saved `sacct --json` instead of running sacct ('-': stdin)")
@click.option("--json", "as_json", is_flag=True, help="JSON: jobs, counts and the verdict")
def reconcile_cmd(db: str, jobs: str | None, start: str | None, end: str | None,
                  tolerance_s: float, sacct: str, sacct_json: TextIO | None,
                  as_json: bool) -> None:
    """Compare allocated GPU-seconds per job with Slurm's (AllocTRES gres/gpu x Elapsed)."""
    job_ids, since, until = _window(jobs, start, end)
    sacct_args: list[str] = []
    if job_ids:
        sacct_args += ["-j", ",".join(job_ids)]
    if since is not None:
        sacct_args += ["-S", _sacct_time(since)]
    if until is not None:
        sacct_args += ["-E", _sacct_time(until)]
    if sacct_json is not None:
        source = getattr(sacct_json, "name", "--sacct-json")
        try:
            text = sacct_json.read()
        except (UnicodeDecodeError, OSError) as e:
            raise click.BadParameter(f"{source}: cannot read as text: {e}",
                                     param_hint="--sacct-json") from e
        slurm = _parse(text, source, job_ids)
    else:
        text, version = run_sacct(sacct, sacct_args)
        slurm = _parse(text, "sacct --json", job_ids, version)
    ledger = _ledger(db, UsageQuery(jobs=job_ids, since_ms=since, until_ms=until,
                                    group_by="job"))
    # the two windows are not drawn quite alike (sacct's by job state, the ledger's by the
    # hook times): ask sacct once more, without a window, for ledger jobs it did not list
    unknown = sorted({t.key for t in ledger} - {j.job_id for j in slurm})
    if unknown and sacct_json is None and not job_ids:
        text, version = run_sacct(sacct, ["-j", ",".join(unknown)])
        slurm += _parse(text, "sacct --json", tuple(unknown), version)
    rows = reconcile_jobs(slurm, ledger, tolerance_s)
    bad = [r for r in rows if r.status in BAD_STATUSES]
    if as_json:
        counts: dict[str, int] = {}
        for r in rows:
            counts[r.status] = counts.get(r.status, 0) + 1
        click.echo(json.dumps({"since_ms": since, "until_ms": until, "tolerance_s": tolerance_s,
                               "ok": not bad, "counts": counts,
                               "jobs": [r.to_json() for r in rows]}, indent=2))
    elif rows:
        _print_table(rows)
        click.echo(f"{len(rows)} job(s), {len(bad)} mismatched or missing")
    else:
        click.echo("no GPU jobs in the window on either side")
    if bad:
        sys.exit(EXIT_MISMATCH)


def _window(jobs: str | None, start: str | None, end: str | None
            ) -> tuple[tuple[str, ...], int | None, int | None]:
    """(job ids, since ms, until ms) from -j/-S/-E, defaulting like `gpufleet acct`."""
    job_ids = tuple(j.strip() for j in (jobs or "").split(",") if j.strip())
    for j in job_ids:
        if not _JOB_ID.match(j):
            raise click.BadParameter(f"{j!r} is not a Slurm job id", param_hint="-j/--jobs")
    since, until = parse_window(start, end, bool(job_ids))
    return job_ids, since, until


reconcile = reconcile_cmd  # the name cli.py registers
