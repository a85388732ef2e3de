"""The embedded state store: one SQLite file in WAL mode.

One connection behind a lock: writes are short and serialised, and WAL lets `gpufleet nodes`
read from another process while the controller writes.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .base import SqlStore, check_schema_version
from .migrations import MIGRATIONS, statements
from .rows import StoreError

WAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024
SMALL_WAL_PAGES = 64  # 256 KiB of 4 KiB pages


class SqliteStore(SqlStore):
    """SQLite in WAL mode; migrations applied at open under SQLite's write lock."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.target = str(path)
        self._wal_stuck = False  # a write failed on a full disk: checkpoint before the next
        try:
            if str(path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None,
                                       timeout=10.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: no corruption on crash
            self._db.execute("PRAGMA foreign_keys=ON")
            # a checkpoint cuts the WAL back to this, so one burst does not keep it large
            self._db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
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
            if self._wal_stuck:
                self._checkpoint_after_full()
            try:
                # IMMEDIATE: take the write lock now, so a second process waits here instead
                # of failing half-way through with SQLITE_BUSY
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise StoreError(f"SQLite store {self.path}: {e}") from e
            try:
                yield self._db
            except sqlite3.Error as e:
                self._failed(e)
                raise StoreError(f"SQLite store {self.path}: {e}") from e
            except BaseException:
                self._rollback()
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._failed(e)
                raise StoreError(f"SQLite store {self.path}: commit failed: {e}") from e

    def _rollback(self) -> None:
        # a failed COMMIT can leave the transaction open: the next BEGIN would fail for ever
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    def _failed(self, error: sqlite3.Error) -> None:
        self._rollback()
        code = getattr(error, "sqlite_errorcode", None)
        if code is not None and code & 0xFF in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR):
            self._wal_stuck = True
            # a disk that filled once is short of room: from now on keep the WAL small
            # (checkpoint every SMALL_WAL_PAGES, not SQLite's 1000), so that it cannot grow
            # into the room just made and fill the disk again before its next checkpoint
            with contextlib.suppress(sqlite3.Error):
                self._db.execute(f"PRAGMA wal_autocheckpoint={SMALL_WAL_PAGES}")

    def _checkpoint_after_full(self) -> None:
        """Before the first write after a full disk: empty the WAL, if the disk has room.

        The WAL restarts from its beginning only after a complete checkpoint, and a
        checkpoint needs room to grow the database file. On a disk the WAL filled, none
        completes; once space is freed the WAL, still short of the auto-checkpoint size,
        grows into the freed space and fills the disk again a few writes later, for good.
        A truncating checkpoint as soon as there is room breaks that circle.
        """
        try:
            busy, _log, _done = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error:
            return  # still no room: the write that follows fails and says so
        if not busy:
            self._wal_stuck = False

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
