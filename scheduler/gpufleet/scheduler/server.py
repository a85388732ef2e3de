"""The controller's gRPC server: a thin servicer over the ingest domain, plus standard
health checking and reflection.

grpc.aio: one event loop holds every agent stream, so 10,000 idle-most-of-the-time streams
cost no threads. The servicer validates, calls the domain, maps domain errors to status
codes; nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator

import grpc
from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.rpc.v1 import fleet_pb2_grpc as pb_grpc
from gpufleet.scheduler.actions import ActionQueue
from gpufleet.scheduler.ingest import IngestError, Ingestor
from gpufleet.scheduler.metrics import ControllerMetrics, MetricsHttpServer, start_metrics_http
from gpufleet.scheduler.policy import HealthPolicy, PolicyConfig
from gpufleet.scheduler.slurm import SlurmClient
from gpufleet.scheduler.store import StateStore, StoreError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FleetController"].full_name


class FleetServicer(pb_grpc.FleetControllerServicer):
    def __init__(self, ingest: Ingestor, metrics: ControllerMetrics | None = None) -> None:
        self.ingest = ingest
        self.metrics = metrics
        self.streams = 0

    async def Connect(
        self, request_iterator: AsyncIterator[pb.AgentMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ControllerMessage]:
        node = None
        seq = 0
        self.streams += 1
        try:
            async for msg in request_iterator:
                try:
                    if node is None:
                        node = self.ingest.hello(msg)
                        if self.metrics is not None:
                            self.metrics.agent_connected()
                        continue
                    seq = self.ingest.handle(node, msg)
                except IngestError as e:
                    if self.metrics is not None:
                        self.metrics.ingest_error("invalid")
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
                except StoreError as e:
                    if self.metrics is not None:
                        self.metrics.ingest_error("store")
                    log.error("store failed on a report from %s: %s", node, e)
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "controller store failed")
                yield pb.ControllerMessage(ack=pb.Ack(seq=seq))
        finally:
            self.streams -= 1
            if node is not None:
                if self.metrics is not None:
                    self.metrics.agent_disconnected()
                try:
                    self.ingest.disconnected(node)
                except StoreError as e:
                    log.error("store failed writing %s's last report time: %s", node, e)
                log.info("node %s disconnected", node)


class Controller:
    """The controller process: store, Slurm action queue, health policy, metrics, and the
    gRPC server on its own loop.

    `metrics_listen` ("HOST:PORT", e.g. "0.0.0.0:9836") serves Prometheus /metrics; None
    serves none (the metrics are still kept, in `self.metrics`). Without `policy` the
    controller only drains on fatal (the foundation's behaviour, which tests rely on).
    """

    def __init__(
        self,
        store: StateStore,
        slurm: SlurmClient | None,
        listen: str = "127.0.0.1:50051",
        shadow: bool = False,
        policy: PolicyConfig | None = None,
        metrics_listen: str | None = None,
        metrics: ControllerMetrics | None = None,
    ) -> None:
        self.store = store
        self.actions = ActionQueue(store, slurm, shadow=shadow)
        self.metrics = metrics if metrics is not None else ControllerMetrics(
            nodes_by_health=self.nodes_by_health, queue_depth=self.actions.depth,
        )
        if hasattr(self.actions, "metrics"):  # the action queue reports finished actions
            self.actions.metrics = self.metrics
        self.policy = HealthPolicy(store, self.actions, policy) if policy is not None else None
        self.ingest = Ingestor(store, self.actions, self.metrics, policy=self.policy)
        self.metrics_listen = metrics_listen
        self.metrics_server: MetricsHttpServer | None = None
        self.listen = listen
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: grpc.aio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stopping: asyncio.Event | None = None
        self._grace_s = 1.0

    async def _serve(self) -> None:
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ])
        pb_grpc.add_FleetControllerServicer_to_server(FleetServicer(self.ingest, self.metrics),
                                                      server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            server,
        )
        self.port = server.add_insecure_port(self.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.listen}")
        await server.start()
        await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        self._stopping = asyncio.Event()
        self._ready.set()
        await self._stopping.wait()
        await health_servicer.enter_graceful_shutdown()
        await server.stop(self._grace_s)

    def _run_loop(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as e:  # noqa: BLE001 - re-raised in the thread that called start()
            self._error = e
            self._ready.set()
        finally:
            loop.close()

    def nodes_by_health(self) -> dict[str, int]:
        """Node counts by health for the metrics; a silent node counts as `unreachable`."""
        counts: dict[str, int] = {}
        for n in self.store.nodes():
            state = n.health if getattr(n, "reachable", True) else "unreachable"
            counts[state] = counts.get(state, 0) + 1
        return counts

    def start(self, timeout_s: float = 10.0) -> int:
        """Start in the background; return the port it listens on."""
        if self.metrics_listen:
            # first: a port clash is a start-up error, not something found an hour later
            self.metrics_server = start_metrics_http(self.metrics, self.metrics_listen)
        self.actions.start()
        if self.policy is not None:
            self.policy.start()
        self._thread = threading.Thread(target=self._run_loop, name="grpc", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError("controller did not start")
        if self._error is not None:
            raise self._error
        log.info("controller listening on %s (port %d)", self.listen, self.port)
        return self.port

    def stop(self, grace_s: float = 1.0) -> None:
        """Stop serving (open streams get grace_s to finish), then the action queue."""
        self._grace_s = grace_s
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            # RuntimeError: the loop closed in between, so it has already stopped
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopping.set)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=grace_s + 5)
        try:
            self.ingest.flush()
        except StoreError as e:
            log.error("store failed writing the last report times at stop: %s", e)
        if self.policy is not None:
            self.policy.stop()
        self.actions.stop()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
