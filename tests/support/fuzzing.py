"""The parser fuzz, shared by tests/security/test_fuzz_parsers.py (seeds the project writes or
generates) and tests/conformance/test_fuzz_real.py (seeds from the real-world corpus): the
Hypothesis budget, text mutation, one fuzz function per line-oriented parser, and the readers
of the corpus's seeds. Each fuzz function records one line through `report_figure`."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from gpufleet.agent.kmsg import KmsgXid, parse_xid_line, to_xid_events
from gpufleet.scheduler.topology.export import parse_topology_conf
from gpufleet.scheduler.topology.gputopo import parse_topo_m
from gpufleet.scheduler.topology.ibnetdiscover import IbParseError, parse_ibnetdiscover
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

# The full budget runs under the `slow` marker (CI); the fast set runs the quick one
# (tests/conftest.py's `fuzz_budget` runs each fuzz test once with each).
BUDGET = int(os.environ.get("GPUFLEET_FUZZ_EXAMPLES", "200"))
QUICK_BUDGET = min(BUDGET, int(os.environ.get("GPUFLEET_FUZZ_QUICK_EXAMPLES", "30")))


FUZZ = settings(max_examples=BUDGET, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])


def fuzz_settings(budget: int) -> settings:
    """FUZZ with `budget` examples."""
    return settings(FUZZ, max_examples=budget)


Report = Callable[[str], None]


class Tally:
    """Inputs tried per outcome class, for the printed line."""

    def __init__(self, budget: int = BUDGET) -> None:
        self.budget = budget
        self.parsed = 0
        self.errors = 0

    def line(self, target: str) -> str:
        return (f"fuzz {target}: {self.parsed + self.errors} inputs tried, {self.parsed} "
                f"parsed, {self.errors} clear errors, 0 crashes (budget {self.budget})")


JUNK = ["", " ", "\t", "0", "-1", "99999999999999999999", "0x", "0xZZ", "#", '"', "[", "]",
        "(", ")", "=", ":", ",", "\x00", "é", "\u202e", "lid", "4xNDR", "12xHDR", "1x???",
        "Switch", "Ca", "Hca", "Rt", "GPU0", "NIC0", "NV12", "X", "SYS", "N/A", "\x1b[4m",
        "SwitchName=s0", "Nodes=n[1-", "Switches=", "BlockSizes=a", "CPU Affinity"]


edits = st.lists(
    st.tuples(st.sampled_from(["delete", "insert", "replace", "dupline", "dropline", "swap"]),
              st.floats(0, 1), st.one_of(st.sampled_from(JUNK), st.text(max_size=12))),
    min_size=1, max_size=5)


def mutate(text: str, ops: list[tuple[str, float, str]]) -> str:
    """Apply character- and line-level edits at relative positions."""
    for op, where, junk in ops:
        lines = text.split("\n")
        li = min(int(where * len(lines)), len(lines) - 1)
        ci = min(int(where * len(text)), len(text))
        if op == "delete":
            text = text[:ci] + text[ci + 1 + len(junk):]
        elif op == "insert":
            text = text[:ci] + junk + text[ci:]
        elif op == "replace":
            line = lines[li]
            words = line.split()
            if words:  # one whitespace-separated word of the line, indentation kept
                words[int(where * 7919) % len(words)] = junk
                indent = line[: len(line) - len(line.lstrip())]
                lines[li] = indent + ("\t" if "\t" in line else " ").join(words)
            text = "\n".join(lines)
        elif op == "dupline":
            text = "\n".join(lines[:li + 1] + lines[li:])
        elif op == "dropline":
            text = "\n".join(lines[:li] + lines[li + 1:])
        elif op == "swap" and len(lines) > 1:
            lines[li], lines[li - 1] = lines[li - 1], lines[li]
            text = "\n".join(lines)
    return text


def check_line_error(e: IbParseError, source: str, text: str) -> None:
    """A clear parse error: names the source and a line that exists (or the one after)."""
    assert str(e).startswith(f"{source}:{e.line_no}:"), str(e)
    assert 1 <= e.line_no <= len(text.splitlines()) + 1, (e.line_no, str(e))
    assert e.problem, str(e)


def real_ib_seeds(root: Path) -> list[tuple[str, str]]:
    """The real dumps of `root` (the conformance corpus's ibnetdiscover/ folder)."""
    seeds = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.stat().st_size > 64_000:
            continue  # the biggest dump (nvidia_topograph, 1 MB) would eat the time budget
        text = path.read_text(errors="replace")
        try:
            parse_ibnetdiscover(text, "seed")
        except IbParseError:
            continue  # prose and sidecars of that folder are not dumps
        seeds.append((str(path.relative_to(root)), text))
    assert len(seeds) >= 10, [s[0] for s in seeds]
    return seeds


def fuzz_ibnetdiscover(seeds: list[tuple[str, str]], report_figure: Report, what: str,
                       budget: int = BUDGET) -> None:
    tally = Tally(budget)

    @fuzz_settings(budget)
    @given(st.integers(0, len(seeds) - 1), edits, st.booleans())
    def one(which: int, ops: list[tuple[str, float, str]], cut: bool) -> None:
        name, text = seeds[which]
        text = mutate(text, ops)
        if cut:  # a dump truncated mid-line, as a full disk or a killed tool leaves it
            text = text[: len(text) * 2 // 3]
        try:
            dump = parse_ibnetdiscover(text, name)
        except IbParseError as e:
            check_line_error(e, name, text)
            tally.errors += 1
            return
        for link in dump.links:
            assert link.a in dump.nodes and link.b in dump.nodes
        tally.parsed += 1

    one()
    report_figure(tally.line(f"ibnetdiscover (mutated {what})"))


def real_topo_seeds(root: Path) -> list[tuple[str, str]]:
    """The `topo -m` sections of real nvidia-smi captures under `root`."""
    seeds = []
    for path in sorted(root.glob("*.txt")):
        m = re.search(r"^# \$ nvidia-smi topo -m\n#+\n(.*?)(?=^#{20,}|\Z)", path.read_text(),
                      re.M | re.S)
        if m:
            parse_topo_m(m.group(1), path.name)  # the real ones parse
            seeds.append((path.name, m.group(1)))
    assert len(seeds) >= 5
    return seeds


def fuzz_topo_m(seeds: list[tuple[str, str]], report_figure: Report, what: str,
                budget: int = BUDGET) -> None:
    tally = Tally(budget)

    @fuzz_settings(budget)
    @given(st.integers(0, len(seeds) - 1), edits)
    @example(0, [("insert", 0.0, "\tGPU0\tCPU Affinity\n")])
    def one(which: int, ops: list[tuple[str, float, str]]) -> None:
        name, text = seeds[which]
        text = mutate(text, ops)
        try:
            m = parse_topo_m(text, name)
        except IbParseError as e:
            check_line_error(e, name, text)
            tally.errors += 1
            return
        assert set(m.cells) <= {(a, b) for a in m.devices for b in m.devices}
        tally.parsed += 1

    one()
    report_figure(tally.line(f"nvidia-smi topo -m (mutated {what})"))


def real_topology_conf_seeds(root: Path) -> list[tuple[str, str]]:
    """The topology.conf files of the real corpus's slurm_conf/ folder."""
    seeds = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and ("topology" in path.name or path.name.startswith("expected.")):
            text = path.read_text()
            parse_topology_conf(text, path.name)
            seeds.append((path.name, text))
    assert len(seeds) >= 4, seeds
    return seeds


def fuzz_topology_conf(seeds: list[tuple[str, str]], report_figure: Report, what: str,
                       budget: int = BUDGET) -> None:
    tally = Tally(budget)

    @fuzz_settings(budget)
    @given(st.integers(0, len(seeds) - 1), edits)
    def one(which: int, ops: list[tuple[str, float, str]]) -> None:
        name, text = seeds[which]
        text = mutate(text, ops)
        try:
            parse_topology_conf(text, name)
        except IbParseError as e:
            check_line_error(e, name, text)
            tally.errors += 1
            return
        tally.parsed += 1

    one()
    report_figure(tally.line(f"topology.conf (mutated {what})"))


def fuzz_kmsg_xid_lines(lines: list[str], report_figure: Report, what: str,
                        budget: int = BUDGET) -> None:
    forms = [ln for ln in lines if "Xid" in ln] + [
        "6,1234,5678901,-;NVRM: Xid (PCI:0000:3b:00): 48, An uncorrectable",
        "<4>NVRM: Xid (0000:3b:00.1): 13, Graphics Exception",
        "14,9,9,-;NVRM: Xid (PCI:0000:9b:00): 79, from userspace"]
    tally = Tally(budget)

    @fuzz_settings(budget)
    @given(st.one_of(st.builds(mutate, st.sampled_from(forms), edits),
                     st.text(max_size=200)))
    def one(line: str) -> None:
        got = parse_xid_line(line)  # the documented contract: an XID or None, never raises
        if got is None:
            tally.errors += 1
            return
        assert isinstance(got, KmsgXid) and got.xid >= 0
        assert re.fullmatch(r"[0-9a-f]{4,8}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]", got.pci_bus_id)
        (event,) = to_xid_events([got], {"00000000:9B:00.0": 4}, 1)
        assert event.gpu_index in (None, 4)
        tally.parsed += 1

    one()
    report_figure(tally.line(f"kernel-log XID lines (mutated {what}; 'error' = not an "
                             "XID line, None)"))
