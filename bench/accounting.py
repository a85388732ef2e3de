"""Accounting ledger at scale: 1,000,000 jobs over 30 days on 1,000 nodes (8 GPUs each).

Prints, for SQLite and (with --postgres) a real PostgreSQL started here:
* ingest rate of the real path (`record_usage`: cumulative rows, one transaction per agent
  report) on a sample of --ingest-jobs jobs, 1 start + 1 end report per job;
* bulk-load time of the full ledger (final rows, executemany; the schema is the real one);
* query latency of typical `gpufleet acct` queries over the month: per account, per user,
  one job, one user's jobs;
* the ledger's size on disk.

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

from gpufleet.scheduler.store import open_store
from gpufleet.scheduler.store.acct import UsageQuery, UsageRow

DAY_MS = 86_400_000
T0 = 1_767_225_600_000  # 2026-01-01 UTC


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


def ingest_rate(store: object, jobs: list[tuple]) -> float:
    """Rows/s through record_usage: a STARTED and an ENDED report per GPU of each job."""
    rows = 0
    t0 = time.perf_counter()
    for job_id, user, acct, node, gpus, start, end in jobs:
        for as_of, end_ms in ((start, None), (end, end)):
            batch = [UsageRow("i" + job_id, node, g, user, acct, start, end_ms, as_of,
                              as_of - start, (as_of - start) // 2, (as_of - start) * 300)
                     for g in range(gpus)]
            store.record_usage(batch)  # type: ignore[attr-defined]
            rows += len(batch)
    return rows / (time.perf_counter() - t0)


def timed(fn: object, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - t0)
    return best


def run(kind: str, target: str, jobs: list[tuple], ingest_jobs: int,
        size_of: object) -> None:
    rng = random.Random(2)
    store = open_store(target)
    rate = ingest_rate(store, jobs[:ingest_jobs])
    load_s = bulk_load(store, jobs, rng)
    if kind == "postgres":
        with store._tx() as db:  # type: ignore[attr-defined]
            db.execute("ANALYZE")
    month = UsageQuery(since_ms=T0, until_ms=T0 + 30 * DAY_MS)
    q = {
        "month per account": lambda: store.usage(
            UsageQuery(since_ms=month.since_ms, until_ms=month.until_ms, group_by="account")),
        "month per user": lambda: store.usage(
            UsageQuery(since_ms=month.since_ms, until_ms=month.until_ms, group_by="user")),
        "one job": lambda: store.usage(UsageQuery(jobs=(jobs[len(jobs) // 2][0],))),
        "one user's jobs, one week": lambda: store.usage(UsageQuery(
            users=("user007",), since_ms=T0 + 7 * DAY_MS, until_ms=T0 + 14 * DAY_MS)),
    }
    gpu_rows = sum(j[4] for j in jobs)
    print(f"[{kind}] {len(jobs):,} jobs, {gpu_rows:,} job x GPU ledger rows")
    print(f"  ingest (record_usage, start+end reports): {rate:,.0f} rows/s")
    print(f"  bulk load of the ledger: {load_s:.1f} s")
    for name, fn in q.items():
        print(f"  query {name}: {timed(fn) * 1000:.1f} ms (best of 3)")
    store.close()
    print(f"  size on disk: {size_of() / 2**20:,.0f} MiB")  # type: ignore[operator]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=1_000_000)
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--ingest-jobs", type=int, default=5000)
    ap.add_argument("--postgres", action="store_true", help="also a real PostgreSQL")
    args = ap.parse_args()
    jobs = make_jobs(args.jobs, args.nodes, random.Random(1))
    tmp = Path(tempfile.mkdtemp(prefix="gf-acct-bench-"))
    try:
        db = tmp / "state.db"
        run("sqlite", str(db), jobs, args.ingest_jobs,
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
                        r = c.execute("SELECT sum(pg_total_relation_size(t)) FROM unnest("
                                      "ARRAY['acct_ledger','acct_jobs','acct_minute']) t"
                                      ).fetchone()
                    s.close()
                    return int(r[0])

                run("postgres", dsn, jobs, args.ingest_jobs, pg_size)
            finally:
                server.stop()
                shutil.rmtree(base, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
