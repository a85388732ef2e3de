"""The embedded state store: one SQLite file in WAL mode.

One connection behind a lock: writes are short and serialised, and WAL lets `gpufleet nodes`
read from another process while the controller writes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .base import SqlStore, StoreError, check_schema_version
from .migrations import MIGRATIONS, statements


class SqliteStore(SqlStore):
    """SQLite in WAL mode; migrations applied at open under SQLite's write lock."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.target = str(path)
        try:
            if str(path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None,
                                       timeout=10.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: no corruption on crash
            self._db.execute("PRAGMA foreign_keys=ON")
        except (sqlite3.Error, OSError) as e:
            raise StoreError(f"cannot open SQLite store {path}: {e}") from e
        try:
            self._migrate()
        except StoreError:
            self._db.close()
            raise

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                # IMMEDIATE: take the write lock now, so a second process waits here instead
                # of failing half-way through with SQLITE_BUSY
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise StoreError(f"SQLite store {self.path}: {e}") from e
            try:
                yield self._db
            except sqlite3.Error as e:
                self._db.execute("ROLLBACK")
                raise StoreError(f"SQLite store {self.path}: {e}") from e
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                raise StoreError(f"SQLite store {self.path}: commit failed: {e}") from e

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as e:
                raise StoreError(f"SQLite store {self.path}: {e}") from e

    def _migrate(self) -> None:
        try:
            with self._tx() as db:
                db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                row = db.execute("SELECT max(version) FROM schema_version").fetchone()
                version = row[0] or 0
                check_schema_version(version, len(MIGRATIONS), str(self.path))
                for i in range(version, len(MIGRATIONS)):
                    for stmt in statements(MIGRATIONS[i]):
                        db.execute(stmt)
                    db.execute("INSERT INTO schema_version VALUES (?)", (i + 1,))
        except StoreError as e:
            if isinstance(e.__cause__, sqlite3.DatabaseError):
                raise StoreError(
                    f"{self.path} is not a usable gpufleet SQLite store: {e.__cause__}"
                ) from e.__cause__
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()
