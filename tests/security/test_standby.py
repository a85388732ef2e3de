"""Two controllers on one PostgreSQL database: one active (advisory lock), the other standby;
kill -9 the active and the agent's reports are acked by the standby. Measures takeover."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from gpufleet.agent.client import StreamClient
from gpufleet.agent.outbox import Outbox
from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.scheduler.service.leader import LEADER_LOCK_KEY

from tests.scheduler.pg_server import PgServer
from tests.security.helpers import hello, sample, stream
from tests.support import wait_for
from tests.support.net import free_port


def _start_controller(dsn: str, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "gpufleet.scheduler", "controller", "--db", dsn,
             "--listen", f"127.0.0.1:{port}", "--slurm", "none", "--insecure",
             "--metrics-listen", "", "-v"],
            stdout=log, stderr=subprocess.STDOUT,
        )


def _lock_holders(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND ((classid::bigint << 32) | objid::bigint) = %s",
            (LEADER_LOCK_KEY & 0xFFFF_FFFF_FFFF_FFFF,)).fetchone()
    return int(row[0]) if row else 0


@pytest.fixture
def two_controllers(pg: PgServer, tmp_path: Path) -> Iterator[tuple[str, list[tuple[
        subprocess.Popen[bytes], int]]]]:
    dsn = pg.create_database()
    procs: list[tuple[subprocess.Popen[bytes], int]] = []
    try:
        for name in ("a", "b"):
            port = free_port()
            procs.append((_start_controller(dsn, port, tmp_path / f"ctl-{name}.log"), port))
            if name == "a":  # a first, so it is the active one
                wait_for(lambda p=port: _status(p) == grpc.StatusCode.OK, 20, "controller a")
        yield dsn, procs
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        pg.drop_database(dsn)


def _status(port: int) -> grpc.StatusCode:
    instance = uuid.uuid4().hex
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        code, _, _ = stream(ch, [hello("probe", instance),
                                 sample(1, instance, int(time.time() * 1000))], timeout_s=2)
    return code


@pytest.mark.slow  # PostgreSQL + two controllers, ~19 s
def test_standby_takes_over_when_active_is_killed(
        two_controllers: tuple[str, list[tuple[subprocess.Popen[bytes], int]]],
        report_figure: Callable[[str], None]) -> None:
    dsn, [(active, port_a), (standby, port_b)] = two_controllers
    # the standby answers, but refuses to serve: agents move on to the active one
    wait_for(lambda: _status(port_b) == grpc.StatusCode.UNAVAILABLE, 20, "standby up")
    assert _lock_holders(dsn) == 1

    outbox = Outbox(uuid.uuid4().hex)
    client = StreamClient(f"127.0.0.1:{port_b},127.0.0.1:{port_a}", outbox,
                          lambda: hello("n7").hello, backoff_initial_s=0.05,
                          backoff_max_s=0.5)
    stop = threading.Event()
    threads = [threading.Thread(target=client.run, args=(stop,), daemon=True)]

    def produce() -> None:  # an agent at 20 Hz, so the gap is measured finely
        while not stop.wait(0.05):
            outbox.put_sample(pb.NodeSample(timestamp_ms=int(time.time() * 1000)))

    threads.append(threading.Thread(target=produce, daemon=True))
    for t in threads:
        t.start()
    try:
        wait_for(lambda: outbox.acked_seq >= 5, 20, "acks from the active controller")
        assert client.target == f"127.0.0.1:{port_a}"  # went past the standby listed first

        os.kill(active.pid, signal.SIGKILL)
        t0 = time.monotonic()
        marker = outbox.put_sample(pb.NodeSample(timestamp_ms=int(time.time() * 1000)))
        wait_for(lambda: outbox.acked_seq >= marker, 30, "the standby to ack")
        takeover_s = time.monotonic() - t0
        assert client.target == f"127.0.0.1:{port_b}"
        assert standby.poll() is None
        assert _lock_holders(dsn) == 1
        # nothing the agent queued was dropped while no controller was active
        assert outbox.dropped == 0
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    report_figure(f"standby takeover (kill -9 active -> agent's report acked by standby): "
                  f"{takeover_s * 1000:.0f} ms")
    assert takeover_s < 10.0
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM nodes WHERE name = 'n7'").fetchone()
    assert row is not None and row[0] == 1
