"""Fake /sys trees for InfiniBand tests, laid out and formatted as the kernel does.

Only builds files under the root it is given (a pytest tmp_path); never touches the real /sys.

Layout (as on a node; the class entry and `device` are symlinks, like in real sysfs):
  {root}/devices/pci0000:00/0000:00:01.0/{pci}/numa_node
  {root}/devices/pci0000:00/0000:00:01.0/{pci}/infiniband/{hca}/node_guid, ports/N/...
  {root}/class/infiniband/{hca}      -> the infiniband/{hca} directory above
  {root}/class/infiniband/{hca}/device -> the PCI device directory
  {root}/bus/pci/devices/{pci}       -> the PCI device directory
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

COUNTERS = ("symbol_error", "link_downed", "link_error_recovery", "port_rcv_errors",
            "port_xmit_discards")

PORT_DEFAULTS: dict[str, object] = {
    "state": "4: ACTIVE",
    "phys_state": "5: LinkUp",
    "rate": "400 Gb/sec (4X NDR)",
    "lid": 0x10,
    "sm_lid": 0x1,
    "link_layer": "InfiniBand",
    "counters": dict.fromkeys(COUNTERS, 0),
}

_PLAIN = ("state", "phys_state", "rate", "lid", "sm_lid", "link_layer", "gid")


def _write(path: Path, value: object) -> None:
    """Write one attribute the way sysfs shows it (trailing newline); None removes it."""
    if value is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{value}\n")


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        link.unlink()
    # relative, as the kernel makes them: the tree can be moved
    link.symlink_to(os.path.relpath(target, link.parent))


def _guid_of(node_guid: str, port: int) -> str:
    """Port GUID in node_guid form: the node GUID plus (port - 1), as ConnectX assigns them."""
    try:
        value = int(node_guid.replace(":", ""), 16) + port - 1
    except ValueError:  # a test writing a garbage node_guid: any port GUID will do
        value = port
    h = f"{value:016x}"
    return ":".join(h[i:i + 4] for i in range(0, 16, 4))


def hca_dir(root: Path, hca: str) -> Path:
    return root / "class" / "infiniband" / hca


def port_dir(root: Path, hca: str, port: int) -> Path:
    return hca_dir(root, hca) / "ports" / str(port)


def make_hca(root: Path, hca: str, node_guid: str,
             ports: dict[int, dict[str, object]] | None = None,
             numa_node: int = 0, pci_addr: str = "0000:17:00.0") -> Path:
    """An HCA with `ports` ({port number: set_port fields}); default one port with defaults.

    `node_guid` in sysfs form ('506b:4b03:00c1:a2b4'); returns {root}/class/infiniband/{hca}.
    """
    pci = root / "devices" / "pci0000:00" / "0000:00:01.0" / pci_addr
    pci.mkdir(parents=True, exist_ok=True)
    _write(pci / "numa_node", numa_node)
    _link(root / "bus" / "pci" / "devices" / pci_addr, pci)
    real = pci / "infiniband" / hca
    real.mkdir(parents=True, exist_ok=True)
    _link(hca_dir(root, hca), real)
    _link(real / "device", pci)
    _write(real / "node_guid", node_guid)
    _write(real / "node_type", "1: CA")
    for n, fields in (ports if ports is not None else {1: {}}).items():
        set_port(root, hca, n, **fields)
    return hca_dir(root, hca)


def set_port(root: Path, hca: str, port: int, **fields: object) -> None:
    """Create or change a port: state="1: DOWN", rate="200 Gb/sec (4X HDR)", lid=0x1a,
    gid="fe80:...", counters={"symbol_error": 5}. A new port starts from PORT_DEFAULTS.

    None removes the file (a counter too); a str is written verbatim (garbage included);
    lid/sm_lid ints are written in hex, counter ints in decimal.
    """
    unknown = set(fields) - set(_PLAIN) - {"counters"}
    if unknown:
        raise TypeError(f"unknown port fields {sorted(unknown)}")
    d = port_dir(root, hca, port)
    if not d.exists():
        guid = (hca_dir(root, hca) / "node_guid").read_text().strip()
        defaults = dict(PORT_DEFAULTS, gid="fe80:0000:0000:0000:" + _guid_of(guid, port))
        given = fields.get("counters") or {}
        assert isinstance(given, dict)
        counters = dict.fromkeys(COUNTERS, 0) | given  # a new port has every counter
        fields = defaults | fields | {"counters": counters}
        d.mkdir(parents=True)
    for name in _PLAIN:
        if name not in fields:
            continue
        value = fields[name]
        if name in ("lid", "sm_lid") and isinstance(value, int):
            value = f"0x{value:x}"
        _write(d / "gids" / "0" if name == "gid" else d / name, value)
    counters = fields.get("counters")
    if counters is not None:
        assert isinstance(counters, dict)
        for cname, cvalue in counters.items():
            _write(d / "counters" / cname, cvalue)


def bump_counter(root: Path, hca: str, port: int, counter: str, by: int = 1) -> int:
    """Add `by` to a counter file, as the HCA would; returns the new value."""
    path = port_dir(root, hca, port) / "counters" / counter
    value = int(path.read_text()) + by
    _write(path, value)
    return value


def remove_port(root: Path, hca: str, port: int) -> None:
    """The port's directory disappears (device reset, driver unload)."""
    shutil.rmtree(port_dir(root, hca, port).resolve())
