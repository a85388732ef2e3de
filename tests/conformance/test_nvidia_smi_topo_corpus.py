"""Every `nvidia-smi topo -m` output in the real-world corpus parses, as captured (ANSI
underline, tabs, Windows blanks) and as a terminal would show it (tabs expanded)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from gpufleet.scheduler.topology.gputopo import parse_topo_m

pytestmark = pytest.mark.conformance

_HEADER = re.compile(r"^.*GPU\d+\b.*CPU Affinity.*$", re.M)


def test_every_topo_m_in_the_corpus(real_data_dir: Path) -> None:
    root = real_data_dir / "nvidia_smi_topo"
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        text = path.read_text(errors="replace")
        if not _HEADER.search(text):
            continue  # -q, XML, nvlink -s ...: no topo -m in this file
        rel = str(path.relative_to(root))
        m = parse_topo_m(text, rel)  # the whole capture: the parser finds the matrix
        assert m.gpus and all(m.cells[(g, g)] == "X" for g in m.gpus), rel
        # the values in the file are the ones read: each GPU row's affinity, verbatim
        for g in m.gpus:
            row = re.search(rf"^{g}\t.*$", text, re.M)
            assert row, rel
            fields = row.group(0).split("\t")
            assert (m.cpu_affinity[g] == "N/A") == (fields[len(m.devices) + 1].strip() == "")
            if m.cpu_affinity[g] != "N/A":
                assert m.cpu_affinity[g] == fields[len(m.devices) + 1].strip()
        spaced = parse_topo_m(text.expandtabs(8), rel)
        assert (spaced.cells, spaced.cpu_affinity, spaced.numa_affinity, spaced.gpu_numa_id) == (
            m.cells, m.cpu_affinity, m.numa_affinity, m.gpu_numa_id), rel
        found.append(rel)
    assert len(found) >= 7, found
