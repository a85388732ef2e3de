"""Fixtures for the security tests: a real PostgreSQL for the standby controllers."""

from __future__ import annotations

import pytest

from tests.scheduler.pg_server import PgServer


@pytest.fixture
def pg(pg_server: PgServer) -> PgServer:
    """The session's PostgreSQL (tests/conftest.py); a test takes its own database from it."""
    return pg_server
