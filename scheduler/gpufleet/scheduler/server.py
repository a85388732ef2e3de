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
from collections.abc import AsyncIterator, Callable

import grpc
from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.rpc.v1 import fleet_pb2_grpc as pb_grpc
from gpufleet.scheduler import audit, limits
from gpufleet.scheduler.actions import ActionQueue
from gpufleet.scheduler.ingest import IngestError, Ingestor
from gpufleet.scheduler.leader import LeaderLock
from gpufleet.scheduler.metrics import ControllerMetrics, MetricsHttpServer, start_metrics_http
from gpufleet.scheduler.policy import HealthPolicy, PolicyConfig
from gpufleet.scheduler.recovery import RecoveryConfig, RecoveryManager
from gpufleet.scheduler.slurm import SlurmClient
from gpufleet.scheduler.store import StateStore, StoreError
from gpufleet.scheduler.tls import ServerTls, peer_node_names
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FleetController"].full_name


class FleetServicer(pb_grpc.FleetControllerServicer):
    """`active` says whether this controller may serve (a standby answers UNAVAILABLE, so
    agents move on to the active one)."""

    def __init__(self, ingest: Ingestor, metrics: ControllerMetrics | None = None,
                 active: Callable[[], bool] = lambda: True) -> None:
        self.ingest = ingest
        self.metrics = metrics
        self.active = active
        self.streams = 0

    async def _refuse(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode,
                      why: str, claimed: str, cert_names: frozenset[str] | None) -> None:
        peer = context.peer()
        log.warning("refused a stream from %s (%s): %s", peer, code.name, why)
        audit.record(
            actor=",".join(sorted(cert_names)) if cert_names else "unauthenticated",
            action="agent_connect", target=claimed, source=peer, result="refused",
            code=code.name, reason=why,
        )
        await context.abort(code, why)

    async def _check_claim(self, context: grpc.aio.ServicerContext, msg: pb.AgentMessage,
                           cert_names: frozenset[str] | None) -> None:
        """With mTLS, a hello may speak only for a node named in the client certificate."""
        claimed = msg.hello.inventory.node_name
        if cert_names is not None and claimed not in cert_names:
            await self._refuse(
                context, grpc.StatusCode.PERMISSION_DENIED,
                f"certificate is for {sorted(cert_names) or 'no DNS name'}, "
                f"not node {claimed!r}", claimed, cert_names)

    async def Connect(
        self, request_iterator: AsyncIterator[pb.AgentMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ControllerMessage]:
        node = None
        seq = 0
        if not self.active():
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "standby controller: another controller is active")
        # None: plaintext (the controller runs --insecure); else the names the CA vouched for
        cert_names = peer_node_names(context.auth_context())
        self.streams += 1
        try:
            async for msg in request_iterator:
                try:
                    limits.check(msg)
                    if node is None:
                        await self._check_claim(context, msg, cert_names)
                        node = self.ingest.hello(msg)
                        if self.metrics is not None:
                            self.metrics.agent_connected()
                        continue
                    seq = self.ingest.handle(node, msg)
                except (IngestError, limits.LimitError) as e:
                    if self.metrics is not None:
                        self.metrics.ingest_error("invalid")
                    log.warning("invalid report from %s (%s): %s", node, context.peer(), e)
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

    `tls`: serve mTLS and bind each stream to the node in its client certificate; None
    serves plaintext (the CLI allows that only with --insecure). `elect`: take the leader
    lock before acting (standby until then); None elects when the store is PostgreSQL,
    the only store two controllers can share.
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
        tls: ServerTls | None = None,
        elect: bool | None = None,
        recovery: RecoveryConfig | None = None,
    ) -> None:
        self.store = store
        self.tls = tls
        dsn = getattr(store, "dsn", None)
        if elect is None:
            elect = isinstance(dsn, str) and dsn.startswith(("postgresql://", "postgres://"))
        self.leader = LeaderLock(dsn) if elect and isinstance(dsn, str) else None
        self._active = threading.Event()
        self.actions = ActionQueue(store, slurm, shadow=shadow)
        self.metrics = metrics if metrics is not None else ControllerMetrics(
            nodes_by_health=self.nodes_by_health, queue_depth=self.actions.depth,
        )
        if hasattr(self.actions, "metrics"):  # the action queue reports finished actions
            self.actions.metrics = self.metrics
        self.policy = HealthPolicy(store, self.actions, policy) if policy is not None else None
        # job recovery (signal, requeue, resume) hangs off the policy's fatal transition and
        # needs a Slurm client that can requeue (the CLI one); None: off
        self.recovery: RecoveryManager | None = None
        if recovery is not None:
            if self.policy is None:
                raise ValueError("job recovery needs the health policy: pass policy= too")
            if slurm is not None and not hasattr(slurm, "requeue"):
                raise ValueError(f"job recovery needs a Slurm client that can requeue jobs "
                                 f"(--slurm cli), not {type(slurm).__name__}")
            self.recovery = RecoveryManager(store, slurm,  # type: ignore[arg-type]
                                            recovery, shadow=self.actions.shadow,
                                            metrics=self.metrics)
            self.policy.recovery = self.recovery
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
        pb_grpc.add_FleetControllerServicer_to_server(
            FleetServicer(self.ingest, self.metrics, active=self._active.is_set), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            server,
        )
        if self.tls is not None:
            self.port = server.add_secure_port(self.listen, self.tls.credentials())
        else:
            log.warning("serving plaintext on %s: any client can claim any node (demo only)",
                        self.listen)
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

    @property
    def active(self) -> bool:
        return self._active.is_set()

    def _become_active(self) -> None:
        self.actions.start()
        if self.policy is not None:
            self.policy.start()
        self._active.set()

    def _step_down(self) -> None:
        # the lock may already be someone else's: stop acting now, the service manager
        # restarts this process as a standby
        threading.Thread(target=self.stop, name="step-down", daemon=True).start()

    def start(self, timeout_s: float = 10.0, elect_wait_s: float = 2.0) -> int:
        """Start in the background; return the port it listens on. With a leader lock,
        wait up to elect_wait_s to become active, else serve as standby until then."""
        if self.metrics_listen:
            # first: a port clash is a start-up error, not something found an hour later
            self.metrics_server = start_metrics_http(self.metrics, self.metrics_listen)
        if self.leader is None:
            self._become_active()
        self._thread = threading.Thread(target=self._run_loop, name="grpc", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError("controller did not start")
        if self._error is not None:
            raise self._error
        if self.leader is not None:
            self.leader.start(self._become_active, self._step_down)
            if not self.leader.acquired.wait(elect_wait_s):
                log.warning("controller on %s is standby (another one is active)", self.listen)
        log.info("controller listening on %s (port %d)", self.listen, self.port)
        return self.port

    def stop(self, grace_s: float = 1.0) -> None:
        """Stop serving (open streams get grace_s to finish), then the action queue."""
        self._grace_s = grace_s
        was_active = self._active.is_set()
        self._active.clear()
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
        if was_active:
            if self.policy is not None:
                self.policy.stop()
            if self.recovery is not None:
                self.recovery.stop()
            self.actions.stop()
        if self.leader is not None:
            self.leader.stop()  # last: the standby must not act before this one stopped
        if self.metrics_server is not None:
            self.metrics_server.shutdown()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
