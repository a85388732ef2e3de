"""Fixtures for the security tests: a real PostgreSQL for the standby controllers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.scheduler.pg_server import PgServer, started_pg_server


@pytest.fixture(scope="session")
def pg() -> Iterator[PgServer]:
    with started_pg_server("gf-sec-pg-") as server:
        yield server
