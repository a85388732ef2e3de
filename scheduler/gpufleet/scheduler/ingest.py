"""Ingest of agent reports: validate, store once, and hand health changes to the policy.

Idempotent: a report is identified by (agent instance, sequence number); one at or below the
node's last stored sequence is acknowledged again but not applied twice.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.scheduler.actions import REASON_PREFIX, ActionQueue
from gpufleet.scheduler.store import SqliteStore, VerdictRow, now_ms

log = logging.getLogger(__name__)

_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SEVERITY_NAMES = {
    pb.SEVERITY_OK: "ok",
    pb.SEVERITY_WARN: "warn",
    pb.SEVERITY_DEGRADED: "degraded",
    pb.SEVERITY_FATAL: "fatal",
}
MAX_GPUS_PER_NODE = 64


class IngestError(ValueError):
    """A report is malformed; the stream is refused with this message."""


@dataclass
class Counters:
    reports: int = 0
    duplicates: int = 0
    events: int = 0


class Ingestor:
    def __init__(self, store: SqliteStore, actions: ActionQueue) -> None:
        self.store = store
        self.actions = actions
        self.counters = Counters()

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
        log.info("node %s connected (%d GPUs, %s)", name, len(inv.gpus), inv.nvml_backend)
        return name

    def handle(self, node: str, msg: pb.AgentMessage) -> int:
        """Apply one report; return the sequence number to acknowledge."""
        body = msg.WhichOneof("body")
        instance, last = self.store.last_seq(node)
        if msg.agent_instance != instance:
            raise IngestError("agent_instance changed within a stream")
        if msg.seq <= last:
            self.counters.duplicates += 1
            return msg.seq
        now = now_ms()
        if body == "sample":
            for v in msg.sample.verdicts:
                self._verdict(node, v)
        elif body == "event":
            ev = msg.event
            v = ev.verdict
            self.store.add_event(
                node, ev.timestamp_ms, pb.EventKind.Name(ev.kind), _severity(v.severity),
                v.reason_code, v.evidence, ev.gpu_index if ev.HasField("gpu_index") else None,
                ev.xid if ev.HasField("xid") else None, now,
            )
            self.counters.events += 1
            self._verdict(node, v)
        elif body == "hello":
            raise IngestError("hello sent twice on one stream")
        else:
            raise IngestError("report with no body")
        self.store.touch_node(node, instance, msg.seq, now)
        self.counters.reports += 1
        return msg.seq

    def _verdict(self, node: str, v: pb.Verdict) -> None:
        severity = _severity(v.severity)
        before, _after = self.store.set_verdict(
            VerdictRow(node, v.check, v.gpu_index if v.HasField("gpu_index") else None,
                       v.subject, severity, v.reason_code, v.evidence, v.since_ms)
        )
        # act on the transition into fatal: the first fatal verdict names the cause; later
        # ones (the GPU-lost check after an Xid 79) add evidence, not another drain
        if severity == "fatal" and before != "fatal":
            reason = f"{REASON_PREFIX}{v.reason_code} {v.evidence}"
            if self.actions.submit(node, "drain", reason, v.since_ms) is not None:
                log.warning("node %s fatal: %s -> drain", node, v.evidence)


def _severity(value: int) -> str:
    try:
        return SEVERITY_NAMES[value]  # type: ignore[index]
    except KeyError as e:
        raise IngestError(f"unknown severity {value}") from e
