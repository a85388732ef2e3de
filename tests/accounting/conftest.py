"""Accounting tests reuse the store fixtures: SQLite and a real PostgreSQL started here."""

from tests.scheduler.conftest import Backend, pg_server, store_backend

__all__ = ["Backend", "pg_server", "store_backend"]
