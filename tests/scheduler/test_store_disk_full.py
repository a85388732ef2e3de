"""A full disk under the state store, SQLite and PostgreSQL, without restarting the controller.

The store lives on a small tmpfs (mounted here, as root); a filler file takes the rest of it.
While writes fail, the controller refuses reports (UNAVAILABLE: agents keep them), its gRPC
health says NOT_SERVING and gpufleet_controller_store_up is 0. Once the filler is gone, the
same controller stores again by itself, and keeps storing (hundreds of reports later: the
WAL that filled the disk must not fill it again), ending with exactly the reports acked.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.rpc.v1 import fleet_pb2_grpc as pb_grpc
from gpufleet.scheduler.service.server import Controller
from gpufleet.scheduler.store import open_store
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.security.helpers import hello

from .pg_server import PgServer

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None,
                                reason="mounts a tmpfs: needs root")
NODE = "n1"


@contextlib.contextmanager
def _tmpfs(path: Path, size: str, owner: str | None = None) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size},mode=0700"
    if owner is not None:
        import pwd

        pw = pwd.getpwnam(owner)
        opts += f",uid={pw.pw_uid},gid={pw.pw_gid}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "gf-disk-full", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(path: Path) -> Path:
    filler = path / "filler"
    # unbuffered: every write reaches the file system inside the suppress below (Python 3.14
    # buffers 128 KiB by default, and the last partial buffer would fail at close instead)
    with filler.open("wb", buffering=0) as f:
        block = b"\0" * 65536
        with contextlib.suppress(OSError):  # ENOSPC: full
            while True:
                f.write(block)
                f.flush()
    with contextlib.suppress(OSError), filler.open("ab") as f:  # a last partial block
        f.write(b"\0" * 4096)
    assert os.statvfs(path).f_bavail < 16
    return filler


def _event(seq: int, inst: str) -> pb.AgentMessage:
    now = int(time.time() * 1000)
    return pb.AgentMessage(seq=seq, agent_instance=inst, event=pb.HealthEvent(
        timestamp_ms=now, kind=pb.EVENT_KIND_THERMAL, gpu_index=seq % 8,
        verdict=pb.Verdict(check="thermal", severity=pb.SEVERITY_WARN, reason_code="hot",
                           evidence=f"report {seq} " + "x" * 400, since_ms=now,
                           gpu_index=seq % 8)))


class Agent:
    """The agent's side, as far as this test needs: reports wait until acked, and are
    resent on the next stream after a refusal."""

    def __init__(self, ctl: Controller) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{ctl.port}")
        self.stub = pb_grpc.FleetControllerStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.inst = uuid.uuid4().hex
        self.next_seq = 1
        self.pending: list[pb.AgentMessage] = []
        self.acked: list[int] = []

    def queue(self, n: int) -> None:
        for _ in range(n):
            self.pending.append(_event(self.next_seq, self.inst))
            self.next_seq += 1

    def push(self, chunk: int = 50) -> grpc.StatusCode | None:
        """One stream with (up to `chunk` of) the pending reports; the error that ended it."""
        batch = self.pending[:chunk]
        try:
            for reply in self.stub.Connect(iter([hello(NODE, self.inst), *batch]), timeout=30):
                assert not reply.ack.rejected, reply.ack.rejected
                self.acked.append(reply.ack.seq)
                self.pending = [m for m in self.pending if m.seq > reply.ack.seq]
        except grpc.RpcError as e:
            return e.code()
        return None

    def serving(self) -> int:
        deadline = time.monotonic() + 5
        status = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        while status == health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
            time.sleep(0.05)  # published on the server's loop right after the refusal
            status = self.health.Check(health_pb2.HealthCheckRequest(service=""),
                                       timeout=5).status
        return int(status)


def _episode(target: str, disk: Path, free_bytes: int | None = None) -> None:
    """`free_bytes`: the room made after the episode (None: all the filler's)."""
    store = open_store(target)
    # no leader election: a loaded machine could leave it standby past start()'s wait
    ctl = Controller(store, None, listen="127.0.0.1:0", elect=False)
    ctl.start()
    agent = Agent(ctl)
    up = "gpufleet_controller_store_up"
    try:
        agent.queue(100)
        while agent.pending:
            assert agent.push() is None
        filler = _fill(disk)
        # reports go on until a write needs room (the WAL or a table grows): then refused
        refused = None
        for _ in range(60):
            agent.queue(20)
            refused = agent.push()
            if refused is not None:
                break
        assert refused == grpc.StatusCode.UNAVAILABLE
        assert agent.serving() == health_pb2.HealthCheckResponse.NOT_SERVING
        assert ctl.metrics.registry.get_sample_value(up) == 0
        for _ in range(3):  # still full: still refused, still NOT_SERVING
            assert agent.push() == grpc.StatusCode.UNAVAILABLE
        assert agent.serving() == health_pb2.HealthCheckResponse.NOT_SERVING
        if free_bytes is None:
            filler.unlink()
        else:
            os.truncate(filler, filler.stat().st_size - free_bytes)
        # room again: the same controller stores everything waiting, and hundreds more
        agent.queue(400)
        while agent.pending:
            assert agent.push() is None, f"refused again with {len(agent.pending)} waiting"
        assert ctl.metrics.registry.get_sample_value(up) == 1
        health = agent.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        sent = agent.next_seq - 1
        assert sorted(set(agent.acked)) == agent.acked and agent.acked[-1] == sent
        events = store.events(NODE, limit=100_000)
        assert len(events) == sent  # exact: nothing acked lost, nothing stored twice
        assert {e.evidence.split()[1] for e in events} == {str(i) for i in range(1, sent + 1)}
        assert store.last_seq(NODE) == (agent.inst, sent)
    finally:
        agent.channel.close()
        ctl.stop(grace_s=0.2)
        store.close()


def test_sqlite_store_recovers_from_a_full_disk(tmp_path: Path) -> None:
    """A little room made (1 MiB): the WAL, short of SQLite's auto-checkpoint size (4 MiB),
    grew into it and filled the disk again, never to be checkpointed (the store was stuck
    for good a few dozen reports on); a checkpoint after the episode empties it."""
    with _tmpfs(tmp_path / "disk", "16m") as disk:
        _episode(str(disk / "state.db"), disk, free_bytes=1 << 20)


def test_postgres_store_recovers_from_a_full_disk(pg_server: PgServer) -> None:
    """The database's tablespace on the small disk (PostgreSQL's WAL stays on its own: a
    full pg_wal is a server crash, not a store error)."""
    # outside pytest's 0700 tmp dirs: the server (user postgres) must reach the mount
    base = Path(tempfile.mkdtemp(prefix="gf-disk-full-"))
    base.chmod(0o755)
    with _tmpfs(base / "disk", "48m", owner="postgres") as disk:
        name = f"gf_full_{os.getpid()}"
        admin = pg_server.dsn()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"CREATE TABLESPACE gf_full LOCATION '{disk}'")
            conn.execute(f'CREATE DATABASE "{name}" TABLESPACE gf_full')
        try:
            _episode(pg_server.dsn(name), disk)
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                conn.execute("DROP TABLESPACE IF EXISTS gf_full")
    shutil.rmtree(base, ignore_errors=True)
