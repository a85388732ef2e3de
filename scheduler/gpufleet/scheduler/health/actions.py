"""Slurm actions run off the ingest path: queued, retried with backoff, every step recorded.

Ingest only enqueues; a worker thread calls Slurm. A slurmctld that is down or slow delays
the action, never the agents' streams. Shadow mode records what would be done and does
nothing.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpufleet.scheduler.access import audit
from gpufleet.scheduler.slurm import SlurmClient, SlurmError, SlurmNode
from gpufleet.scheduler.store import PolicyRow, StateStore, now_ms

if TYPE_CHECKING:
    from gpufleet.scheduler.observability.metrics import ControllerMetrics

log = logging.getLogger(__name__)

REASON_PREFIX = "gpufleet:"


@dataclass(frozen=True)
class Action:
    id: int
    node: str
    kind: str  # "drain" | "resume" | "degrade" | "restore" | "reassert"
    reason: str
    fault_ms: int | None


class ActionQueue:
    def __init__(
        self,
        store: StateStore,
        slurm: SlurmClient | None,
        shadow: bool = False,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 30.0,
    ) -> None:
        self.store = store
        self.slurm = slurm
        self.shadow = shadow or slurm is None
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self._q: queue.Queue[Action] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slurm-actions", daemon=True)
        self._inflight: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self.fault_to_action_ms: list[int] = []
        self.metrics: ControllerMetrics | None = None  # set by the controller when it has one
        # what "degrade" does (set by the health policy from its config)
        self.degraded_weight: int | None = 1000
        self.degraded_feature = "gf_degraded"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)

    def depth(self) -> int:
        return self._q.qsize()

    def submit(self, node: str, kind: str, reason: str, fault_ms: int | None,
               actor: str = "policy") -> int | None:
        """Queue an action unless the same one is already queued; returns its id."""
        with self._lock:
            if (node, kind) in self._inflight:
                return None
            self._inflight.add((node, kind))
        status = "shadow" if self.shadow else "queued"
        action_id = self.store.add_action(node, kind, reason, actor, status, fault_ms, now_ms())
        if self.shadow:
            audit.record(actor, kind, node, "controller", "shadow", reason=reason,
                         action_id=action_id)
            if self.metrics is not None:
                self.metrics.action_finished(kind, "shadow", None)
            log.warning("shadow mode: would %s %s (%s)", kind, node, reason)
            with self._lock:
                self._inflight.discard((node, kind))
            return action_id
        self._q.put(Action(action_id, node, kind, reason, fault_ms))
        return action_id

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                action = self._q.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._execute(action)
            finally:
                with self._lock:
                    self._inflight.discard((action.node, action.kind))

    def _execute(self, a: Action) -> None:
        assert self.slurm is not None  # noqa: S101 - shadow mode never queues
        delay = self.retry_initial_s
        attempts = 0
        while not self._stop.is_set():
            attempts += 1
            try:
                status, detail = self._apply(a)
            except SlurmError as e:
                if not e.transient:
                    self.store.update_action(a.id, "failed", str(e), attempts, now_ms())
                    audit.record("policy", a.kind, a.node, "controller", "failed",
                                 reason=a.reason, error=str(e), action_id=a.id)
                    if self.metrics is not None:
                        self.metrics.action_finished(a.kind, "failed", None)
                    log.error("%s %s failed: %s", a.kind, a.node, e)
                    return
                if attempts == 1:
                    log.warning("%s %s: Slurm not answering (%s); retrying", a.kind, a.node, e)
                self.store.update_action(a.id, "queued", f"retrying: {e}", attempts, None)
                self._stop.wait(delay)
                delay = min(delay * 2, self.retry_max_s)
                continue
            done = now_ms()
            self.store.update_action(a.id, status, detail, attempts, done)
            audit.record("policy", a.kind, a.node, "controller", status, reason=a.reason,
                         detail=detail, action_id=a.id)
            if self.metrics is not None:
                self.metrics.action_finished(
                    a.kind, status, (done - a.fault_ms) / 1000 if a.fault_ms is not None else None
                )
            if status == "done" and a.fault_ms is not None:
                self.fault_to_action_ms.append(done - a.fault_ms)
            log.warning("%s %s: %s %s", a.kind, a.node, status, detail)
            return

    def _apply(self, a: Action) -> tuple[str, str]:
        """Do one action in Slurm; returns (status, detail) for the record."""
        assert self.slurm is not None  # noqa: S101
        apply = {
            "drain": self._drain, "resume": self._resume,
            "degrade": self._degrade, "restore": self._restore, "reassert": self._reassert,
        }.get(a.kind)
        if apply is None:
            raise SlurmError(f"unknown action {a.kind!r}", transient=False)
        return apply(a, self.slurm, self.slurm.node(a.node))

    def _drain(self, a: Action, slurm: SlurmClient, node: SlurmNode) -> tuple[str, str]:
        if node.drained and not node.reason.startswith(REASON_PREFIX):
            # An admin (or NHC) drained it first: keep their reason, it says more to them.
            return "skipped", f"already drained by someone else: {node.reason!r}"
        if node.drained:
            # the same fault reported again (a restarted agent): keep the first reason
            return "skipped", f"already drained by gpufleet: {node.reason!r}"
        slurm.drain(a.node, a.reason)
        return "done", f"was {node.state}"

    def _resume(self, a: Action, slurm: SlurmClient, node: SlurmNode) -> tuple[str, str]:
        if not node.drained:
            return "skipped", f"not drained ({node.state})"
        if not node.reason.startswith(REASON_PREFIX):
            # Never resume a node gpufleet did not drain.
            return "skipped", f"drained by someone else: {node.reason!r}"
        slurm.resume(a.node)
        return "done", f"was {node.state}"

    def _degrade(self, a: Action, slurm: SlurmClient, node: SlurmNode) -> tuple[str, str]:
        if self.store.policy_state(a.node) is not None:
            return "skipped", "already degraded by gpufleet"
        feature = self.degraded_feature
        add_feature = bool(feature) and feature not in node.features
        # remember first, change second: a crash in between leaves a note, not a mystery
        self.store.set_policy_state(PolicyRow(
            a.node, node.weight if self.degraded_weight is not None else None,
            feature if add_feature else "", now_ms(),
        ))
        done = []
        if self.degraded_weight is not None and node.weight != self.degraded_weight:
            slurm.set_weight(a.node, self.degraded_weight)
            done.append(f"weight {node.weight} -> {self.degraded_weight}")
        if add_feature:
            slurm.set_features(a.node, (*node.features, feature))
            done.append(f"feature +{feature}")
        return "done", ", ".join(done) or "nothing to change"

    def degraded_but_lost(self, node: SlurmNode) -> bool:
        """gpufleet holds `node` degraded but Slurm no longer shows its weight or feature
        (slurmctld drops weights and features set by scontrol when it restarts)."""
        row = self.store.policy_state(node.name)
        if row is None:
            return False
        weight_lost = row.original_weight is not None and self.degraded_weight is not None \
            and node.weight != self.degraded_weight
        feature_lost = bool(row.feature_added) and row.feature_added not in node.features
        return weight_lost or feature_lost

    def _reassert(self, a: Action, slurm: SlurmClient, node: SlurmNode) -> tuple[str, str]:
        """Put back a degraded node's weight/feature that Slurm lost; the original weight
        remembered at degrade time stays the one a restore puts back."""
        row = self.store.policy_state(a.node)
        if row is None:
            return "skipped", "not degraded any more"
        done = []
        if row.original_weight is not None and self.degraded_weight is not None \
                and node.weight != self.degraded_weight:
            slurm.set_weight(a.node, self.degraded_weight)
            done.append(f"weight {node.weight} -> {self.degraded_weight}")
        if row.feature_added and row.feature_added not in node.features:
            slurm.set_features(a.node, (*node.features, row.feature_added))
            done.append(f"feature +{row.feature_added}")
        return ("done", ", ".join(done)) if done else ("skipped", "still in place")

    def _restore(self, a: Action, slurm: SlurmClient, node: SlurmNode) -> tuple[str, str]:
        row = self.store.policy_state(a.node)
        if row is None:
            return "skipped", "nothing to restore"
        done = []
        if row.original_weight is not None and node.weight != row.original_weight:
            slurm.set_weight(a.node, row.original_weight)
            done.append(f"weight {node.weight} -> {row.original_weight}")
        if row.feature_added and row.feature_added in node.features:
            slurm.set_features(a.node, tuple(f for f in node.features if f != row.feature_added))
            done.append(f"feature -{row.feature_added}")
        self.store.clear_policy_state(a.node)
        return "done", ", ".join(done) or "nothing to change"

    def wait_idle(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._inflight and self._q.empty():
                    return True
            time.sleep(0.02)
        return False
