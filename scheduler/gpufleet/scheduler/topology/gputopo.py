"""A node's GPU topology from the inventory its agent sent: NVLink counts between GPU pairs,
PCIe relations, GPU <-> NIC affinity, NUMA nodes, NVLink islands; rendered like
`nvidia-smi topo -m`. Also reads real `nvidia-smi topo -m` text into the same form, so the two
can be compared cell by cell. Never calls NVML: that is the agent's job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gpufleet.scheduler.topology.ibnetdiscover import IbParseError
from gpufleet.scheduler.topology.inventory import NodeInventory

__all__ = ["TopoMatrix", "from_inventory", "nvlink_islands", "parse_topo_m", "render_topo_m"]

CELL = re.compile(r"^(X|NV\d+|PIX|PXB|PHB|NODE|SYS|SOC|N/A)$")


@dataclass
class TopoMatrix:
    """Devices ("GPU0".., "NIC0"..), the cell for each ordered pair, and per-GPU affinity."""

    devices: list[str]
    cells: dict[tuple[str, str], str] = field(default_factory=dict)
    cpu_affinity: dict[str, str] = field(default_factory=dict)
    numa_affinity: dict[str, str] = field(default_factory=dict)
    gpu_numa_id: dict[str, str] = field(default_factory=dict)
    nics: dict[str, str] = field(default_factory=dict)  # NIC0 -> mlx5_0

    @property
    def gpus(self) -> list[str]:
        return [d for d in self.devices if d.startswith("GPU")]

    def nvlinks(self, a: str, b: str) -> int:
        cell = self.cells.get((a, b), "")
        return int(cell[2:]) if cell.startswith("NV") else 0


def from_inventory(inv: NodeInventory,
                   cpu_affinity: dict[int, str] | None = None) -> TopoMatrix:
    """Matrix of one node. CPU affinity is not in the v1 inventory: pass it if known."""
    gpus = sorted(inv.gpus, key=lambda g: g.index)
    hcas = sorted({a.hca for a in inv.gpu_nics})
    m = TopoMatrix([f"GPU{g.index}" for g in gpus] + [f"NIC{i}" for i in range(len(hcas))])
    m.nics = {f"NIC{i}": h for i, h in enumerate(hcas)}
    nic_of = {h: f"NIC{i}" for i, h in enumerate(hcas)}
    for g in gpus:
        m.cells[(f"GPU{g.index}", f"GPU{g.index}")] = "X"
        name = f"GPU{g.index}"
        numa = str(g.numa_node) if g.numa_node is not None else "N/A"
        m.numa_affinity[name] = numa
        m.gpu_numa_id[name] = "N/A"  # only C2C/NVLink-attached memory GPUs (GH200) have one
        m.cpu_affinity[name] = (cpu_affinity or {}).get(g.index, "N/A")
    for lk in inv.gpu_links:
        cell = f"NV{lk.nvlink_count}" if lk.nvlink_count else lk.pcie_relation or "N/A"
        m.cells[(f"GPU{lk.gpu_a}", f"GPU{lk.gpu_b}")] = cell
        m.cells[(f"GPU{lk.gpu_b}", f"GPU{lk.gpu_a}")] = cell
    for a in inv.gpu_nics:
        cell = a.pcie_relation or "N/A"
        m.cells[(f"GPU{a.gpu_index}", nic_of[a.hca])] = cell
        m.cells[(nic_of[a.hca], f"GPU{a.gpu_index}")] = cell
    for nic in m.nics:
        m.cells[(nic, nic)] = "X"
    return m


def nvlink_islands(m: TopoMatrix) -> list[list[str]]:
    """GPUs that reach each other over NVLink (directly or through NVSwitch), largest first."""
    seen: set[str] = set()
    out = []
    for g in m.gpus:
        if g in seen:
            continue
        island, stack = [], [g]
        seen.add(g)
        while stack:
            x = stack.pop()
            island.append(x)
            for y in m.gpus:
                if y not in seen and m.nvlinks(x, y) > 0:
                    seen.add(y)
                    stack.append(y)
        out.append(sorted(island, key=lambda d: int(d[3:])))
    return sorted(out, key=lambda i: (-len(i), int(i[0][3:])))


def render_topo_m(m: TopoMatrix) -> str:
    """Text laid out as `nvidia-smi topo -m` prints it (tab separated, legend after)."""
    head = ["", *m.devices, "CPU Affinity", "NUMA Affinity", "GPU NUMA ID"]
    rows = ["\t".join(head)]
    for d in m.devices:
        cells = [" X " if d == c else m.cells.get((d, c), "N/A") for c in m.devices]
        if d.startswith("GPU"):
            tail = [m.cpu_affinity.get(d, "N/A"), m.numa_affinity.get(d, "N/A"), "",
                    m.gpu_numa_id.get(d, "N/A")]
        else:
            tail = []
        rows.append("\t".join([d, *cells, *tail]).rstrip("\t"))
    rows += ["", "Legend:", "",
             "  X    = Self",
             "  SYS  = Connection traversing PCIe as well as the SMP interconnect between NUMA "
             "nodes (e.g., QPI/UPI)",
             "  NODE = Connection traversing PCIe as well as the interconnect between PCIe Host "
             "Bridges within a NUMA node",
             "  PHB  = Connection traversing PCIe as well as a PCIe Host Bridge (typically the "
             "CPU)",
             "  PXB  = Connection traversing multiple PCIe bridges (without traversing the PCIe "
             "Host Bridge)",
             "  PIX  = Connection traversing at most a single PCIe bridge",
             "  NV#  = Connection traversing a bonded set of # NVLinks"]
    if m.nics:
        rows += ["", "NIC Legend:", ""] + [f"  {n}: {h}" for n, h in m.nics.items()]
    return "\n".join(rows) + "\n"


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# the columns after the device cells, as drivers print them: 450+ CPU and NUMA affinity,
# 535+ also the GPU NUMA ID (after an empty column in tab-separated output)
_TAIL_COLUMNS = ("CPU Affinity", "NUMA Affinity", "GPU NUMA ID")
_NIC_LEGEND = re.compile(r"^\s*(NIC\d+)\s*:\s*(\S+)\s*$")


def _header_devices(header: str) -> tuple[list[str], list[str]]:
    """Device columns and the tail columns present, from the header line (tabs or spaces)."""
    at = header.find("CPU Affinity")
    devices = header[:at].split()
    tail = [c for c in _TAIL_COLUMNS if c in header[at:]]
    return devices, tail


def _row_fields(raw: str, ndev: int) -> tuple[list[str], list[str]]:
    """(name + cells, tail fields) of a matrix row.

    Tab-separated rows keep empty fields, so the tail is positional. Rows aligned with
    spaces (a terminal's output pasted into a ticket) lose empty fields: `_place_tail`
    places what is left.
    """
    if "\t" in raw:
        fields = [f.strip() for f in raw.split("\t")]
        if fields and fields[0] == "":  # a row never starts with a tab; tolerate one
            fields = fields[1:]
        return fields[:1 + ndev], fields[1 + ndev:]
    tokens = raw.split()
    return tokens[:1 + ndev], tokens[1 + ndev:]


def _place_tail(tail_cols: list[str], values: list[str], tabbed: bool) -> dict[str, str]:
    """Tail values onto the tail columns of the header."""
    out = dict.fromkeys(tail_cols, "")
    if tabbed:
        # "cpu, numa" (450..530) or "cpu, numa, <empty>, gpu numa id" (535+)
        for col, val in zip(tail_cols[:2], values, strict=False):
            out[col] = val
        if "GPU NUMA ID" in out and len(values) >= 3:
            out["GPU NUMA ID"] = values[-1]
        return out
    vals = list(values)
    if "GPU NUMA ID" in out and vals:
        out["GPU NUMA ID"] = vals.pop()  # always printed (a number or N/A), and last
    for col, val in zip([c for c in tail_cols if c != "GPU NUMA ID"], vals, strict=False):
        out[col] = val  # an empty CPU affinity (Windows) leaves no token to place
    return out


def _read_row(m: TopoMatrix, tail_cols: list[str], line_no: int, raw: str,
              source: str) -> None:
    devices = m.devices
    head, tail = _row_fields(raw, len(devices))
    name = head[0]
    if name not in devices:
        raise IbParseError(source, line_no, f"row {name!r} is not a device of the header", raw)
    cells = head[1:]
    if len(cells) < len(devices):
        raise IbParseError(source, line_no, f"{len(cells)} cells for {len(devices)} devices",
                           raw)
    for col, cell in zip(devices, cells, strict=True):
        if not CELL.match(cell):
            raise IbParseError(source, line_no, f"unknown relation {cell!r} for {col}", raw)
        if cell != "N/A":  # unknown stays absent, as in from_inventory
            m.cells[(name, col)] = cell
    if name.startswith("GPU") and tail_cols:
        placed = _place_tail(tail_cols, tail, "\t" in raw)
        m.cpu_affinity[name] = placed.get("CPU Affinity") or "N/A"
        m.numa_affinity[name] = placed.get("NUMA Affinity") or "N/A"
        m.gpu_numa_id[name] = placed.get("GPU NUMA ID") or "N/A"


def parse_topo_m(text: str, source: str = "<topo -m>") -> TopoMatrix:
    """Read `nvidia-smi topo -m` output of drivers 450 to 580, as printed (tabs) or as pasted
    from a terminal (spaces), with or without ANSI escapes around the header.

    The header row names the device columns: GPUs, then NICs as `NIC<n>` (with a "NIC
    Legend" naming each, drivers >= 510) or by their device names (`mlx5_0`, older drivers);
    then CPU affinity, NUMA affinity and (drivers >= 535) GPU NUMA ID. NICs named in the
    header stand for themselves in `nics`.
    """
    lines = [_ANSI.sub("", raw).rstrip("\r") for raw in text.splitlines()]
    start = next((i for i, ln in enumerate(lines)
                  if "CPU Affinity" in ln and re.search(r"\bGPU\d+\b", ln)), None)
    if start is None:
        raise IbParseError(source, 1, "no `nvidia-smi topo -m` header (GPU0 ... CPU Affinity)")
    devices, tail_cols = _header_devices(lines[start])
    if not devices or not re.fullmatch(r"GPU\d+", devices[0]) or len(set(devices)) != len(
            devices):
        raise IbParseError(source, start + 1, "header does not start with the GPU columns",
                           lines[start])
    m = TopoMatrix(devices)
    for i in range(start + 1, len(lines)):
        raw = lines[i]
        if not raw.strip() or raw.strip().startswith("Legend:"):
            break
        _read_row(m, tail_cols, i + 1, raw, source)
    for raw in lines[start:]:
        if nm := _NIC_LEGEND.match(raw):
            m.nics[nm.group(1)] = nm.group(2)
    for d in devices:
        if not d.startswith(("GPU", "NIC")):
            m.nics.setdefault(d, d)  # old drivers: the column is the device name itself
    return m
