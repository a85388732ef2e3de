"""The REST client against a slurmrestd stand-in per API version, and the pyslurm client
against a stand-in shaped like pyslurm 25.11's documented API.

slurmrestd: an HTTP server answering /openapi/v3 with the paths a version serves and GET
nodes with that version's real document (tests/slurm/captured/), recording what the client POSTs.
23.02+ (v0.0.39..) has POST /slurm/vX/node/{name}: drain, resume, weight and features go
there, with the JWT headers; 22.05 (v0.0.38) has no node update, so they go to scontrol
(the update client) and nothing is POSTed.

pyslurm (https://pyslurm.github.io/25.11/reference/node/): `pyslurm.Nodes.load()` (a dict of
name -> Node), `pyslurm.Node.load(name)`, `Node(name).modify(Node(state=..., reason=...))`,
attributes name, state ('IDLE+DRAIN'), reason, available_features, active_features, weight,
`pyslurm.RPCError`, `pyslurm.__version__` ('25.11.2'). PyPI's pyslurm builds only against
Slurm 25.11, which no Debian suite ships, so these are contract tests against that API, not
runs of pyslurm itself.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import types
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from gpufleet.scheduler.slurm import SlurmError, make_slurm_client
from gpufleet.scheduler.slurm.pyslurm_client import PyslurmClient
from gpufleet.scheduler.slurm.rest import RestSlurmClient

from tests.slurm.capture import CAPTURED

DOCS = CAPTURED  # one copy of real Slurm output, per version
TOKEN = "jwt-of-the-test"  # noqa: S105 - a stand-in server's token


class _UpdateRecorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def drain(self, name: str, reason: str) -> None:
        self.calls.append(("drain", name, reason))

    def resume(self, name: str) -> None:
        self.calls.append(("resume", name))

    def set_weight(self, name: str, weight: int) -> None:
        self.calls.append(("weight", name, str(weight)))

    def set_features(self, name: str, features: tuple[str, ...]) -> None:
        self.calls.append(("features", name, ",".join(features)))

    def nodes(self) -> dict[str, Any]:
        return {}

    def node(self, name: str) -> Any:
        raise AssertionError("not used")

    def ping(self) -> bool:
        return True


class FakeRestd:
    """slurmrestd answering /openapi/v3 with a real version's paths, GET nodes and
    node/{name} of one API version with that version's real document, POST node/{name}
    (recorded), and GET jobs / job/{id} from `jobs` (job id -> that version's job object,
    put in its real document `jobs_doc`), which a test may change between calls."""

    def __init__(self, api: str, nodes_doc: str, paths_txt: str,
                 jobs_doc: dict[str, Any] | None = None) -> None:
        self.api, self.nodes_doc = api, nodes_doc
        self.jobs_doc = jobs_doc or {}
        self.jobs: dict[str, dict[str, Any]] = {
            str(j["job_id"]): j for j in self.jobs_doc.get("jobs", [])}
        # the real slurmrestd's paths ('METHODS path' lines, captured), and one it does not know
        self.paths = {line.split()[-1]: {} for line in paths_txt.splitlines()
                      if line.strip() and not line.startswith("#")}
        self.paths["/slurm/v0.0.99/nodes"] = {}
        self.posts: list[tuple[str, dict[str, Any], dict[str, str]]] = []
        self.openapi_gets = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, doc: dict[str, Any]) -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/openapi/v3":
                    fake.openapi_gets += 1
                    self._reply(200, {"openapi": "3.0.3", "paths": fake.paths})
                elif self.path == f"/slurm/{fake.api}/nodes":
                    self._reply(200, json.loads(fake.nodes_doc))
                elif self.path == f"/slurm/{fake.api}/jobs":
                    self._reply(200, {**fake.jobs_doc, "jobs": list(fake.jobs.values())})
                elif self.path.startswith(f"/slurm/{fake.api}/job/"):
                    job_id = self.path.rsplit("/", 1)[1]
                    if job_id not in fake.jobs:  # what 24.11+ answer
                        self._reply(404, {"errors": [{"description": "Unable to query "
                                                      f"JobId={job_id}"}]})
                    else:
                        self._reply(200, {**fake.jobs_doc, "jobs": [fake.jobs[job_id]]})
                elif self.path.startswith(f"/slurm/{fake.api}/node/") and \
                        not self.path.endswith("/n99"):
                    name = self.path.rsplit("/", 1)[1]
                    doc = json.loads(fake.nodes_doc)
                    self._reply(200, {**doc, "nodes": [n for n in doc.get("nodes", [])
                                                       if n.get("name") == name]})
                elif self.path == f"/slurm/{fake.api}/node/n99":
                    # what a real 24.11/26.05 slurmrestd answers for an unknown node
                    self._reply(200, {"nodes": [], "errors": [{
                        "description": "Failure to query node n99", "error_number": 0,
                        "error": "No error", "source": "_dump_nodes"}]})
                elif self.path == f"/slurm/{fake.api}/ping":
                    # v0.0.42..44 print both; v0.0.45 only `responding`
                    ping: dict[str, Any] = {"hostname": "localhost", "responding": True,
                                            "primary": True, "latency": 100}
                    if fake.api != "v0.0.45":
                        ping |= {"pinged": "UP", "mode": "primary"}
                    self._reply(200, {"pings": [ping]})
                else:
                    self._reply(404, {"errors": [{"error": f"no {self.path}"}]})

            def do_POST(self) -> None:
                prefix = f"/slurm/{fake.api}/node/"
                if fake.api == "v0.0.38" or not self.path.startswith(prefix):
                    self._reply(404, {"errors": [{"error": f"no POST {self.path}"}]})
                    return
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                fake.posts.append((self.path.removeprefix(prefix), body, dict(self.headers)))
                self._reply(200, {"errors": [], "warnings": []})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                       kwargs={"poll_interval": 0.02})  # a quick close()
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def restd(request: pytest.FixtureRequest) -> Iterator[FakeRestd]:
    api, version = request.param
    name = "sinfo.json" if version == "22.05" else "scontrol-show-nodes.json"
    fake = FakeRestd(api, (DOCS / version / name).read_text(),
                     (DOCS / version / "openapi-paths.txt").read_text())
    yield fake
    fake.close()


@pytest.mark.parametrize("restd", [("v0.0.42", "24.11"), ("v0.0.45", "26.05")], indirect=True)
def test_rest_updates_nodes_through_slurmrestd_on_23_02_plus(restd: FakeRestd) -> None:
    updates = _UpdateRecorder()
    c = RestSlurmClient(url=restd.url, token=TOKEN, update_client=updates)  # type: ignore[arg-type]
    assert c.api_version == restd.api  # learnt from /openapi/v3 (v0.0.99 is not one it reads)
    assert [n for n, v in c.nodes().items() if v.drained] == ["n8"]
    c.drain("n3", "gpufleet: Xid 79\non GPU 2")
    c.resume("n3")
    c.set_weight("n3", 500)
    c.set_features("n3", ("ib", "h100"))
    assert [(node, body) for node, body, _ in restd.posts] == [
        ("n3", {"state": ["DRAIN"], "reason": "gpufleet: Xid 79 on GPU 2"}),
        ("n3", {"state": ["RESUME"]}),
        ("n3", {"weight": 500}),
        ("n3", {"features": "ib,h100", "features_act": "ib,h100"}),
    ]
    headers = restd.posts[0][2]
    assert (headers["X-SLURM-USER-NAME"], headers["X-SLURM-USER-TOKEN"]) == ("root", TOKEN)
    assert updates.calls == []
    assert c.ping() is True
    with pytest.raises(SlurmError, match="Failure to query node n99") as err:
        c.node("n99")
    assert err.value.transient is False
    assert restd.openapi_gets == 1  # the version is learnt once


@pytest.mark.parametrize("restd", [("v0.0.38", "22.05")], indirect=True)
def test_rest_on_22_05_reads_and_leaves_updates_to_scontrol(restd: FakeRestd) -> None:
    updates = _UpdateRecorder()
    c = RestSlurmClient(url=restd.url, token=TOKEN, update_client=updates)  # type: ignore[arg-type]
    assert c.api_version == "v0.0.38"
    assert [n for n, v in c.nodes().items() if v.drained] == ["n8"]
    c.drain("n3", "gpufleet: test")
    c.set_weight("n3", 7)
    assert restd.posts == []
    assert updates.calls == [("drain", "n3", "gpufleet: test"), ("weight", "n3", "7")]


@pytest.mark.parametrize("restd", [("v0.0.42", "26.05")], indirect=True)
def test_rest_refuses_a_document_of_another_version(restd: FakeRestd) -> None:
    """A slurmrestd whose v0.0.42 answers with a v0.0.45 document: named, not read."""
    c = RestSlurmClient(url=restd.url, token=TOKEN, api_version="v0.0.42")
    with pytest.raises(SlurmError, match=r"GET /slurm/v0\.0\.42/nodes.*field 'meta\.plugin\."
                                         r"data_parser' is 'data_parser/v0\.0\.45'"):
        c.nodes()


def test_rest_unknown_api_version_is_refused_at_once() -> None:
    with pytest.raises(SlurmError, match=r"data_parser 'v0\.0\.99' is not one gpufleet reads"):
        RestSlurmClient(url="http://127.0.0.1:9", token=TOKEN, api_version="v0.0.99")


class _JobActions:
    """Job actions (scancel/scontrol in production), acting on the stand-in's jobs as Slurm
    would: a requeued job is PENDING, one moved off the bad node RUNNING elsewhere."""

    def __init__(self, restd: FakeRestd) -> None:
        self.restd = restd
        self.calls: list[tuple[str, ...]] = []

    def jobs_on_node(self, node: str) -> list[Any]:
        raise AssertionError("jobs are read from slurmrestd")

    def job(self, job_id: str) -> Any:
        raise AssertionError("jobs are read from slurmrestd")

    def signal_job(self, job_id: str, signal: str, scope: str) -> None:
        self.calls.append(("signal", job_id, signal, scope))

    def requeue(self, job_id: str) -> None:
        self.calls.append(("requeue", job_id))
        job = self.restd.jobs[job_id]
        job["job_state"], job["restart_cnt"] = ["PENDING"], job["restart_cnt"] + 1

    def update_job(self, job_id: str, *, start_now_plus_s: int | None = None,
                   excluded_nodes: tuple[str, ...] | None = None) -> None:
        self.calls.append(("update", job_id, str(start_now_plus_s),
                           ",".join(excluded_nodes or ())))
        job = self.restd.jobs[job_id]
        job["job_state"], job["nodes"] = ["RUNNING"], "n[3-4]"


@pytest.mark.parametrize("restd", [("v0.0.42", "24.11")], indirect=True)
def test_controller_recovers_jobs_with_the_rest_client(restd: FakeRestd,
                                                       tmp_path: Path) -> None:
    """--slurm rest with recovery: the node is drained through slurmrestd, the job on it is
    read from slurmrestd (a real 24.11 document), signalled, requeued without the node and
    seen running again."""
    from gpufleet.rpc.v1 import fleet_pb2 as pb
    from gpufleet.scheduler.recovery.manager import RecoveryConfig
    from gpufleet.scheduler.service.server import Controller
    from gpufleet.scheduler.store import SqliteStore, now_ms

    restd.jobs_doc = json.loads((DOCS / "24.11" / "job-running.json").read_text())
    restd.jobs = {"3": {**restd.jobs_doc["jobs"][0], "comment": "train gpufleet-ckpt"}}
    actions = _JobActions(restd)
    rest = RestSlurmClient(url=restd.url, token=TOKEN, job_action_client=actions)
    store = SqliteStore(tmp_path / "state.db")
    ctl = Controller(store, rest, listen="127.0.0.1:0", recovery=RecoveryConfig(
        grace_s=0.05, poll_s=0.01, running_timeout_s=10.0))
    ctl.start()
    try:
        ctl.ingest.hello(pb.AgentMessage(seq=0, agent_instance="i1", hello=pb.Hello(
            inventory=pb.NodeInventory(node_name="n1"))))
        ctl.ingest.handle("n1", pb.AgentMessage(seq=1, agent_instance="i1", sample=pb.NodeSample(
            verdicts=[pb.Verdict(check="xid", severity=pb.SEVERITY_FATAL, reason_code="xid79",
                                 evidence="GPU 0 Xid 79", since_ms=now_ms())])))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not (
                store.recoveries("3") and store.recoveries("3")[0].status == "running_again"):
            time.sleep(0.02)
        (row,) = store.recoveries("3")
        assert row.status == "running_again" and row.restart == 1, row
        assert [c[0] for c in actions.calls] == ["signal", "requeue", "update"]
        assert actions.calls[2] == ("update", "3", "0", "n1,n2")
        assert ("n1", {"state": ["DRAIN"], "reason": "gpufleet:xid79 GPU 0 Xid 79"}) in [
            (node, body) for node, body, _ in restd.posts]
    finally:
        ctl.stop()
        store.close()


def test_the_controller_command_turns_recovery_on_with_slurm_rest(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`gpufleet controller --slurm rest` hands the controller a recovery config (it was
    silently off with anything but --slurm cli); --slurm none has no jobs to recover."""
    from click.testing import CliRunner
    from gpufleet.scheduler.cli.main import main
    from gpufleet.scheduler.service import server

    built: list[dict[str, Any]] = []

    class Stub:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            built.append(kwargs)

        def start(self) -> None:
            raise OSError("stub: not listening")

    monkeypatch.setattr(server, "Controller", Stub)
    for kind, extra in (("rest", ["--slurm-rest-url", "http://127.0.0.1:9"]), ("none", [])):
        result = CliRunner().invoke(main, [
            "controller", "--db", str(tmp_path / "s.db"), "--insecure", "--metrics-listen", "",
            "--slurm", kind, *extra])
        assert "stub: not listening" in result.output, result.output
    assert [b["recovery"] is not None for b in built] == [True, False]


# ------------------------------------------------------------------ pyslurm


class _FakeNode:
    """pyslurm.Node as documented: Node(name=None, **kwargs); .load(name); .modify(changes)."""

    registry: ClassVar[dict[str, _FakeNode]] = {}
    modified: ClassVar[list[tuple[str, dict[str, Any]]]] = []

    def __init__(self, name: str | None = None, **kwargs: Any) -> None:
        self.name = name
        self.state = kwargs.pop("state", "IDLE")
        self.reason = kwargs.pop("reason", None)
        self.available_features = kwargs.pop("available_features", [])
        self.active_features = kwargs.pop("active_features", [])
        self.weight = kwargs.pop("weight", 1)
        self.changes = {"state": self.state} if name is None else {}
        if name is None:
            self.changes = {k: v for k, v in (("state", self.state), ("reason", self.reason),
                                              ("weight", self.weight),
                                              ("available_features", self.available_features),
                                              ("active_features", self.active_features))
                            if v not in (None, [], 1, "IDLE")}
        if kwargs:
            raise TypeError(f"unexpected Node attributes {sorted(kwargs)}")

    @classmethod
    def load(cls, name: str) -> _FakeNode:
        if name not in cls.registry:
            raise _RPCError(f"Node {name} not found")
        return cls.registry[name]

    def modify(self, changes: _FakeNode) -> None:
        if self.name not in self.registry:
            raise _RPCError("Invalid node name specified")
        _FakeNode.modified.append((str(self.name), changes.changes))


class _RPCError(Exception):
    pass


class _FakeJob:
    """pyslurm.Job as documented: Job(job_id); Job.load(id); send_signal; requeue; and the
    properties recovery reads (state, allocated_nodes, exit_code, exit_code_signal, ...)."""

    registry: ClassVar[dict[int, _FakeJob]] = {}
    actions: ClassVar[list[tuple[Any, ...]]] = []

    def __init__(self, job_id: int, **props: Any) -> None:
        self.id = job_id
        self.state = props.get("state", "RUNNING")
        self.allocated_nodes = props.get("allocated_nodes")
        self.excluded_nodes = props.get("excluded_nodes")
        self.is_requeueable = props.get("is_requeueable", True)
        self.is_batch_job = props.get("is_batch_job", True)
        self.comment = props.get("comment")
        self.requeue_count = props.get("requeue_count", 0)
        self.exit_code = props.get("exit_code", 0)
        self.exit_code_signal = props.get("exit_code_signal", 0)
        self.start_time = props.get("start_time", 1_796_245_768)
        self.end_time = props.get("end_time", 1_796_249_368)
        self.state_reason = props.get("state_reason", "None")

    @classmethod
    def load(cls, job_id: int) -> _FakeJob:
        if job_id not in cls.registry:
            raise _RPCError("Invalid job id specified")
        return cls.registry[job_id]

    def send_signal(self, signal: str, steps: str = "children", hurry: bool = False) -> None:
        import signal as signals

        # pyslurm's signal_to_num: a number, or a name of signal.Signals (a bad one raises)
        _ = signals.Signals(int(signal)) if signal.isnumeric() else signals.Signals[signal]
        _FakeJob.actions.append(("signal", self.id, signal, steps))

    def requeue(self, hold: bool = False) -> None:
        _FakeJob.actions.append(("requeue", self.id, hold))


class _FakeJobs(dict[int, _FakeJob]):
    @classmethod
    def load(cls) -> _FakeJobs:
        return cls(_FakeJob.registry)


class _FakeNodes(dict[str, _FakeNode]):
    @classmethod
    def load(cls) -> _FakeNodes:
        return cls(_FakeNode.registry)


@pytest.fixture
def fake_pyslurm(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    mod = types.ModuleType("pyslurm")
    mod.__version__ = "25.11.2"  # type: ignore[attr-defined]
    mod.Node = _FakeNode  # type: ignore[attr-defined]
    mod.Nodes = _FakeNodes  # type: ignore[attr-defined]
    mod.RPCError = _RPCError  # type: ignore[attr-defined]
    mod.Job = _FakeJob  # type: ignore[attr-defined]
    mod.Jobs = _FakeJobs  # type: ignore[attr-defined]
    _FakeJob.registry = {
        7: _FakeJob(7, allocated_nodes="n[1-2]", comment="gpufleet-ckpt", requeue_count=1),
        8: _FakeJob(8, state="FAILED", allocated_nodes="n3", exit_code=93),
        9: _FakeJob(9, state="CANCELLED", allocated_nodes="n1", exit_code_signal=9),
    }
    _FakeJob.actions = []
    _FakeNode.registry = {
        "n1": _FakeNode("n1", state="IDLE", weight=1),
        "n8": _FakeNode("n8", state="IDLE+DRAIN", reason="gpufleet: Xid 79",
                        available_features=["h100"], weight=10),
    }
    _FakeNode.modified = []
    monkeypatch.setitem(sys.modules, "pyslurm", mod)
    return mod


def test_pyslurm_client_reads_and_modifies_through_the_documented_api(
        fake_pyslurm: types.ModuleType) -> None:
    c = make_slurm_client("pyslurm", slurm_version="25.11.1")
    assert isinstance(c, PyslurmClient)
    nodes = c.nodes()
    assert sorted(nodes) == ["n1", "n8"]
    assert nodes["n8"].drained and not nodes["n1"].drained
    assert (nodes["n8"].reason, nodes["n8"].features, nodes["n8"].weight) == (
        "gpufleet: Xid 79", ("h100",), 10)
    assert c.node("n8") == nodes["n8"]
    assert c.ping() is True
    c.drain("n1", "gpufleet: Xid 79\n GPU 0")
    c.resume("n1")
    c.set_weight("n1", 42)
    c.set_features("n1", ("ib",))
    assert _FakeNode.modified == [
        ("n1", {"state": "DRAIN", "reason": "gpufleet: Xid 79 GPU 0"}),
        ("n1", {"state": "RESUME"}),
        ("n1", {"weight": 42}),
        ("n1", {"available_features": ["ib"], "active_features": ["ib"]}),
    ]


def test_pyslurm_errors_are_slurm_errors(fake_pyslurm: types.ModuleType) -> None:
    c = make_slurm_client("pyslurm", slurm_version="25.11.0")
    assert c is not None
    with pytest.raises(SlurmError, match="pyslurm load node n9 failed: Node n9 not found") as e:
        c.node("n9")
    assert e.value.transient is False
    with pytest.raises(SlurmError, match="invalid node name"):
        c.drain("n1;x", "r")


def test_pyslurm_of_another_slurm_is_refused(fake_pyslurm: types.ModuleType) -> None:
    with pytest.raises(SlurmError, match=r"pyslurm 25\.11\.2 does not match Slurm 24\.11\.5 "
                                         r"\(major\.minor must agree\): use the cli or rest"):
        make_slurm_client("pyslurm", slurm_version="24.11.5")


def test_pyslurm_missing_is_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyslurm", None)  # import pyslurm -> ImportError
    with pytest.raises(SlurmError, match="pyslurm is not installed") as e:
        make_slurm_client("pyslurm")
    assert e.value.transient is False


class _JobUpdates:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int | None, tuple[str, ...] | None]] = []

    def update_job(self, job_id: str, *, start_now_plus_s: int | None = None,
                   excluded_nodes: tuple[str, ...] | None = None) -> None:
        self.calls.append((job_id, start_now_plus_s, excluded_nodes))


def test_pyslurm_jobs_for_recovery(fake_pyslurm: types.ModuleType) -> None:
    updates = _JobUpdates()
    c = PyslurmClient(slurm_version="25.11.1", job_update_client=updates)  # type: ignore[arg-type]
    on_n1 = {j.job_id: j for j in c.jobs_on_node("n1")}
    assert sorted(on_n1) == ["7", "9"]
    seven = on_n1["7"]
    assert (seven.state, seven.nodes, seven.requeue, seven.batch, seven.comment,
            seven.restart_count) == ("RUNNING", ("n1", "n2"), True, True, "gpufleet-ckpt", 1)
    failed = c.job("8")
    assert failed is not None and (failed.state, failed.exit_status) == ("FAILED", 93)
    killed = c.job("9")
    assert killed is not None and (killed.exit_status, killed.exit_signal) == (None, 9)
    assert c.job("12345") is None
    c.signal_job("7", "USR1", "batch")
    c.signal_job("7", "SIGTERM", "full")
    c.signal_job("7", "10", "steps")
    c.requeue("7")
    c.update_job("7", start_now_plus_s=0, excluded_nodes=("n2",))
    assert _FakeJob.actions == [("signal", 7, "SIGUSR1", "batch"),
                                ("signal", 7, "SIGTERM", "all"),
                                ("signal", 7, "10", "children"), ("requeue", 7, False)]
    assert updates.calls == [("7", 0, ("n2",))]
    with pytest.raises(SlurmError, match="signal scope 'some'"):
        c.signal_job("7", "USR1", "some")
