"""InfiniBand and RoCE ports as Linux sysfs shows them (`/sys/class/infiniband`).

Inventory (`ports()`) and a cheap per-second sample (`sample()`) of every port's state, rate
and standard error counters. Reads files only: it never writes to sysfs, never sends MADs
of its own and never raises out of `ports()`/`sample()` because of one bad port or file.

Formats (kernel drivers/infiniband/core/sysfs.c, Documentation/ABI/stable/sysfs-class-infiniband):
  node_guid            506b:4b03:00c1:a2b4                  -> "0x506b4b0300c1a2b4"
  ports/N/state        4: ACTIVE                            -> "ACTIVE"
  ports/N/phys_state   5: LinkUp                            -> "LinkUp"
  ports/N/rate         400 Gb/sec (4X NDR), 2.5 Gb/sec (1X SDR) -> 400.0, 2.5
  ports/N/lid, sm_lid  0x1a                                 -> 26
  ports/N/gids/0       fe80:0000:0000:0000:506b:4b03:00c1:a2b4 -> port GUID, its last 8 bytes
  ports/N/counters/*   decimal; "N/A (no PMA)" when the device has no performance agent

What an unreadable or unparsable file does (always with one log line naming the file, repeated
only after the file was readable again, so a broken port does not flood the log every second):
  state, phys_state           the port is left out of that report (no guessed state: a format
                              we do not understand must not mark a whole fleet's ports down)
  a counter                   None ("not measured"); a missing counter file is None silently
  rate                        0.0 (no rate); a port that is not ACTIVE may have none
  lid, sm_lid                 0 (IB's "no LID": RoCE ports and ports before the SM ran)
  node_guid, port_guid,
  link_layer                  "" (unknown)
  numa_node                   None (also when sysfs says -1)
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from gpufleet.agent.telemetry import IbPortInfo, IbPortSample

log = logging.getLogger(__name__)

COUNTERS = ("symbol_error", "link_downed", "link_error_recovery", "port_rcv_errors",
            "port_xmit_discards")

_STATE_RE = re.compile(r"\s*\d+:\s*(\S.*?)\s*")
_RATE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*Gb/sec\b.*")
_GUID_RE = re.compile(r"[0-9a-fA-F]{4}(?::[0-9a-fA-F]{4}){3}")
# sysfs attributes are at most one page
_READ_BYTES = 4096


_T = TypeVar("_T")


class _Unparsable(ValueError):
    """A sysfs file held something that is not in the kernel's format."""


class _PortGone(Exception):
    """The port's directory disappeared (device reset, driver unload, hot removal)."""


@dataclass(frozen=True, slots=True)
class _PortPaths:
    """A port's file names, joined once at scan time so that sample() only opens them."""

    hca: str
    port: int
    dir: str
    state: str
    phys_state: str
    rate: str
    counters: tuple[tuple[str, str], ...]  # (counter name, path)


def _read(path: str) -> str:
    # os.open/os.read instead of Path.read_text: no buffered-IO object and no encoding
    # lookup per file; sample() opens about eight of these per port every second
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.read(fd, _READ_BYTES)
    finally:
        os.close(fd)
    return data.decode("ascii", errors="replace").strip()


def parse_state(text: str) -> str:
    """'4: ACTIVE' -> 'ACTIVE', '5: LinkUp' -> 'LinkUp', '7: Phy Test' -> 'Phy Test'."""
    m = _STATE_RE.fullmatch(text)
    if m is None:
        raise _Unparsable(f"not '<number>: <name>': {text!r}")
    return m.group(1)


def parse_rate_gbps(text: str) -> float:
    """'400 Gb/sec (4X NDR)' -> 400.0, '2.5 Gb/sec (1X SDR)' -> 2.5."""
    m = _RATE_RE.fullmatch(text)
    if m is None:
        raise _Unparsable(f"not '<number> Gb/sec ...': {text!r}")
    return float(m.group(1))


def parse_hex(text: str) -> int:
    """'0x1a' -> 26 (LIDs are printed in hex)."""
    try:
        return int(text, 16)
    except ValueError:
        raise _Unparsable(f"not a hex number: {text!r}") from None


def parse_guid(text: str) -> str:
    """'506b:4b03:00c1:a2b4' -> '0x506b4b0300c1a2b4'."""
    if _GUID_RE.fullmatch(text) is None:
        raise _Unparsable(f"not a GUID 'xxxx:xxxx:xxxx:xxxx': {text!r}")
    return "0x" + text.replace(":", "").lower()


def parse_gid_port_guid(text: str) -> str:
    """GID 'fe80:0000:0000:0000:506b:4b03:00c1:a2b4' -> port GUID '0x506b4b0300c1a2b4'."""
    try:
        raw = ipaddress.IPv6Address(text).packed
    except ValueError:
        raise _Unparsable(f"not a GID: {text!r}") from None
    # the interface ID (last 8 bytes) of GID index 0 is the port GUID
    return "0x" + raw[8:].hex()


def parse_counter(text: str) -> int | None:
    """Decimal counter; None for the kernel's 'N/A (no PMA)'."""
    if text.startswith("N/A"):
        return None
    if not (text.isascii() and text.isdigit()):  # also refuses '-1', '1e3', ' ' ...
        raise _Unparsable(f"not a decimal counter: {text!r}")
    return int(text)


class IbSysfs:
    """The InfiniBand/RoCE ports below `{root}/class/infiniband`.

    `root` is /sys on a node; tests pass a fake tree (tests/agent/fake_sysfs.py).
    `rescan_s`: how often sample() looks for new ports; a port that disappears makes the
    next sample() rescan at once.
    """

    def __init__(self, root: Path = Path("/sys"), *, rescan_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.root = root
        self.rescan_s = rescan_s
        self._clock = clock
        self._class_dir = root / "class" / "infiniband"
        self._ports: list[_PortPaths] | None = None
        self._scanned_at = 0.0
        self._warned: set[str] = set()  # paths already reported unreadable

    # ------------------------------------------------------------ public

    def ports(self) -> list[IbPortInfo]:
        """Inventory: every port, sorted by (hca, port); [] when the node has no IB class."""
        out = []
        for p in self._rescan():
            try:
                info = self._port_info(p)
            except _PortGone:
                self._gone(p)
                continue
            if info is not None:
                out.append(info)
        return out

    def sample(self) -> list[IbPortSample]:
        """State, rate and error counters of every port, sorted by (hca, port)."""
        ports = self._ports
        if ports is None or self._clock() - self._scanned_at >= self.rescan_s:
            ports = self._rescan()
        out = []
        for p in ports:
            try:
                state = self._field(p.state, parse_state, port_dir=p.dir)
                phys_state = self._field(p.phys_state, parse_state, port_dir=p.dir)
            except _PortGone:
                self._gone(p)
                continue
            if state is None or phys_state is None:
                continue
            rate = self._field(p.rate, parse_rate_gbps, quiet=state != "ACTIVE")
            # each counter read is a PMA query to the HCA firmware: five per port per
            # second is what the usual exporters do, so only the five that health uses
            counters = {name: self._counter(path) for name, path in p.counters}
            out.append(IbPortSample(
                hca=p.hca, port=p.port, state=state, phys_state=phys_state,
                rate_gbps=rate if rate is not None else 0.0, **counters,
            ))
        return out

    def _gone(self, p: _PortPaths) -> None:
        log.info("InfiniBand port %s/%d is gone (%s)", p.hca, p.port, p.dir)
        self._ports = None  # list the ports again on the next sample

    # ------------------------------------------------------------ scanning

    def _rescan(self) -> list[_PortPaths]:
        """List the port directories again and cache them for sample()."""
        self._scanned_at = self._clock()
        found: list[_PortPaths] = []
        try:
            hcas = os.listdir(self._class_dir)
        except FileNotFoundError:
            hcas = []  # no RDMA devices (or no rdma-core modules): nothing to report
        except OSError as e:
            self._unreadable(str(self._class_dir), e)
            hcas = []
        for hca in hcas:
            ports_dir = self._class_dir / hca / "ports"
            try:
                names = os.listdir(ports_dir)
            except OSError as e:
                self._unreadable(str(ports_dir), e)
                continue
            for name in names:
                if not (name.isascii() and name.isdigit()):
                    continue
                d = str(ports_dir / name)
                found.append(_PortPaths(
                    hca=hca, port=int(name), dir=d,
                    state=os.path.join(d, "state"),
                    phys_state=os.path.join(d, "phys_state"),
                    rate=os.path.join(d, "rate"),
                    counters=tuple((c, os.path.join(d, "counters", c)) for c in COUNTERS),
                ))
        found.sort(key=lambda p: (p.hca, p.port))
        self._ports = found
        return found

    def _port_info(self, p: _PortPaths) -> IbPortInfo | None:
        state = self._field(p.state, parse_state, port_dir=p.dir)
        phys_state = self._field(p.phys_state, parse_state, port_dir=p.dir)
        if state is None or phys_state is None:
            return None
        hca_dir = os.path.join(self._class_dir, p.hca)
        rate = self._field(p.rate, parse_rate_gbps, quiet=state != "ACTIVE")
        lid = self._field(os.path.join(p.dir, "lid"), parse_hex)
        sm_lid = self._field(os.path.join(p.dir, "sm_lid"), parse_hex)
        return IbPortInfo(
            hca=p.hca,
            port=p.port,
            node_guid=self._field(os.path.join(hca_dir, "node_guid"), parse_guid) or "",
            port_guid=self._field(os.path.join(p.dir, "gids", "0"), parse_gid_port_guid) or "",
            lid=lid if lid is not None else 0,
            sm_lid=sm_lid if sm_lid is not None else 0,
            state=state,
            phys_state=phys_state,
            rate_gbps=rate if rate is not None else 0.0,
            link_layer=self._field(os.path.join(p.dir, "link_layer"), _parse_word) or "",
            numa_node=self._numa_node(hca_dir),
        )

    def _numa_node(self, hca_dir: str) -> int | None:
        path = os.path.join(hca_dir, "device", "numa_node")
        try:
            value = int(_read(path))
        except FileNotFoundError:
            return None  # virtual devices (rxe, siw) have no PCI parent
        except (OSError, ValueError) as e:
            self._unreadable(path, e)
            return None
        self._readable(path)
        return value if value >= 0 else None  # -1: no NUMA affinity

    # ------------------------------------------------------------ reading

    def _field(self, path: str, parse: Callable[[str], _T], *, quiet: bool = False,
               port_dir: str | None = None) -> _T | None:
        """The parsed content of one file, or None (logged once) when it cannot be had.

        With `port_dir`: raises _PortGone when the file is missing because the whole port
        directory is, which is a removal, not a broken file.
        """
        try:
            value = parse(_read(path))
        except (OSError, ValueError) as e:
            if (port_dir is not None and isinstance(e, FileNotFoundError)
                    and not os.path.isdir(port_dir)):
                raise _PortGone(port_dir) from None
            if quiet:
                log.debug("%s: %s", path, e)
            else:
                self._unreadable(path, e)
            return None
        self._readable(path)
        return value

    def _counter(self, path: str) -> int | None:
        try:
            text = _read(path)
        except FileNotFoundError:
            return None  # not every driver or kernel has every counter
        except OSError as e:
            # newer kernels fail the read (EIO/EINVAL) when the PMA query fails
            self._unreadable(path, e)
            return None
        try:
            value = parse_counter(text)
        except ValueError as e:
            self._unreadable(path, e)
            return None
        self._readable(path)
        return value

    def _readable(self, path: str) -> None:
        if path in self._warned:
            self._warned.discard(path)
            log.info("InfiniBand sysfs file %s reads again", path)

    def _unreadable(self, path: str, err: Exception) -> None:
        if path in self._warned:
            return
        self._warned.add(path)
        reason = os.strerror(err.errno) if isinstance(err, OSError) and err.errno else str(err)
        # once per file until it reads again: a broken port must not flood the log each second
        log.warning("InfiniBand sysfs file %s unusable: %s", path, reason)


def _parse_word(text: str) -> str:
    """link_layer: 'InfiniBand', 'Ethernet' or 'Unknown'."""
    if not text or not text.isprintable() or " " in text:
        raise _Unparsable(f"not a link layer name: {text!r}")
    return text


