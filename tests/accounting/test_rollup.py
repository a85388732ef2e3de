"""The accounting rollups (migration 7) give exactly what summing the ledger gives.

Randomised ledgers (multi-node jobs, replays, reordered and final-first reports, jobs still
running, lost-time charges, days crossed) on SQLite and a real PostgreSQL: `usage()` for
users and accounts (answered from the job-day rollups) is compared with a sum over
acct_ledger done here in Python and with the plain acct_jobs path; `usage_by_minute` (whole
days from acct_day) with a sum over acct_minute; the incrementally kept rollups with a
recomputation; one batched `record_usage` with one call per row.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

import pytest
from gpufleet.scheduler.accounting.ledger import DAY_MS, UsageQuery, UsageRow, UsageTotal

from .conftest import Backend

T0 = 1_767_225_600_000 - 6 * 3_600_000  # 2025-12-31 18:00 UTC: windows cross midnights
ROLLUP_TABLES = ("acct_jobday_account", "acct_jobday_user", "acct_day")


def _reports(rng: random.Random, n_jobs: int, prefix: str = "") -> list[UsageRow]:
    """Cumulative rows as agents send them, then reordered and partly replayed."""
    out: list[UsageRow] = []
    for j in range(n_jobs):
        user, account = f"{prefix}u{rng.randrange(5)}", f"{prefix}a{rng.randrange(3)}"
        start = T0 + rng.randrange(3 * DAY_MS)
        dur = rng.choice((rng.randrange(60_000, 3_600_000), rng.randrange(DAY_MS, 2 * DAY_MS)))
        ends = rng.random() < 0.8
        for n in range(rng.choice((1, 1, 2, 3))):
            node_start = start + n * rng.randrange(0, 5_000)  # nodes start a little apart
            for g in range(rng.choice((1, 2, 4))):
                busy_share, watts = rng.random(), rng.randrange(50, 700)
                times = sorted(rng.sample(range(1, dur), k=min(4, dur - 1)))
                points = [(node_start + t, None) for t in times]
                if ends:
                    points.append((node_start + dur, node_start + dur))
                for as_of, end in points:
                    alloc = as_of - node_start
                    out.append(UsageRow(f"{prefix}{1000 + j}", f"n{n}", g, user, account,
                                        node_start, end, as_of, alloc, int(alloc * busy_share),
                                        alloc * watts))
    rng.shuffle(out)  # reordered: older reports after newer ones, finals before running
    out += rng.sample(out, len(out) // 5)  # resent
    return out


def _apply(store: Any, rows: list[UsageRow], rng: random.Random) -> None:
    i = 0
    while i < len(rows):
        n = rng.choice((1, 3, 8, 40))
        store.record_usage(rows[i:i + n])
        i += n


def _charge_lost(store: Any, rng: random.Random, jobs: list[str]) -> None:
    for job in rng.sample(jobs, len(jobs) // 3):
        run, lost = rng.randrange(3), rng.randrange(1, 900_000)
        for _ in range(rng.choice((1, 2))):  # a retried recovery step charges once
            store.add_lost_time(job, "n0", lost, run=run)


def _ledger(backend: Backend) -> list[tuple[Any, ...]]:
    """acct_ledger as another tool reads it (read once: every query of a test sums the same
    rows, and a connection per query was most of the PostgreSQL half's time)."""
    return backend.raw(
        "SELECT job_id, user_name, account, start_ms, end_ms, allocated_ms, busy_ms, "
        "energy_mj, lost_ms FROM acct_ledger")


def _expected(ledger: list[tuple[Any, ...]], q: UsageQuery) -> list[UsageTotal]:
    """sacct-style totals summed straight from acct_ledger's rows."""
    jobs: dict[str, dict[str, Any]] = {}
    for (job, user, account, start, end, alloc, busy, energy, lost) in ledger:
        j = jobs.setdefault(job, {"user": user, "account": account, "start": start,
                                  "end": None, "sums": [0, 0, 0, 0, 0]})
        j["start"] = min(j["start"], start)
        if end is not None:
            j["end"] = end if j["end"] is None else max(j["end"], end)
        for i, v in enumerate((1, alloc, busy, energy, lost)):
            j["sums"][i] += v
    groups: dict[str, list[int]] = defaultdict(lambda: [0] * 6)
    for job_id, j in jobs.items():
        if q.until_ms is not None and not j["start"] < q.until_ms:
            continue
        if q.since_ms is not None and j["end"] is not None and j["end"] < q.since_ms:
            continue
        if (q.users and j["user"] not in q.users) or (
                q.accounts and j["account"] not in q.accounts) or (q.jobs and job_id not in q.jobs):
            continue
        g = groups[j[q.group_by]]
        g[0] += 1
        for i, v in enumerate(j["sums"]):
            g[i + 1] += v
    return [UsageTotal(k, g[0], *g[1:]) for k, g in groups.items()]


def _by_key(rows: list[UsageTotal]) -> dict[str, UsageTotal]:
    return {r.key: r for r in rows}


def _windows(rng: random.Random) -> list[tuple[int | None, int | None]]:
    midnight = T0 + 6 * 3_600_000
    fixed: list[tuple[int | None, int | None]] = [
        (None, None), (midnight, None), (None, midnight + DAY_MS), (midnight, midnight + DAY_MS),
        (midnight + DAY_MS, midnight + DAY_MS), (midnight - 1, midnight + 2 * DAY_MS + 1)]
    for _ in range(25):
        a = T0 + rng.randrange(-DAY_MS, 6 * DAY_MS)
        b = a + rng.choice((0, 1, 59_999, 3_600_000, DAY_MS, rng.randrange(4 * DAY_MS)))
        fixed.append((rng.choice((a, None)) if rng.random() < 0.2 else a,
                      rng.choice((b, None)) if rng.random() < 0.2 else b))
    return fixed


def _table(backend: Backend, table: str) -> list[tuple[Any, ...]]:
    """A rollup's rows without the all-zero ones (a job that moved out of a day leaves one)."""
    rows = backend.raw(f"SELECT * FROM {table}")  # noqa: S608 - constant names
    return sorted(tuple(r) for r in rows if any(v for v in r[3:]) or table == "acct_day")


@pytest.mark.parametrize("seed", [1, 2])
def test_rollup_answers_equal_the_ledger_summed(store_backend: Backend, seed: int) -> None:
    rng = random.Random(seed)
    store = store_backend.open()
    rows = _reports(rng, 30)
    _apply(store, rows, rng)
    _charge_lost(store, rng, sorted({r.job_id for r in rows}))
    users = sorted({r.user for r in rows})
    accounts = sorted({r.account for r in rows})
    ledger = _ledger(store_backend)
    checked = 0
    for since, until in _windows(rng):
        for q in (
            UsageQuery(since_ms=since, until_ms=until, group_by="account"),
            UsageQuery(since_ms=since, until_ms=until, group_by="user"),
            UsageQuery(accounts=tuple(rng.sample(accounts, 2)), since_ms=since,
                       until_ms=until, group_by="account"),
            UsageQuery(users=tuple(rng.sample(users, 2)), since_ms=since, until_ms=until,
                       group_by="user"),
            # not for the rollups (a user filter while grouping by account): the table path
            UsageQuery(users=(users[0],), since_ms=since, until_ms=until, group_by="account"),
        ):
            got = store.usage(q)
            assert [t.key for t in got] == sorted(t.key for t in got)
            assert _by_key(got) == _by_key(_expected(ledger, q)), (q, since, until)
            assert got == store._usage_from_tables(q), q
            checked += len(got)
    assert checked > 100  # the windows selected something


@pytest.mark.parametrize("seed", [3])
def test_clipped_usage_from_days_equals_the_minutes(store_backend: Backend, seed: int) -> None:
    rng = random.Random(seed)
    store = store_backend.open()
    _apply(store, _reports(rng, 25), rng)
    minutes = store_backend.raw(
        "SELECT minute_ms, account, user_name, allocated_ms, busy_ms, energy_mj FROM acct_minute")
    assert len({m[0] // DAY_MS for m in minutes}) >= 3  # the usage spans several days
    for since, until in _windows(rng):
        lo = since if since is not None else 0
        hi = until if until is not None else 2**62
        for group_by, col in (("account", 1), ("user", 2)):
            want: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
            for m in minutes:
                if lo <= m[0] < hi:
                    for i in range(3):
                        want[m[col]][i] += m[3 + i]
            got = store.usage_by_minute(lo, hi, group_by)
            assert {t.key: [t.allocated_ms, t.busy_ms, t.energy_mj] for t in got} == want


def test_kept_rollups_equal_a_recomputation_and_batches_equal_single_rows(
    store_backend: Backend,
) -> None:
    rng = random.Random(5)
    store = store_backend.open()
    batched = _reports(random.Random(6), 20, prefix="b")
    single = [UsageRow(**{**r.__dict__, "job_id": "s" + r.job_id[1:], "user": "s" + r.user[1:],
                          "account": "s" + r.account[1:]}) for r in batched]
    deltas_b = []
    i = 0
    while i < len(batched):
        n = rng.choice((2, 8, 50))
        deltas_b += store.record_usage(batched[i:i + n])
        i += n
    deltas_s = [d for r in single for d in store.record_usage([r])]
    assert [(d.allocated_ms, d.busy_ms, d.energy_mj) for d in deltas_b] == \
        [(d.allocated_ms, d.busy_ms, d.energy_mj) for d in deltas_s]

    def strip(rows: list[tuple[Any, ...]], prefix: str) -> list[tuple[Any, ...]]:
        return sorted(tuple(v[1:] if isinstance(v, str) and v.startswith(prefix) else v
                            for v in r) for r in rows
                      if any(isinstance(v, str) and v.startswith(prefix) for v in r))

    for table in ("acct_ledger", "acct_minute", "acct_day"):
        rows = store_backend.raw(f"SELECT * FROM {table}")  # noqa: S608 - constant names
        assert strip(rows, "b"), table
        assert strip(rows, "b") == strip(rows, "s"), table
    _charge_lost(store, rng, sorted({r.job_id for r in batched + single}))
    kept = {t: _table(store_backend, t) for t in ROLLUP_TABLES}
    store.rebuild_acct_rollups()
    assert {t: _table(store_backend, t) for t in ROLLUP_TABLES} == kept
    assert kept["acct_jobday_user"]


def test_lost_time_is_charged_once_per_run_and_node_and_reaches_the_rollups(
    store_backend: Backend,
) -> None:
    store = store_backend.open()
    store.record_usage([UsageRow("7", n, g, "ann", "phys", T0, None, T0 + 60_000, 60_000,
                                 30_000, 6_000_000) for n in ("n1", "n2") for g in (0, 1, 2)])
    assert store.add_lost_time("7", "n1", 20_000, run=0) == 3
    assert store.add_lost_time("7", "n1", 20_000, run=0) == 0  # a retry: nothing more
    assert store.add_lost_time("7", "n2", 20_000, run=0) == 3
    assert store.add_lost_time("7", "n1", 5_000, run=1) == 3  # the next run, killed too
    assert store.add_lost_time("7", "n9", 5_000, run=1) == 0  # no GPUs of it there
    with pytest.raises(ValueError, match="negative"):
        store.add_lost_time("7", "n1", -1)
    (job,) = store.usage(UsageQuery(jobs=("7",)))
    assert job.lost_ms == 3 * 20_000 + 3 * 20_000 + 3 * 5_000
    (acct,) = store.usage(UsageQuery(since_ms=T0, until_ms=T0 + DAY_MS, group_by="account"))
    assert acct.lost_ms == job.lost_ms and acct.gpus == 6 and acct.jobs == 1
    charged = store_backend.raw("SELECT node, run, gpus FROM acct_lost ORDER BY run, node")
    assert [tuple(r) for r in charged] == [("n1", 0, 3), ("n2", 0, 3), ("n1", 1, 3),
                                           ("n9", 1, 0)]


def test_a_row_ending_before_it_started_is_refused_whole(store_backend: Backend) -> None:
    store = store_backend.open()
    good = UsageRow("8", "n1", 0, "ann", "phys", T0, None, T0 + 1000, 1000, 0, 0)
    bad = UsageRow("8", "n1", 1, "ann", "phys", T0, T0 - 1, T0, 0, 0, 0)
    with pytest.raises(ValueError, match="job 8 on n1 GPU 1"):
        store.record_usage([good, bad])
    assert store.usage_rows("8") == []
