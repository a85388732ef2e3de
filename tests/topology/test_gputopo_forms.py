"""`nvidia-smi topo -m` as drivers 418..580 print it, and as it reaches us pasted from a
terminal (tabs expanded to spaces), with ANSI escapes, old `mlx5_N` and new `NICn` columns.
The machines below are made up for these tests; the layouts are the driver's."""

from __future__ import annotations

import pytest
from gpufleet.scheduler.topology.gputopo import TopoMatrix, nvlink_islands, parse_topo_m
from gpufleet.scheduler.topology.ibnetdiscover import IbParseError

# 535+: NICn columns, a NIC legend, GPU NUMA ID after an empty column, ANSI-underlined header
DRV_535 = (
    "\t\x1b[4mGPU0\tGPU1\tGPU2\tGPU3\tNIC0\tNIC1\tCPU Affinity\tNUMA Affinity\t"
    "GPU NUMA ID\x1b[0m\n"
    "GPU0\t X \tNV18\tNV18\tNV18\tPIX\tSYS\t0-47,96-143\t0\t\tN/A\n"
    "GPU1\tNV18\t X \tNV18\tNV18\tPIX\tSYS\t0-47,96-143\t0\t\tN/A\n"
    "GPU2\tNV18\tNV18\t X \tNV18\tSYS\tPIX\t48-95,144-191\t1\t\tN/A\n"
    "GPU3\tNV18\tNV18\tNV18\t X \tSYS\tPIX\t48-95,144-191\t1\t\tN/A\n"
    "NIC0\tPIX\tPIX\tSYS\tSYS\t X \tSYS\n"
    "NIC1\tSYS\tSYS\tPIX\tPIX\tSYS\t X \n"
    "\n"
    "Legend:\n"
    "\n"
    "  X    = Self\n"
    "  SYS  = Connection traversing PCIe as well as the SMP interconnect between NUMA nodes\n"
    "  PIX  = Connection traversing at most a single PCIe bridge\n"
    "  NV#  = Connection traversing a bonded set of # NVLinks\n"
    "\n"
    "NIC Legend:\n"
    "\n"
    "  NIC0: mlx5_0\n"
    "  NIC1: mlx5_3\n"
)

# 450..470: NICs named by device, CPU and NUMA affinity, no GPU NUMA ID, no NIC legend
DRV_450 = (
    "\tGPU0\tGPU1\tmlx5_0\tmlx5_1\tCPU Affinity\tNUMA Affinity\n"
    "GPU0\t X \tNV12\tPXB\tSYS\t48-63,176-191\t3\n"
    "GPU1\tNV12\t X \tSYS\tPXB\t16-31,144-159\t1\n"
    "mlx5_0\tPXB\tSYS\t X \tSYS\t\t\n"
    "mlx5_1\tSYS\tPXB\tSYS\t X \t\t\n"
)

# 418: CPU affinity only, SOC where later drivers print SYS, a PCIe pair without NVLink
DRV_418 = (
    "\tGPU0\tGPU1\tCPU Affinity\n"
    "GPU0\t X \tSOC\t0-9,20-29\n"
    "GPU1\tSOC\t X \t10-19,30-39\n"
)

# GH200-style: the GPU has a NUMA node of its own memory
DRV_560_C2C = (
    "\tGPU0\tNIC0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\n"
    "GPU0\t X \tSYS\t0-71\t0\t\t1\n"
    "NIC0\tSYS\t X \n"
    "\nNIC Legend:\n\n  NIC0: mlx5_0\n"
)

# Windows: no affinity at all
WINDOWS = "\tGPU0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\nGPU0\t X \t\t\t\tN/A\n"


def _same(a: TopoMatrix, b: TopoMatrix) -> None:
    assert (a.devices, a.cells, a.nics) == (b.devices, b.cells, b.nics)
    assert (a.cpu_affinity, a.numa_affinity, a.gpu_numa_id) == (
        b.cpu_affinity, b.numa_affinity, b.gpu_numa_id)


def test_driver_535_with_nic_legend_and_gpu_numa_id() -> None:
    m = parse_topo_m(DRV_535, "535")
    assert m.devices == ["GPU0", "GPU1", "GPU2", "GPU3", "NIC0", "NIC1"]
    assert m.nics == {"NIC0": "mlx5_0", "NIC1": "mlx5_3"}
    assert m.cells[("GPU2", "NIC1")] == "PIX" and m.nvlinks("GPU0", "GPU3") == 18
    assert (m.cpu_affinity["GPU2"], m.numa_affinity["GPU2"], m.gpu_numa_id["GPU2"]) == (
        "48-95,144-191", "1", "N/A")
    assert [len(i) for i in nvlink_islands(m)] == [4]


@pytest.mark.parametrize("text", [DRV_535, DRV_450, DRV_418, DRV_560_C2C, WINDOWS])
def test_pasted_from_a_terminal_reads_the_same(text: str) -> None:
    """A terminal expands each tab to the next multiple of 8 columns: that is what tickets,
    wikis and chat messages hold."""
    tabs = parse_topo_m(text, "tabs")
    _same(parse_topo_m(text.expandtabs(8), "spaces"), tabs)
    _same(parse_topo_m(text.expandtabs(4), "spaces4"), tabs)
    # hand-aligned: every separator two spaces or more, trailing blanks gone
    squeezed = "\n".join("  ".join(c for c in line.split("\t")).rstrip()
                         for line in text.splitlines())
    if "\t\t" not in text:  # an empty field cannot survive squeezing; those are covered above
        _same(parse_topo_m(squeezed, "squeezed"), tabs)


def test_driver_450_device_named_nics() -> None:
    m = parse_topo_m(DRV_450, "450")
    assert m.devices == ["GPU0", "GPU1", "mlx5_0", "mlx5_1"]
    assert m.nics == {"mlx5_0": "mlx5_0", "mlx5_1": "mlx5_1"}
    assert m.cells[("mlx5_1", "GPU1")] == "PXB"
    assert (m.cpu_affinity["GPU0"], m.numa_affinity["GPU0"], m.gpu_numa_id["GPU0"]) == (
        "48-63,176-191", "3", "N/A")


def test_driver_418_cpu_affinity_only() -> None:
    m = parse_topo_m(DRV_418, "418")
    assert m.cells[("GPU0", "GPU1")] == "SOC" and m.nvlinks("GPU0", "GPU1") == 0
    assert (m.cpu_affinity["GPU1"], m.numa_affinity["GPU1"]) == ("10-19,30-39", "N/A")
    assert [len(i) for i in nvlink_islands(m)] == [1, 1]


def test_gpu_numa_id_and_windows_blanks() -> None:
    m = parse_topo_m(DRV_560_C2C, "560")
    assert (m.cpu_affinity["GPU0"], m.numa_affinity["GPU0"], m.gpu_numa_id["GPU0"]) == (
        "0-71", "0", "1")
    w = parse_topo_m(WINDOWS, "win")
    assert (w.cpu_affinity["GPU0"], w.numa_affinity["GPU0"], w.gpu_numa_id["GPU0"]) == (
        "N/A", "N/A", "N/A")


def test_found_inside_a_longer_capture() -> None:
    text = ("$ nvidia-smi topo -m\r\n" + DRV_450.replace("\n", "\r\n")
            + "\r\nLegend:\r\n\r\n  X    = Self\r\n")
    _same(parse_topo_m(text, "capture"), parse_topo_m(DRV_450, "450"))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("GPU0 ready\nnothing else\n", r"t:1: no `nvidia-smi topo -m` header"),
        ("\tGPU0\tGPU1\tCPU Affinity\nGPU0\t X \tNV4\t0-7\nGPU7\tNV4\t X \t0-7\n",
         r"t:3: row 'GPU7' is not a device of the header"),
        ("\tGPU0\tGPU1\tCPU Affinity\nGPU0\t X \n", r"t:2: 1 cells for 2 devices"),
        ("        GPU0    GPU1    CPU Affinity\nGPU0     X      NV4     0-7\n"
         "GPU1    FOO      X      0-7\n", r"t:3: unknown relation 'FOO' for GPU0"),
        ("\tNIC0\tGPU0\tCPU Affinity\nGPU0\tSYS\t X \t0-7\n", r"t:1: header does not start"),
    ],
)
def test_bad_input_names_the_line(text: str, match: str) -> None:
    with pytest.raises(IbParseError, match=match):
        parse_topo_m(text, "t")
