"""Fixtures for the state store tests: a real PostgreSQL (tests/conftest.py's `pg_server`, one per
session, a fresh database per test) and SQLite.

`store_backend` parametrises a test over both backends. Under CI=true a PostgreSQL that
cannot start FAILS the PostgreSQL half (a CI job must not go green by skipping it); elsewhere
it is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from gpufleet.scheduler.store import StateStore, open_store

from tests.support.alertmanager import alertmanager, recorder

from .pg_server import PgServer

# the Alertmanager fixtures (tests/support/alertmanager.py), for every test here
__all__ = ["alertmanager", "recorder"]


@dataclass
class Backend:
    """One store backend under test: where it lives, how to open it, raw SQL beside it."""

    kind: str  # "sqlite" | "postgres"
    target: str
    opened: list[StateStore] = field(default_factory=list)

    def open(self) -> Any:
        store = open_store(self.target)
        self.opened.append(store)
        return store

    def raw(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """Run one statement outside the store (as another tool would), committed at once."""
        if self.kind == "sqlite":
            db = sqlite3.connect(self.target)
            try:
                rows = db.execute(sql, params).fetchall()
                db.commit()
            finally:
                db.close()
            return rows
        with psycopg.connect(self.target, autocommit=True) as conn:
            cur = conn.execute(sql.replace("?", "%s"), params or None)
            return cur.fetchall() if cur.description else []

    def raw_script(self, script: str) -> None:
        """Run a whole migration text outside the store."""
        from gpufleet.scheduler.store.migrations import statements

        for stmt in statements(script):
            self.raw(stmt)


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        backend = Backend("sqlite", str(tmp_path / "state.db"))
        cleanup: Callable[[], None] = lambda: None  # noqa: E731 - nothing to drop
    else:
        server: PgServer = request.getfixturevalue("pg_server")
        dsn = server.create_database()
        backend = Backend("postgres", dsn)
        cleanup = lambda: server.drop_database(dsn)  # noqa: E731
    yield backend
    for s in backend.opened:
        with contextlib.suppress(Exception):  # a test may have closed it already
            s.close()
    cleanup()
