"""The outbox's files: reports not yet acked by the controller, on disk under STATE_DIR/spool/.

Layout: numbered segment files (`000000000001.seg`, ...), each the 8-byte magic `GFSPOOL1`
followed by records `>II` (payload length, CRC-32 of the payload) + a serialized
`gpufleet.v1.AgentMessage` (which carries its own seq and agent_instance). A process only
ever appends to the one segment it opened itself; segments of an earlier process are read
at start and then only deleted (or compacted), never appended to.

Durability: `os.write` goes straight to the kernel (no Python buffer), so a killed agent
(kill -9, OOM) loses nothing it wrote. fsync guards against a power loss or kernel crash,
and costs a disk flush (milliseconds on a busy disk): health events, job usage and
checkpoint registrations are fsync'd before `append` returns, because a fault or a
GPU-second must never be lost; samples are fsync'd at most every `sync_interval_s`, because
a 1 Hz sampler paying a flush per second would be the agent's main I/O cost, and losing a
few seconds of samples in a power cut loses nothing the next sample does not say again.
An fsync of an event also makes every sample written before it durable.

A torn or corrupt record (the agent or the machine died mid-write) ends the readable part
of its segment: it and whatever follows in that segment are skipped with a warning.

Never does: raise anything but OSError out of a write (the caller falls back to memory),
or read a whole segment except at start.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import DecodeError
from gpufleet.agent.job import _fsync_dir
from gpufleet.rpc.v1 import fleet_pb2 as pb

log = logging.getLogger(__name__)

MAGIC = b"GFSPOOL1"
_HEADER = struct.Struct(">II")  # payload length, CRC-32 of the payload
HEADER_BYTES = _HEADER.size
# larger than any message the stream may send (client.MAX_MESSAGE_BYTES is 4 MiB): a length
# above it is a torn header, not a record
MAX_RECORD_BYTES = 8 * 1024 * 1024
SUFFIX = ".seg"


def encode_record(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


@dataclass(eq=False)
class Segment:
    number: int
    path: Path
    file_bytes: int = 0  # bytes in the file, dropped and acked records included
    live: int = 0  # records in it the outbox still holds (not acked, not dropped)
    samples: int = 0  # live records that are samples (what the byte bound may drop)


@dataclass(eq=False)
class Loaded:
    """A record found at start: its message and where it lies."""

    msg: pb.AgentMessage
    segment: Segment
    offset: int
    size: int


@dataclass
class LoadReport:
    records: list[Loaded] = field(default_factory=list)
    corrupt_segments: int = 0  # segments with a torn or corrupt record (the rest skipped)
    skipped_bytes: int = 0


class SpoolDir:
    """Segment files in one directory. Not thread-safe: the outbox's lock guards it."""

    def __init__(self, path: Path, segment_bytes: int, sync_interval_s: float) -> None:
        self.path = path
        self.segment_bytes = segment_bytes
        self.sync_interval_s = sync_interval_s
        self.segments: dict[int, Segment] = {}
        self.active: Segment | None = None
        self._fd: int | None = None
        self._next_number = 1
        self._unsynced = False
        self._last_sync_s = 0.0
        self.fsyncs = 0

    # ------------------------------------------------------------ start

    def load(self) -> LoadReport:
        """Create the directory if need be and read every segment left by earlier runs."""
        self.path.mkdir(parents=True, exist_ok=True)
        for tmp in self.path.glob("*.tmp"):  # a compaction that did not finish
            with contextlib.suppress(OSError):
                tmp.unlink()
        report = LoadReport()
        numbers = []
        for p in self.path.glob("*" + SUFFIX):
            try:
                numbers.append(int(p.stem))
            except ValueError:
                log.warning("spool %s: %s is not a segment name; left alone", self.path, p.name)
        for number in sorted(numbers):
            self._next_number = max(self._next_number, number + 1)
            seg = Segment(number, self._segment_path(number))
            self.segments[number] = seg
            self._read_segment(seg, report)
        return report

    def _read_segment(self, seg: Segment, report: LoadReport) -> None:
        try:
            data = seg.path.read_bytes()
        except OSError as e:
            log.warning("spool segment %s unreadable (%s); skipped", seg.path, e)
            report.corrupt_segments += 1
            return
        seg.file_bytes = len(data)
        if not data.startswith(MAGIC):
            log.warning("spool segment %s: not a gpufleet spool segment (bad magic); skipped",
                        seg.path)
            report.corrupt_segments += 1
            report.skipped_bytes += len(data)
            return
        for rec in _records(data, seg, report):
            report.records.append(rec)

    # ------------------------------------------------------------ writing

    def append(self, payload: bytes, durable: bool, now_s: float) -> tuple[Segment, int, int]:
        """Write one record; (segment, offset, record bytes). Raises OSError, after which the
        segment is closed (a later append opens a new one) and holds no partial record if
        the file system let it be truncated."""
        record = encode_record(payload)
        if self.active is not None and self.active.file_bytes >= self.segment_bytes:
            self.close_active()
        if self.active is None:
            self._open_new()
        assert self.active is not None  # noqa: S101 - _open_new set it
        assert self._fd is not None  # noqa: S101 - _open_new set it
        seg, fd, offset = self.active, self._fd, self.active.file_bytes
        try:
            _write_all(fd, record)
            seg.file_bytes += len(record)
            self._unsynced = True
            if durable or now_s - self._last_sync_s >= self.sync_interval_s:
                self._sync(now_s)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, offset)
            seg.file_bytes = offset
            self.close_active()
            raise
        return seg, offset, len(record)

    def _sync(self, now_s: float) -> None:
        if self._fd is not None and self._unsynced:
            os.fdatasync(self._fd)
            self.fsyncs += 1
        self._unsynced = False
        self._last_sync_s = now_s

    def sync(self, now_s: float) -> None:
        """fsync what was written (the outbox calls it at stop)."""
        with contextlib.suppress(OSError):
            self._sync(now_s)

    def _open_new(self) -> None:
        number = self._next_number
        path = self._segment_path(number)
        self.path.mkdir(parents=True, exist_ok=True)  # gone, or never made (load failed)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        self._next_number += 1
        try:
            _write_all(fd, MAGIC)
            # the new name must survive a power cut too, or the fsync'd events in it would not
            _fsync_dir(self.path)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        seg = Segment(number, path, file_bytes=len(MAGIC))
        self.segments[number] = seg
        self.active, self._fd = seg, fd

    def close_active(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                if self._unsynced:
                    os.fdatasync(self._fd)
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = None
        self._unsynced = False
        seg, self.active = self.active, None
        if seg is not None and seg.live == 0:
            self.delete(seg)

    # ------------------------------------------------------------ reading, removing

    def read(self, seg: Segment, offset: int, size: int) -> bytes:
        """The payload of the record at `offset`; raises OSError or ValueError (corrupt)."""
        with seg.path.open("rb") as f:
            f.seek(offset)
            data = f.read(size)
        recs = list(_records(MAGIC + data, seg, LoadReport(), base=offset - len(MAGIC)))
        if len(recs) != 1:
            raise ValueError(f"spool segment {seg.path}: record at {offset} is corrupt")
        return data[HEADER_BYTES:]

    def delete(self, seg: Segment) -> None:
        if seg is self.active:
            return  # still being written; close_active deletes it once it holds nothing
        self.segments.pop(seg.number, None)
        with contextlib.suppress(FileNotFoundError):
            seg.path.unlink()

    def rewrite(self, seg: Segment, keep: list[tuple[int, int]]) -> list[int]:
        """Rewrite `seg` with only the records at (offset, size) in `keep`; their new offsets.
        Raises OSError (the segment is then unchanged)."""
        if seg is self.active:
            self.close_active()
        tmp = seg.path.with_suffix(".tmp")
        new_offsets: list[int] = []
        try:
            with seg.path.open("rb") as src, tmp.open("wb") as dst:
                dst.write(MAGIC)
                pos = len(MAGIC)
                for offset, size in keep:
                    src.seek(offset)
                    chunk = src.read(size)
                    _check_read(chunk, size, seg.path, offset)
                    dst.write(chunk)
                    new_offsets.append(pos)
                    pos += size
                dst.flush()
                os.fdatasync(dst.fileno())
            tmp.replace(seg.path)
            _fsync_dir(self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        seg.file_bytes = pos
        return new_offsets

    def disk_bytes(self) -> int:
        return sum(s.file_bytes for s in self.segments.values())

    def close(self, now_s: float) -> None:
        self.sync(now_s)
        self.close_active()

    def _segment_path(self, number: int) -> Path:
        return self.path / f"{number:012d}{SUFFIX}"


def _records(data: bytes, seg: Segment, report: LoadReport, base: int = 0) -> Iterator[Loaded]:
    """The valid records of one segment's bytes, stopping (with a warning) at a torn one."""
    pos = len(MAGIC)
    end = len(data)
    while pos < end:
        problem = ""
        if end - pos < HEADER_BYTES:
            problem = "a torn record header"
        else:
            length, crc = _HEADER.unpack_from(data, pos)
            start = pos + HEADER_BYTES
            if length > MAX_RECORD_BYTES:
                problem = f"a record length of {length} bytes (corrupt header)"
            elif start + length > end:
                problem = f"a torn record ({end - start} of {length} bytes)"
            else:
                payload = data[start:start + length]
                if zlib.crc32(payload) != crc:
                    problem = "a record whose checksum does not match"
                else:
                    msg = pb.AgentMessage()
                    try:
                        msg.ParseFromString(payload)
                    except DecodeError:
                        problem = "a record that is not an AgentMessage"
                    else:
                        yield Loaded(msg, seg, base + pos, HEADER_BYTES + length)
                        pos = start + length
                        continue
        log.warning("spool segment %s: %s at byte %d (the agent stopped mid-write?); "
                    "skipping the %d bytes from there", seg.path, problem, base + pos, end - pos)
        report.corrupt_segments += 1
        report.skipped_bytes += end - pos
        return


def _write_all(fd: int, data: bytes) -> None:
    # a short write is a full disk that said so late: the caller truncates it away
    if os.write(fd, data) != len(data):
        raise OSError(errno.ENOSPC, "short write to the spool (disk full?)")


def _check_read(chunk: bytes, size: int, path: Path, offset: int) -> None:
    if len(chunk) != size:
        raise OSError(errno.EIO, f"{path}: short read at {offset}")
