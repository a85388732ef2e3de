"""The agent's spool disk fills up: a real 256 KiB tmpfs mounted for the test (tests run as
root; skipped with the reason only where mount is not permitted and CI is not set).

The agent must keep running and sampling, health events still reach the controller, no
crash, the write errors are counted and logged once, and once space frees the spool takes
writes again (the reports held in memory meanwhile move to disk, in order)."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpufleet.agent.outbox import Outbox
from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.scheduler.service.server import Controller
from gpufleet.scheduler.store import SqliteStore

from tests.faults.spool_helpers import AgentProc, TcpProxy, record_ingest
from tests.support import wait_for
from tests.support.ci import unavailable

pytestmark = pytest.mark.slow  # a real full disk, filled in real time

TMPFS_BYTES = 256 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "spooldisk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs",
                           str(mnt)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        unavailable(f"mount -t tmpfs not permitted here ({done.stderr.strip()}): the "
                    "disk-full test needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _sample(i: int) -> pb.NodeSample:
    s = pb.NodeSample(timestamp_ms=1_700_000_000_000 + i)
    for g in range(8):
        s.gpus.add(index=g, temperature_c=40 + g, power_w=300.5, energy_mj=10**9 + i)
    return s


def _event(i: int) -> pb.HealthEvent:
    return pb.HealthEvent(timestamp_ms=1_700_000_000_000 + i, kind=pb.EVENT_KIND_XID, xid=13,
                          verdict=pb.Verdict(check="xid", severity=pb.SEVERITY_WARN,
                                             reason_code="xid13", evidence=f"event {i}"))


def test_outbox_falls_back_to_memory_and_back_to_disk(
        small_disk: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    d = small_disk / "spool"
    box = Outbox("i", spool_dir=d, max_bytes=8 * 1024 * 1024, disk_retry_s=0.2)
    events = []
    for i in range(6000):  # ~1.5 MiB into a 256 KiB disk
        box.put_sample(_sample(i))
        if i % 100 == 0:
            events.append(box.put_event(_event(i)))
    st = box.stats()
    assert st.write_errors >= 1 and st.memory_only_messages > 1000
    assert st.pending_messages == 6000 + len(events)  # nothing lost, nothing dropped
    assert st.disk_bytes <= TMPFS_BYTES
    failures = [r for r in caplog.records if "cannot write the spool" in r.getMessage()]
    assert len(failures) == 1  # logged once per outage, not per report
    kinds = box.pending_messages()
    assert [m.seq for m in kinds] == list(range(1, len(kinds) + 1))  # in order, all there
    # the controller acks all but the last 300: their segments go and the disk has room
    half = kinds[-300].seq
    box.ack(half)
    time.sleep(0.25)  # past disk_retry_s
    box.put_event(_event(99_999))
    st = box.stats()
    assert st.memory_only_messages == 0, st  # moved to disk, in order
    assert any("takes writes again" in r.getMessage() for r in caplog.records)
    box.close()
    again = Outbox("j", spool_dir=d)
    seqs = [m.seq for m in again.pending_messages()]
    assert seqs == list(range(half + 1, len(kinds) + 2))  # the rest, from disk, in order


def test_agent_with_a_full_spool_disk_keeps_sampling_and_reporting(
        small_disk: Path, tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    ctl = Controller(store, None, listen="127.0.0.1:0")
    ctl.start()
    applied = record_ingest(ctl.ingest)
    proxy = TcpProxy(ctl.port)
    proxy.start()
    agent = AgentProc(tmp_path, proxy.port, interval_s=0.02,
                      extra=f'spool_dir = "{small_disk / "spool"}"\n'
                            "spool_max_bytes = 16777216\n"
                            "spool_disk_retry_s = 0.5\n")
    agent.start()
    xids = [(g, x) for x in (13, 31) for g in range(8)]
    try:
        wait_for(lambda: len(applied.stored()) >= 10, 30, "the agent to report")
        proxy.cut()
        # fill what the spool leaves of the small disk, as another writer would
        filler = small_disk / "filler"
        try:
            with filler.open("wb") as f:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
        except OSError:
            pass  # ENOSPC: full
        wait_for(lambda: agent.metric("gpufleet_agent_spool_write_errors_total") >= 1, 30,
                 "a counted spool write error")
        t_full = agent.metric("gpufleet_agent_last_sample_timestamp_seconds")
        for n, (gpu, xid) in enumerate(xids):
            agent.inject_xid(gpu, xid, f"full-{n}")
            time.sleep(0.05)
        wait_for(lambda: agent.metric("gpufleet_agent_spool_memory_messages") >= 100, 30,
                 "reports held in memory")
        assert agent.alive(), agent.log_text()[-3000:]
        # still sampling: the sample timestamp moves on while the disk is full
        assert agent.metric("gpufleet_agent_last_sample_timestamp_seconds") > t_full
        filler.unlink()  # space frees
        proxy.restore()
        wait_for(lambda: sorted((e.gpu_index, e.xid) for e in store.events("gpu01"))
                 == sorted(xids), 60, "every XID at the controller")
        wait_for(lambda: agent.metric("gpufleet_agent_spool_memory_messages") == 0, 30,
                 "the spool to take writes again")
        errors = agent.metric("gpufleet_agent_spool_write_errors_total")
        # cut off again: the reports now go to the disk, with no new write errors
        proxy.cut()
        wait_for(lambda: agent.metric("gpufleet_agent_spool_disk_bytes") > 8192, 30,
                 "reports spooled on disk again")
        assert agent.metric("gpufleet_agent_spool_write_errors_total") == errors
        assert agent.metric("gpufleet_agent_spool_memory_messages") == 0
        proxy.restore()
        wait_for(lambda: agent.metric("gpufleet_agent_spool_messages") < 20, 60, "the drain")
    finally:
        code = agent.stop()
        proxy.cut()
        ctl.stop(grace_s=0.5)
        events = sorted((e.gpu_index, e.xid) for e in store.events("gpu01"))
        store.close()
    log = agent.log_text()
    assert code == 0 and "Traceback" not in log, log[-3000:]
    # once per outage, not per report: the disk retry every 0.5 s may find room for a
    # moment (acks free space) and the disk fill again, a second outage on a loaded
    # machine; hundreds of reports went by meanwhile
    assert 1 <= log.count("cannot write the spool") <= 3, log[-3000:]
    stored = applied.stored()
    seqs = [s for _, s, _ in stored]
    assert seqs == list(range(1, len(seqs) + 1))  # every report once, in order: none lost
    assert events == sorted(xids)  # each health event stored exactly once
