"""Hypothesis fuzzing of every parser of outside text: each returns a value or raises its own
documented error (naming the input, and the line where there are lines), never another
exception. Inputs are mutations of real dumps and documents (tests/conftest.py real_data(),
../shared/reference/slurm-lab) plus plain random text.

Fixed budget per target (GPUFLEET_FUZZ_EXAMPLES overrides; derandomized, so CI runs the same
inputs every time). Each target records one line "fuzz <target>: N inputs tried, P parsed,
E clear errors" through tests/conftest.py's `report_figure`, printed in the "measured figures"
section at the end of the pytest run (and so in `bash .ci/run`'s output).

Fuzzed elsewhere, not repeated here: the agent config file and the controller's TOML
(tests/security/test_fuzz.py), the servicer streams (same file).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from gpufleet.agent import procmap
from gpufleet.agent.accounting import (
    Accountant,
    AccountingError,
    HookRecord,
    job_from_env,
)
from gpufleet.agent.kmsg import KmsgXid, parse_xid_line, to_xid_events
from gpufleet.agent.telemetry import GpuSample
from gpufleet.scheduler.slurm import CliSlurmClient, SlurmError
from gpufleet.scheduler.slurm import rest as slurm_rest
from gpufleet.scheduler.slurm.sacct import SacctParseError, parse_sacct_json
from gpufleet.scheduler.topology.export import parse_topology_conf
from gpufleet.scheduler.topology.gputopo import parse_topo_m
from gpufleet.scheduler.topology.ibnetdiscover import IbParseError, parse_ibnetdiscover
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import REPO, real_data

BUDGET = int(os.environ.get("GPUFLEET_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=BUDGET, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])
SLURM_LAB = REPO.parent / "shared" / "reference" / "slurm-lab"
Report = Callable[[str], None]


class Tally:
    """Inputs tried per outcome class, for the printed line."""

    def __init__(self) -> None:
        self.parsed = 0
        self.errors = 0

    def line(self, target: str) -> str:
        return (f"fuzz {target}: {self.parsed + self.errors} inputs tried, {self.parsed} "
                f"parsed, {self.errors} clear errors, 0 crashes (budget {BUDGET})")


def _lab(name: str) -> str:
    path = SLURM_LAB / name
    if not path.exists():
        pytest.fail(f"{path} is missing: the Slurm lab reference documents are part of the "
                    "shared workspace")
    return path.read_text()


# ------------------------------------------------------------------ text mutation

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


def _check_line_error(e: IbParseError, source: str, text: str) -> None:
    """A clear parse error: names the source and a line that exists (or the one after)."""
    assert str(e).startswith(f"{source}:{e.line_no}:"), str(e)
    assert 1 <= e.line_no <= len(text.splitlines()) + 1, (e.line_no, str(e))
    assert e.problem, str(e)


# ------------------------------------------------------------------ ibnetdiscover


def _ib_seeds() -> list[tuple[str, str]]:
    root = real_data("ibnetdiscover")
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


def test_fuzz_ibnetdiscover(report_figure: Report) -> None:
    seeds = _ib_seeds()
    tally = Tally()

    @FUZZ
    @given(st.integers(0, len(seeds) - 1), edits, st.booleans())
    def one(which: int, ops: list[tuple[str, float, str]], cut: bool) -> None:
        name, text = seeds[which]
        text = mutate(text, ops)
        if cut:  # a dump truncated mid-line, as a full disk or a killed tool leaves it
            text = text[: len(text) * 2 // 3]
        try:
            dump = parse_ibnetdiscover(text, name)
        except IbParseError as e:
            _check_line_error(e, name, text)
            tally.errors += 1
            return
        for link in dump.links:
            assert link.a in dump.nodes and link.b in dump.nodes
        tally.parsed += 1

    one()
    report_figure(tally.line("ibnetdiscover (mutated real dumps)"))


# ------------------------------------------------------------------ nvidia-smi topo -m


def _topo_seeds() -> list[tuple[str, str]]:
    root = real_data("nvidia_smi_topo/utkuozdemir_nvidia_gpu_exporter_captures")
    seeds = []
    for path in sorted(root.glob("*.txt")):
        m = re.search(r"^# \$ nvidia-smi topo -m\n#+\n(.*?)(?=^#{20,}|\Z)", path.read_text(),
                      re.M | re.S)
        if m:
            parse_topo_m(m.group(1), path.name)  # the real ones parse
            seeds.append((path.name, m.group(1)))
    assert len(seeds) >= 5
    return seeds


def test_fuzz_nvidia_smi_topo_m(report_figure: Report) -> None:
    seeds = _topo_seeds()
    tally = Tally()

    @FUZZ
    @given(st.integers(0, len(seeds) - 1), edits)
    @example(0, [("insert", 0.0, "\tGPU0\tCPU Affinity\n")])
    def one(which: int, ops: list[tuple[str, float, str]]) -> None:
        name, text = seeds[which]
        text = mutate(text, ops)
        try:
            m = parse_topo_m(text, name)
        except IbParseError as e:
            _check_line_error(e, name, text)
            tally.errors += 1
            return
        assert set(m.cells) <= {(a, b) for a in m.devices for b in m.devices}
        tally.parsed += 1

    one()
    report_figure(tally.line("nvidia-smi topo -m (mutated real captures)"))


# ------------------------------------------------------------------ topology.conf


def _topology_conf_seeds() -> list[tuple[str, str]]:
    root = real_data("slurm_conf")
    seeds = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and ("topology" in path.name or path.name.startswith("expected.")):
            text = path.read_text()
            parse_topology_conf(text, path.name)
            seeds.append((path.name, text))
    assert len(seeds) >= 4, seeds
    return seeds


def test_fuzz_topology_conf(report_figure: Report) -> None:
    seeds = _topology_conf_seeds()
    tally = Tally()

    @FUZZ
    @given(st.integers(0, len(seeds) - 1), edits)
    def one(which: int, ops: list[tuple[str, float, str]]) -> None:
        name, text = seeds[which]
        text = mutate(text, ops)
        try:
            parse_topology_conf(text, name)
        except IbParseError as e:
            _check_line_error(e, name, text)
            tally.errors += 1
            return
        tally.parsed += 1

    one()
    report_figure(tally.line("topology.conf (mutated real files)"))


# ------------------------------------------------------------------ Slurm JSON

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
    st.text(max_size=12), st.sampled_from(["", "n[1-", "n[1-3]", "IDLE", "(null)", "RUNNING"]),
    # fresh containers each draw (st.just would hand out one shared object, which a later
    # mutation edits in place: hypothesis then sees different draws on replay and fails)
    st.builds(list), st.builds(dict), st.builds(lambda: [{}]),
    st.builds(lambda: {"status": "x"}))


def _slots(node: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Every (container, key) of a JSON tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            out.append((node, k))
            _slots(v, out)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.append((node, i))
            _slots(v, out)
    return out


@st.composite
def json_mutations(draw: st.DrawFn, doc: Any) -> Any:
    """`doc` (a deep copy) with a few keys deleted or values replaced anywhere in the tree."""
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 4))):
        slots = _slots(doc, [])
        if not slots:
            return draw(json_leaf)
        parent, key = slots[draw(st.integers(0, len(slots) - 1))]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[key]
        else:
            parent[key] = draw(json_leaf)
    return doc


def json_texts(seed: dict[str, Any]) -> st.SearchStrategy[str]:
    return st.one_of(
        json_mutations(seed).map(json.dumps),
        st.builds(mutate, st.just(json.dumps(seed, indent=1)), edits),  # broken JSON text
        st.sampled_from(["", "null", "[]", "5", '"x"', '{"nodes": 5}', '{"jobs": {}}',
                         '{"jobs": [5]}', '{"nodes": [null]}']),
    )


class _TextSlurm(CliSlurmClient):
    """The CLI client over canned command output (the JSON parsing is what is fuzzed)."""

    def __init__(self, out: str) -> None:
        super().__init__(version="22.05.8")  # the reference documents' Slurm
        self.out = out

    def _run(self, *argv: str, node: str | None = None) -> str:
        return self.out


class _CannedResponse:
    def __init__(self, body: bytes) -> None:
        self.status, self.reason, self._body = 200, "OK", body

    def read(self) -> bytes:
        return self._body


class _CannedConnection:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def request(self, *args: Any, **kwargs: Any) -> None:
        pass

    def getresponse(self) -> _CannedResponse:
        return _CannedResponse(self.body)

    def close(self) -> None:
        pass


class _TextRest(slurm_rest.RestSlurmClient):
    """The REST client over a canned HTTP 200 body (no socket: the parsing is fuzzed)."""

    def __init__(self, out: str) -> None:
        super().__init__(url="http://slurmrestd.invalid:6820", token="t",  # noqa: S106 - no server
                         api_version="v0.0.38")  # the reference documents' (Slurm 22.05)
        self.out = out

    def _connection(self) -> Any:
        return _CannedConnection(self.out.encode("utf-8", "surrogatepass"))


_CALLS: dict[str, Callable[[str], object]] = {
    "sinfo --json": lambda text: _TextSlurm(text).nodes(),
    "squeue --json": lambda text: _TextSlurm(text).jobs_on_node("n1"),
    "squeue --json -j": lambda text: _TextSlurm(text).job("7"),
    "slurmrestd nodes": lambda text: _TextRest(text).nodes(),
    "slurmrestd node": lambda text: _TextRest(text).node("n1"),
    "slurmrestd jobs": lambda text: _TextRest(text).jobs_on_node("n1"),
    "slurmrestd job": lambda text: _TextRest(text).job("7"),
}


def _slurm_call(kind: str, text: str) -> object:
    return _CALLS[kind](text)


SLURM_CALLS = {"sinfo --json": "sinfo.json", "squeue --json": "squeue.json",
               "squeue --json -j": "squeue.json", "slurmrestd nodes": "sinfo.json",
               "slurmrestd node": "sinfo.json", "slurmrestd jobs": "squeue.json",
               "slurmrestd job": "squeue.json"}


@pytest.mark.parametrize("kind", sorted(SLURM_CALLS))
def test_fuzz_slurm_json(kind: str, report_figure: Report) -> None:
    seed = json.loads(_lab(SLURM_CALLS[kind]))
    _slurm_call(kind, json.dumps(seed))  # the real document parses
    tally = Tally()

    @settings(FUZZ, max_examples=max(1, BUDGET // 2))
    @given(json_texts(seed))
    @example('{"nodes": [{"name": "n1", "weight": "heavy"}]}')
    @example('{"jobs": [{"job_id": 7, "nodes": "n1", "exit_code": {"status": "x"}}]}')
    @example('{"jobs": [{"job_id": 7, "nodes": "n[1-"}]}')
    @example('{"jobs": [{"nodes": "n1"}]}')
    @example("[]")
    def one(text: str) -> None:
        msg = ""
        try:
            _slurm_call(kind, text)
        except SlurmError as e:
            msg = str(e)
        if msg:  # a clear error names the command (and the list) it could not read
            assert "sinfo" in msg or "squeue" in msg or "slurmrestd" in msg, msg
            tally.errors += 1
            return
        tally.parsed += 1

    one()
    report_figure(tally.line(f"Slurm JSON, {kind} (mutated real 22.05 output)"))


def test_fuzz_sacct_json(report_figure: Report) -> None:
    seed = json.loads(_lab("sacct.json"))
    parse_sacct_json(json.dumps(seed))
    tally = Tally()

    @FUZZ
    @given(json_texts(seed))
    def one(text: str) -> None:
        msg = ""
        try:
            parse_sacct_json(text, "sacct-fuzz")
        except SacctParseError as e:
            msg = str(e)
        if msg:
            assert "sacct" in msg, msg  # the source or "sacct job N" with the field
            tally.errors += 1
            return
        tally.parsed += 1

    one()
    report_figure(tally.line("sacct --json (mutated real 22.05 output)"))


# ------------------------------------------------------------------ kernel log XIDs


def test_fuzz_kmsg_xid_lines(report_figure: Report) -> None:
    real = [ln for ln in real_data("xid/leptonai_gpud/dmesg-with-xid-119.log")
            .read_text(errors="replace").splitlines() if ln.strip()]
    forms = [ln for ln in real if "Xid" in ln] + [
        "6,1234,5678901,-;NVRM: Xid (PCI:0000:3b:00): 48, An uncorrectable",
        "<4>NVRM: Xid (0000:3b:00.1): 13, Graphics Exception",
        "14,9,9,-;NVRM: Xid (PCI:0000:9b:00): 79, from userspace"]
    tally = Tally()

    @FUZZ
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
    report_figure(tally.line("kernel-log XID lines (mutated real dmesg; 'error' = not an "
                             "XID line, None)"))


# ------------------------------------------------------------------ agent job spool and /proc


def _hook_doc() -> st.SearchStrategy[str]:
    good = {"job_id": "42", "gpus": ["0", "1"], "user": "alice", "account": "phys",
            "kind": "start", "time_ms": 1_700_000_000_000}
    return st.one_of(json_mutations(good).map(json.dumps),
                     st.builds(mutate, st.just(json.dumps(good)), edits),
                     st.binary(max_size=64).map(lambda b: b.decode("latin-1")))


def test_fuzz_agent_job_spool(tmp_path_factory: pytest.TempPathFactory,
                              report_figure: Report) -> None:
    tally = Tally()

    @FUZZ
    @given(_hook_doc(), st.sampled_from(["start-42.json", "end-42.json", "start-x.json"]))
    @example('{"job_id": "1", "kind": "start", "time_ms": 1, "gpus": ["0-9999999999"]}',
             "start-1.json")
    @example('{"job_id": "1", "kind": "start", "time_ms": 1, "gpus": 5}', "start-1.json")
    def one(doc: str, name: str) -> None:
        state = tmp_path_factory.mktemp("spool")
        (state / "jobs").mkdir()
        path = state / "jobs" / name
        path.write_text(doc, encoding="utf-8", errors="surrogatepass")
        acc = Accountant(state, "n1")
        acc.poll_spool()  # never raises: a bad file is logged and moved aside
        acc.on_sample([GpuSample(index=0, energy_mj=1, utilization_gpu_pct=1.0)], 2_000)
        if path.with_suffix(".bad").exists():
            tally.errors += 1
            return
        tally.parsed += 1  # applied (its job known) or pending: the file is still there
        assert acc.jobs or acc._pending or path.exists()
        assert all(isinstance(r, HookRecord) for r in acc._pending)

    one()
    report_figure(tally.line("agent prolog/epilog spool files (Accountant.poll_spool; "
                             "'error' = moved aside as .bad)"))


def test_fuzz_agent_hook_environment(report_figure: Report) -> None:
    tally = Tally()
    keys = ["SLURM_JOB_ID", "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES", "SLURM_JOB_USER",
            "SLURM_JOB_ACCOUNT"]
    values = st.one_of(st.sampled_from(["42", "0,1", "0-3", "3-1", "0-999", "GPU-1f2e3d4c-0000",
                                        "alice", "", ",", "1_2", "7+0"]),
                       st.text(max_size=16))

    @FUZZ
    @given(st.one_of(
        st.dictionaries(st.sampled_from(keys), values),
        # mostly a real job id, so the GPU lists and names behind it are reached too
        st.tuples(st.sampled_from(["42", "7_1", "9+0"]),
                  st.dictionaries(st.sampled_from(keys[1:]), values)).map(
            lambda t: {"SLURM_JOB_ID": t[0], **t[1]})))
    def one(env: dict[str, str]) -> None:
        msg = ""
        try:
            job = job_from_env(env)
        except AccountingError as e:
            msg = str(e)
        if msg:
            assert any(k in msg for k in keys), msg  # names the variable
            tally.errors += 1
            return
        assert job["job_id"] == env["SLURM_JOB_ID"]
        tally.parsed += 1

    one()
    report_figure(tally.line("agent prolog/epilog environment (job_from_env)"))


def test_fuzz_proc_cgroup_and_environ(report_figure: Report) -> None:
    tally = Tally()
    forms = ["12:memory:/slurm/uid_1000/job_4242/step_0/task_0\n"
             "0::/system.slice/slurmd.service",
             "0::/system.slice/slurmstepd.scope/job_4243/step_batch/user/task_0",
             "4:devices:/slurm_n17/uid_1001/job_18/step_extern/task_0"]

    @FUZZ
    @given(st.one_of(st.builds(mutate, st.sampled_from(forms), edits), st.text(max_size=120)),
           st.binary(max_size=120))
    def one(cgroup: str, environ: bytes) -> None:
        found = procmap.job_from_cgroup(cgroup)  # contract: a job or None, never raises
        env_job = procmap.job_from_environ(b"SLURM_JOB_ID=" + environ)
        if found is None and env_job is None:
            tally.errors += 1
            return
        for job_id in (found[0] if found else None, env_job):
            assert job_id is None or job_id.isdigit()
        tally.parsed += 1

    one()
    report_figure(tally.line("/proc cgroup + environ (procmap; 'error' = no Slurm job, None)"))


def test_summary_names_targets_fuzzed_elsewhere(report_figure: Report) -> None:
    # the other targets print their own lines from tests/security/test_fuzz.py
    here = Path(__file__).with_name("test_fuzz.py").read_text()
    for name in ("test_fuzz_agent_config_file", "test_fuzz_controller_toml",
                 "test_fuzz_servicer_streams"):
        assert f"def {name}(" in here, name
    report_figure("fuzz (elsewhere): agent config, controller TOML and servicer streams are "
                  "fuzzed in tests/security/test_fuzz.py with their own counts")
