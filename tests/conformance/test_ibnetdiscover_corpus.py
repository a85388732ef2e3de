"""Every ibnetdiscover dump of the real-world corpus parses, in the form it was saved and as
sites save it otherwise (spaces for tabs, `-s` progress and stderr mixed in); the files that
are not dumps are refused with one line naming the file and line."""

from __future__ import annotations

from pathlib import Path

import pytest
from gpufleet.scheduler.topology.ibnetdiscover import IbDump, IbParseError, parse_ibnetdiscover

pytestmark = pytest.mark.conformance

# prose, GUID maps and tool-specific sidecars kept beside the dumps
NOT_DUMPS = {
    "jabl_ibtopotool/notes.rst",
    "linux-rdma_ibsim/examples.README",
    "ltaulell_HPC_toolset/X5.map",
    "ltaulell_HPC_toolset/X5.spine",
    "microsoft_superbenchmark/ib_traffic_topo_aware_expected_config",
    "microsoft_superbenchmark/ib_traffic_topo_aware_hostfile",
    "microsoft_superbenchmark/ib_traffic_topo_aware_ibstat.txt",
}


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _shape(dump: IbDump) -> tuple[object, ...]:
    return (dump.fmt, sorted((n.node_id, n.kind, n.guid, n.description)
                             for n in dump.nodes.values()),
            sorted((lk.a, lk.a_port, lk.b, lk.b_port, lk.width, lk.speed) for lk in dump.links))


def test_whole_corpus(real_data_dir: Path) -> None:
    root = real_data_dir / "ibnetdiscover"
    parsed, refused = [], {}
    for rel in _files(root):
        text = (root / rel).read_text(errors="replace")
        try:
            dump = parse_ibnetdiscover(text, rel)
        except IbParseError as e:
            refused[rel] = e
            continue
        assert dump.nodes, rel
        for link in dump.links:
            assert link.a in dump.nodes and link.b in dump.nodes
        parsed.append(rel)
    assert set(refused) == NOT_DUMPS, "a dump is refused, or a sidecar was read as a dump"
    for rel, e in refused.items():  # one line naming the file and the line
        assert str(e).startswith(f"{rel}:{e.line_no}:") and "\n" not in str(e)
    assert len(parsed) >= 17


def _dumps(root: Path) -> list[str]:
    return [rel for rel in _files(root) if rel not in NOT_DUMPS]


def test_saved_other_ways_gives_the_same_fabric(real_data_dir: Path) -> None:
    root = real_data_dir / "ibnetdiscover"
    progress = ('DR path slid 0; dlid 0; 0 -> new Switch {0008f10400411f57} portnum 0 '
                'lid 6-6 "ISR9024 Voltaire"\n'
                'DR path slid 0; dlid 0; 0,1 -> known Channel Adapter {0008f10403960558} '
                'portnum 1 lid 10-10 "x"\n')
    stderr = "ibwarn: [1234] mad_rpc: _do_madrpc failed; dport (DR path slid 0; dlid 0; 0,1)\n"
    for rel in _dumps(root):
        text = (root / rel).read_text()
        want = _shape(parse_ibnetdiscover(text, rel))
        assert _shape(parse_ibnetdiscover(text.replace("\t", "  "), rel)) == want, rel
        assert _shape(parse_ibnetdiscover(progress + stderr + text, rel)) == want, rel
