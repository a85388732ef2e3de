"""The accounting ledger in the state store: per job x run x node x GPU, per job, and rollups.

Agents report CUMULATIVE totals per (job, run, node, GPU) (gpufleet.v1.JobGpuUsage). A report is
applied only when it is newer (as_of_ms) than the stored row, or it is the job's final one;
the job's totals and the rollups get the difference to the stored row, in the same
transaction. So a replayed, resent or reordered report never counts twice, whatever the
controller's sequence bookkeeping says, and a lost one is made good by the next.

Runs (migration 9): a requeued job runs again under the SAME job id (gpufleet's recovery,
`scontrol requeue`, `--requeue` on node failure). Each run is its own ledger row, keyed by
Slurm's restart count (`run`, from the Prolog: gpufleet.agent.accounting says why that and
not the start time); rows from before migration 9 and from agents that send no run are run 0.
A job's totals are the sums over all its runs.

Identity: a ledger row keeps the user, account and start of its first report, except that a
row first reported from the /proc safety net (`source` 'proc', approximate) takes them from
the hook's report ('hook', exact) once that comes. The per-minute rollups keep the usage
counted before that under the identity it was counted with (they hold no per-job rows).

Tables (migrations 6, 7 and 9), all kept in the transaction that changes the ledger:

* `acct_ledger`: one row per job x run x node x GPU, the newest cumulative totals;
* `acct_jobs`: one row per job: the sums of its ledger rows (all runs), its first start, the
  end of its latest run (NULL while that run is running), its GPUs (those of its largest
  run) and its number of runs; user and account from a hook row when it has one;
* `acct_minute` / `acct_day`: usage per (minute | UTC day, account, user), split over time
  (time-proportionally between two reports): the "clipped" view, `usage_by_minute`;
* `acct_jobday_account` / `acct_jobday_user`: each job's WHOLE totals counted on the UTC day
  it started (edge 'start') and, once it has ended, again on the day it ended (edge 'end').
  The jobs overlapping [since, until) are those started before `until` minus those that ended
  before `since`, so a month per account or per user is a few thousand rollup rows plus the
  jobs starting or ending on the two edge days: exact, and fast at millions of jobs;
* `acct_lost`: which killed run of a job was already charged lost time on which node, so a
  retried charge counts once.

Lost time (`lost_ms`): wall-clock milliseconds of work a job lost to a failure (from the
recovery timeline: the requeue minus its last checkpoint, or minus the start of the killed
run), charged to EACH GPU the job held on the node; a ledger row's lost_ms is therefore per
GPU, and the per-job and per-group sums are GPU-milliseconds (`gpufleet acct` shows them as
lost_gpu_s).

Written once in portable SQL (`?` placeholders); used by SqlStore as a mixin.

One module (~600 lines): the ledger's rules (above) and the SQL that keeps them, in one
transaction per report, are one invariant; its types are accounting/ledger.py's.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any

from gpufleet.scheduler.accounting.ledger import (
    DAY_MS,
    GROUP_BY,
    MINUTE_MS,
    UsageDelta,
    UsageQuery,
    UsageRow,
    UsageTotal,
    day_of,
    minute_split,
    spread,
)

from .migrations import ACCT_ROLLUP_BACKFILL, statements

__all__ = ["DAY_MS", "GROUP_BY", "MINUTE_MS", "AcctStoreMixin", "BulkWrite", "UsageDelta",
           "UsageQuery", "UsageRow", "UsageTotal", "day_of", "minute_split"]

# ids per `IN (...)` list: far below SQLite's 32,766 host parameters, short statements for PG
_IN_CHUNK = 500


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), _IN_CHUNK):
        yield items[i:i + _IN_CHUNK]


def _marks(n: int) -> str:
    return ", ".join("?" * n)


@dataclass
class _Gpu:
    """A ledger row, as stored or as this batch left it."""

    as_of_ms: int
    allocated_ms: int
    busy_ms: int
    energy_mj: int
    end_ms: int | None
    start_ms: int
    user: str
    account: str
    source: str


@dataclass(frozen=True)
class _Job:
    """An acct_jobs row."""

    user: str
    account: str
    start_ms: int
    end_ms: int | None
    gpus: int
    allocated_ms: int
    busy_ms: int
    energy_mj: int
    lost_ms: int
    runs: int = 1

    def sums(self) -> tuple[int, int, int, int, int, int]:
        return (1, self.gpus, self.allocated_ms, self.busy_ms, self.energy_mj, self.lost_ms)

    def edges(self) -> list[tuple[str, int]]:
        """The job-day rollup buckets this job counts in: its start day, and its end day."""
        out = [("start", day_of(self.start_ms))]
        if self.end_ms is not None:
            out.append(("end", day_of(self.end_ms)))
        return out


def _jobday_changes(before: _Job | None, after: _Job
                    ) -> dict[tuple[str, str, int, str], list[int]]:
    """(dimension, edge, day, key) -> what to add to that job-day rollup row, for one job that
    went from `before` (None: new) to `after`: its old contribution out, the new one in."""
    out: dict[tuple[str, str, int, str], list[int]] = {}
    for job, sign in ((before, -1), (after, 1)):
        if job is None:
            continue
        for edge, day in job.edges():
            for dim, key in (("account", job.account), ("user", job.user)):
                acc = out.setdefault((dim, edge, day, key), [0] * 6)
                for i, v in enumerate(job.sums()):
                    acc[i] += sign * v
    return {k: v for k, v in out.items() if any(v)}


_RowKey = tuple[int, str, int]  # (run, node, GPU) of one job's ledger row


def _job_of(rows: dict[_RowKey, _Gpu], stored: _Job | None) -> _Job:
    """A job's acct_jobs row from ALL its ledger rows (every run and node): sums over the
    runs; GPUs of its largest run; end of its latest run (None while it runs: a requeued job
    is running again); user and account from a hook row (the latest run's first) when there
    is one, else as stored (the first report's). Lost time is only ever added (stored)."""
    per_run: dict[int, list[_Gpu]] = defaultdict(list)
    for (run, _node, _gpu), g in sorted(rows.items()):
        per_run[run].append(g)
    latest = per_run[max(per_run)]
    ends = [g.end_ms for g in latest if g.end_ms is not None]
    hooked = [g for run in sorted(per_run, reverse=True) for g in per_run[run]
              if g.source == "hook"]
    who: _Gpu | _Job = hooked[0] if hooked else stored or next(iter(rows.values()))
    return _Job(who.user, who.account, min(g.start_ms for g in rows.values()),
                max(ends) if ends else None, max(len(v) for v in per_run.values()),
                sum(g.allocated_ms for g in rows.values()),
                sum(g.busy_ms for g in rows.values()),
                sum(g.energy_mj for g in rows.values()),
                stored.lost_ms if stored is not None else 0, len(per_run))


_JOBDAY_TABLE = {"account": ("acct_jobday_account", "account"),
                 "user": ("acct_jobday_user", "user_name")}
_SUMS = ("jobs", "gpus", "allocated_ms", "busy_ms", "energy_mj", "lost_ms")


@dataclass(frozen=True)
class BulkWrite:
    """One batched write of the ledger: an INSERT, an upsert that ADDS to what is stored
    (`add`: the summed columns, `keys`: the conflict target) or an UPDATE by `keys` (`update`).
    `types` are the columns' PostgreSQL types (for the array form)."""

    table: str
    cols: tuple[str, ...]
    types: tuple[str, ...]
    keys: tuple[str, ...] = ()
    add: tuple[str, ...] = ()
    update: bool = False

    def _conflict(self) -> str:
        if not self.add:
            return ""
        adds = ", ".join(f"{c} = {self.table}.{c} + excluded.{c}" for c in self.add)
        return f" ON CONFLICT ({', '.join(self.keys)}) DO UPDATE SET {adds}"

    def _sets(self, src: str) -> tuple[str, str]:
        sets = ", ".join(f"{c} = {src}{c}" for c in self.cols if c not in self.keys)
        match = " AND ".join(f"{self.table}.{k} = {src}{k}" for k in self.keys)
        return sets, match

    def row_sql(self) -> str:
        """One row per execution (`?` marks in `cols` order): for executemany."""
        if self.update:
            sets = ", ".join(f"{c} = ?" for c in self.cols if c not in self.keys)
            match = " AND ".join(f"{k} = ?" for k in self.keys)
            return f"UPDATE {self.table} SET {sets} WHERE {match}"  # noqa: S608 - constant names
        return (f"INSERT INTO {self.table} ({', '.join(self.cols)}) "  # noqa: S608
                f"VALUES ({_marks(len(self.cols))}){self._conflict()}")

    def array_sql(self) -> str:
        """All rows in one statement, one array per column (PostgreSQL's unnest)."""
        arrays = ", ".join(f"?::{t}[]" for t in self.types)
        if self.update:
            sets, match = self._sets("v.")
            return (f"UPDATE {self.table} SET {sets} FROM unnest({arrays}) "  # noqa: S608
                    f"AS v({', '.join(self.cols)}) WHERE {match}")
        return (f"INSERT INTO {self.table} ({', '.join(self.cols)}) "  # noqa: S608
                f"SELECT * FROM unnest({arrays}){self._conflict()}")

    def row_order(self, row: tuple[Any, ...]) -> tuple[Any, ...]:
        """An UPDATE's row as row_sql wants it: the set columns, then the keys."""
        if not self.update:
            return row
        named = dict(zip(self.cols, row, strict=True))
        return (*(named[c] for c in self.cols if c not in self.keys),
                *(named[k] for k in self.keys))


_B, _T, _I = "bigint", "text", "integer"
_LEDGER_COLS = ("job_id", "run", "node", "gpu_index", "user_name", "account", "start_ms",
                "end_ms", "as_of_ms", "allocated_ms", "busy_ms", "energy_mj", "idle_since_ms",
                "source")
_LEDGER_TYPES = (_T, _I, _T, _I, _T, _T, _B, _B, _B, _B, _B, _B, _B, _T)
_LEDGER_INSERT = BulkWrite("acct_ledger", _LEDGER_COLS, _LEDGER_TYPES)
# identity too: a /proc row becomes its hook's (module docstring)
_LEDGER_UPDATE = BulkWrite("acct_ledger", _LEDGER_COLS, _LEDGER_TYPES,
                           keys=("job_id", "run", "node", "gpu_index"), update=True)
_JOB_COLS = ("job_id", "user_name", "account", "start_ms", "end_ms", "gpus", "allocated_ms",
             "busy_ms", "energy_mj", "runs")
_JOB_TYPES = (_T, _T, _T, _B, _B, _I, _B, _B, _B, _I)
_JOB_INSERT = BulkWrite("acct_jobs", _JOB_COLS, _JOB_TYPES)
_JOB_UPDATE = BulkWrite("acct_jobs", _JOB_COLS, _JOB_TYPES, keys=("job_id",), update=True)
_USAGE_SUMS = ("allocated_ms", "busy_ms", "energy_mj")
_MINUTE_UPSERT = BulkWrite("acct_minute", ("minute_ms", "account", "user_name", *_USAGE_SUMS),
                           (_B, _T, _T, _B, _B, _B), ("minute_ms", "account", "user_name"),
                           _USAGE_SUMS)
_DAY_UPSERT = BulkWrite("acct_day", ("day_ms", "account", "user_name", *_USAGE_SUMS),
                        (_B, _T, _T, _B, _B, _B), ("day_ms", "account", "user_name"),
                        _USAGE_SUMS)
_JOBDAY_UPSERT = {
    dim: BulkWrite(table, ("edge", "day_ms", col, *_SUMS), (_T, _B, _T, *(_B,) * 6),
                   ("edge", "day_ms", col), _SUMS)
    for dim, (table, col) in _JOBDAY_TABLE.items()
}


class AcctStoreMixin:
    """Accounting methods of SqlStore; the backend hooks come from SqlStore.

    Batched writes go through `_write_many(db, write, rows)`: executemany here (SQLite: in
    process, cheap per row); PostgresStore sends each as ONE statement over arrays instead.
    """

    _FOR_UPDATE = ""

    def _tx(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _read(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _batch_tx(self) -> AbstractContextManager[Any]:
        """The transaction of record_usage (PostgreSQL: pipelined); by default `_tx()`."""
        return self._tx()

    def _write_many(self, db: Any, write: BulkWrite, rows: list[tuple[Any, ...]]) -> None:
        """Write `rows` (tuples in `write.cols` order)."""
        if rows:
            db.executemany(write.row_sql(), [write.row_order(r) for r in rows])

    # ------------------------------------------------------------ ingest

    def record_usage(self, rows: Iterable[UsageRow]) -> list[UsageDelta]:
        """Apply agents' cumulative usage rows, all in one transaction; returns what each
        applied row added, in order (replays and rows older than the stored one add nothing
        and are left out). Rows are applied in the order given, exactly as one call per row
        would apply them, but the store is read once and written with a few batched
        statements. A row ending before it started is a ValueError (nothing is applied)."""
        batch = list(rows)
        for r in batch:
            if (r.end_ms is not None and r.end_ms < r.start_ms) or r.as_of_ms < r.start_ms:
                raise ValueError(
                    f"usage row of job {r.job_id} on {r.node} GPU {r.gpu_index}: end_ms="
                    f"{r.end_ms} / as_of_ms={r.as_of_ms} before start_ms={r.start_ms}")
        if not batch:
            return []
        with self._batch_tx() as db:
            return self._apply_batch(db, batch)

    def _load(self, db: Any, batch: list[UsageRow]
              ) -> tuple[dict[str, dict[_RowKey, _Gpu]], dict[str, _Job]]:
        """All stored ledger rows (every run and node) and the job rows of the jobs `batch`
        touches (locked on PostgreSQL): a job's totals, GPUs and end are taken over all of
        them. Every SELECT is sent before any result is read: one round trip in pipeline mode.
        """
        gpu_cursors, job_cursors = [], []
        # one order for every writer (job id, then the key): row locks never cross
        for ids in _chunks(sorted({r.job_id for r in batch})):
            gpu_cursors.append(db.execute(
                "SELECT job_id, run, node, gpu_index, as_of_ms, allocated_ms, busy_ms, "  # noqa: S608 - only ? marks
                "energy_mj, end_ms, start_ms, user_name, account, source FROM acct_ledger "
                f"WHERE job_id IN ({_marks(len(ids))}) ORDER BY job_id, run, node, gpu_index"
                + self._FOR_UPDATE, tuple(ids)))
            job_cursors.append(self._select_jobs(db, ids))
        ledger: dict[str, dict[_RowKey, _Gpu]] = defaultdict(dict)
        for cur in gpu_cursors:
            for row in cur.fetchall():
                ledger[row[0]][(int(row[1]), row[2], int(row[3]))] = _Gpu(*row[4:])
        jobs = {row[0]: _Job(*row[1:]) for cur in job_cursors for row in cur.fetchall()}
        return ledger, jobs

    def _select_jobs(self, db: Any, ids: Sequence[str]) -> Any:
        return db.execute(
            "SELECT job_id, user_name, account, start_ms, end_ms, gpus, allocated_ms, "  # noqa: S608 - only ? marks
            f"busy_ms, energy_mj, lost_ms, runs FROM acct_jobs WHERE job_id IN "
            f"({_marks(len(ids))}) ORDER BY job_id" + self._FOR_UPDATE,
            tuple(ids))

    def _apply_batch(self, db: Any, batch: list[UsageRow]) -> list[UsageDelta]:
        ledger, stored_jobs = self._load(db, batch)
        inserted: set[tuple[str, _RowKey]] = set()  # new ledger rows
        latest: dict[tuple[str, _RowKey], UsageRow] = {}  # as they are to be stored
        minutes: dict[tuple[int, str, str], list[int]] = {}
        out = []
        for reported in batch:
            r = reported  # replaced below by the row as it is to be stored
            rows = ledger[r.job_id]
            key = (r.run, r.node, r.gpu_index)
            old = rows.get(key)
            if old is not None:
                newer = r.as_of_ms > old.as_of_ms and old.end_ms is None
                final_first = r.end_ms is not None and old.end_ms is None
                if not (newer or final_first):
                    continue
                prev_ms, d_alloc, d_busy, d_energy = (
                    old.as_of_ms, r.allocated_ms - old.allocated_ms, r.busy_ms - old.busy_ms,
                    r.energy_mj - old.energy_mj)
                if not (old.source == "proc" and r.source == "hook"):
                    # identity and start from the first report (module docstring)
                    r = replace(r, user=old.user, account=old.account, start_ms=old.start_ms,
                                source=old.source or r.source)
            else:
                prev_ms, d_alloc, d_busy, d_energy = (r.start_ms, r.allocated_ms, r.busy_ms,
                                                      r.energy_mj)
                inserted.add((r.job_id, key))
            rows[key] = _Gpu(r.as_of_ms, r.allocated_ms, r.busy_ms, r.energy_mj, r.end_ms,
                             r.start_ms, r.user, r.account, r.source)
            latest[(r.job_id, key)] = r
            if d_alloc or d_busy or d_energy:
                shares = minute_split(prev_ms, r.as_of_ms)
                for (minute, _s), a, b, e in zip(shares, spread(d_alloc, shares),
                                                 spread(d_busy, shares),
                                                 spread(d_energy, shares), strict=True):
                    acc = minutes.setdefault((minute, r.account, r.user), [0, 0, 0])
                    acc[0] += a
                    acc[1] += b
                    acc[2] += e
            out.append(UsageDelta(r.job_id, r.account, r.user, d_alloc, d_busy, d_energy))
        jobs = {job_id: _job_of(ledger[job_id], stored_jobs.get(job_id))
                for job_id in {job_id for job_id, _key in latest}}
        self._write_batch(db, inserted, latest, stored_jobs, jobs, minutes)
        return out

    def _write_batch(self, db: Any, inserted: set[tuple[str, _RowKey]],
                     latest: dict[tuple[str, _RowKey], UsageRow],
                     stored_jobs: dict[str, _Job], jobs: dict[str, _Job],
                     minutes: dict[tuple[int, str, str], list[int]]) -> None:
        new_rows: list[tuple[Any, ...]] = []
        updates: list[tuple[Any, ...]] = []
        for k in sorted(latest):
            r = latest[k]
            (new_rows if k in inserted else updates).append(
                (r.job_id, r.run, r.node, r.gpu_index, r.user, r.account, r.start_ms, r.end_ms,
                 r.as_of_ms, r.allocated_ms, r.busy_ms, r.energy_mj, r.idle_since_ms, r.source))
        self._write_many(db, _LEDGER_INSERT, new_rows)
        self._write_many(db, _LEDGER_UPDATE, updates)
        new_jobs: list[tuple[Any, ...]] = []
        job_updates: list[tuple[Any, ...]] = []
        jobday: dict[tuple[str, str, int, str], list[int]] = defaultdict(lambda: [0] * 6)
        for job_id in sorted(jobs):
            job, before = jobs[job_id], stored_jobs.get(job_id)
            if job == before:
                continue
            (new_jobs if before is None else job_updates).append(
                (job_id, job.user, job.account, job.start_ms, job.end_ms, job.gpus,
                 job.allocated_ms, job.busy_ms, job.energy_mj, job.runs))
            for day_key, v in _jobday_changes(before, job).items():
                acc = jobday[day_key]
                for i, x in enumerate(v):
                    acc[i] += x
        self._write_many(db, _JOB_INSERT, new_jobs)
        self._write_many(db, _JOB_UPDATE, job_updates)
        self._write_jobday(db, jobday)
        days: dict[tuple[int, str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
        for (minute, account, user), v in minutes.items():
            acc = days[(day_of(minute), account, user)]
            for i, x in enumerate(v):
                acc[i] += x
        self._write_many(db, _MINUTE_UPSERT, [(*k, *v) for k, v in sorted(minutes.items())])
        self._write_many(db, _DAY_UPSERT, [(*k, *v) for k, v in sorted(days.items())])

    def _write_jobday(self, db: Any, changes: dict[tuple[str, str, int, str], list[int]]
                      ) -> None:
        for dim in _JOBDAY_TABLE:
            self._write_many(db, _JOBDAY_UPSERT[dim], [
                (edge, day, key, *v) for (d, edge, day, key), v in sorted(changes.items())
                if d == dim and any(v)])

    # ------------------------------------------------------------ lost time

    def add_lost_time(self, job_id: str, node: str, lost_ms: int, run: int | None = None,
                      now_ms: int = 0) -> int:
        """Charge `lost_ms` (wall ms of work lost to a failure) to EACH GPU the killed run of
        `job_id` holds in the ledger on `node` (so the job's lost_ms grows by lost_ms x those
        GPUs: GPU-ms). The killed run is the newest ledger run on `node` at or below `run`
        (rows of agents that send no run are all run 0); without `run`, the newest there.
        Returns the number of GPUs charged by this call.

        With `run` (Slurm's restart count of the run that was killed) the charge is made at
        most once per (job, run, node), whatever the number of calls: a retried recovery
        step, a second recovery of the same killed run, a controller restarted half-way. A
        repeat charges nothing and returns 0. A node where the job has no ledger rows yet
        charges 0 GPUs (and, with `run`, counts as done: recorded in acct_lost with gpus 0)."""
        if lost_ms < 0:
            raise ValueError(f"lost time of job {job_id} on {node}: {lost_ms} ms is negative")
        with self._tx() as db:
            if run is not None:
                fresh = db.execute(
                    "INSERT INTO acct_lost (job_id, run, node, lost_ms, gpus, charged_ms) "
                    "VALUES (?, ?, ?, ?, 0, ?) ON CONFLICT (job_id, run, node) DO NOTHING",
                    (job_id, run, node, lost_ms, now_ms),
                ).rowcount
                if not fresh:
                    return 0
            upto = run if run is not None else 2**31 - 1
            n = int(db.execute(
                "UPDATE acct_ledger SET lost_ms = lost_ms + ? WHERE job_id = ? AND node = ? "
                "AND run = (SELECT max(run) FROM acct_ledger WHERE job_id = ? AND node = ? "
                "AND run <= ?)",
                (lost_ms, job_id, node, job_id, node, upto),
            ).rowcount)
            if n and lost_ms:
                row = self._select_jobs(db, [job_id]).fetchone()
                if row is not None:
                    before = _Job(*row[1:])
                    db.execute("UPDATE acct_jobs SET lost_ms = lost_ms + ? WHERE job_id = ?",
                               (lost_ms * n, job_id))
                    after = replace(before, lost_ms=before.lost_ms + lost_ms * n)
                    self._write_jobday(db, _jobday_changes(before, after))
            if run is not None:
                db.execute("UPDATE acct_lost SET gpus = ? WHERE job_id = ? AND run = ? "
                           "AND node = ?", (n, job_id, run, node))
            return n

    def rebuild_acct_rollups(self) -> None:
        """Recompute acct_day and the job-day rollups from acct_minute and acct_jobs (what
        migration 7 does once; for a ledger loaded in bulk, or a repair)."""
        with self._tx() as db:
            for stmt in statements(ACCT_ROLLUP_BACKFILL):
                db.execute(stmt)

    # ------------------------------------------------------------ queries

    def usage_rows(self, job_id: str) -> list[UsageRow]:
        with self._read() as db:
            rows = db.execute(
                "SELECT job_id, node, gpu_index, user_name, account, start_ms, end_ms, as_of_ms, "
                "allocated_ms, busy_ms, energy_mj, idle_since_ms, run, source FROM acct_ledger "
                "WHERE job_id = ? ORDER BY run, node, gpu_index", (job_id,),
            ).fetchall()
        return [UsageRow(*r) for r in rows]

    def usage(self, q: UsageQuery) -> list[UsageTotal]:
        """Totals per group of the jobs matching `q` (UsageQuery: a job counts whole when it
        ran at any time inside [since_ms, until_ms)). Groups by user or by account with no
        filter on anything else come from the job-day rollups; everything else (a job list,
        a user filter while grouping by account, ...) from acct_jobs / acct_ledger with
        their indexes. Both give the same numbers (tests/accounting/test_rollup.py).
        start_ms / end_ms of a total are the job's (group_by job) or the node's first start
        and last end (group_by node); None for user and account groups."""
        if q.group_by not in GROUP_BY:
            raise ValueError(f"group_by={q.group_by!r}: must be one of {', '.join(GROUP_BY)}")
        if self._rollups_answer(q):
            return self._usage_from_rollups(q)
        return self._usage_from_tables(q)

    @staticmethod
    def _rollups_answer(q: UsageQuery) -> bool:
        if q.group_by not in ("user", "account") or q.jobs:
            return False
        other_filter = q.users if q.group_by == "account" else q.accounts
        if other_filter:
            return False
        # "started before until minus ended before since" needs since <= until
        return q.since_ms is None or q.until_ms is None or q.since_ms <= q.until_ms

    def _usage_from_rollups(self, q: UsageQuery) -> list[UsageTotal]:
        table, col = _JOBDAY_TABLE[q.group_by]
        keys = q.accounts if q.group_by == "account" else q.users
        key_filter = f" AND {col} IN ({_marks(len(keys))})" if keys else ""
        sums = ("jobs", "gpus", "allocated_ms", "busy_ms", "energy_mj", "lost_ms")
        neg = tuple(f"-{c}" for c in sums)
        one = ("1", *sums[1:])
        minus_one = ("-1", *neg[1:])
        parts: list[str] = []
        args: list[object] = []

        def part(values: tuple[str, ...], source: str, cond: str, *cond_args: object) -> None:
            cols = ", ".join(f"{v} AS {a}" for v, a in zip(values, "jgabel", strict=True))
            parts.append(f"SELECT {col} AS k, {cols} FROM {source} "  # noqa: S608 - constant names
                         f"WHERE {cond}{key_filter}")
            args.extend([*cond_args, *keys])

        # + every job started before `until`: whole days from the rollup, the last (partial)
        # day from acct_jobs
        if q.until_ms is None:
            part(sums, table, "edge = 'start'")
        else:
            cut = day_of(q.until_ms)
            part(sums, table, "edge = 'start' AND day_ms < ?", cut)
            part(one, "acct_jobs", "start_ms >= ? AND start_ms < ?", cut, q.until_ms)
        # - every job that ended before `since` (it started before `until` too)
        if q.since_ms is not None:
            cut = day_of(q.since_ms)
            part(neg, table, "edge = 'end' AND day_ms < ?", cut)
            part(minus_one, "acct_jobs", "end_ms >= ? AND end_ms < ?", cut, q.since_ms)
        sql = ("SELECT k, sum(j), sum(g), sum(a), sum(b), sum(e), sum(l) FROM ("  # noqa: S608 - constant names, ? marks
               + " UNION ALL ".join(parts) + ") t GROUP BY k HAVING sum(j) > 0 ORDER BY k")
        with self._read() as db:
            rows = db.execute(sql, args).fetchall()
        return [UsageTotal(str(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4]), int(r[5]),
                           int(r[6])) for r in rows]

    def _usage_from_tables(self, q: UsageQuery) -> list[UsageTotal]:
        table = "acct_ledger" if q.group_by == "node" else "acct_jobs"
        where: list[str] = ["1 = 1"]
        args: list[object] = []
        for col, values in (("user_name", q.users), ("account", q.accounts),
                            ("job_id", q.jobs)):
            if values:
                where.append(f"{col} IN ({_marks(len(values))})")
                args += list(values)
        if q.since_ms is not None:
            where.append("(end_ms IS NULL OR end_ms >= ?)")
            args.append(q.since_ms)
        if q.until_ms is not None:
            where.append("start_ms < ?")
            args.append(q.until_ms)
        key = {"user": "user_name", "account": "account", "job": "job_id", "node": "node"}
        col = key[q.group_by]
        # acct_jobs has one row per job: count(*) is its number of jobs
        jobs = "count(DISTINCT job_id)" if table == "acct_ledger" else "count(*)"
        gpus = "count(*)" if table == "acct_ledger" else "sum(gpus)"
        span = ("min(start_ms), max(end_ms)" if q.group_by in ("job", "node")
                else "NULL, NULL")
        extra = ("min(user_name), min(account), sum(runs)" if q.group_by == "job"
                 else "'', '', 0")
        sql = (f"SELECT {col}, {jobs}, {gpus}, sum(allocated_ms), "  # noqa: S608
               f"sum(busy_ms), sum(energy_mj), sum(lost_ms), {span}, "
               f"{extra} FROM {table} WHERE {' AND '.join(where)} GROUP BY {col} ORDER BY {col}")
        with self._read() as db:
            rows = db.execute(sql, args).fetchall()
        return [UsageTotal(str(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4]), int(r[5]),
                           int(r[6]), r[7], r[8], str(r[9]), str(r[10]), int(r[11]))
                for r in rows]

    def usage_by_minute(self, since_ms: int, until_ms: int, group_by: str = "account"
                        ) -> list[UsageTotal]:
        """Usage inside [since_ms, until_ms) exactly (to the minute: the minutes starting in
        the window), per user or account (jobs, gpus and lost are 0: rollups do not keep
        them). Whole UTC days inside the window come from acct_day, the rest from
        acct_minute; the sums are the same as acct_minute's alone."""
        if group_by not in ("user", "account"):
            raise ValueError(f"group_by={group_by!r}: per-minute rollups know user and account")
        col = "user_name" if group_by == "user" else "account"
        first_day = -(-since_ms // DAY_MS) * DAY_MS  # the first day starting in the window
        end_day = day_of(until_ms)  # ... and the end of the last whole one
        if first_day < end_day:
            sql = (f"SELECT k, sum(a), sum(b), sum(e) FROM ("  # noqa: S608 - constant names
                   f"SELECT {col} AS k, allocated_ms AS a, busy_ms AS b, energy_mj AS e "
                   f"FROM acct_day WHERE day_ms >= ? AND day_ms < ? UNION ALL "
                   f"SELECT {col}, allocated_ms, busy_ms, energy_mj FROM acct_minute "
                   f"WHERE minute_ms >= ? AND minute_ms < ? UNION ALL "
                   f"SELECT {col}, allocated_ms, busy_ms, energy_mj FROM acct_minute "
                   f"WHERE minute_ms >= ? AND minute_ms < ?) t GROUP BY k ORDER BY k")
            args: tuple[int, ...] = (first_day, end_day, since_ms, first_day, end_day, until_ms)
        else:
            sql = (f"SELECT {col}, sum(allocated_ms), sum(busy_ms), sum(energy_mj) "  # noqa: S608
                   f"FROM acct_minute WHERE minute_ms >= ? AND minute_ms < ? GROUP BY {col} "
                   f"ORDER BY {col}")
            args = (since_ms, until_ms)
        with self._read() as db:
            rows = db.execute(sql, args).fetchall()
        return [UsageTotal(str(r[0]), 0, 0, int(r[1]), int(r[2]), int(r[3]), 0) for r in rows]
