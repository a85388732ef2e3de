"""Each Slurm version's reader over what that version really prints, and over what it does not.

The documents in tests/slurm/captured/<version>/ are real output of Slurm 22.05.8 (Debian bookworm),
24.11.5 (trixie root) and 26.05.5 (sid root), captured from a live lab by
tests/slurm/capture.py (see the README.md there): node n8 drained with a `gpufleet:` reason,
job 1 COMPLETED, job 2 FAILED (`exit 3`), job 3 RUNNING on n[1-2] with gpu:2 each.

The clients run here over those documents instead of the commands (`_run` answers from the
files, by argv), so what is tested is which command each version's client asks for and how it
reads the answer. Feeding one version's reader another version's document, or a document
with a field missing or renamed, must be a SlurmError naming the field: never an empty
cluster, never a node that is drained read as not drained.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest
from gpufleet.scheduler.placement.sources import view_from_slurm
from gpufleet.scheduler.slurm import CliSlurmClient, SlurmError, SlurmVersion, reader_for
from gpufleet.scheduler.slurm.rest import RestSlurmClient, api_version_from_openapi
from gpufleet.scheduler.slurm.sacct import SacctParseError, parse_sacct_json

from tests.slurm.capture import CAPTURED

DOCS = CAPTURED  # one copy of real Slurm output, per version
VERSIONS = ("22.05", "24.11", "26.05")
DATA_PARSER = {"22.05": None, "24.11": "v0.0.42", "26.05": "v0.0.45"}
REASON = "gpufleet: Xid 79 (GPU fell off the bus) on GPU 0"
TOPOLOGY = "SwitchName=leaf1 Nodes=n[1-4]\nSwitchName=leaf2 Nodes=n[5-8]\n"
PARTITIONS = "PartitionName=main Default=YES MaxTime=UNLIMITED Nodes=n[1-8]\n"


def _doc(version: str, name: str) -> str:
    return (DOCS / version / name).read_text()


def _version(version: str) -> SlurmVersion:
    return SlurmVersion.parse(_doc(version, "version.txt"))


class Canned(CliSlurmClient):
    """The CLI client of `version` whose commands answer with `answers[argv]`."""

    def __init__(self, version: str, answers: dict[tuple[str, ...], str]) -> None:
        super().__init__(version=_version(version))
        self.answers = answers
        self.asked: list[tuple[str, ...]] = []

    def _run(self, *argv: str, node: str | None = None) -> str:
        self.asked.append(argv)
        if argv not in self.answers:
            raise AssertionError(f"unexpected command {argv}")
        return self.answers[argv]


def _nodes_doc(version: str) -> str:
    """What this version's client reads nodes from: sinfo on 22.05, scontrol from 23.02."""
    return _doc(version, "sinfo.json" if version == "22.05" else "scontrol-show-nodes.json")


def client_of(version: str, docs_of: str | None = None) -> Canned:
    """`version`'s client answering with `docs_of`'s documents (default: its own)."""
    src = docs_of or version
    nodes, jobs = _nodes_doc(src), _doc(src, "squeue.json")
    return Canned(version, {
        ("sinfo", "--json"): nodes,
        ("scontrol", "--json", "show", "nodes"): nodes,
        ("squeue", "--json"): jobs,
        ("squeue", "--json", "-t", "all", "-j", "3"): jobs,
        ("squeue", "--json", "-t", "all", "-w", "n1"): jobs,
        ("scontrol", "-o", "show", "node", "n8"): _doc(src, "node-drained.txt"),
        ("scontrol", "--json", "show", "node", "n8"):
            _doc(src, "node-drained.json") if src != "22.05" else nodes,
        ("scontrol", "-o", "show", "partition"): PARTITIONS,
    })


# ------------------------------------------------------------ each version, its own documents


@pytest.mark.parametrize("version", VERSIONS)
def test_version_is_learnt_and_names_its_schema(version: str) -> None:
    v = _version(version)
    assert v.release == version
    assert v.data_parser == DATA_PARSER[version]


@pytest.mark.parametrize("version", VERSIONS)
def test_nodes_of_each_version(version: str) -> None:
    c = client_of(version)
    nodes = c.nodes()
    assert sorted(nodes) == [f"n{i}" for i in range(1, 9)]
    assert nodes["n8"].drained, nodes["n8"]
    assert nodes["n8"].reason == REASON
    assert nodes["n8"].state == "IDLE+DRAIN"
    assert [n for n, v in nodes.items() if v.drained] == ["n8"]
    assert all(v.weight == 1 and v.features == () for v in nodes.values())
    # 23.02+ lists no nodes in `sinfo --json`: the client never asks it there
    want = ("sinfo", "--json") if version == "22.05" else ("scontrol", "--json", "show", "nodes")
    assert c.asked == [want]


@pytest.mark.parametrize("version", VERSIONS)
def test_one_drained_node_of_each_version(version: str) -> None:
    n8 = client_of(version).node("n8")
    assert (n8.name, n8.drained, n8.reason) == ("n8", True, REASON)


@pytest.mark.parametrize("version", VERSIONS)
def test_jobs_of_each_version(version: str) -> None:
    c = client_of(version)
    job = c.job("3")
    assert job is not None
    assert (job.state, job.nodes, job.requeue, job.batch) == ("RUNNING", ("n1", "n2"), True,
                                                              True)
    assert job.gres_detail == ("gpu:2(IDX:0-1)", "gpu:2(IDX:0-1)")
    assert job.start_time_s > 1_700_000_000 and job.end_time_s > job.start_time_s
    on_n1 = c.jobs_on_node("n1")  # 22.05's capture still holds the ended jobs 1, 2 too
    assert "3" in {j.job_id for j in on_n1} and all("n1" in j.nodes for j in on_n1)


def _pending_queue(version: str) -> str:
    """The captured queue with job 3 made pending: in two partitions, pinned to n[3-4],
    excluding n5 (what a routine diagnostic must not hold back)."""
    doc = json.loads(_doc(version, "squeue.json"))
    job = next(j for j in doc["jobs"] if j["job_id"] == 3)
    job.update(job_state="PENDING" if version == "22.05" else ["PENDING"], nodes="",
               partition="main,debug", required_nodes="n[3-4]", excluded_nodes="n5",
               state_reason="Resources")
    return json.dumps(doc)


@pytest.mark.parametrize("version", VERSIONS)
def test_routine_diag_reads_of_each_version(version: str) -> None:
    """Each node's LastBusyTime and partitions; the pending jobs with theirs."""
    c = client_of(version)
    infos = c.node_infos()
    assert all(i.last_busy_s is not None and i.last_busy_s > 1_700_000_000
               for i in infos.values())
    assert infos["n1"].partitions == ("main",)
    assert c.pending_jobs() == []  # the captured queue: nothing pending
    c.answers[("squeue", "--json")] = _pending_queue(version)
    [job] = c.pending_jobs()
    assert (job.job_id, job.partitions, job.required_nodes, job.excluded_nodes) == (
        "3", ("main", "debug"), ("n3", "n4"), ("n5",))
    assert c.asked.count(("squeue", "--json")) == 2  # filtered here: 23.02+ ignores -t


@pytest.mark.parametrize("version", VERSIONS)
def test_rest_routine_diag_reads_of_each_version(version: str) -> None:
    api = DATA_PARSER[version] or "v0.0.38"
    answers = {f"/slurm/{api}/nodes": _nodes_doc(version),
               f"/slurm/{api}/jobs": _pending_queue(version)}

    class R(RestSlurmClient):
        def _send(self, method: str, full: str, data: dict[str, Any] | None,
                  what: str) -> dict[str, Any]:
            assert method == "GET"
            doc: dict[str, Any] = json.loads(answers[full])
            return doc

    r = R(url="http://slurmrestd.invalid:6820", token="t", api_version=api)  # noqa: S106
    infos = r.node_infos()
    assert infos["n8"].node.drained and infos["n8"].last_busy_s is not None
    [job] = r.pending_jobs()
    assert (job.job_id, job.partitions, job.required_nodes) == ("3", ("main", "debug"),
                                                                ("n3", "n4"))


@pytest.mark.parametrize("version", ["24.11", "26.05"])
def test_ended_jobs_of_data_parser_versions(version: str) -> None:
    """`scontrol show job --json` (the same job schema as squeue's): exit codes as objects."""
    reader = reader_for(_version(version))
    (failed,) = reader.read_jobs(json.loads(_doc(version, "job-failed.json")), "job-failed")
    (done,) = reader.read_jobs(json.loads(_doc(version, "job-completed.json")), "job-done")
    assert (failed.state, failed.exit_status, failed.exit_signal) == ("FAILED", 3, 0)
    assert (done.state, done.exit_status) == ("COMPLETED", 0)


def test_ended_jobs_of_22_05() -> None:
    jobs = {j.job_id: j for j in client_of("22.05").jobs()}
    assert (jobs["2"].state, jobs["2"].exit_status) == ("FAILED", 3)  # raw status 768
    assert (jobs["1"].state, jobs["1"].exit_status) == ("COMPLETED", 0)


@pytest.mark.parametrize("version", VERSIONS)
def test_sacct_of_each_version(version: str) -> None:
    jobs = parse_sacct_json(_doc(version, "sacct-finished.json"), version=_version(version))
    assert {(j.job_id, j.state) for j in jobs} >= {("1", "COMPLETED"), ("2", "FAILED")}
    assert all(j.start_s and j.end_s and j.end_s >= j.start_s for j in jobs)
    # a saved document (no version given) is read by the data_parser its meta names
    assert parse_sacct_json(_doc(version, "sacct-finished.json")) == jobs


@pytest.mark.parametrize("version", VERSIONS)
def test_placement_view_of_each_version(version: str) -> None:
    view = view_from_slurm(client_of(version), timeout_s=5, topology_conf=TOPOLOGY)
    assert "DRAIN" in view.nodes["n8"].slurm_state
    assert view.nodes["n1"].free_gpus == frozenset(range(2, 8))  # job 3 holds GPUs 0-1
    assert view.nodes["n5"].free_gpus == frozenset(range(8))
    assert view.nodes["n1"].partitions == frozenset({"main"})
    assert view.default_partition == "main"
    assert view.leaf_of["n6"] == "leaf2"


@pytest.mark.parametrize("version", VERSIONS)
def test_gpus_in_use_per_node_of_each_version(version: str) -> None:
    """gres_used (a count: what SlurmViewSource checks its kept job indices against)."""
    infos = client_of(version).node_infos()
    assert infos["n1"].gres_used == "gpu:2"  # job 3's two GPUs
    assert infos["n5"].gres_used == "gpu:0"


# ------------------------------------------------------------ another version's documents

PAIRS = [(mine, theirs) for mine in VERSIONS for theirs in VERSIONS if mine != theirs]


@pytest.mark.parametrize(("mine", "theirs"), PAIRS)
def test_another_versions_nodes_are_refused_naming_the_field(mine: str, theirs: str) -> None:
    c = client_of(mine, docs_of=theirs)
    if mine != "22.05" and theirs == "22.05":
        # 23.02+ asks `scontrol --json show nodes`; 22.05 would print sinfo's shape there
        c.answers[("scontrol", "--json", "show", "nodes")] = _doc("22.05", "sinfo.json")
    with pytest.raises(SlurmError, match=r"field '(state|meta\.plugin\.data_parser)'") as err:
        c.nodes()
    assert err.value.transient is False
    assert "show nodes" in str(err.value) or "sinfo" in str(err.value)


@pytest.mark.parametrize(("mine", "theirs"), PAIRS)
def test_another_versions_jobs_are_refused_naming_the_field(mine: str, theirs: str) -> None:
    with pytest.raises(SlurmError, match=r"squeue --json.*field '(job_state|exit_code|"
                                         r"meta\.plugin\.data_parser)'"):
        client_of(mine, docs_of=theirs).job("3")


@pytest.mark.parametrize(("mine", "theirs"), PAIRS)
def test_another_versions_sacct_is_refused_naming_the_field(mine: str, theirs: str) -> None:
    with pytest.raises(SacctParseError, match=r"field '(state\.current|meta\.plugin\."
                                              r"data_parser)'") as err:
        parse_sacct_json(_doc(theirs, "sacct-finished.json"), version=_version(mine))
    assert isinstance(err.value, SlurmError)


def _as_if_from(doc_text: str, version: str) -> str:
    """The document with its `meta` made to say it came from `version`: what is left to
    refuse it is its body."""
    doc = json.loads(doc_text)
    if DATA_PARSER[version] is None:
        doc.pop("meta", None)
    else:
        doc["meta"] = {"plugin": {"data_parser": f"data_parser/{DATA_PARSER[version]}"}}
    return json.dumps(doc)


BODY_PAIRS = [(a, b) for a, b in PAIRS if "22.05" in (a, b)]


@pytest.mark.parametrize(("mine", "theirs"), BODY_PAIRS)
def test_another_versions_body_is_refused_even_under_my_meta(mine: str, theirs: str) -> None:
    """22.05's body under a 24.11 meta and the reverse: each field read is typed, so the
    node's state, the job's state and sacct's state are named, not misread."""
    c = client_of(mine, docs_of=theirs)
    key = ("sinfo", "--json") if mine == "22.05" else ("scontrol", "--json", "show", "nodes")
    c.answers[key] = _as_if_from(_nodes_doc(theirs), mine)
    with pytest.raises(SlurmError, match=r"field 'state' is .*expected"):
        c.nodes()
    c.answers[("squeue", "--json", "-t", "all", "-j", "3")] = _as_if_from(
        _doc(theirs, "squeue.json"), mine)
    with pytest.raises(SlurmError, match=r"field '(job_state|exit_code)' is .*expected"):
        c.job("3")
    with pytest.raises(SacctParseError, match=r"field 'state\.current' is"):
        parse_sacct_json(_as_if_from(_doc(theirs, "sacct-finished.json"), mine),
                         version=_version(mine))


@pytest.mark.parametrize("version", ["24.11", "26.05"])
def test_23_02_plus_sinfo_is_never_an_empty_cluster(version: str) -> None:
    """`sinfo --json` of 23.02+ (a top-level `sinfo` array, no `nodes`) given to 22.05's
    reader: the missing field is named, not an empty cluster returned."""
    c = client_of("22.05")
    c.answers[("sinfo", "--json")] = _doc(version, "sinfo.json")
    with pytest.raises(SlurmError, match=r"field '(nodes|meta\.plugin\.data_parser)'"):
        c.nodes()
    # and with its meta gone too, still the missing 'nodes' field
    doc = json.loads(_doc(version, "sinfo.json"))
    del doc["meta"]
    c.answers[("sinfo", "--json")] = json.dumps(doc)
    with pytest.raises(SlurmError, match=r"`sinfo --json`: field 'nodes' is missing"):
        c.nodes()


# ------------------------------------------------------------ missing and renamed fields

Edit = Callable[[dict[str, Any]], None]


def _rename(obj: dict[str, Any], old: str, new: str) -> None:
    obj[new] = obj.pop(old)


NODE_EDITS: list[tuple[str, Edit, str]] = [
    ("state missing", lambda n: n.pop("state"), "state"),
    ("state renamed", lambda n: _rename(n, "state", "node_state"), "state"),
    ("reason missing", lambda n: n.pop("reason"), "reason"),
    ("weight a string", lambda n: n.update(weight="1"), "weight"),
    ("features renamed", lambda n: _rename(n, "features", "available_features"), "features"),
    ("name missing", lambda n: n.pop("name"), "name"),
    ("gres missing", lambda n: n.pop("gres"), "gres"),
    ("last_busy a string", lambda n: n.update(last_busy="yesterday"), "last_busy"),
]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("label", "edit", "field"), NODE_EDITS, ids=[e[0] for e in NODE_EDITS])
def test_node_field_missing_or_renamed(version: str, label: str, edit: Edit, field: str) -> None:
    doc = json.loads(_nodes_doc(version))
    edit(next(n for n in doc["nodes"] if n["name"] == "n8"))
    c = client_of(version)
    key = ("sinfo", "--json") if version == "22.05" else ("scontrol", "--json", "show", "nodes")
    c.answers[key] = json.dumps(doc)
    with pytest.raises(SlurmError, match=rf"field '{field}'"):
        c.nodes()


JOB_EDITS: list[tuple[str, Edit, str]] = [
    ("job_state missing", lambda j: j.pop("job_state"), "job_state"),
    ("job_state renamed", lambda j: _rename(j, "job_state", "state"), "job_state"),
    ("exit_code missing", lambda j: j.pop("exit_code"), "exit_code"),
    ("start_time renamed", lambda j: _rename(j, "start_time", "started"), "start_time"),
    ("job_id a string", lambda j: j.update(job_id="3"), "job_id"),
    ("restart_cnt missing", lambda j: j.pop("restart_cnt"), "restart_cnt"),
    ("nodes missing", lambda j: j.pop("nodes"), "nodes"),
    ("partition missing", lambda j: j.pop("partition"), "partition"),
    ("required_nodes renamed", lambda j: _rename(j, "required_nodes", "nodelist"),
     "required_nodes"),
]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("label", "edit", "field"), JOB_EDITS, ids=[e[0] for e in JOB_EDITS])
def test_job_field_missing_or_renamed(version: str, label: str, edit: Edit, field: str) -> None:
    doc = json.loads(_doc(version, "squeue.json"))
    edit(next(j for j in doc["jobs"] if j["job_id"] == 3))
    c = client_of(version)
    c.answers[("squeue", "--json", "-t", "all", "-j", "3")] = json.dumps(doc)
    with pytest.raises(SlurmError, match=rf"squeue --json.*field '{field}'"):
        c.job("3")


@pytest.mark.parametrize("version", ["24.11", "26.05"])
def test_data_parser_objects_checked_inside(version: str) -> None:
    """The {set, infinite, number} and exit-code objects are read field by field too."""
    doc = json.loads(_doc(version, "squeue.json"))
    job = next(j for j in doc["jobs"] if j["job_id"] == 3)
    broken = copy.deepcopy(doc)
    next(j for j in broken["jobs"] if j["job_id"] == 3)["start_time"].pop("number")
    reader = reader_for(_version(version))
    with pytest.raises(SlurmError, match=r"field 'start_time'.*field 'number' is missing"):
        reader.read_jobs(broken, "squeue")
    job["exit_code"]["return_code"] = 0  # 22.05's plain number inside 23.11+'s object
    with pytest.raises(SlurmError, match=r"field 'exit_code'.*field 'return_code'"):
        reader.read_jobs(doc, "squeue")


def test_a_version_gpufleet_does_not_know_is_refused() -> None:
    with pytest.raises(SlurmError, match=r"Slurm 27\.05\.0 is not a version gpufleet reads"):
        reader_for(SlurmVersion(27, 5))
    with pytest.raises(SlurmError, match="no Slurm version"):
        SlurmVersion.parse("scontrol: command not found")
    doc = json.loads(_doc("26.05", "scontrol-show-nodes.json"))
    doc["meta"]["plugin"]["data_parser"] = "data_parser/v0.0.46"
    with pytest.raises(SlurmError, match=r"'data_parser/v0\.0\.46', expected data_parser/"
                                         r"v0\.0\.45"):
        reader_for(_version("26.05")).read_nodes(doc, "nodes")


# ------------------------------------------------------------ slurmrestd's version


def _openapi_of(paths_txt: str) -> dict[str, Any]:
    """openapi-paths.txt ('METHODS path' lines) back into an OpenAPI document's `paths`."""
    paths = {line.split()[-1]: {} for line in paths_txt.splitlines()
             if line.strip() and not line.startswith("#")}
    return {"openapi": "3.0.2", "paths": paths}


@pytest.mark.parametrize("version", VERSIONS)
def test_rest_api_version_from_each_versions_openapi(version: str) -> None:
    """slurmrestd's own /openapi/v3 paths (captured): the newest API it serves, and that
    version's node update endpoint where it has one (23.02+)."""
    text = _doc(version, "openapi-paths.txt")
    api = api_version_from_openapi(_openapi_of(text), "slurmrestd")
    assert api == (DATA_PARSER[version] or "v0.0.38")
    has_post = any(line.split()[-1] == f"/slurm/{api}/node/{{node_name}}" and
                   "POST" in line.split()[:-1] for line in text.splitlines())
    assert has_post == (version != "22.05")


def test_rest_api_version_errors_name_the_field() -> None:
    with pytest.raises(SlurmError, match="field 'paths' has no /slurm/ API gpufleet reads"):
        api_version_from_openapi({"paths": {"/slurm/v0.0.99/nodes": {}}}, "slurmrestd")
    with pytest.raises(SlurmError, match="field 'paths' is missing"):
        api_version_from_openapi({"openapi": "3"}, "slurmrestd")


@pytest.mark.parametrize("version", VERSIONS)
def test_rest_reads_each_versions_nodes(version: str) -> None:
    """slurmrestd's GET nodes is the same data_parser document as the CLI's (22.05: v0.0.38,
    the document sinfo --json prints)."""
    api = DATA_PARSER[version] or "v0.0.38"
    body = _nodes_doc(version)

    class R(RestSlurmClient):
        def _send(self, method: str, full: str, data: dict[str, Any] | None,
                  what: str) -> dict[str, Any]:
            assert (method, full) == ("GET", f"/slurm/{api}/nodes")
            doc: dict[str, Any] = json.loads(body)
            return doc

    nodes = R(url="http://slurmrestd.invalid:6820", token="t", api_version=api).nodes()  # noqa: S106
    assert [n for n, v in nodes.items() if v.drained] == ["n8"]
    other = "24.11" if version != "24.11" else "22.05"
    body = _nodes_doc(other)
    with pytest.raises(SlurmError, match=r"field '(state|meta\.plugin\.data_parser)'"):
        R(url="http://slurmrestd.invalid:6820", token="t", api_version=api).nodes()  # noqa: S106
