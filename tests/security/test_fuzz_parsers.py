"""Hypothesis fuzzing of every parser of outside text: each returns a value or raises its own
documented error (naming the input, and the line where there are lines), never another
exception. Inputs are mutations of documents the project writes or generates (fabrics from
tests/topology/fabricgen.py, `topo -m` rendered from the simulated NVML profiles, Slurm 22.05
JSON in tests/fixtures/slurm-22.05, kernel-log lines) plus plain random text. The same fuzz
over the real-world corpus runs in tests/conformance/test_fuzz_real.py.

Fixed budget per target (GPUFLEET_FUZZ_EXAMPLES overrides; derandomized, so CI runs the same
inputs every time), under `slow`; the fast set runs each target with the quick budget
(GPUFLEET_FUZZ_QUICK_EXAMPLES, tests/conftest.py's `fuzz_budget`). Each target records one
line "fuzz <target>: N inputs tried, P parsed, E clear errors" through tests/conftest.py's
`report_figure`, printed in the "measured figures" section at the end of the pytest run (and
so in `bash .ci/run`'s output).

Fuzzed elsewhere, not repeated here: the agent config file and the controller's TOML
(tests/security/test_fuzz.py), the servicer streams (same file).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from gpufleet.agent import nvml_sim, procmap
from gpufleet.agent.accounting import (
    Accountant,
    AccountingError,
    HookRecord,
    job_from_env,
)
from gpufleet.agent.telemetry import GpuSample
from gpufleet.scheduler.slurm import CliSlurmClient, SlurmError
from gpufleet.scheduler.slurm import rest as slurm_rest
from gpufleet.scheduler.slurm.sacct import SacctParseError, parse_sacct_json
from gpufleet.scheduler.topology.export import export_block, export_tree, parse_topology_conf
from gpufleet.scheduler.topology.fabric import build_fabric
from gpufleet.scheduler.topology.gputopo import from_inventory, render_topo_m
from gpufleet.scheduler.topology.hostmap import map_hosts
from gpufleet.scheduler.topology.ibnetdiscover import parse_ibnetdiscover
from hypothesis import example, given
from hypothesis import strategies as st

from tests.conftest import REPO
from tests.support.fuzzing import (
    Report,
    Tally,
    edits,
    fuzz_ibnetdiscover,
    fuzz_kmsg_xid_lines,
    fuzz_settings,
    fuzz_topo_m,
    fuzz_topology_conf,
    mutate,
)
from tests.support.inventory import sim_inventory
from tests.topology.fabricgen import fat_tree

SLURM_JSON = REPO / "tests" / "fixtures" / "slurm-22.05"


def _lab(name: str) -> str:
    return (SLURM_JSON / name).read_text()


# ------------------------------------------------------------------ text mutation


# ------------------------------------------------------------------ ibnetdiscover


def _ib_seeds() -> list[tuple[str, str]]:
    """Generated fat trees: named hosts, vendor-default names, a down-trained uplink."""
    hosts = [f"gpu{i:02d}" for i in range(12)]
    return [("fat-tree", fat_tree(hosts, per_leaf=4, spines=2).text),
            ("defaults", fat_tree(hosts[:6], per_leaf=3, spines=1, speed="HDR",
                                  default_descriptions=True).text),
            ("slow", fat_tree(hosts[:8], per_leaf=4, spines=2, slow_uplink=(1, 0)).text)]


def test_fuzz_ibnetdiscover(report_figure: Report, fuzz_budget: int) -> None:
    fuzz_ibnetdiscover(_ib_seeds(), report_figure, "generated fat trees", fuzz_budget)


# ------------------------------------------------------------------ nvidia-smi topo -m


def _topo_seeds() -> list[tuple[str, str]]:
    """`topo -m` as gpufleet renders it for every simulated NVML profile."""
    return [(profile, render_topo_m(from_inventory(sim_inventory(profile))))
            for profile in sorted(nvml_sim.PROFILES)]


def test_fuzz_nvidia_smi_topo_m(report_figure: Report, fuzz_budget: int) -> None:
    fuzz_topo_m(_topo_seeds(), report_figure, "rendered simulated profiles", fuzz_budget)


# ------------------------------------------------------------------ topology.conf


def _topology_conf_seeds() -> list[tuple[str, str]]:
    """topology.conf as gpufleet exports it (tree and block) from generated fabrics."""
    hosts = [f"gpu{i:02d}" for i in range(12)]
    seeds = []
    for name, gen in [("tree", fat_tree(hosts, per_leaf=4, spines=2)),
                      ("small", fat_tree(hosts[:5], per_leaf=2, spines=1))]:
        fab = build_fabric(parse_ibnetdiscover(gen.text, name))
        placed = map_hosts(fab)
        seeds.append((f"{name}.tree.conf", export_tree(fab, placed)))
        seeds.append((f"{name}.block.conf", export_block(fab, placed)))
    seeds.append(("hand.conf", "# written by hand\nSwitchName=s1 Nodes=n[1-4] LinkSpeed=100\n"
                               "SwitchName=s2 Nodes=n[5-8]\nSwitchName=top Switches=s[1-2]\n"))
    for name, text in seeds:
        parse_topology_conf(text, name)
    return seeds


def test_fuzz_topology_conf(report_figure: Report, fuzz_budget: int) -> None:
    fuzz_topology_conf(_topology_conf_seeds(), report_figure, "exported and written files",
                       fuzz_budget)


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
def test_fuzz_slurm_json(kind: str, report_figure: Report, fuzz_budget: int) -> None:
    seed = json.loads(_lab(SLURM_CALLS[kind]))
    _slurm_call(kind, json.dumps(seed))  # the real document parses
    tally = Tally(max(1, fuzz_budget // 2))

    @fuzz_settings(tally.budget)
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
    report_figure(tally.line(f"Slurm JSON, {kind} (mutated 22.05-shaped documents)"))


def test_fuzz_sacct_json(report_figure: Report, fuzz_budget: int) -> None:
    seed = json.loads(_lab("sacct.json"))
    parse_sacct_json(json.dumps(seed))
    tally = Tally(fuzz_budget)

    @fuzz_settings(fuzz_budget)
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
    report_figure(tally.line("sacct --json (mutated 22.05-shaped documents)"))


# ------------------------------------------------------------------ kernel log XIDs


KMSG_FORMS = [  # the forms drivers print (dmesg -T, /dev/kmsg records, syslog)
    "[Sun Feb 23 16:24:18 2025] NVRM: Xid (PCI:0000:9b:00): 119, pid=2024380, name=nvidia-smi, "
    "Timeout after 6s of waiting for RPC response from GPU4 GSP!",
    "[ 1234.567890] NVRM: Xid (PCI:0000:3b:00): 79, pid='<unknown>', name=<unknown>, "
    "GPU has fallen off the bus.",
    "Feb 23 16:24:18 gpu01 kernel: NVRM: Xid (PCI:0000:18:00): 31, pid=1234, name=python, "
    "Ch 00000008, intr 00000000. MMU Fault",
]


def test_fuzz_kmsg_xid_lines(report_figure: Report, fuzz_budget: int) -> None:
    fuzz_kmsg_xid_lines(KMSG_FORMS, report_figure, "driver line forms", fuzz_budget)


# ------------------------------------------------------------------ agent job spool and /proc


def _hook_doc() -> st.SearchStrategy[str]:
    good = {"job_id": "42", "gpus": ["0", "1"], "user": "alice", "account": "phys",
            "kind": "start", "time_ms": 1_700_000_000_000}
    return st.one_of(json_mutations(good).map(json.dumps),
                     st.builds(mutate, st.just(json.dumps(good)), edits),
                     st.binary(max_size=64).map(lambda b: b.decode("latin-1")))


def test_fuzz_agent_job_spool(tmp_path_factory: pytest.TempPathFactory,
                              report_figure: Report, fuzz_budget: int) -> None:
    tally = Tally(fuzz_budget)

    @fuzz_settings(fuzz_budget)
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


def test_fuzz_agent_hook_environment(report_figure: Report, fuzz_budget: int) -> None:
    tally = Tally(fuzz_budget)
    keys = ["SLURM_JOB_ID", "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES", "SLURM_JOB_USER",
            "SLURM_JOB_ACCOUNT"]
    values = st.one_of(st.sampled_from(["42", "0,1", "0-3", "3-1", "0-999", "GPU-1f2e3d4c-0000",
                                        "alice", "", ",", "1_2", "7+0"]),
                       st.text(max_size=16))

    @fuzz_settings(fuzz_budget)
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


def test_fuzz_proc_cgroup_and_environ(report_figure: Report, fuzz_budget: int) -> None:
    tally = Tally(fuzz_budget)
    forms = ["12:memory:/slurm/uid_1000/job_4242/step_0/task_0\n"
             "0::/system.slice/slurmd.service",
             "0::/system.slice/slurmstepd.scope/job_4243/step_batch/user/task_0",
             "4:devices:/slurm_n17/uid_1001/job_18/step_extern/task_0"]

    @fuzz_settings(fuzz_budget)
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
