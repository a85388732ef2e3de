"""Accounting ledger at scale: 1,000,000 jobs over 30 days on 1,000 nodes (8 GPUs each).

Prints, for SQLite and (with --postgres) a real PostgreSQL started here (Debian's server,
initdb into a temp dir, fsync=off as in the tests), all from one run:
* ingest rate of the real path (`record_usage`, one transaction per call) in two shapes:
  one call per job event (a STARTED and an ENDED report per job of --ingest-jobs jobs, 1-8
  rows each; the shape of the earlier figures) and one call per node per minute (an agent's
  RUNNING report: 8 GPU rows, --ingest-nodes nodes x --ingest-minutes minutes);
* bulk-load time of the full ledger (final rows, executemany; the schema is the real one)
  and of the rollup back-fill (`rebuild_acct_rollups`, what migration 7 runs);
* query latency of typical `gpufleet acct` queries over the month: per account, per user,
  one job, one user's jobs, and the ratio of the month queries to the 1 s target; the month
  queries are checked equal to the plain acct_jobs path (printed with its time);
* the ledger's size on disk (all acct_* tables and indexes).

    .venv/bin/python bench/accounting.py --jobs 1000000 [--postgres]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpufleet.scheduler.accounting.ledger import UsageQuery, UsageRow
from gpufleet.scheduler.store import open_store

DAY_MS = 86_400_000
T0 = 1_767_225_600_000  # 2026-01-01 UTC
TARGET_S = 1.0  # the target for the month-per-account query


def make_jobs(n: int, nodes: int, rng: random.Random) -> list[tuple]:
    """(job_id, user, account, node, gpus, start_ms, end_ms) with a mix of 1-8 GPU jobs."""
    out = []
    for i in range(n):
        start = T0 + rng.randrange(30 * DAY_MS)
        dur = int(rng.expovariate(1 / 3_600_000)) + 60_000
        gpus = rng.choice((1, 1, 2, 4, 8))
        acct = f"acct{rng.randrange(50):02d}"
        user = f"user{rng.randrange(500):03d}"
        out.append((str(1_000_000 + i), user, acct, f"gpu{rng.randrange(nodes):04d}", gpus,
                    start, start + dur))
    return out


_LEDGER_SQL = (
    "INSERT INTO acct_ledger (job_id, node, gpu_index, user_name, account, start_ms, end_ms, "
    "as_of_ms, allocated_ms, busy_ms, energy_mj) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_JOBS_SQL = (
    "INSERT INTO acct_jobs (job_id, user_name, account, start_ms, end_ms, gpus, allocated_ms, "
    "busy_ms, energy_mj) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")


def bulk_load(store: object, jobs: list[tuple], rng: random.Random) -> float:
    t0 = time.perf_counter()
    with store._tx() as db:  # type: ignore[attr-defined]
        led, jrows = [], []
        for job_id, user, acct, node, gpus, start, end in jobs:
            alloc = end - start
            busy = int(alloc * rng.random())
            energy = alloc * 300
            for g in range(gpus):
                led.append((job_id, node, g, user, acct, start, end, end, alloc, busy, energy))
            jrows.append((job_id, user, acct, start, end, gpus, alloc * gpus, busy * gpus,
                          energy * gpus))
            if len(led) > 50_000:
                _flush(db, led, jrows)
        _flush(db, led, jrows)
    return time.perf_counter() - t0


def _flush(db: object, led: list[tuple], jrows: list[tuple]) -> None:
    if hasattr(db, "conn"):  # PostgreSQL's adapter: its psycopg cursor, %s placeholders
        pg = db.conn.cursor()
        for sql, rows in ((_LEDGER_SQL, led), (_JOBS_SQL, jrows)):
            pg.executemany(sql.replace("?", "%s"), rows)
        led.clear()
        jrows.clear()
        return
    db.executemany(  # type: ignore[attr-defined]
        _LEDGER_SQL, led)
    db.executemany(_JOBS_SQL, jrows)  # type: ignore[attr-defined]
    led.clear()
    jrows.clear()


def ingest_rate(store: object, jobs: list[tuple]) -> tuple[float, int]:
    """Rows/s through record_usage: a STARTED and an ENDED report per GPU of each job, one
    call per report (1-8 rows)."""
    rows = 0
    t0 = time.perf_counter()
    for job_id, user, acct, node, gpus, start, end in jobs:
        for as_of, end_ms in ((start, None), (end, end)):
            batch = [UsageRow("i" + job_id, node, g, user, acct, start, end_ms, as_of,
                              as_of - start, (as_of - start) // 2, (as_of - start) * 300)
                     for g in range(gpus)]
            store.record_usage(batch)  # type: ignore[attr-defined]
            rows += len(batch)
    return rows / (time.perf_counter() - t0), rows


def node_report_rate(store: object, nodes: int, minutes: int) -> tuple[float, int]:
    """Rows/s through record_usage of agents' per-minute RUNNING reports: one call per node
    and minute with its 8 GPUs' cumulative rows (one 1-GPU job per GPU)."""
    rows = 0
    start = T0 + 3 * DAY_MS
    t0 = time.perf_counter()
    for m in range(1, minutes + 1):
        as_of = start + m * 60_000
        for n in range(nodes):
            batch = [UsageRow(f"r{n}-{g}", f"gpu{n:04d}", g, f"user{n % 500:03d}",
                              f"acct{n % 50:02d}", start, None, as_of, as_of - start,
                              (as_of - start) // 3, (as_of - start) * 250)
                     for g in range(8)]
            store.record_usage(batch)  # type: ignore[attr-defined]
            rows += len(batch)
    return rows / (time.perf_counter() - t0), rows


def timed(fn: object, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - t0)
    return best


def run(kind: str, target: str, jobs: list[tuple], args: argparse.Namespace,
        size_of: object) -> None:
    rng = random.Random(2)
    store = open_store(target)
    rate, ingested = ingest_rate(store, jobs[:args.ingest_jobs])
    node_rate, node_rows = node_report_rate(store, args.ingest_nodes, args.ingest_minutes)
    load_s = bulk_load(store, jobs, rng)
    t0 = time.perf_counter()
    store.rebuild_acct_rollups()  # type: ignore[attr-defined]
    rollup_s = time.perf_counter() - t0
    if kind == "postgres":  # autovacuum would have analysed a ledger this size by now
        with store._tx() as db:  # type: ignore[attr-defined]
            db.execute("ANALYZE")
    since, until = T0, T0 + 30 * DAY_MS
    month = {g: UsageQuery(since_ms=since, until_ms=until, group_by=g)
             for g in ("account", "user")}
    q = {
        "month per account": lambda: store.usage(month["account"]),
        "month per user": lambda: store.usage(month["user"]),
        "one job": lambda: store.usage(UsageQuery(jobs=(jobs[len(jobs) // 2][0],))),
        "one user's jobs, one week": lambda: store.usage(UsageQuery(
            users=("user007",), since_ms=T0 + 7 * DAY_MS, until_ms=T0 + 14 * DAY_MS)),
        "clipped month per account": lambda: store.usage_by_minute(since, until, "account"),
    }
    gpu_rows = sum(j[4] for j in jobs)
    print(f"[{kind}] {len(jobs):,} jobs, {gpu_rows:,} job x GPU ledger rows")
    print(f"  ingest, one call per job event ({ingested:,} rows of {args.ingest_jobs:,} "
          f"jobs): {rate:,.0f} rows/s")
    print(f"  ingest, one call per node-minute report of 8 rows ({node_rows:,} rows): "
          f"{node_rate:,.0f} rows/s")
    print(f"  bulk load of the ledger: {load_s:.1f} s; rollup back-fill: {rollup_s:.1f} s")
    for name, fn in q.items():
        took_s = timed(fn)
        ratio = f" = {took_s / TARGET_S:.3f} x the 1 s target" if "month" in name else ""
        print(f"  query {name}: {took_s * 1000:.1f} ms (best of 3){ratio}")
    for g, query in month.items():
        t0 = time.perf_counter()
        plain = store._usage_from_tables(query)  # type: ignore[attr-defined]
        plain_s = time.perf_counter() - t0
        same = store.usage(query) == plain
        print(f"  month per {g} from acct_jobs alone (the pre-rollup path): "
              f"{plain_s * 1000:.0f} ms; rollup answer identical: {'yes' if same else 'NO'}")
        if not same:
            raise SystemExit(f"[{kind}] rollup answer differs from acct_jobs for {g}")
    store.close()
    print(f"  size on disk: {size_of() / 2**20:,.0f} MiB")  # type: ignore[operator]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=1_000_000)
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--ingest-jobs", type=int, default=5000)
    ap.add_argument("--ingest-nodes", type=int, default=100)
    ap.add_argument("--ingest-minutes", type=int, default=20)
    ap.add_argument("--postgres", action="store_true", help="also a real PostgreSQL")
    args = ap.parse_args()
    jobs = make_jobs(args.jobs, args.nodes, random.Random(1))
    tmp = Path(tempfile.mkdtemp(prefix="gf-acct-bench-"))
    try:
        db = tmp / "state.db"
        run("sqlite", str(db), jobs, args,
            lambda: sum(p.stat().st_size for p in tmp.glob("state.db*")))
        if args.postgres:
            from tests.scheduler.pg_server import PgServer

            base = Path(tempfile.mkdtemp(prefix="gf-pg-"))
            os.chmod(base, 0o755)  # noqa: S103 - the server runs as postgres and must enter it
            server = PgServer(base)
            server.start()
            try:
                dsn = server.create_database()

                def pg_size() -> int:
                    s = open_store(dsn)
                    with s._read() as c:  # type: ignore[attr-defined]
                        r = c.execute("SELECT sum(pg_total_relation_size(oid)) FROM pg_class "
                                      "WHERE relkind = 'r' AND relname LIKE 'acct%'"
                                      ).fetchone()
                    s.close()
                    return int(r[0])

                run("postgres", dsn, jobs, args, pg_size)
            finally:
                server.stop()
                shutil.rmtree(base, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
