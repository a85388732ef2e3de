"""A controller restart: every agent reconnects at once, and no live node is called unreachable.

After a restart every stored last-seen time is as old as the downtime, and the agents come
back through a storm of hellos. The health policy must give them one `unreachable_after_s`
from when it started acting, not count the downtime (it used to mark the whole cluster
unreachable on its first tick, and with `drain_unreachable` drain it), while a node whose
agent really is gone is still marked unreachable after that.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid

import grpc
from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.scheduler.health.policy import PolicyConfig
from gpufleet.scheduler.service.server import Controller
from gpufleet.scheduler.store import SqliteStore, now_ms

from tests.scheduler.fakes import FakeSlurm
from tests.support.waiting import wait_for

AGENTS = 100
DOWNTIME_MS = 3_600_000  # the controller was away an hour


def _hello(node: str, instance: str) -> bytes:
    inv = pb.NodeInventory(node_name=node, hostname=node)
    return pb.AgentMessage(seq=0, agent_instance=instance,
                           hello=pb.Hello(inventory=inv)).SerializeToString()


def _heartbeat(seq: int, instance: str) -> bytes:
    return pb.AgentMessage(seq=seq, agent_instance=instance, heartbeat=pb.Heartbeat(
        timestamp_ms=now_ms())).SerializeToString()


class Agents:
    """AGENTS streams opened all at once, each heartbeating every `period_s` until stopped."""

    def __init__(self, port: int, names: list[str], period_s: float) -> None:
        self.port, self.names, self.period_s = port, names, period_s
        self.acked: dict[str, int] = {}
        self.errors: list[str] = []
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            connect = channel.stream_stream("/gpufleet.v1.FleetController/Connect",
                                            request_serializer=bytes,
                                            response_deserializer=bytes)
            await asyncio.gather(*(self._agent(connect, n) for n in self.names))

    async def _agent(self, connect: grpc.aio.StreamStreamMultiCallable, node: str) -> None:
        assert self._stop is not None
        instance = uuid.uuid4().hex
        call = connect(wait_for_ready=True)
        try:
            await call.write(_hello(node, instance))
            seq = 0
            while not self._stop.is_set():
                seq += 1
                await call.write(_heartbeat(seq, instance))
                ack = pb.ControllerMessage.FromString(await call.read())
                self.acked[node] = ack.ack.seq
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.period_s)
            await call.done_writing()
        except grpc.aio.AioRpcError as e:
            self.errors.append(f"{node}: {e.code().name}")


def test_reconnect_storm_after_a_restart_marks_no_live_node_unreachable(tmp_path) -> None:
    live = [f"n{i:03d}" for i in range(AGENTS)]
    dead = "gone"
    store = SqliteStore(tmp_path / "state.db")
    before = now_ms() - DOWNTIME_MS
    for name in [*live, dead]:  # what the previous controller left: last seen an hour ago
        store.upsert_node(name, name, 8, b"", "old-instance", before)
    marked: list[str] = []
    real = store.set_reachable

    def set_reachable(name: str, reachable: bool, now: int) -> bool:
        changed = real(name, reachable, now)
        if changed and not reachable:
            marked.append(name)
        return changed

    store.set_reachable = set_reachable  # type: ignore[method-assign]
    ctl = Controller(store, FakeSlurm([*live, dead]), listen="127.0.0.1:0",
                     policy=PolicyConfig(unreachable_after_s=3.0, tick_s=0.1,
                                         resume_quiet_s=3600))
    port = ctl.start()
    agents = Agents(port, live, period_s=0.5)
    agents.start()
    try:
        assert wait_for(lambda: len(agents.acked) == AGENTS or bool(agents.errors), 120), (
            f"{len(agents.acked)}/{AGENTS} agents reconnected")
        assert not agents.errors
        # the liveness clock does run: the node whose agent never came back goes unreachable
        wait_for(lambda: dead in marked, 60, "the dead node to be marked unreachable")
        seen = dict(agents.acked)
        # and the live ones kept reporting through it
        wait_for(lambda: all(agents.acked[n] > seen[n] for n in live), 60,
                 "every live agent to be acked again")
    finally:
        agents.stop()
        ctl.stop()
        store.close()
    assert marked == [dead], f"live nodes marked unreachable: {sorted(set(marked) - {dead})}"
