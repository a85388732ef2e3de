"""The agent's on-disk outbox spool: order, bounds, drop policy, restart, torn tails, the
dead-letter file, and its config keys. Real files in a temporary directory, no mocks."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from gpufleet.agent.config import AgentConfig, ConfigError
from gpufleet.agent.outbox import Outbox
from gpufleet.agent.spool import MAGIC, SUFFIX
from gpufleet.rpc.v1 import fleet_pb2 as pb


def _sample(i: int) -> pb.NodeSample:
    # about 1 KiB, like a small node's sample
    s = pb.NodeSample(timestamp_ms=1_700_000_000_000 + i)
    for g in range(4):
        s.gpus.add(index=g, temperature_c=40 + g, power_w=300.5, energy_mj=10**9 + i,
                   memory_used_bytes=2**33)
    s.host.cpu_pct = 12.5
    return s


def _event(i: int) -> pb.HealthEvent:
    return pb.HealthEvent(timestamp_ms=1_700_000_000_000 + i, kind=pb.EVENT_KIND_XID, xid=13,
                          verdict=pb.Verdict(check="xid", severity=pb.SEVERITY_WARN,
                                             reason_code="xid13", evidence=f"event {i}"))


def _usage(i: int) -> pb.JobUsageReport:
    return pb.JobUsageReport(node="n1", usage=[pb.JobGpuUsage(
        job_id=str(1000 + i), gpu_index=0, start_ms=1_700_000_000_000, as_of_ms=1_700_000_001_000,
        allocated_ms=1000)])


def _kinds(box: Outbox) -> list[tuple[str, int, str]]:
    return [(m.agent_instance, m.seq, m.WhichOneof("body") or "") for m in box.pending_messages()]


def _segments(d: Path) -> list[Path]:
    return sorted(d.glob("*" + SUFFIX))


def test_reports_survive_a_restart_in_order_with_their_instance(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    first = Outbox("inst-a", spool_dir=d)
    for i in range(50):
        first.put_sample(_sample(i))
        if i % 10 == 0:
            first.put_event(_event(i))
        if i % 25 == 0:
            first.put_usage(_usage(i))
    first.ack(20)  # the controller stored 1..20 before the agent stopped
    before = _kinds(first)
    assert [s for _, s, _ in before] == list(range(21, 58))
    first.close()

    second = Outbox("inst-b", spool_dir=d)
    assert _kinds(second) == before  # same order, same instance and seq
    assert second.stream_instance() == "inst-a"  # the earlier process's reports go first
    assert second.acked_seq_for("inst-a") == 20
    seq = second.put_event(_event(99))
    assert seq == 1  # this process numbers its own reports from 1, as inst-b
    assert _kinds(second)[-1] == ("inst-b", 1, "event")
    # sending walks inst-a in order; inst-b's report is not offered on inst-a's stream
    got, cursor = [], 20
    while (msg := second.next_after(cursor, 0.0, instance="inst-a")) is not None:
        got.append(msg.seq)
        cursor = msg.seq
    assert got == list(range(21, 58))
    second.ack(57, instance="inst-a")
    assert second.stream_instance() == "inst-b"
    assert not [p for p in _segments(d) if p.stat().st_size > len(MAGIC) and
                b"inst-a" in p.read_bytes()], "inst-a's segments go once all are acked"
    second.ack(1)
    assert len(second) == 0


def test_acked_segments_are_deleted_so_a_connected_agent_spools_little(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    box = Outbox("i", spool_dir=d, max_bytes=1024 * 1024)
    for i in range(3000):  # ~3 MiB written over time, each acked at once as when connected
        box.ack(box.put_sample(_sample(i)))
    st = box.stats()
    assert st.pending_messages == 0
    # what is left on disk is the segment being written, a fraction of one segment
    assert st.disk_bytes <= box.spool.segment_bytes if box.spool else False
    assert len(_segments(d)) <= 1


def test_byte_bound_drops_oldest_samples_first_never_events_or_usage(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    max_bytes = 64 * 1024
    box = Outbox("i", spool_dir=d, max_bytes=max_bytes)
    events, usage, samples = [], [], []
    record_bytes = 8 + len(pb.AgentMessage(seq=1, agent_instance="i",
                                           sample=_sample(0)).SerializeToString())
    for i in range(2000):  # ~330 KiB of samples into a 64 KiB bound
        samples.append(box.put_sample(_sample(i)))
        if i % 50 == 0:
            events.append(box.put_event(_event(i)))
        if i % 200 == 0:
            usage.append(box.put_usage(_usage(i)))
    st = box.stats()
    assert st.pending_bytes <= max_bytes
    assert st.disk_bytes <= max_bytes + box.spool.segment_bytes if box.spool else False
    kinds = _kinds(box)
    assert [s for _, s, k in kinds if k == "event"] == events  # every event kept
    assert [s for _, s, k in kinds if k == "usage"] == usage  # every usage report kept
    kept = [s for _, s, k in kinds if k == "sample"]
    dropped = sorted(set(samples) - set(kept))
    assert st.dropped_samples == len(dropped) >= len(samples) - max_bytes // record_bytes
    assert min(kept) > max(dropped)  # the oldest went first: what is left is the newest
    assert kept[-1] == samples[-1]
    assert [s for _, s, _ in kinds] == sorted(s for _, s, _ in kinds)  # still in order
    box.close()
    # the drops are on disk too: a restart brings back exactly what was pending
    again = Outbox("j", spool_dir=d, max_bytes=max_bytes)
    assert _kinds(again) == kinds


def test_events_alone_may_exceed_the_bound_and_are_kept(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    box = Outbox("i", spool_dir=tmp_path / "spool", max_bytes=64 * 1024)
    caplog.set_level(logging.WARNING)
    seqs = [box.put_event(_event(i)) for i in range(1500)]  # ~190 KiB of events
    assert [s for _, s, _ in _kinds(box)] == seqs
    assert box.stats().dropped_samples == 0
    assert sum("never dropped" in r.getMessage() for r in caplog.records) == 1  # once


def test_checkpoint_bound_applies_on_disk_too(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    box = Outbox("i", spool_dir=d)
    box.max_pending_checkpoints = 3
    box.put_sample(_sample(0))
    for step in range(6):
        box.put_checkpoint(pb.CheckpointRegistered(job_id="1", step=step, path="/c"))
    steps = [m.checkpoint.step for m in box.pending_messages() if m.HasField("checkpoint")]
    assert steps == [3, 4, 5] and box.stats().dropped_checkpoints == 3
    box.close()
    again = Outbox("j", spool_dir=d)
    assert [m.checkpoint.step for m in again.pending_messages()
            if m.HasField("checkpoint")] == [3, 4, 5]


def test_torn_tail_is_skipped_with_a_warning(tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "spool"
    box = Outbox("i", spool_dir=d)
    for i in range(10):
        box.put_event(_event(i))
    box.close()
    (seg,) = _segments(d)
    with seg.open("ab") as f:  # the agent died after 5 bytes of the next record's header
        f.write(b"\x00\x00\x01\x00\x7f")
    caplog.set_level(logging.WARNING)
    again = Outbox("j", spool_dir=d)
    assert [s for _, s, _ in _kinds(again)] == list(range(1, 11))
    assert again.stats().corrupt_records == 1
    assert any("torn record header" in r.getMessage() for r in caplog.records)


def test_every_truncation_point_and_a_flipped_byte_load_a_clean_prefix(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    box = Outbox("i", spool_dir=d)
    for i in range(6):
        box.put_event(_event(i))
        box.put_sample(_sample(i))
    box.close()
    (seg,) = _segments(d)
    data = seg.read_bytes()
    full = list(range(1, 13))
    for cut in range(len(data) + 1):  # the agent killed at every possible byte
        case = tmp_path / f"cut{cut}"
        case.mkdir()
        (case / seg.name).write_bytes(data[:cut])
        seqs = [s for _, s, _ in _kinds(Outbox("j", spool_dir=case))]
        assert seqs == full[:len(seqs)], cut  # a prefix, never garbage, never a crash
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # bit rot in the middle: the records before it stay
    case = tmp_path / "flip"
    case.mkdir()
    (case / seg.name).write_bytes(bytes(flipped))
    again = Outbox("j", spool_dir=case)
    seqs = [s for _, s, _ in _kinds(again)]
    assert 0 < len(seqs) < 12 and seqs == full[:len(seqs)]
    assert again.stats().corrupt_records == 1


def test_rejected_report_goes_to_the_bounded_dead_letter_file(tmp_path: Path) -> None:
    dead = tmp_path / "rejected.jsonl"
    box = Outbox("i", spool_dir=tmp_path / "spool", dead_letter_path=dead,
                 dead_letter_max_bytes=2000)
    seq = box.put_checkpoint(pb.CheckpointRegistered(job_id="47;11", step=1, path="rel"))
    box.put_sample(_sample(1))
    box.reject(seq, "checkpoint with invalid job id '47;11'")
    box.ack(seq)
    assert [s for _, s, _ in _kinds(box)] == [seq + 1]  # gone, the next one stays
    (line,) = dead.read_text().splitlines()
    doc = json.loads(line)
    assert (doc["seq"], doc["agent_instance"]) == (seq, "i")
    assert doc["reason"] == "checkpoint with invalid job id '47;11'"
    assert doc["message"]["checkpoint"]["jobId"] == "47;11"
    for i in range(20):  # bounded: rotated once, never growing without end
        box.reject(box.put_event(_event(i)), "x" * 100)
    assert dead.stat().st_size < 2000 + 1000
    assert (tmp_path / "rejected.jsonl.1").exists()
    assert box.stats().rejected == 21


def test_spool_write_cost_per_message(tmp_path: Path, report_figure: Callable[[str], None]) -> None:
    """Measured: samples (batched fsync) vs events (fsync each), on this machine's disk."""
    box = Outbox("i", spool_dir=tmp_path / "spool", max_bytes=64 * 1024 * 1024)
    sample = _sample(0)
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        box.put_sample(sample)
    sample_us = (time.perf_counter() - t0) / n * 1e6
    m = 200
    t0 = time.perf_counter()
    for i in range(m):
        box.put_event(_event(i))
    event_us = (time.perf_counter() - t0) / m * 1e6
    mem = Outbox("k")
    t0 = time.perf_counter()
    for _ in range(n):
        mem.put_sample(sample)
    mem_us = (time.perf_counter() - t0) / n * 1e6
    report_figure(f"spool write cost: sample {sample_us:.0f} us (batched fsync), event "
                  f"{event_us:.0f} us (fsync each), in-memory outbox {mem_us:.0f} us per message "
                  f"({len(sample.SerializeToString())} B sample)")
    assert sample_us < 5_000  # a 1 Hz sampler spends well under 1 % of its time here


@pytest.mark.parametrize(("key", "value", "problem"), [
    ("spool_max_bytes", 1000, "between 65536"),
    ("spool_max_bytes", "32MiB", "whole number of bytes"),
    ("spool_max_bytes", True, "whole number of bytes"),
    ("spool_sync_interval_s", -1.0, "0..3600"),
    ("spool_disk_retry_s", float("nan"), "0..3600"),
    ("spool_dir", "relative/spool", "absolute path"),
])
def test_spool_config_errors_name_the_key(key: str, value: object, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as err:
        AgentConfig(**{key: value}).validate()  # type: ignore[arg-type]
    assert str(err.value).startswith(key)


def test_spool_config_defaults() -> None:
    cfg = AgentConfig(state_dir="/var/lib/x").validate()
    assert cfg.resolved_spool_dir() == Path("/var/lib/x/spool")
    assert cfg.dead_letter_path() == Path("/var/lib/x/rejected.jsonl")
    assert 16 * 1024 * 1024 <= cfg.spool_max_bytes <= 64 * 1024 * 1024
