"""Fixtures for the security tests: a real PostgreSQL for the standby controllers."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import IN_CI
from tests.scheduler.pg_server import PgServer, PgServerError


@pytest.fixture(scope="session")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgServer]:
    # not under pytest's tmp_path: that is mode 0700 root, and the server runs as `postgres`
    base = Path(tempfile.mkdtemp(prefix="gf-sec-pg-"))
    server = PgServer(base)
    try:
        server.start()
    except PgServerError as e:
        shutil.rmtree(base, ignore_errors=True)
        if IN_CI:
            pytest.fail(f"CI=true and the test PostgreSQL could not start: {e}", pytrace=False)
        pytest.skip(f"PostgreSQL could not start: {e}")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
