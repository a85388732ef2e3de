"""Our Xid table against NVIDIA's catalog, Xid by Xid and, for the NVLink5 Xids 144-150,
variant by variant: severity (fatal or not) and the recommended action.

Oracles (shared/data/real/xid, see SOURCES.tsv): NVIDIA NVSentinel's xiderrorsmapping.csv
(xid, mnemonic, action, FATAL|NONFATAL), its actionmapping.ini (the action vocabulary), and the
official catalog spreadsheet as generated into Go data by leptonai/gpud (main sheet with the
immediate resolution; "XID 144-150 Decode" sheet with one row per NVLink5 variant).
"""

from __future__ import annotations

import configparser
import csv
import re
from pathlib import Path

import pytest
from gpufleet.agent.xid_catalog import XID_CATALOG, Resolution, classify

pytestmark = pytest.mark.conformance

# NVSentinel's action names -> ours
ACTION = {
    "IGNORE": Resolution.NONE,
    "RESTART_APP": Resolution.RESTART_APP,
    "RESET_GPU": Resolution.RESET_GPU,
    "RESTART_VM": Resolution.RESTART_VM,
    "RESTART_BM": Resolution.REBOOT,
    "UNEXPECTED_ERR_REPORT_ISSUE": Resolution.CONTACT_SUPPORT,
    "UPDATE_SWFW": Resolution.UPDATE_SWFW,
    "CHECK_MECHANICALS": Resolution.CHECK_MECHANICALS,
    "CHECK_UVM": Resolution.CHECK_UVM,
    "WORKFLOW_XID_45": Resolution.WORKFLOW_XID_45,
    "WORKFLOW_XID_48": Resolution.WORKFLOW_XID_48,
    "WORKFLOW_NVLINK_ERR": Resolution.WORKFLOW_NVLINK,
    "WORKFLOW_NVLINK5_ERR": Resolution.WORKFLOW_NVLINK5,
}
# the official catalog's immediate resolution -> ours
IMMEDIATE = {**ACTION, "CONTACT_SUPPORT": Resolution.CONTACT_SUPPORT,
             "WORKFLOW_NVLINK_ERR": Resolution.WORKFLOW_NVLINK,
             "XID_154": Resolution.FOLLOW_XID_154, "XID_154_EVAL": Resolution.FOLLOW_XID_154}
# where the two NVIDIA sources disagree, our table follows NVSentinel's mapping
SOURCES_DIFFER = {108, 160, 162}


def _mapping(root: Path) -> dict[int, tuple[str, bool]]:
    out = {}
    with (root / "xid/nvidia_nvsentinel/xiderrorsmapping.csv").open(newline="") as f:
        for row in csv.reader(f):
            if row and row[0].strip().isdigit():
                out[int(row[0])] = (row[-2].strip(), row[-1].strip().upper() == "FATAL")
    return out


def test_every_xid_of_the_mapping(real_data_dir: Path) -> None:
    mapping = _mapping(real_data_dir)
    assert len(mapping) >= 162
    vocabulary = configparser.ConfigParser()
    vocabulary.read(real_data_dir / "xid/nvidia_nvsentinel/actionmapping.ini")
    known_actions = {k.upper() for k in vocabulary[vocabulary.sections()[0]]}
    wrong = []
    for xid, (action, fatal) in sorted(mapping.items()):
        ours = XID_CATALOG.get(xid)
        if xid == 154:  # "Follow guidance as it applies to another Xid"
            want = Resolution.FOLLOW_XID_154
        else:
            assert action in known_actions, (xid, action)
            want = ACTION[action]
        if ours is None or (ours.fatal, ours.resolution) != (fatal, want):
            wrong.append((xid, ours, fatal, want))
    assert wrong == []
    # and nothing in our table that the catalog does not have
    assert set(XID_CATALOG) <= set(mapping)


def _go_catalog(root: Path) -> str:
    return (root / "xid/leptonai_gpud/catalog_generated.go").read_text()


def test_immediate_resolution_of_the_official_catalog(real_data_dir: Path) -> None:
    text = _go_catalog(real_data_dir)
    rows = re.findall(r'\{Code: (\d+), Mnemonic: "(?:[^"\\]|\\.)*", Description: '
                      r'"(?:[^"\\]|\\.)*", ImmediateResolution: "([^"]*)"', text)
    assert len(rows) >= 162
    wrong = []
    for code, immediate in rows:
        xid = int(code)
        if xid not in XID_CATALOG or xid in SOURCES_DIFFER:
            continue
        if XID_CATALOG[xid].resolution != IMMEDIATE[immediate]:
            wrong.append((xid, immediate, XID_CATALOG[xid].resolution))
    assert wrong == []


_RULE = re.compile(
    r'\{Xid: (\d+), Unit: "([^"]*)", IntrinfoPatternV1: "([01-]+)", IntrinfoPatternV2: '
    r'"([01-]+)", ErrorStatus: (0x[0-9a-fA-F]+), Resolution: "([^"]*)", Investigatory: '
    r'"[^"]*", Severity: "([^"]*)"')


def _word(pattern: str) -> int:
    """The smallest intrinfo word a bit pattern ('-' any) accepts, MSB first."""
    return int(pattern.replace("-", "0"), 2)


def test_every_nvlink5_variant(real_data_dir: Path) -> None:
    """Each row of the decode sheet, as the driver would print it, in both intrinfo
    encodings: the catalog's severity and resolution, whatever the driver's own word."""
    rules = _RULE.findall(_go_catalog(real_data_dir))
    assert len(rules) >= 90
    wrong = []
    for xid_s, unit, v1, v2, status_s, resolution, severity in rules:
        xid, status = int(xid_s), int(status_s, 16)
        fatal = not severity.lower().startswith("non")
        want = (fatal, IMMEDIATE[resolution])
        word = unit.split("/")[-1]
        for pattern in (v1, v2):
            for said in ("Fatal", "Nonfatal"):  # the table decides, not the driver's word
                line = (f"{word} {said} XC0 i0 Link 07 ({_word(pattern):#010x} "
                        f"{status:#010x} 0x00000000 0x00000000 0x00000000 0x00000000)")
                got = classify(xid, line)
                if (got.fatal, got.resolution) != want or not got.known:
                    wrong.append((xid, unit, pattern, status, said, got, want))
    assert wrong == []


def test_nvlink5_nonfatal_variants_exist_and_do_not_drain(real_data_dir: Path) -> None:
    rules = _RULE.findall(_go_catalog(real_data_dir))
    nonfatal = {int(r[0]) for r in rules if r[6].lower().startswith("non")}
    assert nonfatal >= {144, 145, 146, 147, 148, 149}


def test_real_kernel_log(real_data_dir: Path) -> None:
    """A real node's dmesg (GSP RPC timeouts): each Xid line gets the catalog's class."""
    from gpufleet.agent.kmsg import KmsgXid, parse_kmsg_line

    lines = (real_data_dir / "xid/leptonai_gpud/dmesg-with-xid-119.log").read_text()
    items = [i for i in map(parse_kmsg_line, lines.splitlines()) if i is not None]
    assert items and len(items) == lines.count("NVRM: Xid")
    for item in items:
        assert isinstance(item, KmsgXid) and item.xid == 119
        got = classify(item.xid, item.message)
        assert (got.fatal, got.resolution) == (True, Resolution.RESET_GPU)
