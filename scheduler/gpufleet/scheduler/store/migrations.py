"""Schema migrations of the state store, one numbering for both SQL dialects.

Migration N is `MIGRATIONS[N-1]` on SQLite and `PG_MIGRATIONS[N-1]` on PostgreSQL; both lists
always have the same length, and a store records the highest number applied in
`schema_version`. Each migration runs in one transaction with the version bump, so a crash
leaves the previous version intact. Never edit a released migration: append a new one.
"""

from __future__ import annotations

# Recomputes the accounting rollups of migration 7 from acct_jobs and acct_minute: part of
# migration 7 (back-fill of a version 6 store) and `rebuild_acct_rollups()`. Portable SQL:
# integer division of BIGINT/INTEGER truncates in both dialects (times are >= 0).
ACCT_ROLLUP_BACKFILL = """
DELETE FROM acct_jobday_account;
DELETE FROM acct_jobday_user;
DELETE FROM acct_day;
INSERT INTO acct_jobday_account (edge, day_ms, account, jobs, gpus, allocated_ms, busy_ms,
                                 energy_mj, lost_ms)
    SELECT 'start', (start_ms / 86400000) * 86400000, account, count(*), sum(gpus),
           sum(allocated_ms), sum(busy_ms), sum(energy_mj), sum(lost_ms)
    FROM acct_jobs GROUP BY 2, 3;
INSERT INTO acct_jobday_account (edge, day_ms, account, jobs, gpus, allocated_ms, busy_ms,
                                 energy_mj, lost_ms)
    SELECT 'end', (end_ms / 86400000) * 86400000, account, count(*), sum(gpus),
           sum(allocated_ms), sum(busy_ms), sum(energy_mj), sum(lost_ms)
    FROM acct_jobs WHERE end_ms IS NOT NULL GROUP BY 2, 3;
INSERT INTO acct_jobday_user (edge, day_ms, user_name, jobs, gpus, allocated_ms, busy_ms,
                              energy_mj, lost_ms)
    SELECT 'start', (start_ms / 86400000) * 86400000, user_name, count(*), sum(gpus),
           sum(allocated_ms), sum(busy_ms), sum(energy_mj), sum(lost_ms)
    FROM acct_jobs GROUP BY 2, 3;
INSERT INTO acct_jobday_user (edge, day_ms, user_name, jobs, gpus, allocated_ms, busy_ms,
                              energy_mj, lost_ms)
    SELECT 'end', (end_ms / 86400000) * 86400000, user_name, count(*), sum(gpus),
           sum(allocated_ms), sum(busy_ms), sum(energy_mj), sum(lost_ms)
    FROM acct_jobs WHERE end_ms IS NOT NULL GROUP BY 2, 3;
INSERT INTO acct_day (day_ms, account, user_name, allocated_ms, busy_ms, energy_mj)
    SELECT (minute_ms / 86400000) * 86400000, account, user_name, sum(allocated_ms),
           sum(busy_ms), sum(energy_mj)
    FROM acct_minute GROUP BY 1, 2, 3;
"""


def _acct_rollups(ms: str) -> str:
    """Migration 7 in one dialect (`ms`: the type of millisecond columns)."""
    return f"""
    CREATE TABLE acct_jobday_account (
        edge          TEXT NOT NULL,           -- 'start': by the job's start day, 'end': end day
        day_ms        {ms} NOT NULL,           -- UTC day, epoch ms
        account       TEXT NOT NULL,
        jobs          {ms} NOT NULL,
        gpus          {ms} NOT NULL,
        allocated_ms  {ms} NOT NULL,
        busy_ms       {ms} NOT NULL,
        energy_mj     {ms} NOT NULL,
        lost_ms       {ms} NOT NULL,
        PRIMARY KEY (edge, day_ms, account)
    );
    CREATE TABLE acct_jobday_user (
        edge          TEXT NOT NULL,
        day_ms        {ms} NOT NULL,
        user_name     TEXT NOT NULL,
        jobs          {ms} NOT NULL,
        gpus          {ms} NOT NULL,
        allocated_ms  {ms} NOT NULL,
        busy_ms       {ms} NOT NULL,
        energy_mj     {ms} NOT NULL,
        lost_ms       {ms} NOT NULL,
        PRIMARY KEY (edge, day_ms, user_name)
    );
    CREATE TABLE acct_day (
        day_ms        {ms} NOT NULL,
        account       TEXT NOT NULL,
        user_name     TEXT NOT NULL,
        allocated_ms  {ms} NOT NULL,
        busy_ms       {ms} NOT NULL,
        energy_mj     {ms} NOT NULL,
        PRIMARY KEY (day_ms, account, user_name)
    );
    CREATE TABLE acct_lost (
        job_id        TEXT NOT NULL,
        run           INTEGER NOT NULL,        -- Slurm's restart count of the killed run
        node          TEXT NOT NULL,           -- one charge per killed run and node
        lost_ms       {ms} NOT NULL,           -- wall ms, charged to each GPU there
        gpus          INTEGER NOT NULL,        -- how many ledger rows it was charged to
        charged_ms    {ms} NOT NULL,
        PRIMARY KEY (job_id, run, node)
    );
    CREATE INDEX acct_jobs_end ON acct_jobs(end_ms);
    """ + ACCT_ROLLUP_BACKFILL


MIGRATIONS: list[str] = [
    # 1: the foundation schema
    """
    CREATE TABLE nodes (
        name            TEXT PRIMARY KEY,
        hostname        TEXT NOT NULL DEFAULT '',
        gpu_count       INTEGER NOT NULL DEFAULT 0,
        inventory       BLOB,
        health          TEXT NOT NULL DEFAULT 'unknown',
        health_reason   TEXT NOT NULL DEFAULT '',
        health_evidence TEXT NOT NULL DEFAULT '',
        agent_instance  TEXT NOT NULL DEFAULT '',
        last_seq        INTEGER NOT NULL DEFAULT 0,
        first_seen_ms   INTEGER NOT NULL,
        last_seen_ms    INTEGER NOT NULL
    );
    CREATE TABLE verdicts (
        node        TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
        check_name  TEXT NOT NULL,
        gpu_index   INTEGER NOT NULL,          -- -1: the node as a whole
        severity    TEXT NOT NULL,
        reason_code TEXT NOT NULL,
        evidence    TEXT NOT NULL,
        since_ms    INTEGER NOT NULL,
        PRIMARY KEY (node, check_name, gpu_index)
    );
    CREATE TABLE events (
        id          INTEGER PRIMARY KEY,
        node        TEXT NOT NULL,
        ts_ms       INTEGER NOT NULL,          -- when it happened, agent clock
        received_ms INTEGER NOT NULL,          -- when the controller stored it
        kind        TEXT NOT NULL,
        severity    TEXT NOT NULL,
        reason_code TEXT NOT NULL,
        evidence    TEXT NOT NULL,
        gpu_index   INTEGER,
        xid         INTEGER
    );
    CREATE INDEX events_node_ts ON events(node, ts_ms);
    CREATE TABLE actions (
        id          INTEGER PRIMARY KEY,
        node        TEXT NOT NULL,
        action      TEXT NOT NULL,             -- drain, resume, ...
        reason      TEXT NOT NULL,
        actor       TEXT NOT NULL,             -- "policy" or a user name
        status      TEXT NOT NULL,             -- queued, done, failed, skipped, shadow
        detail      TEXT NOT NULL DEFAULT '',
        attempts    INTEGER NOT NULL DEFAULT 0,
        created_ms  INTEGER NOT NULL,
        done_ms     INTEGER,
        fault_ms    INTEGER                    -- the fault that caused it, agent clock
    );
    CREATE INDEX actions_node ON actions(node, created_ms);
    """,
    # 2: verdicts about things that are not GPUs (IB ports, paths) get a subject
    """
    CREATE TABLE verdicts_v2 (
        node        TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
        check_name  TEXT NOT NULL,
        gpu_index   INTEGER NOT NULL,          -- -1: not about one GPU
        subject     TEXT NOT NULL DEFAULT '',  -- "mlx5_0/1", "/tmp", ...
        severity    TEXT NOT NULL,
        reason_code TEXT NOT NULL,
        evidence    TEXT NOT NULL,
        since_ms    INTEGER NOT NULL,
        PRIMARY KEY (node, check_name, gpu_index, subject)
    );
    INSERT INTO verdicts_v2 (node, check_name, gpu_index, subject, severity, reason_code,
                             evidence, since_ms)
        SELECT node, check_name, gpu_index, '', severity, reason_code, evidence, since_ms
        FROM verdicts;
    DROP TABLE verdicts;
    ALTER TABLE verdicts_v2 RENAME TO verdicts;
    """,
    # 3: node reachability (liveness) and what the degraded policy changed, to undo it
    """
    ALTER TABLE nodes ADD COLUMN reachable INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE nodes ADD COLUMN unreachable_since_ms INTEGER;
    CREATE TABLE policy_state (
        node            TEXT PRIMARY KEY,
        original_weight INTEGER,                -- NULL: the weight was not changed
        feature_added   TEXT NOT NULL DEFAULT '',  -- '': no feature was added
        applied_ms      INTEGER NOT NULL
    );
    CREATE INDEX events_ts ON events(ts_ms);
    """,
    # 4: the newest checkpoint each job registered (gpufleet.agent.job), for recovery
    """
    CREATE TABLE checkpoints (
        job_id      TEXT PRIMARY KEY,
        node        TEXT NOT NULL,
        step        INTEGER NOT NULL,
        path        TEXT NOT NULL,
        time_ms     INTEGER NOT NULL,          -- when the job saved it, node clock
        uid         INTEGER,                   -- the registering process, from the kernel
        received_ms INTEGER NOT NULL
    );
    """,
    # 5: recovery of jobs hit by a fatal node: one row per job and fault, every step timed
    """
    CREATE TABLE recoveries (
        id              INTEGER PRIMARY KEY,
        job_id          TEXT NOT NULL,
        node            TEXT NOT NULL,         -- the node that turned fatal
        status          TEXT NOT NULL,         -- running, requeued, running_again, skipped, ...
        detail          TEXT NOT NULL DEFAULT '',
        restart         INTEGER NOT NULL,      -- this is gpufleet's Nth restart of the job
        fault_ms        INTEGER,               -- agent clock
        drain_ms        INTEGER,               -- controller clock from here on
        signal_ms       INTEGER,
        requeue_ms      INTEGER,
        running_ms      INTEGER,
        checkpoint_step INTEGER,               -- newest registered checkpoint at the requeue
        checkpoint_ms   INTEGER,
        lost_work_ms    INTEGER,               -- requeue - that checkpoint (or job start)
        created_ms      INTEGER NOT NULL
    );
    CREATE INDEX recoveries_job ON recoveries(job_id, id);
    """,
    # 6: job accounting: a ledger per job x node x GPU (cumulative totals, the newest report
    # wins), per-job totals for fast per-user/per-account queries, per-minute rollups
    """
    CREATE TABLE acct_ledger (
        job_id        TEXT NOT NULL,
        node          TEXT NOT NULL,
        gpu_index     INTEGER NOT NULL,
        user_name     TEXT NOT NULL,
        account       TEXT NOT NULL,
        start_ms      INTEGER NOT NULL,
        end_ms        INTEGER,
        as_of_ms      INTEGER NOT NULL,
        allocated_ms  INTEGER NOT NULL,
        busy_ms       INTEGER NOT NULL,
        energy_mj     INTEGER NOT NULL,
        lost_ms       INTEGER NOT NULL DEFAULT 0,
        idle_since_ms INTEGER,
        PRIMARY KEY (job_id, node, gpu_index)
    );
    CREATE INDEX acct_ledger_node ON acct_ledger(node, start_ms);
    CREATE TABLE acct_jobs (
        job_id        TEXT PRIMARY KEY,
        user_name     TEXT NOT NULL,
        account       TEXT NOT NULL,
        start_ms      INTEGER NOT NULL,
        end_ms        INTEGER,
        gpus          INTEGER NOT NULL,
        allocated_ms  INTEGER NOT NULL,
        busy_ms       INTEGER NOT NULL,
        energy_mj     INTEGER NOT NULL,
        lost_ms       INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX acct_jobs_start ON acct_jobs(start_ms);
    CREATE INDEX acct_jobs_account ON acct_jobs(account, start_ms);
    CREATE INDEX acct_jobs_user ON acct_jobs(user_name, start_ms);
    CREATE TABLE acct_minute (
        minute_ms     INTEGER NOT NULL,
        account       TEXT NOT NULL,
        user_name     TEXT NOT NULL,
        allocated_ms  INTEGER NOT NULL,
        busy_ms       INTEGER NOT NULL,
        energy_mj     INTEGER NOT NULL,
        PRIMARY KEY (minute_ms, account, user_name)
    );
    """,
    # 7: accounting rollups for fast exact queries at millions of jobs (store/acct.py): job
    # totals by start and by end day per account and per user, usage per day, lost-time
    # charges by recovery; back-filled from a version 6 store's acct_jobs and acct_minute
    _acct_rollups("INTEGER"),
    # 8: each health event remembers the report it came in (agent instance + sequence
    # number), unique per node: a report replayed after a controller crash between storing
    # the event and recording the node's last sequence number cannot store it twice.
    # Events from before carry NULLs (NULLs never collide in a unique index).
    """
    ALTER TABLE events ADD COLUMN agent_instance TEXT;
    ALTER TABLE events ADD COLUMN seq INTEGER;
    CREATE UNIQUE INDEX events_report ON events(node, agent_instance, seq)
    """,
    # 9: runs of a job (store/acct.py): a requeued job runs again under the same job id, so
    # the ledger is kept per job x run (Slurm's restart count) x node x GPU; rows stored
    # before are run 0. `source`: 'hook' (Prolog/Epilog, exact) or 'proc' (/proc safety
    # net), '' unknown (rows before, agents before). acct_jobs counts each job's runs.
    # SQLite cannot change a primary key in place: the table is copied.
    """
    CREATE TABLE acct_ledger_v9 (
        job_id        TEXT NOT NULL,
        run           INTEGER NOT NULL DEFAULT 0,
        node          TEXT NOT NULL,
        gpu_index     INTEGER NOT NULL,
        user_name     TEXT NOT NULL,
        account       TEXT NOT NULL,
        start_ms      INTEGER NOT NULL,
        end_ms        INTEGER,
        as_of_ms      INTEGER NOT NULL,
        allocated_ms  INTEGER NOT NULL,
        busy_ms       INTEGER NOT NULL,
        energy_mj     INTEGER NOT NULL,
        lost_ms       INTEGER NOT NULL DEFAULT 0,
        idle_since_ms INTEGER,
        source        TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (job_id, run, node, gpu_index)
    );
    INSERT INTO acct_ledger_v9 (job_id, run, node, gpu_index, user_name, account, start_ms,
                                end_ms, as_of_ms, allocated_ms, busy_ms, energy_mj, lost_ms,
                                idle_since_ms, source)
        SELECT job_id, 0, node, gpu_index, user_name, account, start_ms, end_ms, as_of_ms,
               allocated_ms, busy_ms, energy_mj, lost_ms, idle_since_ms, ''
        FROM acct_ledger;
    DROP TABLE acct_ledger;
    ALTER TABLE acct_ledger_v9 RENAME TO acct_ledger;
    CREATE INDEX acct_ledger_node ON acct_ledger(node, start_ms);
    ALTER TABLE acct_jobs ADD COLUMN runs INTEGER NOT NULL DEFAULT 1
    """,
]

# PostgreSQL: BIGINT for millisecond times (past 2038 and past 2^31 ids), BYTEA, identity ids.
PG_MIGRATIONS: list[str] = [
    # 1: the foundation schema
    """
    CREATE TABLE nodes (
        name            TEXT PRIMARY KEY,
        hostname        TEXT NOT NULL DEFAULT '',
        gpu_count       INTEGER NOT NULL DEFAULT 0,
        inventory       BYTEA,
        health          TEXT NOT NULL DEFAULT 'unknown',
        health_reason   TEXT NOT NULL DEFAULT '',
        health_evidence TEXT NOT NULL DEFAULT '',
        agent_instance  TEXT NOT NULL DEFAULT '',
        last_seq        BIGINT NOT NULL DEFAULT 0,
        first_seen_ms   BIGINT NOT NULL,
        last_seen_ms    BIGINT NOT NULL
    );
    CREATE TABLE verdicts (
        node        TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
        check_name  TEXT NOT NULL,
        gpu_index   INTEGER NOT NULL,
        severity    TEXT NOT NULL,
        reason_code TEXT NOT NULL,
        evidence    TEXT NOT NULL,
        since_ms    BIGINT NOT NULL,
        PRIMARY KEY (node, check_name, gpu_index)
    );
    CREATE TABLE events (
        id          BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        node        TEXT NOT NULL,
        ts_ms       BIGINT NOT NULL,
        received_ms BIGINT NOT NULL,
        kind        TEXT NOT NULL,
        severity    TEXT NOT NULL,
        reason_code TEXT NOT NULL,
        evidence    TEXT NOT NULL,
        gpu_index   INTEGER,
        xid         INTEGER
    );
    CREATE INDEX events_node_ts ON events(node, ts_ms);
    CREATE TABLE actions (
        id          BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        node        TEXT NOT NULL,
        action      TEXT NOT NULL,
        reason      TEXT NOT NULL,
        actor       TEXT NOT NULL,
        status      TEXT NOT NULL,
        detail      TEXT NOT NULL DEFAULT '',
        attempts    INTEGER NOT NULL DEFAULT 0,
        created_ms  BIGINT NOT NULL,
        done_ms     BIGINT,
        fault_ms    BIGINT
    );
    CREATE INDEX actions_node ON actions(node, created_ms);
    """,
    # 2: verdicts get a subject (PostgreSQL alters in place; DDL is transactional)
    """
    ALTER TABLE verdicts ADD COLUMN subject TEXT NOT NULL DEFAULT '';
    ALTER TABLE verdicts DROP CONSTRAINT verdicts_pkey;
    ALTER TABLE verdicts ADD PRIMARY KEY (node, check_name, gpu_index, subject);
    """,
    # 3: node reachability and the degraded policy's memory
    """
    ALTER TABLE nodes ADD COLUMN reachable BOOLEAN NOT NULL DEFAULT TRUE;
    ALTER TABLE nodes ADD COLUMN unreachable_since_ms BIGINT;
    CREATE TABLE policy_state (
        node            TEXT PRIMARY KEY,
        original_weight INTEGER,
        feature_added   TEXT NOT NULL DEFAULT '',
        applied_ms      BIGINT NOT NULL
    );
    CREATE INDEX events_ts ON events(ts_ms);
    """,
    # 4: the newest checkpoint each job registered
    """
    CREATE TABLE checkpoints (
        job_id      TEXT PRIMARY KEY,
        node        TEXT NOT NULL,
        step        BIGINT NOT NULL,
        path        TEXT NOT NULL,
        time_ms     BIGINT NOT NULL,
        uid         BIGINT,
        received_ms BIGINT NOT NULL
    );
    """,
    # 5: recovery of jobs hit by a fatal node
    """
    CREATE TABLE recoveries (
        id              BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        job_id          TEXT NOT NULL,
        node            TEXT NOT NULL,
        status          TEXT NOT NULL,
        detail          TEXT NOT NULL DEFAULT '',
        restart         INTEGER NOT NULL,
        fault_ms        BIGINT,
        drain_ms        BIGINT,
        signal_ms       BIGINT,
        requeue_ms      BIGINT,
        running_ms      BIGINT,
        checkpoint_step BIGINT,
        checkpoint_ms   BIGINT,
        lost_work_ms    BIGINT,
        created_ms      BIGINT NOT NULL
    );
    CREATE INDEX recoveries_job ON recoveries(job_id, id);
    """,
    # 6: job accounting: a ledger per job x node x GPU (cumulative totals, the newest report
    # wins), per-job totals for fast per-user/per-account queries, per-minute rollups
    """
    CREATE TABLE acct_ledger (
        job_id        TEXT NOT NULL,
        node          TEXT NOT NULL,
        gpu_index     INTEGER NOT NULL,
        user_name     TEXT NOT NULL,
        account       TEXT NOT NULL,
        start_ms      BIGINT NOT NULL,
        end_ms        BIGINT,
        as_of_ms      BIGINT NOT NULL,
        allocated_ms  BIGINT NOT NULL,
        busy_ms       BIGINT NOT NULL,
        energy_mj     BIGINT NOT NULL,
        lost_ms       BIGINT NOT NULL DEFAULT 0,
        idle_since_ms BIGINT,
        PRIMARY KEY (job_id, node, gpu_index)
    );
    CREATE INDEX acct_ledger_node ON acct_ledger(node, start_ms);
    CREATE TABLE acct_jobs (
        job_id        TEXT PRIMARY KEY,
        user_name     TEXT NOT NULL,
        account       TEXT NOT NULL,
        start_ms      BIGINT NOT NULL,
        end_ms        BIGINT,
        gpus          INTEGER NOT NULL,
        allocated_ms  BIGINT NOT NULL,
        busy_ms       BIGINT NOT NULL,
        energy_mj     BIGINT NOT NULL,
        lost_ms       BIGINT NOT NULL DEFAULT 0
    );
    CREATE INDEX acct_jobs_start ON acct_jobs(start_ms);
    CREATE INDEX acct_jobs_account ON acct_jobs(account, start_ms);
    CREATE INDEX acct_jobs_user ON acct_jobs(user_name, start_ms);
    CREATE TABLE acct_minute (
        minute_ms     BIGINT NOT NULL,
        account       TEXT NOT NULL,
        user_name     TEXT NOT NULL,
        allocated_ms  BIGINT NOT NULL,
        busy_ms       BIGINT NOT NULL,
        energy_mj     BIGINT NOT NULL,
        PRIMARY KEY (minute_ms, account, user_name)
    );
    """,
    # 7: accounting rollups (see MIGRATIONS[6])
    _acct_rollups("BIGINT"),
    # 8: events keyed by their report (see MIGRATIONS[7])
    """
    ALTER TABLE events ADD COLUMN agent_instance TEXT;
    ALTER TABLE events ADD COLUMN seq BIGINT;
    CREATE UNIQUE INDEX events_report ON events(node, agent_instance, seq)
    """,
    # 9: runs of a job (see MIGRATIONS[8]); PostgreSQL changes the key in place
    """
    ALTER TABLE acct_ledger ADD COLUMN run INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE acct_ledger ADD COLUMN source TEXT NOT NULL DEFAULT '';
    ALTER TABLE acct_ledger DROP CONSTRAINT acct_ledger_pkey;
    ALTER TABLE acct_ledger ADD PRIMARY KEY (job_id, run, node, gpu_index);
    ALTER TABLE acct_jobs ADD COLUMN runs INTEGER NOT NULL DEFAULT 1
    """,
]

if len(MIGRATIONS) != len(PG_MIGRATIONS):  # pragma: no cover - caught by any test run
    raise RuntimeError("every migration needs both dialects: MIGRATIONS and PG_MIGRATIONS differ")


def statements(migration: str) -> list[str]:
    """Split a migration into statements (no migration has a ';' inside a literal)."""
    return [s.strip() for s in migration.split(";") if s.strip()]
