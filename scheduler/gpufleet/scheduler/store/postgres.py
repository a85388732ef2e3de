"""The production state store: PostgreSQL through psycopg 3.

A standby controller opens the same database and sees everything the active one wrote.
Migrations run in one transaction under a PostgreSQL advisory lock, so two controllers
starting at once apply each migration exactly once. A connection the server dropped is
replaced on the next call; the call that met the drop fails with StoreError (the caller
decides whether to retry). Passwords never appear in messages.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import conninfo as pg_conninfo

from .acct import BulkWrite
from .base import SqlStore, check_schema_version
from .migrations import PG_MIGRATIONS, statements
from .rows import StoreError

# pg_advisory_xact_lock key: any constant shared by every gpufleet controller ("gpufleet")
MIGRATION_LOCK_KEY = 0x6770_666C_6565_74
CONNECT_TIMEOUT_S = 10
# a statement stuck behind a lock must not hang ingest for ever
STATEMENT_TIMEOUT_MS = 30_000


def describe_target(dsn: str) -> str:
    """postgresql://user@host:port/db without the password, for messages and logs."""
    try:
        parts = pg_conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "postgresql://(unparseable target)"
    user = f"{parts['user']}@" if parts.get("user") else ""
    host = str(parts.get("host") or "localhost")
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{host}{port}/{parts.get('dbname') or ''}"


class _PgConn:
    """Adapts a psycopg connection to the `?` placeholders the shared SQL uses."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Any = ()) -> psycopg.Cursor[Any]:
        # the shared SQL has no '%' and no '?' inside literals (checked by the test suite)
        return self.conn.execute(sql.replace("?", "%s"), params or None)

    def executemany(self, sql: str, params: Any) -> None:
        # psycopg 3 pipelines the rows: one round trip for the batch, not one per row
        with self.conn.cursor() as cur:
            cur.executemany(sql.replace("?", "%s"), params)



class PostgresStore(SqlStore):
    """PostgreSQL state store: one connection behind a lock, autocommit + explicit transactions."""

    _FOR_UPDATE = " FOR UPDATE"

    def __init__(self, dsn: str) -> None:
        super().__init__()
        self.dsn = dsn
        self.target = describe_target(dsn)
        self._conn: psycopg.Connection[Any] | None = None
        with self._lock:
            self._connect()
        try:
            self._migrate()
        except StoreError:
            self.close()
            raise

    def _write_many(self, db: Any, write: BulkWrite, rows: list[tuple[Any, ...]]) -> None:
        """One statement over one array per column (unnest), not one per row: a ledger batch
        (an agent's report, its minute rollups) is one round trip and one plan."""
        if rows:
            db.execute(write.array_sql(), [list(c) for c in zip(*rows, strict=True)])

    def _connect(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        try:
            self._conn = psycopg.connect(
                self.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
                application_name="gpufleet-controller",
            )
        except psycopg.Error as e:
            raise StoreError(f"cannot connect to PostgreSQL store {self.target}: {e}") from e
        return self._conn

    @contextmanager
    def _tx(self) -> Iterator[_PgConn]:
        with self._lock:
            conn = self._connect()
            try:
                with conn.transaction():
                    yield _PgConn(conn)
            except psycopg.Error as e:
                raise StoreError(f"PostgreSQL store {self.target}: {e}") from e

    @contextmanager
    def _batch_tx(self) -> Iterator[_PgConn]:
        """A transaction in pipeline mode: statements go out without waiting for each answer;
        reading a result (fetch*) waits. record_usage reads once, then queues its writes and
        the COMMIT: two round trips for an agent's report, whatever its size."""
        with self._lock:
            conn = self._connect()
            try:
                with conn.pipeline(), conn.transaction():
                    yield _PgConn(conn)
            except psycopg.Error as e:
                raise StoreError(f"PostgreSQL store {self.target}: {e}") from e

    @contextmanager
    def _read(self) -> Iterator[_PgConn]:
        with self._lock:
            conn = self._connect()
            try:
                yield _PgConn(conn)
            except psycopg.Error as e:
                raise StoreError(f"PostgreSQL store {self.target}: {e}") from e

    def _migrate(self) -> None:
        with self._tx() as db:
            # held until this transaction ends: a second controller waits, then finds the
            # schema current and applies nothing
            db.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK_KEY,))
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT max(version) FROM schema_version").fetchone()
            version = int(row[0] or 0) if row else 0
            check_schema_version(version, len(PG_MIGRATIONS), self.target)
            for i in range(version, len(PG_MIGRATIONS)):
                for stmt in statements(PG_MIGRATIONS[i]):
                    db.execute(stmt)
                db.execute("INSERT INTO schema_version VALUES (?)", (i + 1,))

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
