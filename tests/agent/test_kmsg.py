"""XIDs from the kernel log: the line forms drivers print, and following a log without blocking."""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

import pytest
from gpufleet.agent import kmsg
from gpufleet.agent.kmsg import KmsgReader, KmsgXid, parse_xid_line, to_xid_events
from gpufleet.agent.telemetry import XidEvent

XID_119 = ("[Sun Feb 23 16:24:18 2025] NVRM: Xid (PCI:0000:9b:00): 119, pid=2024380, "
           "name=nvidia-smi, Timeout after 6s of waiting for RPC response from GPU4 GSP!")
XID_79_RECORD = ("4,1234,5678901,-;NVRM: Xid (PCI:0000:9b:00): 79, pid='<unknown>', "
                 "name=<unknown>, GPU has fallen off the bus.")


@pytest.mark.parametrize(("line", "expected"), [
    (XID_119, KmsgXid("0000:9b:00.0", 119, "pid=2024380, name=nvidia-smi, Timeout after 6s "
                      "of waiting for RPC response from GPU4 GSP!")),
    (XID_79_RECORD, KmsgXid("0000:9b:00.0", 79,
                            "pid='<unknown>', name=<unknown>, GPU has fallen off the bus.")),
    ("NVRM: Xid (PCI:0000:3b:00): 48, An uncorrectable double bit error (DBE) has been detected",
     KmsgXid("0000:3b:00.0", 48,
             "An uncorrectable double bit error (DBE) has been detected")),
    ("[ 1234.567890] NVRM: Xid (0000:3B:00): 13, Graphics Exception: ESR 0x405840=0x1",
     KmsgXid("0000:3b:00.0", 13, "Graphics Exception: ESR 0x405840=0x1")),
    ("Feb 23 16:24:18 node7 kernel: NVRM: Xid (PCI:0001:CA:00): 94, pid=1, name=x, Contained",
     KmsgXid("0001:ca:00.0", 94, "pid=1, name=x, Contained")),
    ("NVRM: Xid (PCI:00000000:9b:00): 31, pid=7, name=python, Ch 00000008, MMU Fault",
     KmsgXid("0000:9b:00.0", 31, "pid=7, name=python, Ch 00000008, MMU Fault")),
    ("NVRM: Xid (PCI:0000:9b:00.1): 79, GPU has fallen off the bus.\n",
     KmsgXid("0000:9b:00.1", 79, "GPU has fallen off the bus.")),
])
def test_xid_line_forms(line: str, expected: KmsgXid) -> None:
    assert parse_xid_line(line) == expected


@pytest.mark.parametrize("line", [
    "",
    "[Sun Feb 23 16:24:18 2025] NVRM: GPU at PCI:0000:9b:00: GPU-4a0c6e1f-0000-0000",
    "[Sun Feb 23 16:24:18 2025] NVRM: GPU Board Serial Number: 1652823054829",
    "6,339,5140900,-;NET: Registered protocol family 10",
    "[ 5.1] mlx5_core 0000:17:00.0: Port module event: module 0, Cable plugged",
    "NVRM: Xid (PCI:0000:9b:00): , no number",
    "NVRM: Xid (PCI:zzzz:9b:00): 79, bad address",
    # userspace (facility 1, user) writing an XID-looking line into /dev/kmsg is not the driver
    "12,99,5678901,-;NVRM: Xid (PCI:0000:9b:00): 79, pid='<unknown>', name=<unknown>, fake",
])
def test_non_xid_lines(line: str) -> None:
    assert parse_xid_line(line) is None


def _append(path: Path, text: str) -> None:
    with path.open("a") as f:
        f.write(text)


def test_reader_starts_at_end_and_returns_appended_xids_once(tmp_path: Path) -> None:
    path = tmp_path / "kmsg"
    path.write_text(XID_119 + "\n" + XID_79_RECORD + "\n")
    reader = KmsgReader(path)
    try:
        assert reader.read_new() == []  # history is skipped
        _append(path, "6,340,5690716,-;udevd[80]: starting\n" + XID_79_RECORD + "\n")
        assert [(x.xid, x.pci_bus_id) for x in reader.read_new()] == [(79, "0000:9b:00.0")]
        assert reader.read_new() == []  # returned once
        _append(path, XID_119 + "\n")
        assert [x.xid for x in reader.read_new()] == [119]
    finally:
        reader.close()
    assert reader.read_new() == []  # closed: nothing, no error
    reader.close()  # twice is fine


def test_reader_from_start_reads_history(tmp_path: Path) -> None:
    path = tmp_path / "kmsg"
    path.write_text(XID_119 + "\n" + "noise\n" + XID_79_RECORD + "\n")
    with KmsgReader(path, start_at_end=False) as reader:
        assert [x.xid for x in reader.read_new()] == [119, 79]
        assert reader.read_new() == []


def test_partial_line_is_held_until_complete(tmp_path: Path) -> None:
    path = tmp_path / "kmsg"
    path.write_text("")
    with KmsgReader(path) as reader:
        half = len(XID_79_RECORD) // 2
        _append(path, XID_79_RECORD[:half])
        assert reader.read_new() == []
        _append(path, XID_79_RECORD[half:])
        assert reader.read_new() == []  # still no newline: the message may go on
        _append(path, "\n")
        assert [x.xid for x in reader.read_new()] == [79]
        assert reader.read_new() == []


def test_truncated_file_is_read_from_the_start(tmp_path: Path) -> None:
    path = tmp_path / "kmsg"
    path.write_text("x" * 1000 + "\n")
    with KmsgReader(path) as reader:
        path.write_text(XID_119 + "\n")  # rotated: shorter than where we were
        assert [x.xid for x in reader.read_new()] == [119]


def test_reader_on_a_fifo_never_blocks(tmp_path: Path) -> None:
    path = tmp_path / "kmsg.fifo"
    os.mkfifo(path)
    with KmsgReader(path) as reader:
        assert reader.read_new() == []  # no writer yet
        wfd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        try:
            assert reader.read_new() == []  # a writer, no data: EAGAIN, not a hang
            os.write(wfd, (XID_79_RECORD + "\n" + XID_119[:20]).encode())
            assert [x.xid for x in reader.read_new()] == [79]
            os.write(wfd, (XID_119[20:] + "\n").encode())
            assert [x.xid for x in reader.read_new()] == [119]
        finally:
            os.close(wfd)


class _FakeKmsg:
    """os.read/os.fstat as /dev/kmsg behaves: one record per read, EAGAIN, EPIPE."""

    def __init__(self, script: list[bytes | OSError]) -> None:
        self.script = script

    def read(self, fd: int, n: int) -> bytes:
        assert n >= 8192  # a smaller buffer makes the kernel fail the read with EINVAL
        if not self.script:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        item = self.script.pop(0)
        if isinstance(item, OSError):
            raise item
        return item


def test_kmsg_records_eagain_and_overrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "kmsg"
    path.write_text("")
    real_fstat = os.fstat
    seeks: list[tuple[int, int]] = []

    class _Stat:
        def __init__(self, st: os.stat_result) -> None:
            self.st_mode = stat.S_IFCHR | 0o644
            self.st_size = st.st_size

    monkeypatch.setattr(kmsg.os, "fstat", lambda fd: _Stat(real_fstat(fd)))
    monkeypatch.setattr(kmsg.os, "lseek", lambda fd, pos, how: seeks.append((pos, how)) or 0)
    reader = KmsgReader(path)
    assert seeks == [(0, os.SEEK_END)]  # history skipped
    epipe = BrokenPipeError(errno.EPIPE, "Broken pipe")
    fake = _FakeKmsg([
        b"6,1,100,-;NVRM: loading NVIDIA UNIX x86_64 Kernel Module\n",
        (XID_79_RECORD + "\n SUBSYSTEM=pci\n DEVICE=+pci:0000:9b:00.0\n").encode(),
        epipe,
        b"4,1300,5679000,-;NVRM: Xid (PCI:0000:9b:00): 48, DBE\n",
    ])
    monkeypatch.setattr(kmsg.os, "read", fake.read)
    with caplog.at_level(logging.WARNING):
        assert [x.xid for x in reader.read_new()] == [79, 48]
        fake.script = [epipe, epipe, b"4,1400,5679100,-;NVRM: Xid (PCI:0000:9b:00): 94, x\n"]
        assert [x.xid for x in reader.read_new()] == [94]
    assert reader.overruns == 3
    assert len([r for r in caplog.records if "overran" in r.getMessage()]) == 1  # logged once
    assert reader.read_new() == []
    monkeypatch.undo()
    reader.close()


def test_permission_denied_says_what_is_needed(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def deny(*_: object) -> int:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(kmsg.os, "open", deny)
    with pytest.raises(PermissionError, match="CAP_SYSLOG") as info:
        KmsgReader(tmp_path / "kmsg")
    assert info.value.errno == errno.EPERM and info.value.filename == str(tmp_path / "kmsg")


def test_missing_path_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        KmsgReader(tmp_path / "nope")


@pytest.mark.parametrize("nvml_bus_id", ["0000:9B:00.0", "00000000:9B:00.0", "0000:9b:00.0"])
def test_to_xid_events_matches_nvml_bus_ids(nvml_bus_id: str) -> None:
    items = [KmsgXid("0000:9b:00.0", 79, "fallen off the bus"),
             KmsgXid("0000:3b:00.0", 48, "DBE")]
    bus_to_index = {"00000000:1A:00.0": 0, nvml_bus_id: 4}
    assert to_xid_events(items, bus_to_index, now_ms=1_700_000_000_000) == [
        XidEvent(gpu_index=4, xid=79, timestamp_ms=1_700_000_000_000, source="kmsg",
                 message="fallen off the bus"),
        XidEvent(gpu_index=None, xid=48, timestamp_ms=1_700_000_000_000, source="kmsg",
                 message="DBE"),
    ]


def test_to_xid_events_ignores_function_and_bad_keys() -> None:
    items = [KmsgXid("0000:9b:00.1", 13, "x")]
    assert to_xid_events(items, {"garbage": 1, "0000:9b:00.0": 2}, 5) == [
        XidEvent(gpu_index=2, xid=13, timestamp_ms=5, source="kmsg", message="x")]
    assert to_xid_events([], {"0000:9b:00.0": 2}, 5) == []
