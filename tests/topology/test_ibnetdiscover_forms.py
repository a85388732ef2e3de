"""Every output form of `ibnetdiscover`, as the real tool prints it over an ibsim fabric of ours
(tests/topology/ibsim_fabric.py), gives the same fabric; plus the chassis-grouping and old-release
forms ibsim cannot produce, written here from the tool's documented format."""

from __future__ import annotations

from pathlib import Path

import pytest
from gpufleet.scheduler.topology.ibnetdiscover import IbDump, IbParseError, parse_ibnetdiscover

from tests.topology.ibsim_fabric import FORMS, discover, require_tools, simulated_fabric

Outputs = dict[str, tuple[str, str]]  # form -> (stdout, stderr)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> Outputs:
    require_tools()
    with simulated_fabric(tmp_path_factory.mktemp("ibsim")) as env:
        return {name: discover(env, args) for name, args in FORMS.items()}


def _cabling(dump: IbDump) -> set[frozenset[tuple[str, int]]]:
    """Cables by (node description, port): the same whatever GUIDs a form keys nodes by."""
    desc = {n.node_id: n.description for n in dump.nodes.values()}
    return {frozenset({(desc[lk.a], lk.a_port), (desc[lk.b], lk.b_port)}) for lk in dump.links}


def _rates(dump: IbDump) -> dict[frozenset[tuple[str, int]], tuple[int | None, str | None]]:
    desc = {n.node_id: n.description for n in dump.nodes.values()}
    return {frozenset({(desc[lk.a], lk.a_port), (desc[lk.b], lk.b_port)}): (lk.width, lk.speed)
            for lk in dump.links}


def test_plain_dump_of_the_simulated_fabric(outputs: Outputs) -> None:
    dump = parse_ibnetdiscover(outputs["plain"][0], "plain")
    kinds = [n.kind for n in dump.nodes.values()]
    assert (dump.fmt, kinds.count("switch"), kinds.count("ca"), len(dump.links)) == (
        "topology", 4, 5, 10)
    by_desc = {n.description: n for n in dump.nodes.values()}
    # a '#' inside the quoted description is part of it, not a comment
    assert by_desc["Voltaire 4036 # 4036-8C5C"].lid == 2
    # a host without a hostname keeps the vendor's description: only its GUID can name it
    nohost = by_desc["MT4129 ConnectX7   Mellanox Technologies"]
    assert (nohost.kind, nohost.guid, nohost.ports[1].lid) == ("ca", "0x0c42a10300100006", 14)
    dual = by_desc["gpu04 HCA-1"]
    assert sorted(dual.ports) == [1, 2] and dual.ports[2].port_guid == "0x0c42a1030010000a"
    rates = _rates(dump)
    leaf1, leaf2 = "MF0;leaf-1:MQM9790/U1", "MF0;leaf-2:MQM9790/U1"
    spine2 = "Voltaire 4036 # 4036-8C5C"
    assert rates[frozenset({(leaf1, 6), (spine2, 1)})] == (1, "QDR")  # trained at 1x
    assert rates[frozenset({(leaf2, 6), (spine2, 2)})] == (4, "DDR")
    assert rates[frozenset({("gpu01 mlx5_0", 1), (leaf1, 1)})] == (4, "QDR")


@pytest.mark.parametrize("form", ["full", "show", "grouping", "grouping_show", "max_hops",
                                  "full_show"])
def test_topology_forms_give_the_same_fabric(outputs: Outputs, form: str) -> None:
    plain = parse_ibnetdiscover(outputs["plain"][0], "plain")
    dump = parse_ibnetdiscover(outputs[form][0], form)
    assert dump.fmt == "topology"
    assert _cabling(dump) == _cabling(plain)
    assert _rates(dump) == _rates(plain)
    assert {k: (n.kind, n.guid, n.description, n.lid) for k, n in dump.nodes.items()} == {
        k: (n.kind, n.guid, n.description, n.lid) for k, n in plain.nodes.items()}
    if form.startswith("full"):
        port = next(iter(dump.nodes["S-0c42a10300200000"].ports.values()))
        assert set(port.attrs) >= {"s", "w", "v"}


def test_show_form_carries_progress_lines(outputs: Outputs) -> None:
    text = outputs["show"][0]
    assert text.startswith("DR path")  # what made the old parser refuse the dump at line 1
    parse_ibnetdiscover(text, "show")


@pytest.mark.parametrize("form", ["plain", "show", "ports", "list"])
def test_stderr_saved_with_the_dump_is_kept_as_warnings(outputs: Outputs, form: str) -> None:
    stdout, stderr = outputs[form]
    assert stderr.strip(), "ibsim-run prints its 'ibwarn: ... sim_connect' line on stderr"
    dump = parse_ibnetdiscover(stderr + stdout, form)  # `ibnetdiscover ... 2>&1 > file`
    assert dump.nodes and any("sim_connect" in w for w in dump.warnings)


@pytest.mark.parametrize("form", ["ports", "ports_show"])
def test_ports_report_gives_the_same_cabling(outputs: Outputs, form: str) -> None:
    plain = parse_ibnetdiscover(outputs["plain"][0], "plain")
    dump = parse_ibnetdiscover(outputs[form][0], form)
    assert dump.fmt == "ports"
    assert _cabling(dump) == _cabling(plain)
    assert _rates(dump) == _rates(plain)
    spine2 = dump.nodes["S-0c42a10300200001"]
    assert [p for p, port in sorted(spine2.ports.items()) if not port.connected] == [
        3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize(("form", "kinds"), [("list", {"switch": 4, "ca": 5}),
                                             ("hca_list", {"ca": 5}),
                                             ("switch_list", {"switch": 4})])
def test_node_lists(outputs: Outputs, form: str, kinds: dict[str, int]) -> None:
    plain = parse_ibnetdiscover(outputs["plain"][0], "plain")
    dump = parse_ibnetdiscover(outputs[form][0], form)
    assert dump.fmt == "list" and dump.links == []
    got: dict[str, int] = {}
    for n in dump.nodes.values():
        got[n.kind] = got.get(n.kind, 0) + 1
        ref = plain.nodes[n.node_id]  # same "S-"/"H-" ids as the topology form
        assert (n.guid, n.nports, n.description) == (ref.guid, ref.nports, ref.description)
    assert got == kinds


def test_tabs_or_spaces(outputs: Outputs) -> None:
    for form in ("plain", "full", "ports", "list"):
        text = outputs[form][0]
        a = parse_ibnetdiscover(text, form)
        b = parse_ibnetdiscover(text.replace("\t", "    "), form)
        assert _cabling(a) == _cabling(b)
        assert {k: n.description for k, n in a.nodes.items()} == {
            k: n.description for k, n in b.nodes.items()}


# ------------------------------------------------------------------ forms ibsim cannot make

# `ibnetdiscover -g` on a fabric with a chassis switch (ibsim's nodes have no vendor id, so
# it never groups): chassis heading, spine/line sections, "[ext N]" external port numbers,
# chassis comments on the GUID lines, a Xsigo-style "Hostname:" line.
CHASSIS = """\
#
# Topology file: generated on Wed Dec  2 21:04:35 2026
#
# Initiated from node 0008f10403961354 port 0008f10403961355

Chassis 1 (guid 0x8f10400411f56)
Hostname: io-director-1

# Spine Nodes
vendid=0x8f1
devid=0x5a32
sysimgguid=0x8f10400411f56\t\t# Chassis 1 (io-director-1)
switchguid=0x8f10400411f57(8f10400411f57)\t# ISR9288/ISR9096 Voltaire sFB-12D Spine 1
Switch\t24 "S-0008f10400411f57"\t\t# "ISR9288 Voltaire sFB-12D" base port 0 lid 6 lmc 0
[1]\t"S-0008f10400411f5e"[19]\t\t# "ISR9288 Voltaire sLB-24D" lid 7 4xDDR

# Line Nodes
vendid=0x8f1
devid=0x5a31
sysimgguid=0x8f10400411f56\t\t# Chassis 1 (io-director-1)
switchguid=0x8f10400411f5e(8f10400411f5e)\t# ISR9288/ISR9096 Voltaire sLB-24D Line 3
Switch\t24 "S-0008f10400411f5e"\t\t# "ISR9288 Voltaire sLB-24D" base port 0 lid 7 lmc 0
[19]\t"S-0008f10400411f57"[1]\t\t# "ISR9288 Voltaire sFB-12D" lid 6 4xDDR
[1][ext 12]\t"H-0008f10403961354"[1](8f10403961355) \t\t# "node-07 HCA-1" lid 9 4xDDR

# Chassis Switches

# Chassis CAs

Non-Chassis Nodes

vendid=0x8f1
devid=0x5a44
sysimgguid=0x8f10403961357
caguid=0x8f10403961354
Ca\t2 "H-0008f10403961354"\t\t# "node-07 HCA-1"
[1](8f10403961355) \t"S-0008f10400411f5e"[1][ext 12]\t\t# lid 9 lmc 0 "ISR9288 sLB" lid 7 4xDDR
"""


def test_chassis_grouping_form() -> None:
    dump = parse_ibnetdiscover(CHASSIS, "chassis")
    assert len(dump.links) == 2 and not dump.warnings
    host = dump.nodes["H-0008f10403961354"]
    assert (host.description, host.ports[1].speed, host.ports[1].lid) == (
        "node-07 HCA-1", "DDR", 9)
    leaf = dump.nodes["S-0008f10400411f5e"]
    assert (leaf.ports[1].width, leaf.sysimgguid) == (4, "0x0008f10400411f56")


# Old releases: speeds only SDR..QDR, and "??"/"???" where PortInfo could not be read.
UNKNOWN_RATE = """\
switchguid=0x5442ba00003080(5442ba00003080)
Switch\t24 "S-005442ba00003080"\t\t# "ISR9024 Voltaire" base port 0 lid 6 lmc 0
[1]\t"H-0008f10403960558"[1](8f10403960559) \t\t# "mtlx03" lid 10 ?????

caguid=0x8f10403960558
Ca\t2 "H-0008f10403960558"\t\t# "mtlx03"
[1](8f10403960559) \t"S-005442ba00003080"[1]\t\t# lid 10 lmc 0 "ISR9024 Voltaire" lid 6 4x???
"""


def test_unknown_width_and_speed_are_none() -> None:
    dump = parse_ibnetdiscover(UNKNOWN_RATE, "old")
    (link,) = dump.links
    assert (link.width, link.speed, link.rate_gbps) == (4, None, None)
    ports = parse_ibnetdiscover(
        "SW     6  3 0x005442ba00003080 ?? ???                                    'ISR9024'\n",
        "p")
    assert ports.nodes["S-005442ba00003080"].ports[3].width is None


def test_diff_output_is_refused_with_a_reason() -> None:
    diff = ('< Switch\t8 "S-0c42a10300200001"\t\t# "x" base port 0 lid 2 lmc 0\n'
            '< [1]\t"S-0c42a10300200002"[6]\t\t# "y" lid 3 1xQDR\n')
    with pytest.raises(IbParseError, match=r"d:1: this is `ibnetdiscover --diff` output"):
        parse_ibnetdiscover(diff, "d")


def test_bad_list_line_names_the_line() -> None:
    text = ('Ca\t : 0x0000000000100009 ports 2 devid 0x0 vendid 0x0 "Hca4"\n'
            "Switch\t : 0xZZ ports 8\n")
    with pytest.raises(IbParseError, match=r"l:2: not an 'ibnetdiscover -l' node line"):
        parse_ibnetdiscover(text, "l")
    dup = text.splitlines()[0] + "\n" + text.splitlines()[0] + "\n"
    with pytest.raises(IbParseError, match=r"l:2: node 'H-0000000000100009' listed twice"):
        parse_ibnetdiscover(dup, "l")


def test_fabric_file_is_ours(tmp_path: Path) -> None:
    """ibsim reads its own `net` file, and our parser reads it as ibsim's grammar too."""
    from tests.topology.ibsim_fabric import NET

    dump = parse_ibnetdiscover(NET, "net")
    assert dump.fmt == "ibsim" and len(dump.links) == 10
