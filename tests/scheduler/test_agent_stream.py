"""The Connect stream's wire, over real gRPC: what is acked, and commands that go out at once.

An unsequenced heartbeat (seq 0, fleet.proto Heartbeat) is taken as a sign of life and never
acked; a sequenced one (agents before that rule) is acked as before. A repair command queued
for a node whose agent sends nothing reaches it at once (before, commands rode on the ack of
the node's next report, and a heartbeat-only node gets none).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from gpufleet.agent.client import Heartbeats, StreamClient
from gpufleet.agent.outbox import Outbox
from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.rpc.v1 import fleet_pb2_grpc as pb_grpc
from gpufleet.scheduler.health.actions import ActionQueue
from gpufleet.scheduler.health.policy import HealthPolicy, PolicyConfig
from gpufleet.scheduler.repair.engine import AgentCommand
from gpufleet.scheduler.service.ingest import Ingestor
from gpufleet.scheduler.service.repair_link import AgentCommands
from gpufleet.scheduler.service.server import FleetServicer
from gpufleet.scheduler.store import SqliteStore

from tests.security.helpers import hello, sample


class Served:
    """FleetServicer on a grpc.aio server in its own thread and loop."""

    def __init__(self, tmp_path: Path) -> None:
        self.store = SqliteStore(tmp_path / "state.db")
        self.commands = AgentCommands(self.store)
        self.ingest = Ingestor(self.store, HealthPolicy(self.store, ActionQueue(self.store, None),
                                                        PolicyConfig()))
        self.port = 0
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete,
                                        args=(self._serve(),), daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    async def _serve(self) -> None:
        server = grpc.aio.server()
        pb_grpc.add_FleetControllerServicer_to_server(
            FleetServicer(self.ingest, commands=self.commands), server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await server.stop(0.5)

    def close(self) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self.store.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path)
    yield s
    s.close()


class Agent:
    """One raw stream: messages put in `out` are sent; replies land in `replies`."""

    def __init__(self, port: int, node: str) -> None:
        self.instance = uuid.uuid4().hex
        self.out: queue.Queue[pb.AgentMessage | None] = queue.Queue()
        self.replies: queue.Queue[pb.ControllerMessage] = queue.Queue()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.out.put(hello(node, self.instance))
        self.call = pb_grpc.FleetControllerStub(self.channel).Connect(self._requests())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _requests(self) -> Iterator[pb.AgentMessage]:
        while (msg := self.out.get()) is not None:
            yield msg

    def _read(self) -> None:
        try:
            for reply in self.call:
                self.replies.put(reply)
        except grpc.RpcError:
            pass  # cancelled at close

    def beat(self, seq: int = 0) -> None:
        self.out.put(pb.AgentMessage(seq=seq, agent_instance=self.instance,
                                     heartbeat=pb.Heartbeat(timestamp_ms=int(time.time() * 1000))))

    def close(self) -> None:
        self.call.cancel()
        self.out.put(None)
        self.channel.close()


def test_unsequenced_heartbeats_are_not_acked_and_sequenced_ones_are(served: Served) -> None:
    agent = Agent(served.port, "n1")
    try:
        agent.out.put(sample(1, agent.instance, int(time.time() * 1000)))
        assert agent.replies.get(timeout=10).ack.seq == 1
        reports = served.ingest.counters.reports
        for _ in range(3):
            agent.beat()
        agent.beat(seq=2)  # an older agent's heartbeat
        # the next reply is the sequenced heartbeat's ack: none came for the three before it
        assert agent.replies.get(timeout=10).ack.seq == 2
        # all four were taken in as signs of life, and the stored sequence is the acked one
        assert served.ingest.counters.reports == reports + 4
        agent.out.put(sample(3, agent.instance, int(time.time() * 1000)))
        assert agent.replies.get(timeout=10).ack.seq == 3
        assert agent.replies.empty()
    finally:
        agent.close()


def test_a_command_reaches_a_silent_agent_without_a_report(served: Served) -> None:
    agent = Agent(served.port, "n1")
    try:
        agent.out.put(sample(1, agent.instance, int(time.time() * 1000)))
        assert agent.replies.get(timeout=10).ack.seq == 1
        agent.beat()  # a heartbeat-only agent: nothing it sends is acked from now on
        deadline = time.monotonic() + 10
        while not served.commands.has_stream("n1") and time.monotonic() < deadline:
            time.sleep(0.01)
        # queued from another thread (the repair loop's), while the agent sends nothing
        sent = served.commands.send(AgentCommand("n1", "diag", "req-1", level=2))
        assert sent
        reply = agent.replies.get(timeout=10)
        assert reply.HasField("command")
        assert (reply.command.request_id, reply.command.kind, reply.command.diag_level) == (
            "req-1", pb.Command.KIND_RUN_DIAG, 2)
        assert served.commands.take("n1") == []  # sent once, not left queued
    finally:
        agent.close()


def test_a_command_for_a_node_without_a_stream_is_refused(served: Served) -> None:
    assert not served.commands.send(AgentCommand("n9", "reset_gpu", "req-2", gpus=(1,)))


@contextlib.contextmanager
def agent_client(served: Served, outbox: Outbox, beats: Heartbeats) -> Iterator[StreamClient]:
    """The agent's own StreamClient for node n1, running in a thread until the block ends."""
    client = StreamClient(f"127.0.0.1:{served.port}", outbox, lambda: hello("n1").hello,
                          backoff_initial_s=0.05, heartbeats=beats)
    stop = threading.Event()
    thread = threading.Thread(target=client.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield client
    finally:
        stop.set()
        thread.join(10)


def wait_until(done: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_the_agent_sends_heartbeats_only_on_a_live_stream_and_never_queues_them(
        served: Served) -> None:
    """The agent's own StreamClient: a heartbeat from before the stream is dropped; on the
    stream it is taken in, unacked, and the outbox never holds one. The stream counts as up
    (the controller's headers) though nothing was ever acked."""
    outbox = Outbox(uuid.uuid4().hex)
    beats = Heartbeats(outbox.wake)
    # no stream yet: stale once one is up
    beats.put(pb.Heartbeat(timestamp_ms=int(time.time() * 1000) - 1000))
    with agent_client(served, outbox, beats) as client:
        assert client.connected.wait(10)
        assert client.connects == 1
        now = int(time.time() * 1000)
        beats.put(pb.Heartbeat(timestamp_ms=now))
        wait_until(lambda: served.ingest.counters.reports >= 1)
        assert outbox.stats().pending_messages == 0  # never queued
        assert outbox.acked_seq == 0  # nothing sequenced went out, nothing was acked
        # a sequenced sample behind it: once acked, everything before it on the stream was
        # taken in: the fresh heartbeat and the sample, not the stale heartbeat
        seq = outbox.put_sample(pb.NodeSample(timestamp_ms=now))
        wait_until(lambda: outbox.acked_seq >= seq)
        assert outbox.acked_seq == seq
        assert served.ingest.counters.reports == 2


def test_a_controller_from_before_gets_sequenced_heartbeats(
        served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    """A controller that sends no gpufleet-stream header (one from before unsequenced
    heartbeats, which refuses seq 0) gets each heartbeat through the outbox, sequenced and
    acked, as before: agents may be upgraded before their controller."""
    from gpufleet.scheduler.service import server

    monkeypatch.setattr(server, "STREAM_ACCEPTED_KEY", "not-gpufleet-stream")
    outbox = Outbox(uuid.uuid4().hex)
    beats = Heartbeats(outbox.wake)
    with agent_client(served, outbox, beats) as client:
        seq = outbox.put_sample(pb.NodeSample(timestamp_ms=int(time.time() * 1000)))
        assert client.connected.wait(10)  # at the first ack: no header says so
        beats.put(pb.Heartbeat(timestamp_ms=int(time.time() * 1000)))
        wait_until(lambda: outbox.acked_seq > seq)
        assert outbox.acked_seq == seq + 1  # the heartbeat went sequenced, and was acked
        assert served.store.node("n1") is not None
        assert served.ingest.counters.reports == 2
