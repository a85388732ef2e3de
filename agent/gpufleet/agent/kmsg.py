"""NVIDIA XID errors from the kernel log (/dev/kmsg), a second source beside NVML events.

The driver logs every XID as a kernel message, e.g.
  NVRM: Xid (PCI:0000:9b:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.
  NVRM: Xid (PCI:0000:3b:00): 48, An uncorrectable double bit error ...   (older drivers)
  NVRM: Xid (0000:3b:00): 13, ...                                          (older still)
It does so even when NVML itself cannot deliver the event (a GPU that fell off the bus).
Some drivers report a lost GPU without any Xid, over three lines (one record in /dev/kmsg,
where the newlines show as "\\x0a"):
  NVRM: The NVIDIA GPU 0000:82:00.0
  NVRM: (PCI ID: 10de:2330) installed in this system has
  NVRM: fallen off the bus and is not responding to commands.
or as "NVRM: GPU 0000:3b:00.0: GPU has fallen off the bus."; those are read as a lost GPU.

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gpufleet.agent.telemetry import XidEvent

log = logging.getLogger(__name__)

_XID_RE = re.compile(
    r"NVRM: Xid \((?:PCI:)?(?P<domain>[0-9a-fA-F]{4,8}):(?P<bus>[0-9a-fA-F]{2}):"
    r"(?P<device>[0-9a-fA-F]{2})(?:\.(?P<function>[0-7]))?\): (?P<xid>\d+),?\s*(?P<message>.*)"
)
_ADDR_RE = re.compile(
    r"(?:PCI:)?(?P<domain>[0-9a-fA-F]{4,8}):(?P<bus>[0-9a-fA-F]{2}):(?P<device>[0-9a-fA-F]{2})"
    r"(?:\.(?P<function>[0-7]))?\b")
_LOST_RE = re.compile(r"fallen off the bus", re.IGNORECASE)
_GPU_NAMED_RE = re.compile(r"NVRM: (?:The NVIDIA GPU|GPU at|GPU) (?:PCI:)?[0-9a-fA-F]{4,8}:")
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


@dataclass(frozen=True, slots=True)
class KmsgGpuLost:
    """The driver says a GPU fell off the bus, in words and without an Xid."""

    pci_bus_id: str  # as KmsgXid's
    message: str  # the driver's line(s)


def _bus_id(m: re.Match[str]) -> str:
    # the kernel prints domain:bus:device without the function; NVML and sysfs add ".0"
    return (f"{int(m.group('domain'), 16):04x}:{m.group('bus').lower()}:"
            f"{m.group('device').lower()}.{m.group('function') or '0'}")


def _kernel_text(line: str) -> str | None:
    """The message of a kernel line; None for a /dev/kmsg record not from the kernel.

    Userspace can write to /dev/kmsg, but only with another facility, so a real driver
    message always comes with facility 0.
    """
    rec = _RECORD_RE.match(line)
    if rec is not None:
        if int(rec.group("prefix")) >> 3 != 0:
            return None
        line = line[rec.end():]
    return line


def parse_xid_line(line: str) -> KmsgXid | None:
    """One kernel log line in any usual form (dmesg, /dev/kmsg record, syslog) -> XID or None."""
    text = _kernel_text(line)
    m = _XID_RE.search(text) if text is not None else None
    if m is None:
        return None
    return KmsgXid(pci_bus_id=_bus_id(m), xid=int(m.group("xid")),
                   message=m.group("message").rstrip())


def parse_kmsg_line(line: str, last_named_gpu: str | None = None
                    ) -> KmsgXid | KmsgGpuLost | None:
    """An Xid, a GPU lost without an Xid, or None.

    `last_named_gpu`: the address an earlier "NVRM: The NVIDIA GPU <address>" line named, for
    logs that split the driver's three-line message (syslog, journal, dmesg).
    """
    xid = parse_xid_line(line)
    if xid is not None:
        return xid
    text = _kernel_text(line)
    if text is None or "NVRM" not in text or _LOST_RE.search(text) is None:
        return None
    m = _ADDR_RE.search(text)
    bus_id = _bus_id(m) if m is not None else last_named_gpu
    if bus_id is None:
        return None
    return KmsgGpuLost(pci_bus_id=bus_id, message=text.replace("\\x0a", " ").strip())


def named_gpu(line: str) -> str | None:
    """The address of an "NVRM: The NVIDIA GPU 0000:82:00.0" line (first of three), else None."""
    text = _kernel_text(line)
    if text is None or (g := _GPU_NAMED_RE.search(text)) is None:
        return None
    m = _ADDR_RE.search(text, g.start())
    return _bus_id(m) if m is not None else None


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
        self._named_gpu: str | None = None  # from "NVRM: The NVIDIA GPU <addr>", for the next
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

    def read_new(self) -> list[KmsgXid | KmsgGpuLost]:
        """The XIDs (and GPUs lost without one) logged since the last call; [] when none (or
        when closed). Never blocks."""
        if self._fd is None:
            return []
        lines = self._read_records(self._fd) if self._records else self._read_lines(self._fd)
        out: list[KmsgXid | KmsgGpuLost] = []
        for line in lines:
            item = parse_kmsg_line(line, self._named_gpu)
            if isinstance(item, KmsgXid):
                log.info("kernel log: Xid %d on %s: %s", item.xid, item.pci_bus_id,
                         item.message)
            elif isinstance(item, KmsgGpuLost):
                log.warning("kernel log: GPU %s fell off the bus (no Xid): %s",
                            item.pci_bus_id, item.message)
                self._named_gpu = None
            else:
                self._named_gpu = named_gpu(line) or self._named_gpu
                continue
            out.append(item)
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


def to_xid_events(items: Sequence[KmsgXid | KmsgGpuLost], bus_to_index: dict[str, int],
                  now_ms: int) -> list[XidEvent]:
    """Kernel-log XIDs (and lost GPUs, `lost=True`, xid 0) as agent events; the GPU is found
    by PCI address (None if unknown).

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
        lost = isinstance(item, KmsgGpuLost)
        xid = 0 if isinstance(item, KmsgGpuLost) else item.xid
        if gpu_index is None:
            log.warning("kernel log %s on %s: no GPU known at that address",
                        "lost GPU" if lost else f"Xid {xid}", item.pci_bus_id)
        out.append(XidEvent(gpu_index=gpu_index, xid=xid, timestamp_ms=now_ms,
                            source="kmsg", message=item.message, lost=lost))
    return out
