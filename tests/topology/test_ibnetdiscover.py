"""The ibnetdiscover parser on generated fabrics: counts, attributes, errors and a timing.

The same parser over every real dump of the corpus: tests/conformance/test_ibnetdiscover_real.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from gpufleet.scheduler.topology.ibnetdiscover import IbParseError, parse_ibnetdiscover

from tests.topology.fabricgen import fat_tree

HOSTS = [f"gpu{i:02d}" for i in range(1, 9)]


def test_generated_fat_tree_counts_and_attributes() -> None:
    gen = fat_tree(HOSTS, per_leaf=4, spines=2, speed="HDR", slow_uplink=(1, 0))
    dump = parse_ibnetdiscover(gen.text, "gen")
    kinds = [n.kind for n in dump.nodes.values()]
    # 2 spines + 2 leaves; 8 hosts; 8 host cables + 2 x 2 uplinks
    assert (dump.fmt, kinds.count("switch"), kinds.count("ca"), len(dump.links)) == (
        "topology", 4, 8, 12)
    host = dump.nodes["H-" + gen.host_guid["gpu01"][2:]]
    assert (host.description, host.guid) == ("gpu01 mlx5_0", gen.host_guid["gpu01"])
    assert (host.ports[1].width, host.ports[1].speed) == (4, "HDR")
    leaf = dump.nodes[gen.host_leaf["gpu05"]]
    assert (leaf.kind, leaf.nports, leaf.description) == ("switch", 6, "MF0;leaf-1:MQM9790/U1")
    assert sorted(p.width for p in leaf.ports.values() if p.connected)[0] == 1  # 1x uplink


def test_tabs_and_spaces_give_the_same_fabric() -> None:
    text = fat_tree(HOSTS, per_leaf=4, spines=2).text
    a = parse_ibnetdiscover(text)
    b = parse_ibnetdiscover(text.replace("\t", "   "))
    assert a.links == b.links
    assert {k: (v.kind, v.description, v.guid) for k, v in a.nodes.items()} == {
        k: (v.kind, v.description, v.guid) for k, v in b.nodes.items()}


@pytest.mark.parametrize(("old", "new", "words"), [
    ("4xNDR", "4xFOO", "unknown link speed"),
    ("devid=0xd2f2", "devid=banana", "not an ibnetdiscover line"),
    ('"[1]', '[1]', "malformed port line"),
])
def test_bad_input_names_the_line(old: str, new: str, words: str) -> None:
    text = fat_tree(HOSTS, per_leaf=4, spines=2).text
    lines = text.splitlines()
    line_no = next(i for i, ln in enumerate(lines, 1) if old in ln)
    lines[line_no - 1] = lines[line_no - 1].replace(old, new, 1)
    with pytest.raises(IbParseError) as exc:
        parse_ibnetdiscover("\n".join(lines) + "\n", "gen.topo")
    assert words in str(exc.value)
    assert str(exc.value).startswith(f"gen.topo:{line_no}:")
    assert exc.value.line_no == line_no


def test_overlong_guid_is_a_parse_error() -> None:
    # found by the fuzz below: a GUID of more than 16 digits raised a bare ValueError
    with pytest.raises(IbParseError, match=r"d:1: not a GUID"):
        parse_ibnetdiscover("switchguid=0x8f105002036b58f105002036b4\n", "d")


def test_port_line_before_any_record() -> None:
    with pytest.raises(IbParseError, match=r"dump:3: port line outside"):
        parse_ibnetdiscover('#\n\n[1]\t"S-0008f10500108c5c"[15]\t# "x" lid 1 4xQDR\n', "dump")


def test_parse_few_thousand_hosts_fast(report_figure: Callable[[str], None]) -> None:
    hosts = [f"gpu{i:04d}" for i in range(4096)]
    gen = fat_tree(hosts, per_leaf=32, spines=16)
    lines = gen.text.count("\n")
    runs_s = []
    for _ in range(3):  # best of 3: the machine is shared, the parser's cost is the minimum
        t0 = time.perf_counter()
        dump = parse_ibnetdiscover(gen.text)
        runs_s.append(time.perf_counter() - t0)
    elapsed_s = min(runs_s)
    assert len(dump.nodes) == 4096 + 128 + 16
    report_figure(f"parse ibnetdiscover, 4096 hosts / 144 switches / {lines} lines: "
                  f"{elapsed_s * 1000:.0f} ms")
    assert elapsed_s < 2.0  # budget 1 s; slack for a loaded 2-core CI box
