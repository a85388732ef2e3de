"""Ingest of agent reports: validate, store once, and hand health changes to the policy.

Idempotent: a report is identified by (agent instance, sequence number); one at or below the
node's last stored sequence is acknowledged again but not applied twice.

Cost matters (10,000 nodes at 1 Hz): the node's (instance, last sequence) is kept in memory
after its hello, and a plain sample (no verdict changed) changes nothing stored but the
node's last-seen time and sequence, so those are written in one batch every
`touch_interval_s` rather than one transaction per sample. Anything that changes state (a
verdict, an event) is written, with the sequence, before it is acknowledged. Losing the
batched touches in a crash is harmless: the agent never resends an acked report, and a
stored sequence that is a little behind only means replays of it would be applied again,
which for a plain sample changes nothing.

At steady state agents send a `heartbeat` (no verdict changed) every few seconds instead of
every sample: it is handled like a plain sample. The batch is written in ONE transaction per
flush on a worker thread (`touch_nodes`), so the event loop never waits for the store on a
sign of life; the store keeps time and sequence from moving back when a batch lands after
a report stored on its own.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.scheduler.accounting.ledger import UsageRow
from gpufleet.scheduler.health.policy import HealthPolicy
from gpufleet.scheduler.observability.metrics import ControllerMetrics
from gpufleet.scheduler.store import CheckpointRow, StateStore, VerdictRow, now_ms
from gpufleet.scheduler.store.values import Severity

log = logging.getLogger(__name__)

_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# a Slurm job id, or an array/het element: 1234, 1234_7, 1234+1
_JOB_ID = re.compile(r"^[0-9]{1,12}([_+][0-9]{1,9})?$")
SEVERITY_NAMES = {
    pb.SEVERITY_OK: Severity.OK,
    pb.SEVERITY_WARN: Severity.WARN,
    pb.SEVERITY_DEGRADED: Severity.DEGRADED,
    pb.SEVERITY_FATAL: Severity.FATAL,
}
MAX_GPUS_PER_NODE = 64
STORE_SEQ_MAX = 2**63 - 1  # nodes.last_seq: SQLite INTEGER, PostgreSQL BIGINT


class IngestError(ValueError):
    """A report is malformed; the stream is refused with this message."""


@dataclass
class Counters:
    reports: int = 0
    duplicates: int = 0
    events: int = 0


@dataclass
class _NodeSeq:
    """What ingest needs per node on every report, kept in memory after the hello."""

    instance: str
    last_seq: int
    seen_ms: int = 0
    dirty: bool = False  # last_seq / seen_ms not yet written to the store


def unsequenced(msg: pb.AgentMessage) -> bool:
    """A heartbeat sent without a sequence number (fleet.proto Heartbeat): never acked."""
    return msg.seq == 0 and msg.WhichOneof("body") == "heartbeat"


class Ingestor:
    """Applies agent reports. Not thread-safe: the gRPC event loop is its only caller, but
    for hello(), which the servicer runs on one worker thread (it only adds to `_nodes`;
    every pass over `_nodes` iterates a copy)."""

    def __init__(self, store: StateStore, policy: HealthPolicy,
                 metrics: ControllerMetrics | None = None, touch_interval_s: float = 1.0, *,
                 munge_socket: str | None = None,
                 on_command_result: Callable[[str, pb.CommandResult], None] | None = None,
                 acting: Callable[[], bool] = lambda: True,
                 ) -> None:
        """`policy` gets every change of a node's health while `acting()` (this process acts
        in Slurm: the leader); otherwise the change is queued in the store, with the
        verdict, for the leader (health/follow.py). `munge_socket`: the munged that checks
        checkpoint registrations' credentials (None: MUNGE's default socket);
        `on_command_result`: where agents' command results go (the repair loop's; None:
        they are dropped)."""
        self.store = store
        self.policy = policy
        self.acting = acting
        self.metrics = metrics
        self.munge_socket = munge_socket
        self.counters = Counters()
        self.touch_interval_s = touch_interval_s
        self._nodes: dict[str, _NodeSeq] = {}
        # the nodes whose batched touch is pending: a flush takes these, not a pass over all
        # 10,000 nodes every second (that pass, and the 10,000 tuples it made, were ~10 % of
        # the event loop's time at 10,000 nodes)
        self._dirty: set[str] = set()
        self.on_command_result = on_command_result
        self._next_flush = time.monotonic() + touch_interval_s
        # one worker: batches are written in order, and never two at once
        self._flusher: ThreadPoolExecutor | None = None
        self._flushing: Future[None] | None = None

    def hello(self, msg: pb.AgentMessage) -> str:
        if msg.WhichOneof("body") != "hello":
            raise IngestError("the first message on a stream must be hello")
        inv = msg.hello.inventory
        name = inv.node_name
        if not _NODE_NAME.match(name):
            raise IngestError(f"invalid node name {name!r} in hello")
        if not msg.agent_instance:
            raise IngestError("hello without agent_instance")
        if len(inv.gpus) > MAX_GPUS_PER_NODE:
            raise IngestError(f"{len(inv.gpus)} GPUs in hello: more than {MAX_GPUS_PER_NODE}")
        self.store.upsert_node(name, inv.hostname, len(inv.gpus), inv.SerializeToString(),
                               msg.agent_instance, now_ms())
        instance, last = self.store.last_seq(name)
        self._nodes[name] = _NodeSeq(instance, last)
        log.info("node %s connected (%d GPUs, %s)", name, len(inv.gpus), inv.nvml_backend)
        return name

    def handle(self, node: str, msg: pb.AgentMessage) -> int:  # noqa: PLR0912 - one flat branch per report kind reads best
        """Apply one report; return the sequence number to acknowledge (0 for an
        unsequenced heartbeat: nothing to acknowledge)."""
        body = msg.WhichOneof("body")
        state = self._nodes.get(node)
        if state is None:  # not through hello() (tests driving ingest directly)
            state = self._nodes[node] = _NodeSeq(*self.store.last_seq(node))
        if msg.agent_instance != state.instance:
            raise IngestError("agent_instance changed within a stream")
        # unsequenced (fleet.proto Heartbeat): a sign of life now, nothing to ack; the stored
        # sequence stays where it is
        sequenced = not unsequenced(msg)
        if sequenced and msg.seq <= state.last_seq:
            self.counters.duplicates += 1
            if self.metrics is not None:
                self.metrics.duplicate_report()
            return msg.seq
        # checked before anything is stored, so a report rejected here leaves nothing
        # half-applied (one good verdict stored, the next refused)
        if body == "sample":
            for v in msg.sample.verdicts:
                _severity(v.severity)
        elif body == "event" and msg.event.kind not in pb.EventKind.values():
            raise IngestError(f"event.kind={msg.event.kind}: unknown event kind")
        now = now_ms()
        if body == "heartbeat" or (body == "sample" and not msg.sample.verdicts):
            # nothing to store but the sequence and the time: batched (module docstring)
            if sequenced:
                state.last_seq = msg.seq
            state.seen_ms, state.dirty = now, True
            self._dirty.add(node)
            stamp = msg.heartbeat.timestamp_ms if body == "heartbeat" else msg.sample.timestamp_ms
            self._counted(body, stamp)
            if time.monotonic() >= self._next_flush:
                self.flush_in_background()
            return msg.seq
        if body == "sample":
            verdicts = msg.sample.verdicts
            for v in verdicts:
                self._verdict(node, v)
            self._counted("sample", msg.sample.timestamp_ms)
        elif body == "event":
            self._event(node, msg.event, now, (msg.agent_instance, msg.seq))
        elif body == "checkpoint":
            self._checkpoint(node, msg.checkpoint, now)
        elif body == "usage":
            self._usage(node, msg.usage)
        elif body == "command_result":
            if self.on_command_result is not None:  # the repair loop's commands
                self.on_command_result(node, msg.command_result)
        elif body == "hello":
            raise IngestError("hello sent twice on one stream")
        else:
            raise IngestError("report with no body")
        self.store.touch_node(node, state.instance, msg.seq, now)
        state.last_seq, state.seen_ms, state.dirty = msg.seq, now, False
        return msg.seq

    def reject(self, node: str, msg: pb.AgentMessage, reason: str) -> int:
        """A report that failed validation (`reason`): store nothing of it but consume its
        sequence number, durably like a stored report, so the agent's replay of it is a
        duplicate; return the sequence number to acknowledge (with the rejection).

        The caller has checked that the report belongs to this stream's agent instance.
        """
        state = self._nodes.get(node)
        if state is None:  # not through hello() (tests driving ingest directly)
            state = self._nodes[node] = _NodeSeq(*self.store.last_seq(node))
        if msg.agent_instance != state.instance:
            raise IngestError("agent_instance changed within a stream")
        if self.metrics is not None:
            self.metrics.report_rejected(msg.WhichOneof("body") or "none")
        if msg.seq <= state.last_seq:
            return msg.seq  # rejected before (or below what is stored): nothing to move
        if msg.seq > STORE_SEQ_MAX:
            # a sequence number the store cannot hold (a corrupt report): nothing to consume,
            # and acking up to it would drop every report queued behind it on the agent
            return state.last_seq
        # the sequence number moves, the last-seen time does not: a node whose every report
        # is refused (a clock days ahead, a broken agent) must still go unreachable
        seen = state.seen_ms
        if not seen:
            row = self.store.node(node)
            seen = row.last_seen_ms if row is not None else now_ms()
        self.store.touch_node(node, state.instance, msg.seq, seen)
        state.last_seq, state.seen_ms, state.dirty = msg.seq, seen, False
        log.debug("node %s: report %d consumed as rejected: %s", node, msg.seq, reason)
        return msg.seq

    def _event(self, node: str, ev: pb.HealthEvent, now: int, report: tuple[str, int]) -> None:
        v = ev.verdict
        stored = self.store.add_event(
            node, ev.timestamp_ms, pb.EventKind.Name(ev.kind), _severity(v.severity),
            v.reason_code, v.evidence, ev.gpu_index if ev.HasField("gpu_index") else None,
            ev.xid if ev.HasField("xid") else None, now, report=report,
        )
        if stored is None:
            # stored before a crash that lost the node's last sequence number: the verdict
            # below is idempotent, the event and its counters are not
            self.counters.duplicates += 1
            self._verdict(node, v)
            return
        self.counters.events += 1
        if self.metrics is not None and ev.kind == pb.EVENT_KIND_XID:
            self.metrics.xid_event(node)
        self._verdict(node, v)
        self._counted("event", ev.timestamp_ms)

    def _checkpoint(self, node: str, c: pb.CheckpointRegistered, now: int) -> None:
        if not _JOB_ID.match(c.job_id):
            raise IngestError(f"checkpoint with invalid job id {c.job_id!r}")
        if not c.path.startswith("/") or len(c.path) > 4096:
            raise IngestError(f"checkpoint of job {c.job_id} with a bad path {c.path[:80]!r}")
        # The job's own MUNGE credential (payload "<job_id>:<step>"): proves end to end which
        # uid registered it, not only what the agent says. Absent on nodes without munge:
        # still accepted (counted and logged), as before MUNGE. Runs unmunge on this thread:
        # registrations are one per job checkpoint, rare next to samples.
        import pwd  # local, like munge: edits to this file stay inside _checkpoint

        from gpufleet.scheduler.access import munge

        claimed_uid = c.uid if c.HasField("uid") else None
        if c.munge_credential:
            owner = next((u.user for u in self.store.usage_rows(c.job_id) if u.user), None)
            try:
                owner_uid = pwd.getpwnam(owner).pw_uid if owner else None
            except KeyError:
                owner_uid = None  # a user this host does not know: the uid check still holds
            try:
                cred = munge.verify_checkpoint(c.munge_credential, c.job_id, c.step,
                                               claimed_uid, owner_uid, self.munge_socket)
            except munge.MungeError as e:
                raise IngestError(
                    f"checkpoint of job {c.job_id} step {c.step} from {node}: {e}") from e
            if cred.stale:
                log.info("job %s checkpoint on %s: MUNGE credential %s (spooled), uid %d and "
                         "payload match", c.job_id, node, cred.stale, cred.uid)
        else:
            munge.count_absent_checkpoint_credential()
            log.info("job %s checkpoint on %s carries no MUNGE credential (munge not on the "
                     "node?): trusted on the agent's word, uid %s", c.job_id, node, claimed_uid)
        stored = self.store.record_checkpoint(CheckpointRow(
            c.job_id, node, c.step, c.path, c.time_ms, c.uid if c.HasField("uid") else None, now,
        ))
        log.info("job %s checkpoint step %d on %s%s", c.job_id, c.step, node,
                 "" if stored else " (not newer: kept the stored one)")

    def _usage(self, node: str, rep: pb.JobUsageReport) -> None:
        """Job accounting: cumulative rows, idempotent by themselves (store/acct.py), so a
        replay the sequence check lets through still counts once."""
        if rep.node and rep.node != node:
            raise IngestError(f"usage report for node {rep.node!r} on the stream of {node!r}")
        rows = []
        for u in rep.usage:
            if not _JOB_ID.match(u.job_id):
                raise IngestError(f"usage with invalid job id {u.job_id!r}")
            if u.gpu_index >= MAX_GPUS_PER_NODE:
                raise IngestError(f"usage of job {u.job_id} on GPU {u.gpu_index}: no such GPU")
            if u.as_of_ms < u.start_ms or (u.HasField("end_ms") and u.end_ms < u.start_ms):
                raise IngestError(f"usage of job {u.job_id}: as_of/end before start")
            rows.append(UsageRow(
                u.job_id, node, u.gpu_index, u.user, u.account, u.start_ms,
                u.end_ms if u.HasField("end_ms") else None, u.as_of_ms, u.allocated_ms,
                u.busy_ms, u.energy_mj, u.idle_since_ms if u.HasField("idle_since_ms") else None,
                u.run,  # unset (agents before runs): 0, the first run
                u.source if u.source in ("hook", "proc") else "",
            ))
        deltas = self.store.record_usage(rows)
        if self.metrics is not None:
            for d in deltas:
                self.metrics.acct.usage(d.account, d.allocated_ms, d.busy_ms, d.energy_mj)
            for r in rows:
                self.metrics.acct.gpu_state(r.job_id, node, r.gpu_index, r.user, r.account,
                                            r.idle_since_ms, r.end_ms is not None)
        self._counted("usage", 0)  # as_of may be an old end time: not a report lag

    def _counted(self, kind: str, agent_timestamp_ms: int) -> None:
        self.counters.reports += 1
        if self.metrics is not None:
            self.metrics.report_ingested(kind, agent_timestamp_ms)

    def _take_dirty(self) -> list[tuple[str, str, int, int]]:
        self._next_flush = time.monotonic() + self.touch_interval_s
        names, self._dirty = self._dirty, set()
        rows = []
        for name in names:
            state = self._nodes.get(name)
            if state is not None and state.dirty:
                state.dirty = False
                rows.append((name, state.instance, state.last_seq, state.seen_ms))
        return rows

    def flush(self) -> None:
        """Write the batched last-seen times and sequences now, in one transaction (at stop,
        in tests); waits for a batch still being written."""
        if self._flushing is not None:
            self._flushing.result()
        self.store.touch_nodes(self._take_dirty())

    def flush_in_background(self) -> None:
        """flush() on the worker thread (every touch_interval_s, from the event loop); a
        batch still being written (a slow store) defers this one to the next interval."""
        if self._flushing is not None and not self._flushing.done():
            self._next_flush = time.monotonic() + self.touch_interval_s
            return
        rows = self._take_dirty()
        if not rows:
            return
        if self._flusher is None:
            self._flusher = ThreadPoolExecutor(1, thread_name_prefix="ingest-flush")
        self._flushing = self._flusher.submit(self._write_batch, rows)

    def _write_batch(self, rows: list[tuple[str, str, int, int]]) -> None:
        try:
            self.store.touch_nodes(rows)
        except Exception as e:  # noqa: BLE001 - a worker thread: logged, retried by the next
            log.error("store failed writing %d nodes' last report times: %s", len(rows), e)
            for name, *_ in rows:  # written again with the next batch (or, should this add
                state = self._nodes.get(name)  # miss the swap in _take_dirty, the next report)
                if state is not None:
                    state.dirty = True
                    self._dirty.add(name)

    def close(self) -> None:
        """Write what is batched and stop the worker thread."""
        self.flush()
        if self._flusher is not None:
            self._flusher.shutdown(wait=True)
            self._flusher = None

    def disconnected(self, node: str) -> None:
        """A node's stream ended: write what it left in memory (kept: a reconnecting agent's
        next hello replaces it)."""
        state = self._nodes.get(node)
        if state is not None and state.dirty:
            state.dirty = False
            self.store.touch_node(node, state.instance, state.last_seq, state.seen_ms)

    def last_seen_ms(self, node: str) -> int | None:
        """The node's last report time as ingest knows it (the store may lag by
        touch_interval_s); None for a node without a report since its hello."""
        state = self._nodes.get(node)
        return state.seen_ms if state is not None and state.seen_ms else None

    def _verdict(self, node: str, v: pb.Verdict) -> None:
        severity = _severity(v.severity)
        # read once: a process that becomes the leader right after this queued the change,
        # and reads it back from the queue as the leader
        acting = self.acting()
        before, after = self.store.set_verdict(
            VerdictRow(node, v.check, v.gpu_index if v.HasField("gpu_index") else None,
                       v.subject, severity, v.reason_code, v.evidence, v.since_ms),
            publish=not acting,
        )
        if acting:
            self.policy.on_health_change(node, before, after, v.reason_code, v.evidence,
                                         v.since_ms)


def _severity(value: int) -> Severity:
    try:
        return SEVERITY_NAMES[value]  # type: ignore[index]
    except KeyError as e:
        raise IngestError(f"unknown severity {value}") from e
