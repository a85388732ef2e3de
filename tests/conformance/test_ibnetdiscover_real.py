"""The ibnetdiscover parser on every real dump of the corpus: counts, quirks, errors, fuzz."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from gpufleet.scheduler.topology.hostmap import load_guid_map
from gpufleet.scheduler.topology.ibnetdiscover import IbParseError, parse_ibnetdiscover
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conformance.corpus import real_data

# Every file of ibnetdiscover/: a dump (with the counts it must give) or a named sidecar.
# A new file there fails test_every_file_is_classified until it is listed here.
DUMPS: dict[str, tuple[str, int, int, int]] = {  # path -> (format, switches, CAs, links)
    "jabl_ibtopotool/1.topo": ("topology", 2, 4, 7),
    "jabl_ibtopotool/2.topo": ("topology", 1, 2, 2),
    "jabl_ibtopotool/3.topo": ("topology", 2, 6, 10),
    "jabl_ibtopotool/4.topo": ("topology", 1, 1, 1),
    "linux-rdma_ibsim/net": ("ibsim", 2, 2, 4),
    "linux-rdma_ibsim/net.1": ("ibsim", 1, 2, 2),
    "linux-rdma_ibsim/net.2sw2path": ("ibsim", 2, 2, 4),
    "linux-rdma_ibsim/net.2sw2path4hca": ("ibsim", 2, 4, 6),
    "linux-rdma_ibsim/net.2sw2path4hca2port": ("ibsim", 2, 2, 6),
    "loginoff_infiniband_topology/topo": ("topology", 8, 144, 192),
    "ltaulell_HPC_toolset/X5.topofile": ("topology", 11, 89, 159),
    "microsoft_superbenchmark/ib_traffic_topo_aware_ibnetdiscover.txt": ("topology", 8, 11, 18),
    "nvidia_topograph/example-bad.out": ("topology", 0, 1, 0),
    "nvidia_topograph/example.out": ("topology", 40, 582, 1114),
    "treydock_infiniband_exporter/test.out": ("ports", 4, 3, 4),
    "treydock_infiniband_exporter/test2.out": ("ports", 5, 2, 3),
    "treydock_infiniband_exporter/test3.out": ("ports", 1, 0, 0),
}


GUID_MAPS = {  # GUID -> host files: read by load_guid_map
    "ltaulell_HPC_toolset/X5.map": 86,
    "microsoft_superbenchmark/ib_traffic_topo_aware_ibstat.txt": 10,
}


NOT_DUMPS = {  # prose and tool-specific sidecars, not fabric descriptions
    "jabl_ibtopotool/notes.rst",
    "linux-rdma_ibsim/examples.README",
    "ltaulell_HPC_toolset/X5.spine",
    "microsoft_superbenchmark/ib_traffic_topo_aware_hostfile",
    "microsoft_superbenchmark/ib_traffic_topo_aware_expected_config",
}


def test_every_file_is_classified() -> None:
    root = real_data("ibnetdiscover")
    files = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert files == set(DUMPS) | set(GUID_MAPS) | NOT_DUMPS


@pytest.mark.parametrize("rel", sorted(DUMPS))
def test_real_dump_parses(rel: str) -> None:
    path = real_data(f"ibnetdiscover/{rel}")
    dump = parse_ibnetdiscover(path.read_text(), str(path))
    fmt, switches, cas, links = DUMPS[rel]
    kinds = [n.kind for n in dump.nodes.values()]
    assert (dump.fmt, kinds.count("switch"), kinds.count("ca"), len(dump.links)) == (
        fmt, switches, cas, links)


@pytest.mark.parametrize("rel", sorted(GUID_MAPS))
def test_real_guid_maps_load(rel: str) -> None:
    path = real_data(f"ibnetdiscover/{rel}")
    assert len(load_guid_map(path.read_text(), str(path))) == GUID_MAPS[rel]


def _x5() -> str:
    return real_data("ibnetdiscover/ltaulell_HPC_toolset/X5.topofile").read_text()


def test_hash_inside_quoted_switch_name() -> None:
    dump = parse_ibnetdiscover(_x5())
    assert dump.nodes["S-0008f10500108c5c"].description == "Voltaire 4036 # 4036-8C5C"
    assert dump.nodes["S-0008f10500108c5c"].lid == 16


def test_tabs_and_spaces_give_the_same_fabric() -> None:
    text = _x5()
    a = parse_ibnetdiscover(text)
    b = parse_ibnetdiscover(text.replace("\t", "   "))
    assert a.links == b.links
    assert {k: (v.kind, v.description, v.guid) for k, v in a.nodes.items()} == {
        k: (v.kind, v.description, v.guid) for k, v in b.nodes.items()}


def test_link_width_speed_lid_and_guids() -> None:
    dump = parse_ibnetdiscover(real_data("ibnetdiscover/jabl_ibtopotool/1.topo").read_text())
    host = dump.nodes["H-0008f10403960558"]
    assert host.guid == "0x0008f10403960558"
    assert host.ports[2].port_guid == "0x0008f1040396055a"
    assert (host.ports[1].lid, host.ports[1].width, host.ports[1].speed) == (10, 1, "SDR")
    sw = dump.nodes["S-005442ba00003080"]
    assert (sw.kind, sw.nports, sw.lid, sw.description) == ("switch", 24, 6, "ISR9024 Voltaire")


def test_full_attributes_s_w_v_e() -> None:
    path = real_data("ibnetdiscover/microsoft_superbenchmark/"
                     "ib_traffic_topo_aware_ibnetdiscover.txt")
    dump = parse_ibnetdiscover(path.read_text())
    port = dump.nodes["S-0ff08c43213b3f30"].ports[1]
    assert port.attrs == {"s": 4, "w": 2, "v": 4, "e": 4}
    assert (port.width, port.speed) == (4, "HDR")
    # the aggregation node only appears from the switch side: kept, with what is known
    assert dump.nodes["H-0ff08c43213b3f38"].description == "Mellanox Technologies Aggregation Node"
    assert any("no record of its own" in w for w in dump.warnings)


def test_libibmad_error_line_is_kept_as_a_warning() -> None:
    dump = parse_ibnetdiscover(real_data("ibnetdiscover/jabl_ibtopotool/3.topo").read_text())
    assert len(dump.warnings) == 1 and "query_smp.c" in dump.warnings[0]


def test_ports_report() -> None:
    path = real_data("ibnetdiscover/treydock_infiniband_exporter/test.out")
    dump = parse_ibnetdiscover(path.read_text())
    sw = dump.nodes["S-506b4b03005c2740"]
    assert sw.description == "ib-i4l1s01"
    assert sw.ports[37].connected is False and sw.ports[37].speed is None  # "4x ???"
    assert dump.nodes["S-08c0eb0300add20e"].ports[80].connected is False  # no peer
    ca = dump.nodes["H-7cfe9003003b4bde"]
    assert (ca.description, ca.lid, ca.ports[1].speed) == ("o0001 HCA-1", 134, "EDR")
    test2 = parse_ibnetdiscover(real_data(
        "ibnetdiscover/treydock_infiniband_exporter/test2.out").read_text())
    assert test2.nodes["S-946dae0300618c83"].description == "5FB0406-spine-IB02"
    test3 = parse_ibnetdiscover(real_data(
        "ibnetdiscover/treydock_infiniband_exporter/test3.out").read_text())
    assert test3.nodes["S-0002c9020040f161"].description == "Infiniscale-IV Mellanox Technologies"


@pytest.mark.parametrize(
    ("mutate", "line_no", "words"),
    [
        (lambda t: t.replace('[4]\t"H-003048c749cd0000"[1]', '[4]\t"H-003048c749cd0000[1]', 1),
         14, "malformed port line"),
        (lambda t: t.replace("4xDDR", "4xFOO", 1), 14, "unknown link speed"),
        (lambda t: t.replace("devid=0x5a5a", "devid=banana", 1), 7, "not an ibnetdiscover line"),
        (lambda t: t.replace("[1]\t\"S-0008f10500108c5c\"[15]", "[1]\t\"S-0008f10500108c5c\"[14]",
                             1), 0, "says"),
    ],
)
def test_bad_input_names_the_line(mutate: Callable[[str], str], line_no: int,
                                  words: str) -> None:
    with pytest.raises(IbParseError) as exc:
        parse_ibnetdiscover(mutate(_x5()), "X5.topofile")
    assert words in str(exc.value)
    assert str(exc.value).startswith("X5.topofile:")
    if line_no:
        assert exc.value.line_no == line_no


_FUZZ_SOURCES = [
    "ltaulell_HPC_toolset/X5.topofile",
    "jabl_ibtopotool/3.topo",
    "treydock_infiniband_exporter/test.out",
    "linux-rdma_ibsim/net.2sw2path4hca2port",
    "microsoft_superbenchmark/ib_traffic_topo_aware_ibnetdiscover.txt",
]


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    which=st.sampled_from(_FUZZ_SOURCES),
    edits=st.lists(
        st.tuples(st.sampled_from(["delete", "insert", "replace", "dupline", "dropline"]),
                  st.floats(0, 1), st.text(min_size=0, max_size=6)),
        min_size=1, max_size=6),
)
def test_fuzz_mutated_real_dumps_parse_or_raise_parse_error(
        which: str, edits: list[tuple[str, float, str]]) -> None:
    text = (Path(real_data("ibnetdiscover")) / which).read_text()
    for op, where, junk in edits:
        if op in ("dupline", "dropline"):
            lines = text.splitlines()
            i = int(where * (len(lines) - 1))
            lines[i:i + 1] = [lines[i], lines[i]] if op == "dupline" else []
            text = "\n".join(lines)
            continue
        i = int(where * len(text))
        if op == "delete":
            text = text[:i] + text[i + len(junk) + 1:]
        elif op == "insert":
            text = text[:i] + junk + text[i:]
        else:
            text = text[:i] + junk + text[i + len(junk):]
    try:
        dump = parse_ibnetdiscover(text, "fuzz")
    except IbParseError as e:
        error: IbParseError | None = e
    else:
        error = None
    if error is not None:
        assert error.line_no >= 1
        assert str(error).startswith(f"fuzz:{error.line_no}:")
        return
    for link in dump.links:  # what parsed is self-consistent
        assert link.a in dump.nodes and link.b in dump.nodes

