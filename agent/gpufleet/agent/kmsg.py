"""NVIDIA XID errors from the kernel log (/dev/kmsg), a second source beside NVML events.

The driver logs every XID as a kernel message, e.g.
  NVRM: Xid (PCI:0000:9b:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.
  NVRM: Xid (PCI:0000:3b:00): 48, An uncorrectable double bit error ...   (older drivers)
  NVRM: Xid (0000:3b:00): 13, ...                                          (older still)
It does so even when NVML itself cannot deliver the event (a GPU that fell off the bus).

This module only reads: it never writes to the kernel log, never blocks the caller (the
agent's event loop polls it) and never replays history unless asked to.

Permissions: opening /dev/kmsg needs CAP_SYSLOG when the sysctl kernel.dmesg_restrict is 1
(the default on many distributions); with it 0, the file mode (0644 root) lets anyone read.
systemd's ProtectKernelLogs=yes hides it whatever the capabilities. KmsgReader raises
PermissionError saying so; the caller decides whether to run without this source.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from gpufleet.agent.telemetry import XidEvent

log = logging.getLogger(__name__)

_XID_RE = re.compile(
    r"NVRM: Xid \((?:PCI:)?(?P<domain>[0-9a-fA-F]{4,8}):(?P<bus>[0-9a-fA-F]{2}):"
    r"(?P<device>[0-9a-fA-F]{2})(?:\.(?P<function>[0-7]))?\): (?P<xid>\d+),?\s*(?P<message>.*)"
)
# /dev/kmsg record header: "<syslog prefix>,<seq>,<usec>,<flags>[,...];<message>"
_RECORD_RE = re.compile(r"(?P<prefix>\d+),\d+,\d+,[^;]*;")
# larger than any record the kernel formats (8 KiB); a smaller buffer makes read() fail EINVAL
_RECORD_BYTES = 16384
_MAX_RECORDS_PER_CALL = 10_000  # a flooding kernel log must not keep the event loop here
_MAX_LINE_BYTES = 1 << 20  # a text file without newlines must not grow our buffer forever


@dataclass(frozen=True, slots=True)
class KmsgXid:
    pci_bus_id: str  # "0000:9b:00.0": domain:bus:device.function, lower case
    xid: int
    message: str  # the text after the XID number: "pid=..., name=..., <driver's words>"


def parse_xid_line(line: str) -> KmsgXid | None:
    """One kernel log line in any usual form (dmesg, /dev/kmsg record, syslog) -> XID or None.

    A /dev/kmsg record whose facility is not the kernel's is refused: userspace can write
    to /dev/kmsg, but only with another facility, so a real XID always comes with 0.
    """
    rec = _RECORD_RE.match(line)
    if rec is not None:
        if int(rec.group("prefix")) >> 3 != 0:
            return None
        line = line[rec.end():]
    m = _XID_RE.search(line)
    if m is None:
        return None
    # the kernel prints domain:bus:device without the function; NVML and sysfs add ".0"
    bus_id = (f"{int(m.group('domain'), 16):04x}:{m.group('bus').lower()}:"
              f"{m.group('device').lower()}.{m.group('function') or '0'}")
    return KmsgXid(pci_bus_id=bus_id, xid=int(m.group("xid")), message=m.group("message").rstrip())


class KmsgReader:
    """Follows /dev/kmsg (path configurable for tests: a regular file or FIFO works),
    non-blocking, starting at the end (only new records).

    On /dev/kmsg every read() returns one whole record. On a regular file or FIFO the text
    is split into lines, and a last line without its newline waits for the rest.
    Raises PermissionError (with the reason) or another OSError when `path` cannot be opened.
    """

    def __init__(self, path: Path = Path("/dev/kmsg"), start_at_end: bool = True) -> None:
        self.path = path
        self.overruns = 0  # times the kernel overwrote records before we read them
        self._buf = b""
        try:
            self._fd: int | None = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except PermissionError as e:
            raise PermissionError(
                e.errno,
                f"cannot read the kernel log {path}: the agent needs CAP_SYSLOG (or root) "
                "when kernel.dmesg_restrict=1, and no systemd ProtectKernelLogs=yes",
                str(path),
            ) from e
        try:
            mode = os.fstat(self._fd).st_mode
            self._records = stat.S_ISCHR(mode)
            self._regular = stat.S_ISREG(mode)
            if start_at_end and (self._records or self._regular):
                # /dev/kmsg: SEEK_END skips the kernel's whole ring buffer (history at boot);
                # a FIFO has no history and cannot seek
                os.lseek(self._fd, 0, os.SEEK_END)
        except OSError:
            self.close()
            raise

    def read_new(self) -> list[KmsgXid]:
        """The XIDs logged since the last call; [] when none (or when closed). Never blocks."""
        if self._fd is None:
            return []
        lines = self._read_records(self._fd) if self._records else self._read_lines(self._fd)
        out = []
        for line in lines:
            xid = parse_xid_line(line)
            if xid is not None:
                log.info("kernel log: Xid %d on %s: %s", xid.xid, xid.pci_bus_id, xid.message)
                out.append(xid)
        return out

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> KmsgReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ reading

    def _read_records(self, fd: int) -> list[str]:
        out = []
        for _ in range(_MAX_RECORDS_PER_CALL):
            try:
                data = os.read(fd, _RECORD_BYTES)
            except BlockingIOError:  # EAGAIN: no more records for now
                break
            except BrokenPipeError:
                # EPIPE: records were overwritten before we read them; the kernel has moved
                # our position to the oldest record still there, so reading on is right
                self.overruns += 1
                if self.overruns == 1:
                    log.warning("%s: kernel log overran, some records were lost (an XID "
                                "among them would be missed; NVML events still come)",
                                self.path)
                continue
            if not data:
                break
            # one record: header;message, then " KEY=value" continuation lines
            out.append(data.decode("utf-8", errors="replace").split("\n", 1)[0])
        return out

    def _read_lines(self, fd: int) -> list[str]:
        if self._regular and os.fstat(fd).st_size < os.lseek(fd, 0, os.SEEK_CUR):
            # the file was truncated (rotated, or a test rewrote it): read it from the start
            os.lseek(fd, 0, os.SEEK_SET)
            self._buf = b""
        chunks = [self._buf]
        total = 0
        while total < _MAX_LINE_BYTES:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:  # a FIFO with a writer but no data
                break
            if not data:  # end of file, or a FIFO without a writer
                break
            chunks.append(data)
            total += len(data)
        *complete, rest = b"".join(chunks).split(b"\n")
        if len(rest) > _MAX_LINE_BYTES:
            log.warning("%s: dropping %d bytes without a newline", self.path, len(rest))
            rest = b""
        self._buf = rest  # a partial last line waits for the rest of it
        return [c.decode("utf-8", errors="replace") for c in complete]


def _bus_key(bus_id: str) -> tuple[int, int, int] | None:
    """(domain, bus, device) of '0000:9B:00.0', '00000000:9b:00.0', 'PCI:0000:9b:00', '9b:00'."""
    parts = bus_id.strip().lower().removeprefix("pci:").split(".", 1)[0].split(":")
    if len(parts) == 2:
        parts = ["0", *parts]
    if len(parts) != 3:
        return None
    try:
        domain, bus, device = (int(p, 16) for p in parts)
    except ValueError:
        return None
    return domain, bus, device


def to_xid_events(items: list[KmsgXid], bus_to_index: dict[str, int],
                  now_ms: int) -> list[XidEvent]:
    """Kernel-log XIDs as agent events; the GPU is found by PCI address (None if unknown).

    Matching ignores the function, case and the domain's width, since NVML writes
    '00000000:9B:00.0' where the kernel writes '0000:9b:00'.
    """
    index: dict[tuple[int, int, int], int] = {}
    for bus_id, gpu in bus_to_index.items():
        key = _bus_key(bus_id)
        if key is not None:
            index[key] = gpu
    out = []
    for item in items:
        key = _bus_key(item.pci_bus_id)
        gpu_index = index.get(key) if key is not None else None
        if gpu_index is None:
            log.warning("kernel log Xid %d on %s: no GPU known at that address",
                        item.xid, item.pci_bus_id)
        out.append(XidEvent(gpu_index=gpu_index, xid=item.xid, timestamp_ms=now_ms,
                            source="kmsg"))
    return out
