"""Accounting tests reuse the store fixtures: SQLite and a real PostgreSQL (a fresh database of
tests/conftest.py's session server per test)."""

from tests.scheduler.conftest import Backend, store_backend

__all__ = ["Backend", "store_backend"]
