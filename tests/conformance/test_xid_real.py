"""XIDs in a real node's dmesg (the table against the catalog: test_xid_catalog.py)."""

from __future__ import annotations

from pathlib import Path

from gpufleet.agent.kmsg import KmsgReader, parse_xid_line

from tests.conformance.corpus import real_data


def test_every_xid_line_of_a_real_dmesg() -> None:
    """A real node's dmesg (leptonai/gpud test data): five GSP timeouts on one GPU."""
    path = real_data("xid/leptonai_gpud/dmesg-with-xid-119.log")
    lines = path.read_text().splitlines()
    expected = sum("NVRM: Xid" in line for line in lines)  # what `grep -c 'NVRM: Xid'` counts
    parsed = [x for x in map(parse_xid_line, lines) if x is not None]
    assert expected > 0
    assert len(parsed) == expected
    assert {(x.xid, x.pci_bus_id) for x in parsed} == {(119, "0000:9b:00.0")}
    assert all(x.message.startswith("pid=") and "GSP" in x.message for x in parsed)


def test_real_dmesg_through_the_reader(tmp_path: Path) -> None:
    lines = real_data("xid/leptonai_gpud/dmesg-with-xid-119.log").read_bytes()
    log_file = tmp_path / "dmesg"
    log_file.write_bytes(b"")
    with KmsgReader(log_file) as reader:
        with log_file.open("ab") as f:
            f.write(lines)
        got = reader.read_new()
    assert len(got) == lines.count(b"NVRM: Xid") and {x.xid for x in got} == {119}

