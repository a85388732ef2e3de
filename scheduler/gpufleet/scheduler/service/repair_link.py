"""The repair loop's doors to the agents' streams and to Alertmanager.

`AgentCommands` holds, per node, the commands waiting for that node's stream; `send` wakes
the node's stream (its `wake` callback, thread-safe: the repair loop runs in its own thread),
which takes and writes them at once: a node whose agent only heartbeats (never acked) gets
no other write to ride on. It converts between the
repair domain's types and the wire's, so the repair package never sees protobuf.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.scheduler.observability.alerting import Alert, AlertSender
from gpufleet.scheduler.repair.engine import AgentCommand, CommandResult
from gpufleet.scheduler.service.convert import inventory_from_blob
from gpufleet.scheduler.store import StateStore

log = logging.getLogger(__name__)

_KINDS = {"reset_gpu": pb.Command.KIND_RESET_GPU, "diag": pb.Command.KIND_RUN_DIAG}
_NAMES = {v: k for k, v in _KINDS.items()}


class AgentCommands:
    def __init__(self, store: StateStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._pending: dict[str, deque[pb.Command]] = {}
        self._streams: dict[str, int] = {}  # node -> open streams
        self._wakers: dict[str, list[Callable[[], None]]] = {}  # node -> its streams' wakes

    # the servicer's side
    def connected(self, node: str, up: bool, wake: Callable[[], None] | None = None) -> None:
        """A stream of `node` opened (up) or closed; `wake` (the same callable both times):
        called, from any thread, when a command for `node` is queued."""
        with self._lock:
            n = self._streams.get(node, 0) + (1 if up else -1)
            if n > 0:
                self._streams[node] = n
            else:
                self._streams.pop(node, None)
            if wake is not None:
                wakers = self._wakers.setdefault(node, [])
                if up:
                    wakers.append(wake)
                elif wake in wakers:
                    wakers.remove(wake)
                if not wakers:
                    self._wakers.pop(node, None)

    def take(self, node: str) -> list[pb.Command]:
        with self._lock:
            q = self._pending.pop(node, None)
        return list(q) if q else []

    # the repair loop's side (AgentLink)
    def has_stream(self, node: str) -> bool:
        with self._lock:
            return node in self._streams

    def send(self, cmd: AgentCommand) -> bool:
        with self._lock:
            if cmd.node not in self._streams:
                return False  # no stream now: the repair loop tries again next tick
            self._pending.setdefault(cmd.node, deque()).append(pb.Command(
                kind=_KINDS[cmd.kind], request_id=cmd.request_id, gpu_indices=cmd.gpus,
                diag_level=cmd.level))
            wakers = list(self._wakers.get(cmd.node, ()))
        for wake in wakers:  # outside the lock: a waker may take() at once
            wake()
        return True

    def boot_id(self, node: str) -> str | None:
        raw = self.store.inventory(node)
        return None if raw is None else inventory_from_blob(raw).boot_id

    def nodes(self) -> frozenset[str]:
        """The nodes with a stream on this process now (service/command_relay.py publishes
        them for the other ingest processes)."""
        with self._lock:
            return frozenset(self._streams)


def result_from_wire(node: str, r: pb.CommandResult) -> CommandResult:
    failed = [c for c in r.checks if not c.passed]
    evidence = "; ".join(c.evidence for c in failed) or r.detail
    return CommandResult(node, r.request_id, _NAMES.get(r.kind, "?"), r.ok, r.could_not_run,
                         r.detail, tuple(c.name for c in failed), evidence[:2000])


class Escalator:
    """Escalations to Alertmanager (and/or a webhook) through AlertSender; logged always."""

    def __init__(self, sender: AlertSender | None) -> None:
        self.sender = sender

    def __call__(self, node: str, name: str, summary: str, evidence: str) -> None:
        log.error("escalation %s %s: %s: %s", name, node, summary, evidence)
        if self.sender is not None:
            severity = "warning" if name == "GpufleetRepairAwaitsApproval" else "page"
            self.sender.fire(Alert(name, node, severity, summary, evidence))
