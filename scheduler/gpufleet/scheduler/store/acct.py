"""The accounting ledger in the state store: per job x node x GPU, per job, per minute.

Agents report CUMULATIVE totals per (job, node, GPU) (gpufleet.v1.JobGpuUsage). A report is
applied only when it is newer (as_of_ms) than the stored row, or it is the job's final one;
the job's totals and the per-minute rollups get the difference to the stored row, in the
same transaction. So a replayed, resent or reordered report never counts twice, whatever the
controller's sequence bookkeeping says, and a lost one is made good by the next.

Written once in portable SQL (`?` placeholders); used by SqlStore as a mixin.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

MINUTE_MS = 60_000
MAX_SPLIT_MINUTES = 24 * 60  # a longer gap between two reports goes into its last minute
GROUP_BY = ("user", "account", "job", "node")


@dataclass(frozen=True)
class UsageRow:
    """One job's cumulative use of one GPU on one node, as of as_of_ms."""

    job_id: str
    node: str
    gpu_index: int
    user: str
    account: str
    start_ms: int
    end_ms: int | None
    as_of_ms: int
    allocated_ms: int
    busy_ms: int
    energy_mj: int
    idle_since_ms: int | None = None


@dataclass(frozen=True)
class UsageDelta:
    """What one applied report added (for counters: the difference to the stored row)."""

    job_id: str
    account: str
    user: str
    allocated_ms: int
    busy_ms: int
    energy_mj: int


@dataclass(frozen=True)
class UsageTotal:
    """Totals of one group (`key` is the user, account, job id or node; "" for all)."""

    key: str
    jobs: int
    gpus: int
    allocated_ms: int
    busy_ms: int
    energy_mj: int
    lost_ms: int
    start_ms: int | None = None
    end_ms: int | None = None
    user: str = ""
    account: str = ""


@dataclass(frozen=True)
class UsageQuery:
    users: tuple[str, ...] = ()
    accounts: tuple[str, ...] = ()
    jobs: tuple[str, ...] = ()
    since_ms: int | None = None  # jobs still running at or after this time
    until_ms: int | None = None  # jobs started before this time
    group_by: str = "job"


def minute_split(prev_ms: int, as_of_ms: int) -> list[tuple[int, float]]:
    """(minute start, share) of the interval (prev_ms, as_of_ms]: time-proportional shares."""
    if as_of_ms <= prev_ms:
        return [((as_of_ms // MINUTE_MS) * MINUTE_MS, 1.0)]
    first = prev_ms // MINUTE_MS
    last = (as_of_ms - 1) // MINUTE_MS
    if last - first > MAX_SPLIT_MINUTES:
        return [(last * MINUTE_MS, 1.0)]
    span = as_of_ms - prev_ms
    out = []
    for m in range(first, last + 1):
        lo = max(prev_ms, m * MINUTE_MS)
        hi = min(as_of_ms, (m + 1) * MINUTE_MS)
        out.append((m * MINUTE_MS, (hi - lo) / span))
    return out


def _spread(total: int, shares: Sequence[tuple[int, float]]) -> list[int]:
    """Integer parts of `total` by share, summing exactly to `total` (no ms lost to rounding)."""
    parts = [int(total * s) for _m, s in shares]
    parts[-1] += total - sum(parts)
    return parts


class AcctStoreMixin:
    """Accounting methods of SqlStore; the backend hooks come from SqlStore."""

    _FOR_UPDATE = ""

    def _tx(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _read(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def record_usage(self, rows: Iterable[UsageRow]) -> list[UsageDelta]:
        """Apply agents' cumulative usage rows in one transaction; returns what each applied
        row added (replays and rows older than the stored one add nothing and are left out)."""
        out = []
        with self._tx() as db:
            for r in rows:
                d = self._apply_usage(db, r)
                if d is not None:
                    out.append(d)
        return out

    def _apply_usage(self, db: Any, r: UsageRow) -> UsageDelta | None:
        old = db.execute(
            "SELECT as_of_ms, allocated_ms, busy_ms, energy_mj, end_ms FROM acct_ledger "  # noqa: S608 - constant
            "WHERE job_id = ? AND node = ? AND gpu_index = ?" + self._FOR_UPDATE,
            (r.job_id, r.node, r.gpu_index),
        ).fetchone()
        if old is not None:
            newer = r.as_of_ms > old[0] and old[4] is None
            final_first = r.end_ms is not None and old[4] is None
            if not (newer or final_first):
                return None
            prev_ms, d_alloc, d_busy, d_energy = (
                old[0], r.allocated_ms - old[1], r.busy_ms - old[2], r.energy_mj - old[3])
            db.execute(
                "UPDATE acct_ledger SET end_ms = ?, as_of_ms = ?, allocated_ms = ?, busy_ms = ?, "
                "energy_mj = ?, idle_since_ms = ? WHERE job_id = ? AND node = ? AND gpu_index = ?",
                (r.end_ms, r.as_of_ms, r.allocated_ms, r.busy_ms, r.energy_mj, r.idle_since_ms,
                 r.job_id, r.node, r.gpu_index),
            )
        else:
            prev_ms, d_alloc, d_busy, d_energy = r.start_ms, r.allocated_ms, r.busy_ms, r.energy_mj
            db.execute(
                "INSERT INTO acct_ledger (job_id, node, gpu_index, user_name, account, start_ms, "
                "end_ms, as_of_ms, allocated_ms, busy_ms, energy_mj, idle_since_ms) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (r.job_id, r.node, r.gpu_index, r.user, r.account, r.start_ms, r.end_ms,
                 r.as_of_ms, r.allocated_ms, r.busy_ms, r.energy_mj, r.idle_since_ms),
            )
        self._add_to_job(db, r, d_alloc, d_busy, d_energy, new_gpu=old is None)
        if d_alloc or d_busy or d_energy:
            shares = minute_split(prev_ms, r.as_of_ms)
            for (minute, _s), a, b, e in zip(shares, _spread(d_alloc, shares),
                                             _spread(d_busy, shares), _spread(d_energy, shares),
                                             strict=True):
                db.execute(
                    "INSERT INTO acct_minute (minute_ms, account, user_name, allocated_ms, "
                    "busy_ms, energy_mj) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (minute_ms, "
                    "account, user_name) DO UPDATE SET "
                    "allocated_ms = acct_minute.allocated_ms + excluded.allocated_ms, "
                    "busy_ms = acct_minute.busy_ms + excluded.busy_ms, "
                    "energy_mj = acct_minute.energy_mj + excluded.energy_mj",
                    (minute, r.account, r.user, a, b, e),
                )
        return UsageDelta(r.job_id, r.account, r.user, d_alloc, d_busy, d_energy)

    def _add_to_job(self, db: Any, r: UsageRow, d_alloc: int, d_busy: int, d_energy: int,
                    new_gpu: bool) -> None:
        job = db.execute(
            "SELECT start_ms, end_ms FROM acct_jobs WHERE job_id = ?" + self._FOR_UPDATE,  # noqa: S608 - constant
            (r.job_id,),
        ).fetchone()
        if job is None:
            db.execute(
                "INSERT INTO acct_jobs (job_id, user_name, account, start_ms, end_ms, gpus, "
                "allocated_ms, busy_ms, energy_mj) VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?)",
                (r.job_id, r.user, r.account, r.start_ms, r.end_ms, d_alloc, d_busy, d_energy),
            )
            return
        start = min(job[0], r.start_ms)
        end = r.end_ms if job[1] is None else max(job[1], r.end_ms or job[1])
        db.execute(
            "UPDATE acct_jobs SET start_ms = ?, end_ms = ?, gpus = gpus + ?, "
            "allocated_ms = allocated_ms + ?, busy_ms = busy_ms + ?, energy_mj = energy_mj + ? "
            "WHERE job_id = ?",
            (start, end, 1 if new_gpu else 0, d_alloc, d_busy, d_energy, r.job_id),
        )

    def add_lost_time(self, job_id: str, node: str, lost_ms: int) -> int:
        """Hook for the recovery timeline: GPU time of `job_id` on `node` lost to a failure,
        charged to each of its GPUs there. Returns the number of GPUs charged."""
        with self._tx() as db:
            n = db.execute(
                "UPDATE acct_ledger SET lost_ms = lost_ms + ? WHERE job_id = ? AND node = ?",
                (lost_ms, job_id, node),
            ).rowcount
            if n:
                db.execute("UPDATE acct_jobs SET lost_ms = lost_ms + ? WHERE job_id = ?",
                           (lost_ms * n, job_id))
            return int(n)

    def usage_rows(self, job_id: str) -> list[UsageRow]:
        with self._read() as db:
            rows = db.execute(
                "SELECT job_id, node, gpu_index, user_name, account, start_ms, end_ms, as_of_ms, "
                "allocated_ms, busy_ms, energy_mj, idle_since_ms FROM acct_ledger "
                "WHERE job_id = ? ORDER BY node, gpu_index", (job_id,),
            ).fetchall()
        return [UsageRow(*r) for r in rows]

    def usage(self, q: UsageQuery) -> list[UsageTotal]:
        """Totals per group of the jobs matching `q` (sacct semantics: a job counts whole when
        it ran at any time inside [since_ms, until_ms))."""
        if q.group_by not in GROUP_BY:
            raise ValueError(f"group_by={q.group_by!r}: must be one of {', '.join(GROUP_BY)}")
        table = "acct_ledger" if q.group_by == "node" else "acct_jobs"
        where: list[str] = ["1 = 1"]
        args: list[object] = []
        for col, values in (("user_name", q.users), ("account", q.accounts),
                            ("job_id", q.jobs)):
            if values:
                where.append(f"{col} IN ({', '.join('?' * len(values))})")
                args += list(values)
        if q.since_ms is not None:
            where.append("(end_ms IS NULL OR end_ms >= ?)")
            args.append(q.since_ms)
        if q.until_ms is not None:
            where.append("start_ms < ?")
            args.append(q.until_ms)
        key = {"user": "user_name", "account": "account", "job": "job_id", "node": "node"}
        col = key[q.group_by]
        gpus = "count(*)" if table == "acct_ledger" else "sum(gpus)"
        extra = ("min(user_name), min(account)" if q.group_by == "job"
                 else "'', ''")
        sql = (f"SELECT {col}, count(DISTINCT job_id), {gpus}, sum(allocated_ms), "  # noqa: S608
               f"sum(busy_ms), sum(energy_mj), sum(lost_ms), min(start_ms), max(end_ms), "
               f"{extra} FROM {table} WHERE {' AND '.join(where)} GROUP BY {col} ORDER BY {col}")
        with self._read() as db:
            rows = db.execute(sql, args).fetchall()
        return [UsageTotal(str(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4]), int(r[5]),
                           int(r[6]), r[7], r[8], str(r[9]), str(r[10])) for r in rows]

    def usage_by_minute(self, since_ms: int, until_ms: int, group_by: str = "account"
                        ) -> list[UsageTotal]:
        """Usage inside [since_ms, until_ms) exactly (to the minute), per user or account,
        from the per-minute rollups (jobs, gpus and lost are 0: rollups do not keep them)."""
        if group_by not in ("user", "account"):
            raise ValueError(f"group_by={group_by!r}: per-minute rollups know user and account")
        col = "user_name" if group_by == "user" else "account"
        sql = (f"SELECT {col}, sum(allocated_ms), sum(busy_ms), sum(energy_mj) "  # noqa: S608
               f"FROM acct_minute WHERE minute_ms >= ? AND minute_ms < ? GROUP BY {col} "
               f"ORDER BY {col}")
        with self._read() as db:
            rows = db.execute(sql, (since_ms, until_ms)).fetchall()
        return [UsageTotal(str(r[0]), 0, 0, int(r[1]), int(r[2]), int(r[3]), 0) for r in rows]
