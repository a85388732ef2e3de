"""An agent cut off from a real controller (real gRPC over loopback, through a TCP proxy the
test cuts and restores), then reconnected: every report it queued reaches the controller's
store exactly once, in sequence order, none lost; also across an agent restart while cut off.

The agent is a real `gpufleet-agent run` process on the simulated NVML. Its sample interval
is 20 ms in the fast tests, so several minutes' worth of 1 Hz reports (>= 300, with XID
health events and job usage reports) pile up in a few seconds; one test holds a real
120 s cut-off at 1 Hz (about 130 s, marked `slow`: CI runs it, `-m "not slow"` skips it).
"""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from gpufleet.scheduler.service.server import Controller
from gpufleet.scheduler.store import SqliteStore

from tests.faults.spool_helpers import AgentProc, Applied, TcpProxy, now_ms, record_ingest
from tests.support import wait_for

# (gpu, xid) pairs that are neither 79 (GPU lost) nor 48 (ECC): each one is one event
XIDS = [(g, x) for x in (13, 31, 43, 45) for g in range(8)]


@dataclass
class Rig:
    ctl: Controller
    store: SqliteStore
    proxy: TcpProxy
    applied: Applied
    base: Path

    def agent(self, interval_s: float = 0.02, extra: str = "") -> AgentProc:
        return AgentProc(self.base, self.proxy.port, interval_s=interval_s, extra=extra)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    store = SqliteStore(tmp_path / "state.db")
    ctl = Controller(store, None, listen="127.0.0.1:0")
    ctl.start()
    proxy = TcpProxy(ctl.port)
    proxy.start()
    try:
        yield Rig(ctl, store, proxy, record_ingest(ctl.ingest), tmp_path)
    finally:
        proxy.cut()
        ctl.stop(grace_s=0.5)
        store.close()


def _check_exactly_once_in_order(applied: Applied, instances: list[str]) -> dict[str, int]:
    """Each instance's reports were stored once each, seq 1..N with no gap, in order, and an
    instance never reappears once a later one spoke. Returns N per instance."""
    stored = applied.stored()
    order = [i for i, _ in itertools.groupby(inst for inst, _, _ in stored)]
    assert order == instances, f"instances in the order stored: {order}"
    counts = {}
    for inst in instances:
        seqs = [s for i, s, _ in stored if i == inst]
        assert seqs == list(range(1, len(seqs) + 1)), f"{inst}: gaps or repeats in {seqs[:20]}"
        counts[inst] = len(seqs)
    return counts


def _instances(applied: Applied) -> list[str]:
    return [i for i, _ in itertools.groupby(inst for inst, _, _, _ in applied.rows)]


def _cut_and_queue(rig: Rig, agent: AgentProc, xids: list[tuple[int, int]], jobs: range,
                   min_pending: int, tag: str) -> None:
    """Cut the agent off, then give it XIDs and job starts/ends until it holds min_pending."""
    rig.proxy.cut()
    time.sleep(0.3)  # reports sent into the dying socket are not acked: they are resent
    for n, (gpu, xid) in enumerate(xids):
        agent.inject_xid(gpu, xid, f"{tag}-{gpu}-{xid}")
        if n < len(jobs):
            agent.job("start", str(jobs[n]), [gpu], now_ms())
        time.sleep(0.05)
    for job_id in jobs:
        agent.job("end", str(job_id), [0], now_ms())
    wait_for(lambda: agent.metric("gpufleet_agent_spool_messages") >= min_pending, 60,
             f"{min_pending} reports spooled", step_s=0.2)


def _events(store: SqliteStore, node: str) -> list[tuple[int | None, int | None]]:
    return sorted((e.gpu_index, e.xid) for e in store.events(node, limit=100_000))


@pytest.mark.slow  # real-time cut-off, ~13 s
def test_cut_off_agent_replays_every_report_once_in_order(
        rig: Rig, report_figure: Callable[[str], None]) -> None:
    agent = rig.agent()
    agent.start()
    try:
        wait_for(lambda: len(rig.applied.stored()) >= 20, 30, "the agent to report")
        _cut_and_queue(rig, agent, XIDS[:16], range(500, 508), 400, "cut")
        spooled = agent.metrics()
        assert spooled["gpufleet_agent_spool_disk_bytes"] > 0
        assert spooled["gpufleet_agent_spool_memory_messages"] == 0
        pending = spooled["gpufleet_agent_spool_messages"]
        t0 = time.monotonic()
        rig.proxy.restore()
        wait_for(lambda: agent.metric("gpufleet_agent_spool_messages") < 20, 60,
                 "the spool to drain", step_s=0.02)
        drained_s = time.monotonic() - t0
        time.sleep(0.5)
    finally:
        assert agent.stop() == 0, agent.log_text()[-3000:]
    assert "Traceback" not in agent.log_text()
    instances = _instances(rig.applied)
    counts = _check_exactly_once_in_order(rig.applied, instances)
    assert len(instances) == 1 and counts[instances[0]] >= 400
    assert _events(rig.store, "gpu01") == sorted(XIDS[:16])  # each XID stored exactly once
    kinds = [b for _, _, b in rig.applied.stored()]
    # usage reports batch the jobs that start or end within one sample: at least 2
    assert kinds.count("event") == 16 and kinds.count("usage") >= 2
    for job_id in range(500, 508):  # ledger: each job's allocated time is exact
        (row,) = rig.store.usage_rows(str(job_id))
        assert row.end_ms is not None and row.allocated_ms == row.end_ms - row.start_ms
    # the replay proper: from the first report stored after the restore to the last of the
    # backlog (the reconnect itself waits out the client's jittered backoff first)
    after = [t for t, _ in zip(rig.applied.times, rig.applied.rows, strict=True) if t >= t0]
    replay_s = after[int(pending) - 1] - after[0]
    report_figure(f"spool replay after a cut-off: {pending:.0f} reports replayed in "
                  f"{replay_s:.2f} s ({pending / replay_s:.0f} reports/s, loopback gRPC, "
                  f"SQLite store); restore -> spool drained {drained_s:.1f} s incl. reconnect "
                  "backoff")


@pytest.mark.slow  # real-time cut-off, ~10 s
def test_agent_restarted_while_cut_off_replays_its_spool(rig: Rig) -> None:
    first = rig.agent()
    first.start()
    wait_for(lambda: len(rig.applied.stored()) >= 20, 30, "the agent to report")
    _cut_and_queue(rig, first, XIDS[:8], range(600, 604), 300, "a")
    # killed outright: what it wrote is in the page cache, the spool must read it back
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    first.faults.write_text('{"faults": []}')  # the new simulator must not replay old XIDs
    second = rig.agent()
    second.start()
    try:
        wait_for(lambda: second.metric("gpufleet_agent_spool_messages") >= 300, 30,
                 "the restarted agent to load the spool")
        for gpu, xid in XIDS[8:12]:
            second.inject_xid(gpu, xid, f"b-{gpu}-{xid}")
            time.sleep(0.05)
        wait_for(lambda: second.metric("gpufleet_agent_spool_messages") >= 310, 30,
                 "new reports")
        rig.proxy.restore()
        wait_for(lambda: _events(rig.store, "gpu01") == sorted(XIDS[:12]), 60,
                 "every XID at the controller")
        wait_for(lambda: second.metric("gpufleet_agent_spool_messages") < 20, 60,
                 "the spool to drain")
    finally:
        assert second.stop() == 0, second.log_text()[-3000:]
    assert "Traceback" not in second.log_text()
    instances = _instances(rig.applied)
    assert len(instances) == 2, instances  # the killed agent's, then the restarted one's
    counts = _check_exactly_once_in_order(rig.applied, instances)
    assert counts[instances[0]] >= 300
    assert _events(rig.store, "gpu01") == sorted(XIDS[:12])  # none lost, none twice
    for job_id in range(600, 604):
        (row,) = rig.store.usage_rows(str(job_id))
        assert row.end_ms is not None and row.allocated_ms == row.end_ms - row.start_ms
    assert rig.store.last_seq("gpu01")[0] == instances[1]  # the controller follows the new one


@pytest.mark.slow
def test_real_120s_cut_off_at_1hz(rig: Rig, report_figure: Callable[[str], None]) -> None:
    """120 s without the controller at the production rate (1 Hz): about 130 s of wall time."""
    agent = rig.agent(interval_s=1.0)
    agent.start()
    try:
        wait_for(lambda: len(rig.applied.stored()) >= 3, 30, "the agent to report")
        rig.proxy.cut()
        t_cut = time.monotonic()
        for n, (gpu, xid) in enumerate(XIDS[:12]):  # an XID every 10 s
            agent.inject_xid(gpu, xid, f"slow-{gpu}-{xid}")
            agent.job("start" if n % 2 == 0 else "end", str(700 + n // 2), [gpu - gpu % 2],
                      now_ms())
            time.sleep(max(0.0, t_cut + 10 * (n + 1) - time.monotonic()))
        assert time.monotonic() - t_cut >= 120
        pending = agent.metric("gpufleet_agent_spool_messages")
        assert pending >= 120 + 12
        rig.proxy.restore()
        wait_for(lambda: _events(rig.store, "gpu01") == sorted(XIDS[:12]), 60, "every XID")
        wait_for(lambda: agent.metric("gpufleet_agent_spool_messages") <= 2, 30, "the drain")
    finally:
        assert agent.stop() == 0, agent.log_text()[-3000:]
    counts = _check_exactly_once_in_order(rig.applied, _instances(rig.applied))
    assert sum(counts.values()) >= 120 + 12 + 3
    report_figure(f"120 s cut-off at 1 Hz: {pending:.0f} reports spooled, all stored once, "
                  "in order")
