"""`gpufleet acct`: GPU time and energy per job, user, account or node, from the ledger.

Filters work like sacct's: a job is selected whole when it ran at any moment inside
[-S, -E); `--clip` instead counts only the usage inside the window (from the per-minute
rollups; user and account grouping only). Reads the store; never changes it.

Two ways in, one answer (cli/userapi.py): `--db` reads the store directly (root on the head
node), `--controller HOST:PORT` asks the controller over gRPC with the caller's MUNGE
credential; there a plain user sees only their own usage (naming another user is refused) and
admins see everything.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from datetime import datetime, timedelta
from typing import Any

import click
from gpufleet.scheduler.accounting.ledger import GROUP_BY, UsageQuery, UsageTotal
from gpufleet.scheduler.cli.settings import DEFAULT_DB
from gpufleet.scheduler.cli.userapi import ask, user_api
from gpufleet.scheduler.service.user_client import controller_options
from gpufleet.scheduler.userapi.model import JOB_ID, NAME

_RELATIVE = re.compile(r"^now(?:-([0-9]+)(s|min|h|d|days?|weeks?))?$")
_UNIT_S = {"s": 1, "min": 60, "h": 3600, "d": 86400, "day": 86400, "days": 86400,
           "week": 604800, "weeks": 604800}
COLUMNS = ("jobs", "gpus", "alloc_gpu_s", "busy_gpu_s", "busy_pct", "energy_j", "lost_gpu_s")


def parse_time(text: str, option: str, now: datetime | None = None) -> int:
    """'2024-05-01', '2024-05-01T08:00[:00]', 'now', 'now-7days', 'now-2h' -> epoch ms."""
    now = now or datetime.now().astimezone()
    m = _RELATIVE.match(text.strip())
    if m:
        n = int(m.group(1) or 0)
        return int((now - timedelta(seconds=n * _UNIT_S.get(m.group(2) or "s", 1))
                    ).timestamp() * 1000)
    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a time: use YYYY-MM-DD[THH:MM[:SS]], 'now' or 'now-<N><s|min|h|"
            f"days|weeks>'", param_hint=option) from None
    if dt.tzinfo is None:
        dt = dt.astimezone()  # local time, like sacct
    return int(dt.timestamp() * 1000)


def parse_window(start: str | None, end: str | None, have_jobs: bool
                 ) -> tuple[int | None, int | None]:
    """-S/-E in ms as sacct reads them: the default window is the last day; with -j, all time."""
    since = parse_time(start, "-S/--starttime") if start else (
        None if have_jobs else parse_time("now-1day", "-S"))
    until = parse_time(end, "-E/--endtime") if end else None
    if since is not None and until is not None and until <= since:
        raise click.BadParameter(f"{end!r} is not after the start {start!r}",
                                 param_hint="-E/--endtime")
    return since, until


def _split(value: str | None, option: str, pattern: re.Pattern[str], what: str
           ) -> tuple[str, ...]:
    if not value:
        return ()
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    for v in items:
        if not pattern.match(v):
            raise click.BadParameter(f"{v!r} is not a {what}", param_hint=option)
    return items


def _doc(t: UsageTotal, group_by: str) -> dict[str, Any]:
    d: dict[str, Any] = {group_by: t.key}
    if group_by == "job":
        d.update(user=t.user, account=t.account, start_ms=t.start_ms, end_ms=t.end_ms)
    d.update(
        jobs=t.jobs, gpus=t.gpus,
        alloc_gpu_s=round(t.allocated_ms / 1000.0, 3),
        busy_gpu_s=round(t.busy_ms / 1000.0, 3),
        busy_pct=round(100.0 * t.busy_ms / t.allocated_ms, 1) if t.allocated_ms else 0.0,
        energy_j=round(t.energy_mj / 1000.0, 3),
        lost_gpu_s=round(t.lost_ms / 1000.0, 3),
    )
    return d


def _total(rows: list[UsageTotal]) -> UsageTotal:
    return UsageTotal("TOTAL", sum(r.jobs for r in rows), sum(r.gpus for r in rows),
                      sum(r.allocated_ms for r in rows), sum(r.busy_ms for r in rows),
                      sum(r.energy_mj for r in rows), sum(r.lost_ms for r in rows))


@click.group("acct", invoke_without_command=True)
@click.option("--db", default=DEFAULT_DB, show_default=True, envvar="GPUFLEET_DB",
              help="state store: a SQLite file, or postgresql://USER@HOST/DB")
@click.option("-u", "--user", "users", help="only these users (comma-separated)")
@click.option("-A", "--account", "accounts", help="only these accounts (comma-separated)")
@click.option("-j", "--jobs", "jobs", help="only these job ids (comma-separated)")
@click.option("-S", "--starttime", "start", help="window start [default: now-1day, as sacct]")
@click.option("-E", "--endtime", "end", help="window end [default: now]")
@click.option("--group-by", type=click.Choice(GROUP_BY), default="job", show_default=True)
@click.option("--clip", is_flag=True,
              help="count only usage inside the window (per-minute rollups; user/account)")
@click.option("--json", "as_json", is_flag=True, help="JSON: rows and totals")
@click.option("--csv", "as_csv", is_flag=True, help="CSV, a TOTAL row last")
@controller_options
@click.pass_context
def acct(ctx: click.Context, db: str, users: str | None, accounts: str | None, jobs: str | None,
         start: str | None, end: str | None, group_by: str, clip: bool, as_json: bool,
         as_csv: bool, controller: str | None, tls_ca: str | None, tls_cert: str | None,
         tls_key: str | None, insecure: bool, munge_socket: str | None) -> None:
    """GPU-seconds allocated and busy, energy and time lost to failures, like sacct.

    With --controller a plain user sees only their own usage (no -u: yourself).
    `gpufleet acct reconcile --help`: compare with Slurm's own accounting (sacct)."""
    if ctx.invoked_subcommand is not None:
        return  # the subcommand has its own options
    if as_json and as_csv:
        raise click.UsageError("--json and --csv exclude each other")
    job_ids = _split(jobs, "-j/--jobs", JOB_ID, "Slurm job id")
    since, until = parse_window(start, end, bool(job_ids))
    q = UsageQuery(users=_split(users, "-u/--user", NAME, "user name"),
                   accounts=_split(accounts, "-A/--account", NAME, "account name"),
                   jobs=job_ids, since_ms=since, until_ms=until, group_by=group_by)
    if clip and (group_by not in ("user", "account") or q.users or q.accounts or q.jobs):
        raise click.UsageError("--clip works with --group-by user|account and no -u/-A/-j")
    with user_api(db, controller, tls_ca, tls_cert, tls_key, insecure, munge_socket) as api:
        rows = ask(lambda: api.usage(q, clip))
    _render(rows, group_by, since, until, as_json, as_csv)


def _render(rows: list[UsageTotal], group_by: str, since: int | None, until: int | None,
            as_json: bool, as_csv: bool) -> None:
    docs = [_doc(r, group_by) for r in rows]
    total = _doc(_total(rows), group_by)
    if as_json:
        click.echo(json.dumps({"group_by": group_by, "since_ms": since, "until_ms": until,
                               "rows": docs, "total": total}, indent=2))
        return
    keys = [group_by, *(["user", "account"] if group_by == "job" else []), *COLUMNS]
    if as_csv:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(docs)
        w.writerow(total)
        sys.stdout.write(buf.getvalue())
        return
    table = [[str(d.get(k, "")) for k in keys] for d in [*docs, total]]
    widths = [max(len(k), *(len(r[i]) for r in table)) for i, k in enumerate(keys)]
    click.echo("  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)))
    click.echo("  ".join("-" * w for w in widths))
    for r in table[:-1]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    click.echo("  ".join("=" * w for w in widths))
    click.echo("  ".join(c.ljust(w) for c, w in zip(table[-1], widths, strict=True)))
