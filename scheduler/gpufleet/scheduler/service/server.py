"""The controller's gRPC server: a thin servicer over the ingest domain, plus standard
health checking and reflection.

grpc.aio: one event loop holds every agent stream, so 10,000 idle-most-of-the-time streams
cost no threads. The servicer validates, calls the domain, maps domain errors to status
codes; nothing else.

One module (~530 lines): the `Connect` servicer and the Controller that builds and wires
every part (metrics, actions, recovery, repair, policy, ingest) in one visible order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import grpc
from google.protobuf.message import DecodeError
from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.rpc.v1 import fleet_pb2_grpc as pb_grpc
from gpufleet.scheduler.access import audit
from gpufleet.scheduler.access.tls import ServerTls, peer_node_names
from gpufleet.scheduler.health.actions import ActionQueue
from gpufleet.scheduler.health.follow import ChangeFollower
from gpufleet.scheduler.health.policy import HealthPolicy, PolicyConfig
from gpufleet.scheduler.observability.alerting import AlertSender
from gpufleet.scheduler.observability.metrics import (
    ControllerMetrics,
    MetricsHttpServer,
    start_metrics_http,
)
from gpufleet.scheduler.placement.sources import apply_store
from gpufleet.scheduler.placement.switch_hold import DEFAULT_GRACE_S, SwitchHolds
from gpufleet.scheduler.recovery.manager import RecoveryConfig, RecoveryManager
from gpufleet.scheduler.repair import Journal, RepairConfig, RepairManager
from gpufleet.scheduler.repair.engine import Rebooter
from gpufleet.scheduler.service import limits
from gpufleet.scheduler.service.command_relay import CommandRelay, RelayedCommands
from gpufleet.scheduler.service.ingest import IngestError, Ingestor, unsequenced
from gpufleet.scheduler.service.leader import LeaderLock
from gpufleet.scheduler.service.repair_link import AgentCommands, Escalator, result_from_wire
from gpufleet.scheduler.service.user_service import (
    DEFAULT_ADMIN_GROUP,
    Authenticator,
    FleetUserServicer,
    ViewSource,
)
from gpufleet.scheduler.slurm import (
    CliSlurmClient,
    SlurmClient,
    SlurmJobClient,
    SlurmQueueClient,
)
from gpufleet.scheduler.store import StateStore, StoreError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# gRPC core queues a call that arrived before the Python server asked for the next one, and
# CANCELS it once that queue holds more than 1,000 (soft) / 3,000 (hard) calls. When thousands
# of agents (re)connect at once (a controller restart, a standby taking over) the event loop
# accepts calls slower than they come: with the defaults ~1,800-2,400 streams came up and the
# rest were cancelled over and over (docs/scaling.md). Room for every agent of a cluster.
MAX_PENDING_CALLS = 65_536
# ... and cancels a call left waiting there over 30 s: 10,000 agents connecting at once take
# longer than that to be taken in (each hello is a store write), so the last ones were
# cancelled and had to reconnect
MAX_UNREQUESTED_S = 600
# one socket per agent, plus the store, Slurm and metrics: far over the usual soft 1024
WANTED_NOFILE = 65_536


def raise_fd_limit(wanted: int = WANTED_NOFILE) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE towards `wanted` (at most the hard limit);
    return (soft, hard) after. Each agent stream holds one socket."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, e)
    if soft != resource.RLIM_INFINITY and soft < 16_384:
        log.warning("open-file limit %d: this controller can hold at most ~%d agent streams "
                    "(raise LimitNOFILE in its systemd unit)", soft, max(0, soft - 256))
    return soft, hard


# The collector's youngest-generation threshold in the controller process (CPython's is 700).
# With 10,000 streams alive (~70 tracked objects each) every object that happens to be alive
# when a young collection runs (reports in flight, futures, the touch batch) is promoted, and
# once promotions reach a quarter of the old generation a FULL collection walks all ~750,000
# objects: ~0.3-0.5 s of the event loop's time each (docs/scaling.md). Collecting the young
# generation 70x less often lets those objects die first; a young pass over ~50,000 objects
# is a few ms.
GC_GEN0_THRESHOLD = 50_000


def tune_gc(gen0_threshold: int = GC_GEN0_THRESHOLD) -> None:
    """For the controller PROCESS, once it has started: collect the young generation less
    often. Process-wide, so the process entry calls it, not Controller (tests build many
    controllers in one process). No `gc.freeze()`: frozen right after start, a controller
    restarted under reconnecting agents (tests/faults/test_kill.py) lost Xid events: objects
    of streams already open then are never collected, finalised or closed (cause not
    pinned down)."""
    import gc

    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)


# sent as initial metadata once a stream's hello is taken (the agent's client.py: same key)
STREAM_ACCEPTED_KEY = "gpufleet-stream"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FleetController"].full_name
USER_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FleetUser"].full_name


class FleetServicer(pb_grpc.FleetControllerServicer):
    """`active` says whether this controller may serve agents now (a standby that does not
    ingest answers UNAVAILABLE, so agents move on to the active one)."""

    def __init__(self, ingest: Ingestor, metrics: ControllerMetrics | None = None,
                 active: Callable[[], bool] = lambda: True,
                 store_state: Callable[[bool], None] = lambda ok: None,
                 commands: AgentCommands | None = None) -> None:
        self.ingest = ingest
        self.commands = commands  # repair commands waiting for each node's stream
        self.metrics = metrics
        # hellos (a full inventory's limits, a store transaction each) run here, one at a
        # time, so a connect storm of thousands does not hold up the connected agents'
        # heartbeats on the event loop (docs/scaling.md)
        self._hellos = ThreadPoolExecutor(1, thread_name_prefix="hello")
        self.active = active
        # told after each write ingest tried: False on a StoreError, True when one succeeded
        self.store_state = store_state
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

    # the generated stub types a streaming reply as a returned iterator; grpc.aio also takes
    # a coroutine that writes with context.write, which this one does (commands at any time)
    async def Connect(  # type: ignore[override]  # noqa: PLR0912, PLR0915 - one stream's life (hello, reports, refusals) reads best in one place
        self, request_iterator: AsyncIterator[pb.AgentMessage], context: grpc.aio.ServicerContext
    ) -> None:
        # A report that fails validation is acked with a reason (Ack.rejected) and its seq
        # consumed: the stream goes on and the agent does not resend it. What makes the
        # stream itself untrustworthy still ends it: a bad hello, a second hello, a change
        # of agent_instance, a report naming another node. An unsequenced heartbeat (seq 0,
        # fleet.proto Heartbeat) is never acked.
        #
        # Writes go through context.write, from this reader and from the command pump (a
        # repair command goes out the moment it is queued, not after the node's next ack:
        # a node that only heartbeats gets none); one write at a time on a call.
        node = None
        instance = ""
        writing = asyncio.Lock()
        wake_up = asyncio.Event()
        wake_up.set()  # commands queued before this stream: send them once it is up
        loop = asyncio.get_running_loop()
        pump: asyncio.Task[None] | None = None

        def wake() -> None:  # AgentCommands.send, from the repair loop's thread
            loop.call_soon_threadsafe(wake_up.set)

        async def write(reply: pb.ControllerMessage) -> None:
            async with writing:
                await context.write(reply)

        async def send_commands(node: str, commands: AgentCommands) -> None:
            try:
                while True:
                    await wake_up.wait()
                    wake_up.clear()
                    for cmd in commands.take(node):
                        await write(pb.ControllerMessage(command=cmd))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the call ended under the write (gRPC raises several kinds); the reader ends the stream
                log.info("command to %s not sent: the stream ended (%s)", node, e)

        if not self.active():
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "standby controller: another controller is active")
        # None: plaintext (the controller runs --insecure); else the names the CA vouched for
        cert_names = peer_node_names(context.auth_context())
        self.streams += 1

        def stream_violation(msg: pb.AgentMessage, node: str) -> IngestError | None:
            body = msg.WhichOneof("body")
            claimed = (msg.usage.node if body == "usage" else
                       msg.checkpoint.node if body == "checkpoint" else "")
            if body == "hello":
                return IngestError("hello sent twice on one stream")
            if msg.agent_instance != instance:
                return IngestError("agent_instance changed within a stream")
            if claimed and claimed != node:
                return IngestError(f"report for node {claimed[:64]!r} on the stream of {node!r}")
            return None

        def reject(msg: pb.AgentMessage, node: str, error: ValueError) -> pb.Ack:
            reason = str(error)[:512]
            body = msg.WhichOneof("body") or "none"
            seq = self.ingest.reject(node, msg, reason)
            log.warning("rejected report %d (%s) from %s (%s): %s", msg.seq, body, node,
                        context.peer(), reason)
            audit.record(actor=node, action="agent_report", target=node, source=context.peer(),
                         result="rejected", seq=msg.seq, kind=body, reason=reason)
            return pb.Ack(seq=seq, rejected=[pb.Rejected(seq=msg.seq, reason=reason)])

        try:
            async for msg in request_iterator:
                try:
                    if node is None:
                        await loop.run_in_executor(self._hellos, limits.check, msg)
                        await self._check_claim(context, msg, cert_names)
                        node = await loop.run_in_executor(self._hellos, self.ingest.hello, msg)
                        self.store_state(True)
                        instance = msg.agent_instance
                        # the agent sees its stream is up by these headers: heartbeats are
                        # not acked, so it may get no message for a long time
                        await context.send_initial_metadata(((STREAM_ACCEPTED_KEY, "1"),))
                        if self.commands is not None:
                            self.commands.connected(node, True, wake)
                            pump = asyncio.create_task(send_commands(node, self.commands))
                        if self.metrics is not None:
                            self.metrics.agent_connected()
                        continue
                    violation = stream_violation(msg, node)
                    if violation is not None:
                        raise violation
                    ack: pb.Ack | None
                    try:
                        limits.check(msg)
                        seq = self.ingest.handle(node, msg)
                        ack = None if unsequenced(msg) else pb.Ack(seq=seq)
                        if msg.WhichOneof("body") != "sample" or msg.sample.verdicts:
                            self.store_state(True)  # a plain sample may not have written
                    except (IngestError, limits.LimitError) as e:
                        ack = None if unsequenced(msg) else reject(msg, node, e)
                    except (ArithmeticError, TypeError, ValueError) as e:
                        # a check missed it and the store refused a value (OverflowError): a
                        # bug, logged as one, but the report is refused, not the node's queue
                        log.exception("report %d from %s failed a check it should have "
                                      "passed or failed earlier", msg.seq, node)
                        ack = None if unsequenced(msg) else reject(
                            msg, node, ValueError(f"unstorable report: {e}"))
                except (IngestError, limits.LimitError) as e:
                    if self.metrics is not None:
                        self.metrics.ingest_error("invalid")
                    log.warning("invalid report from %s (%s): %s", node, context.peer(), e)
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
                except StoreError as e:
                    if self.metrics is not None:
                        self.metrics.ingest_error("store")
                    log.error("store failed on a report from %s: %s", node, e)
                    self.store_state(False)
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "controller store failed")
                if ack is not None:
                    await write(pb.ControllerMessage(ack=ack))
        except DecodeError as e:
            # bytes that are no AgentMessage (a port scanner, another protocol, corruption):
            # nothing of the stream can be trusted; one line, not a traceback
            if self.metrics is not None:
                self.metrics.ingest_error("invalid")
            log.warning("undecodable message from %s (%s): %s", node or "a new stream",
                        context.peer(), e)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"not a gpufleet.v1.AgentMessage: {e}")
        finally:
            self.streams -= 1
            if pump is not None:
                pump.cancel()
            if node is not None and self.commands is not None:
                self.commands.connected(node, False, wake)
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
    serves none (the metrics are still kept, in `self.metrics`). `policy`: the health
    policy's settings, PolicyConfig()'s defaults when None. `alerts`: the controller's own
    alerts (node fatal, node silent) and the repair loop's escalations go out through it.

    `tls`: serve mTLS and bind each stream to the node in its client certificate; None
    serves plaintext (the CLI allows that only with --insecure). `elect`: take the leader
    lock before acting (standby until then); None elects when the store is PostgreSQL,
    the only store two controllers can share. `standby_ingests`: while not the leader,
    still take agents' streams and store their reports (several ingest processes on one
    PostgreSQL store, docs/scaling.md); health changes go to the leader through the store
    (health/follow.py), which alone acts in Slurm. False: a standby refuses agents.
    `follow_poll_s`: how often the leader reads those changes.
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
        munge_socket: str | None = None,
        admin_group: str | None = DEFAULT_ADMIN_GROUP,
        user_view_source: ViewSource | None = None,
        repair: RepairConfig | None = None,
        repair_journal: str | None = None,
        rebooter: Rebooter | None = None,
        partition_of: Callable[[str], str] | None = None,
        alerts: AlertSender | None = None,
        standby_ingests: bool = False,
        follow_poll_s: float = 0.05,
        switch_holds_slurm: CliSlurmClient | None = None,
        switch_hold_grace_s: float = DEFAULT_GRACE_S,
    ) -> None:
        self.store = store
        self._health: health.aio.HealthServicer | None = None
        self._health_lock = asyncio.Lock()  # one health update at a time, latest state wins
        self._store_ok = True  # the last write ingest tried succeeded (see _store_state)
        self._health_task: asyncio.Future[None] | None = None
        self.tls = tls
        dsn = getattr(store, "dsn", None)
        if elect is None:
            elect = isinstance(dsn, str) and dsn.startswith(("postgresql://", "postgres://"))
        self.leader = LeaderLock(dsn) if elect and isinstance(dsn, str) else None
        self._active = threading.Event()
        self.standby_ingests = standby_ingests and self.leader is not None
        # FleetUser (people: acct, jobs, placement, drain/resume): identity from MUNGE only,
        # also when the agents' port is plaintext (--insecure)
        self.user_servicer = FleetUserServicer(
            store, slurm, Authenticator(munge_socket, admin_group),
            active=self._active.is_set, view_source=user_view_source)
        # one PolicyConfig says what a degrade is to both the queue and the policy
        policy = policy if policy is not None else PolicyConfig()
        self.metrics = metrics if metrics is not None else ControllerMetrics(
            # late-bound: the queue below is built with these metrics
            nodes_by_health=self.nodes_by_health,
            queue_depth=lambda: self.actions.depth(),  # noqa: PLW0108 - self.actions not set yet
        )
        self.actions = ActionQueue(store, slurm, shadow=shadow,
                                   degraded_weight=policy.degraded_weight,
                                   degraded_feature=policy.degraded_feature,
                                   metrics=self.metrics)
        # job recovery (signal, requeue, resume) hangs off the policy's fatal transition and
        # needs a Slurm client with the job calls (cli, rest and pyslurm all have them)
        self.recovery: RecoveryManager | None = None
        if recovery is not None:
            if slurm is not None and not isinstance(slurm, SlurmJobClient):
                raise ValueError(f"job recovery needs a Slurm client that can requeue jobs, "
                                 f"not {type(slurm).__name__}")
            self.recovery = RecoveryManager(store, slurm, recovery, shadow=self.actions.shadow,
                                            metrics=self.metrics)
        self.alerts = alerts
        # the repair loop (remediate, diagnose, resume or escalate) hangs off the policy's
        # drains and needs Slurm; None: off
        self.commands: AgentCommands | None = None
        self.repair: RepairManager | None = None
        # on a shared store: commands to agents on other processes, answers from them
        self.relay: CommandRelay | None = None
        if repair is not None:
            self.commands, self.repair, self.relay = self._make_repair(
                slurm, repair, repair_journal, rebooter, partition_of)
        self.policy = HealthPolicy(store, self.actions, policy, recovery=self.recovery,
                                   repair=self.repair, alerts=alerts)
        on_result = None
        if self.repair is not None:
            repair_loop = self.repair
            on_result = lambda node, r: repair_loop.on_result(result_from_wire(node, r))  # noqa: E731 - one line of glue
            if self.relay is not None:
                on_result = self.relay.on_result
        # checkpoint registrations' MUNGE credentials are checked with the same munged
        self.ingest = Ingestor(store, self.policy, self.metrics, munge_socket=munge_socket,
                               on_command_result=on_result, acting=self._active.is_set)
        # the leader acts on what other ingest processes stored (only a shared store has any)
        self.follower = (ChangeFollower(store, self.policy, follow_poll_s)
                         if self.leader is not None else None)
        # the sbatch filter's one-leaf waits, dropped once they would cost a job more than
        # switch_hold_grace_s (placement/switch_hold.py); judged as Place judges
        self.switch_holds = (self._make_switch_holds(switch_holds_slurm, switch_hold_grace_s)
                             if switch_holds_slurm is not None else None)
        self.user_servicer.switch_holds = self.switch_holds is not None
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

    def _make_repair(self, slurm: SlurmClient | None, cfg: RepairConfig,
                     journal: str | None, rebooter: Rebooter | None,
                     partition_of: Callable[[str], str] | None
                     ) -> tuple[AgentCommands, RepairManager, CommandRelay | None]:
        from gpufleet.scheduler.repair.metrics import RepairCollector
        from gpufleet.scheduler.slurm.repair_calls import CliPartitions, CliRebooter

        if slurm is None:
            raise ValueError("the repair loop needs a Slurm client")
        if not journal:
            raise ValueError("the repair loop needs a journal path (repair_journal=)")
        queue = slurm if isinstance(slurm, SlurmQueueClient) else None
        if cfg.routine_every_s > 0 and queue is None:
            raise ValueError(f"routine diagnostics need a Slurm client that lists nodes and "
                             f"pending jobs (cli or rest), not {type(slurm).__name__}")
        commands = AgentCommands(self.store)
        # a store other processes share (the leader lock): an agent's stream may be on any
        link = RelayedCommands(commands, self.store) if self.leader is not None else None
        repair = RepairManager(
            slurm, Journal(journal), replace(cfg, shadow=cfg.shadow or self.actions.shadow),
            link if link is not None else commands,
            rebooter if rebooter is not None else CliRebooter(),
            Escalator(self.alerts),
            partition_of if partition_of is not None else CliPartitions(), queue=queue)
        self.metrics.registry.register(RepairCollector(repair))
        relay = (CommandRelay(link, self.store, repair.on_result, self._active.is_set)
                 if link is not None else None)
        return commands, repair, relay

    async def _serve(self) -> None:
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
            ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
            ("grpc.server_max_unrequested_time_in_server", MAX_UNREQUESTED_S),
        ])
        pb_grpc.add_FleetControllerServicer_to_server(
            FleetServicer(self.ingest, self.metrics, active=self._serves_agents,
                          store_state=self._store_state,
                          commands=self.commands), server)
        pb_grpc.add_FleetUserServicer_to_server(self.user_servicer, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, USER_SERVICE_NAME,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
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
        # NOT_SERVING while standby: load balancers and agents' health checks pick the
        # active one. _become_active / _step_down update it from the leader thread.
        self._health = health_servicer
        await self._publish_health()
        self._server = server
        self._stopping = asyncio.Event()
        self._ready.set()
        flusher = asyncio.ensure_future(self._flush_touches())
        await self._stopping.wait()
        flusher.cancel()
        await health_servicer.enter_graceful_shutdown()
        await server.stop(self._grace_s)

    async def _flush_touches(self) -> None:
        """Write batched last-seen times every touch interval also when no report comes to
        trigger it: heartbeats arrive in bursts (agents that connected together beat
        together), and a touch left waiting for the next burst made the store's last-seen
        time lag a whole heartbeat period: with unreachable_after_s under two periods, live
        nodes were marked unreachable (bench/ingest.py at 200 agents: 193 of them)."""
        while True:
            await asyncio.sleep(self.ingest.touch_interval_s)
            self.ingest.flush_in_background()

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

    def _serves_agents(self) -> bool:
        return self.standby_ingests or self._active.is_set()

    def _make_switch_holds(self, cli: CliSlurmClient, grace_s: float) -> SwitchHolds:
        users, store = self.user_servicer, self.store
        return SwitchHolds(
            cli.switch_requests, cli.pending_jobs,
            lambda: apply_store(users.view_source(), store, users.inventories),
            lambda job_id: cli.update_job(job_id, switches=0),
            grace_s=grace_s, shadow=self.actions.shadow,
            on_release=self.metrics.switch_hold_dropped)

    def _become_active(self) -> None:
        self.actions.start()
        self.policy.start()
        if self.follower is not None:
            self.follower.start()
        if self.alerts is not None:
            self.alerts.start()
        if self.repair is not None:
            self.repair.start()
        if self.switch_holds is not None:
            self.switch_holds.start()
        self._active.set()
        self._publish_health_soon()

    def _step_down(self) -> None:
        # the lock may already be someone else's: stop acting now, the service manager
        # restarts this process as a standby
        self._publish_health_soon(serving=False)
        threading.Thread(target=self.stop, name="step-down", daemon=True).start()

    async def _publish_health(self, serving: bool | None = None) -> None:
        """gRPC health = whether this controller serves: SERVING when active, NOT_SERVING
        as a standby (or stepping down). None: read the current state under the lock, so of
        two racing updates the later one wins."""
        if self._health is None:
            return
        async with self._health_lock:
            active = self._active.is_set() if serving is None else serving
            # a standby that ingests serves agents (FleetController), not people (FleetUser)
            agents = (active or (self.standby_ingests and serving is None)) and self._store_ok
            users = active and self._store_ok
            for name, on in (("", agents), (SERVICE_NAME, agents), (USER_SERVICE_NAME, users)):
                await self._health.set(name, health_pb2.HealthCheckResponse.SERVING if on
                                       else health_pb2.HealthCheckResponse.NOT_SERVING)

    def _store_state(self, ok: bool) -> None:
        """On the server's loop, after each write ingest tried: NOT_SERVING (and the
        store_up metric 0) from a failed one to the next that succeeds. Agents keep
        retrying (their reports wait in their outboxes), so the first write that succeeds
        after a full disk is freed turns it back."""
        if ok == self._store_ok:
            return
        self._store_ok = ok
        if ok:
            log.warning("state store takes writes again: serving")
        else:
            log.error("state store refuses writes: NOT_SERVING until one succeeds")
        if self.metrics is not None:
            self.metrics.store_up(ok)
        self._health_task = asyncio.ensure_future(self._publish_health())

    def _publish_health_soon(self, serving: bool | None = None) -> None:
        """From another thread (the leader lock's): update health on the server's loop."""
        loop = self._loop
        if loop is None or loop.is_closed() or self._health is None:
            return  # not serving yet: _serve publishes the state it finds
        # RuntimeError: the loop closed in between; nothing left to report to
        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(self._publish_health(serving), loop)

    def start(self, timeout_s: float = 10.0, elect_wait_s: float = 2.0) -> int:
        """Start in the background; return the port it listens on. With a leader lock,
        wait up to elect_wait_s to become active, else serve as standby until then."""
        raise_fd_limit()
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
        if self.relay is not None:
            self.relay.start()
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
            self.ingest.close()
        except StoreError as e:
            log.error("store failed writing the last report times at stop: %s", e)
        if self.relay is not None:
            self.relay.stop()
        if was_active:
            if self.follower is not None:
                self.follower.stop()
            self.policy.stop()
            if self.recovery is not None:
                self.recovery.stop()
            if self.repair is not None:
                self.repair.stop()
            if self.switch_holds is not None:
                self.switch_holds.stop()
            if self.alerts is not None:
                self.alerts.stop()
            self.actions.stop()
        if self.leader is not None:
            self.leader.stop()  # last: the standby must not act before this one stopped
        if self.metrics_server is not None:
            self.metrics_server.shutdown()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
