"""The parser fuzz of tests/security/test_fuzz_parsers.py, seeded with the real-world corpus:
mutated real ibnetdiscover dumps, nvidia-smi captures, topology.conf files and dmesg lines."""

from __future__ import annotations

from collections.abc import Callable

from tests.conformance.corpus import real_data
from tests.support.fuzzing import (
    fuzz_ibnetdiscover,
    fuzz_kmsg_xid_lines,
    fuzz_topo_m,
    fuzz_topology_conf,
    real_ib_seeds,
    real_topo_seeds,
    real_topology_conf_seeds,
)

Report = Callable[[str], None]


def test_fuzz_real_ibnetdiscover(report_figure: Report) -> None:
    fuzz_ibnetdiscover(real_ib_seeds(real_data("ibnetdiscover")), report_figure, "real dumps")


def test_fuzz_real_nvidia_smi_topo_m(report_figure: Report) -> None:
    root = real_data("nvidia_smi_topo/utkuozdemir_nvidia_gpu_exporter_captures")
    fuzz_topo_m(real_topo_seeds(root), report_figure, "real captures")


def test_fuzz_real_topology_conf(report_figure: Report) -> None:
    fuzz_topology_conf(real_topology_conf_seeds(real_data("slurm_conf")), report_figure,
                       "real files")


def test_fuzz_real_kmsg_xid_lines(report_figure: Report) -> None:
    lines = [ln for ln in real_data("xid/leptonai_gpud/dmesg-with-xid-119.log")
             .read_text(errors="replace").splitlines() if ln.strip()]
    fuzz_kmsg_xid_lines(lines, report_figure, "real dmesg")
