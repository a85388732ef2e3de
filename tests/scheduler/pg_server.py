"""A throw-away PostgreSQL server for tests: initdb into a temp dir, pg_ctl start on a free
port, stopped by PID at the end.

Debian's server binaries live in /usr/lib/postgresql/<major>/bin (not on PATH);
$GPUFLEET_PG_BIN overrides. As root the server runs as the `postgres` user (initdb refuses
root). Trust authentication on 127.0.0.1 only: the server lives as long as the test session.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg

from tests.support.ci import unavailable
from tests.support.net import free_port

DEBIAN_PG_BINS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


class PgServerError(Exception):
    """The test PostgreSQL could not start; the message says why and which log to read."""


def find_pg_bin() -> Path:
    env = os.environ.get("GPUFLEET_PG_BIN")
    candidates = [Path(env)] if env else [*DEBIAN_PG_BINS]
    if not env and (initdb := shutil.which("initdb")):
        candidates.append(Path(initdb).parent)
    for c in candidates:
        if (c / "initdb").exists() and (c / "pg_ctl").exists():
            return c
    raise PgServerError(
        "no PostgreSQL server binaries (initdb, pg_ctl) in "
        f"{[str(c) for c in candidates] or '/usr/lib/postgresql/*/bin'}: "
        "apt-get install postgresql, or set GPUFLEET_PG_BIN"
    )



class PgServer:
    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.data_dir = base_dir / "data"
        self.sock_dir = base_dir / "sock"
        self.log_path = base_dir / "postgres.log"
        self.port = 0
        self.pid: int | None = None
        self._run_as: list[str] = []
        self._db_counter = 0

    def _cmd(self, *argv: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                [*self._run_as, *argv], capture_output=True, text=True, timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise PgServerError(f"`{argv[0]}` timed out after {timeout_s} s") from e

    def start(self) -> None:
        bin_dir = find_pg_bin()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.sock_dir.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError as e:
                raise PgServerError("running as root and there is no `postgres` user") from e
            self._run_as = ["runuser", "-u", "postgres", "--"]
            self.base_dir.chmod(0o755)
            for p in (self.base_dir, self.sock_dir):
                shutil.chown(p, "postgres", "postgres")
        init = self._cmd(str(bin_dir / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
                         "-A", "trust", "-E", "UTF8", "--no-sync", "--no-instructions")
        if init.returncode != 0:
            raise PgServerError(f"initdb failed ({init.returncode}): {init.stderr.strip()}")
        self.port = free_port()
        opts = (f"-p {self.port} -k {self.sock_dir} -c listen_addresses=127.0.0.1 "
                "-c fsync=off -c max_connections=50")
        proc = self._cmd(str(bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l",
                         str(self.log_path), "-o", opts, "-w", "-t", "60", "start", timeout_s=90)
        pid_file = self.data_dir / "postmaster.pid"
        if pid_file.exists():
            self.pid = int(pid_file.read_text().split()[0])
        if proc.returncode != 0:
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() \
                else "(no log)"
            raise PgServerError(
                f"pg_ctl start failed ({proc.returncode}): {proc.stderr.strip()}; "
                f"read {self.log_path}:\n{tail}"
            )

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        self._db_counter += 1
        name = f"gf_test_{os.getpid()}_{self._db_counter}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def drop_database(self, dsn: str) -> None:
        name = dsn.rsplit("/", 1)[1]
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self, timeout_s: float = 30) -> None:
        """Fast shutdown (SIGINT) of the postmaster by PID; SIGKILL if it will not go."""
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists():
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def started_pg_server(prefix: str) -> Iterator[PgServer]:
    """A PostgreSQL for a test session: started, yielded, stopped by PID, removed. Under
    CI=true one that cannot start FAILS the tests; elsewhere they skip with the reason."""


    # not under pytest's tmp_path: that is mode 0700 root, and the server runs as `postgres`
    base = Path(tempfile.mkdtemp(prefix=prefix))
    server = PgServer(base)
    try:
        server.start()
    except PgServerError as e:
        shutil.rmtree(base, ignore_errors=True)
        unavailable(f"the test PostgreSQL could not start: {e}")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
