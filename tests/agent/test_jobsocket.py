"""The agent's job socket, alone and wired through the agent to a gRPC stream."""

from __future__ import annotations

import json
import os
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from gpufleet.agent import job
from gpufleet.agent.config import AgentConfig, ConfigError
from gpufleet.agent.jobsocket import (
    MAX_REQUEST_BYTES,
    JobSocketError,
    JobSocketServer,
    Registration,
    cgroup_job_id,
    parse_request,
)
from gpufleet.agent.nvml import NvmlBackend, load_library
from gpufleet.agent.runner import Agent
from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.rpc.v1 import fleet_pb2_grpc as pb_grpc

from tests.support import wait_for

NOW_MS = 1_700_000_000_000


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="gfs") as d:
        yield Path(d)


def _request(path: Path, payload: bytes, timeout_s: float = 5.0) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        s.connect(str(path))
        s.sendall(payload)
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return json.loads(data)  # type: ignore[no-any-return]


def _good(**over: object) -> bytes:
    doc: dict[str, object] = {"kind": "checkpoint", "job_id": "123", "step": 5,
                              "path": "/scratch/ck/step-5", "time_ms": NOW_MS}
    doc.update(over)
    return json.dumps({k: v for k, v in doc.items() if v is not None}).encode() + b"\n"


# ---------------------------------------------------------------- parsing


def test_parse_good_request() -> None:
    reg = parse_request(_good(), uid=1000, pid=42, received_ms=NOW_MS + 5)
    assert reg == Registration("123", 5, "/scratch/ck/step-5", NOW_MS, 1000, 42, NOW_MS + 5)


@pytest.mark.parametrize(("payload", "error"), [
    (b"not json\n", "not JSON"),
    (b"[1, 2]\n", "JSON object"),
    (_good(kind="hello"), "kind='hello'"),
    (_good(job_id=123), "job_id=123"),
    (_good(job_id="12; rm -rf /"), "job_id="),
    (_good(job_id=None), "job_id=None"),
    (_good(step=-1), "step=-1"),
    (_good(step=True), "step=True"),
    (_good(step="5"), "step='5'"),
    (_good(path="relative/x"), "path='relative/x'"),
    (_good(path="/a\nb"), "path="),
    (_good(path="/" + "x" * 2000), "path="),
    (_good(time_ms=5), "time_ms=5"),
    (_good(time_ms=1.5e12), "time_ms="),
    (b"{" + b" " * MAX_REQUEST_BYTES + b"}\n", "longer than"),
])
def test_parse_rejects_with_the_field_named(payload: bytes, error: str) -> None:
    with pytest.raises(JobSocketError, match=error.replace("(", r"\(")):
        parse_request(payload)


def test_cgroup_job_id_reads_slurm_cgroups(tmp_path: Path) -> None:
    (tmp_path / "10").mkdir()
    (tmp_path / "10" / "cgroup").write_text(
        "0::/system.slice/slurmstepd.scope/job_4711/step_0/user/task_0\n")
    (tmp_path / "11").mkdir()
    (tmp_path / "11" / "cgroup").write_text(  # cgroup v1
        "12:memory:/slurm/uid_1000/job_99/step_batch\n4:cpuset:/slurm/uid_1000/job_99\n")
    (tmp_path / "12").mkdir()
    (tmp_path / "12" / "cgroup").write_text("0::/user.slice/user-1000.slice/session-3.scope\n")
    assert cgroup_job_id(10, tmp_path) == "4711"
    assert cgroup_job_id(11, tmp_path) == "99"
    assert cgroup_job_id(12, tmp_path) is None
    assert cgroup_job_id(13, tmp_path) is None  # hidden or gone


# ---------------------------------------------------------------- server


def test_server_accepts_refuses_and_survives(short_dir: Path) -> None:
    got: list[Registration] = []
    path = short_dir / "run" / "job.sock"
    server = JobSocketServer(path, got.append)
    server.start()
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666
        assert _request(path, _good()) == {"ok": True}
        bad = _request(path, _good(step=-3))
        assert bad["ok"] is False and "step=-3" in str(bad["error"])
        # a client that connects and says nothing is dropped after the timeout...
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.connect(str(path))
        # ...and one that sends too much gets refused, not buffered
        big = _request(path, b"x" * (MAX_REQUEST_BYTES * 4) + b"\n")
        silent.close()
        assert big["ok"] is False
        assert _request(path, _good(step=6)) == {"ok": True}
    finally:
        server.stop()
    assert [r.step for r in got] == [5, 6]
    assert all(r.uid == os.getuid() for r in got)
    assert (server.accepted, server.rejected) == (2, 2)
    assert not path.exists()


def test_registration_from_another_jobs_cgroup_is_refused(short_dir: Path) -> None:
    proc = short_dir / "proc"
    (proc / str(os.getpid())).mkdir(parents=True)
    (proc / str(os.getpid()) / "cgroup").write_text("0::/slurmstepd.scope/job_555/step_0\n")
    got: list[Registration] = []
    server = JobSocketServer(short_dir / "job.sock", got.append, proc_root=proc)
    server.start()
    try:
        refused = _request(short_dir / "job.sock", _good(job_id="123"))
        assert refused["ok"] is False and "runs in job 555" in str(refused["error"])
        assert _request(short_dir / "job.sock", _good(job_id="555")) == {"ok": True}
    finally:
        server.stop()
    assert [r.job_id for r in got] == ["555"]


def test_stale_socket_is_replaced_live_one_is_not(short_dir: Path) -> None:
    path = short_dir / "job.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: an agent that died
    first = JobSocketServer(path, lambda r: None)
    first.start()
    try:
        second = JobSocketServer(path, lambda r: None)
        with pytest.raises(FileExistsError, match="another process"):
            second.start()
        assert _request(path, _good()) == {"ok": True}  # the first still serves
    finally:
        first.stop()
    path.write_text("not a socket")
    with pytest.raises(FileExistsError, match="not a socket"):
        JobSocketServer(path, lambda r: None).start()
    assert path.read_text() == "not a socket"


@pytest.mark.parametrize(("value", "error"), [
    ("relative.sock", "absolute"),
    ("/" + "x" * 120, "107 bytes"),
])
def test_config_validates_job_socket_path(value: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        AgentConfig(job_socket_path=value).validate()
    AgentConfig(job_socket_path="").validate()  # off is fine


# ---------------------------------------------------------------- through the agent


class RecordingController(pb_grpc.FleetControllerServicer):
    """A stand-in controller that stores every report and acks it."""

    def __init__(self) -> None:
        self.messages: list[pb.AgentMessage] = []
        self.lock = threading.Lock()

    def Connect(self, request_iterator, context):  # type: ignore[no-untyped-def]
        for msg in request_iterator:
            with self.lock:
                self.messages.append(msg)
            yield pb.ControllerMessage(ack=pb.Ack(seq=msg.seq))

    def checkpoints(self) -> list[pb.AgentMessage]:
        with self.lock:
            return [m for m in self.messages if m.WhichOneof("body") == "checkpoint"]


@pytest.fixture
def fake_controller() -> Iterator[tuple[RecordingController, int]]:
    servicer = RecordingController()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_FleetControllerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(grace=None)


def test_checkpoint_travels_job_to_agent_to_controller(
        fake_controller, short_dir: Path, tmp_path: Path, monkeypatch) -> None:
    servicer, port = fake_controller
    sock = short_dir / "job.sock"
    cfg = AgentConfig(node_name="n2", controller=f"127.0.0.1:{port}", gpu_backend="simulated",
                      sim_profile="l40s-pcie", state_dir=str(tmp_path / "state"),
                      interval_s=0.2, metrics_listen="", job_socket_path=str(sock))
    agent = Agent(cfg, NvmlBackend(load_library("simulated", "l40s-pcie", None, "n2"), "sim"))
    runner = threading.Thread(target=agent.run, daemon=True)
    runner.start()
    try:
        wait_for(sock.exists)
        monkeypatch.setenv("SLURM_JOB_ID", "31337")
        monkeypatch.setenv(job.ENV_AGENT_SOCKET, str(sock))
        t0 = time.monotonic()
        ckpt = job.save(tmp_path / "ck", 900, b"state")
        assert job.register(ckpt) is True  # the agent answers ok
        wait_for(lambda: len(servicer.checkpoints()) >= 2)
        elapsed_s = time.monotonic() - t0
        wait_for(lambda: len(agent.outbox) == 0)  # acked, so not resent
    finally:
        agent.stop.set()
        runner.join(timeout=10)
    assert not runner.is_alive()
    first = servicer.checkpoints()[0]
    c = first.checkpoint
    assert (c.job_id, c.step, c.path, c.time_ms, c.node) == (
        "31337", 900, str(ckpt.path.resolve()), ckpt.time_ms, "n2")
    assert c.HasField("uid") and c.uid == os.getuid()
    assert abs(c.received_ms - ckpt.time_ms) < 5_000
    assert first.seq > 0 and first.agent_instance == agent.outbox.agent_instance
    assert elapsed_s < 5.0
    assert not sock.exists()  # the agent removed its socket on the way out


def test_pending_registrations_are_bounded() -> None:
    from gpufleet.agent.outbox import Outbox

    box = Outbox(agent_instance="i", max_pending=10_000)
    box.max_pending_checkpoints = 3
    box.put_sample(pb.NodeSample(timestamp_ms=1))
    for step in range(5):
        box.put_checkpoint(pb.CheckpointRegistered(job_id="1", step=step))
    kept = [m.checkpoint.step for m in box.pending_messages()
            if m.WhichOneof("body") == "checkpoint"]
    assert kept == [2, 3, 4]
    assert len(box) == 4 and box.dropped == 2  # the sample is untouched
