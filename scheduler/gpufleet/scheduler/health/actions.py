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
from gpufleet.scheduler.store.values import ActionKind, ActionStatus

if TYPE_CHECKING:
    from gpufleet.scheduler.observability.metrics import ControllerMetrics

log = logging.getLogger(__name__)

REASON_PREFIX = "gpufleet:"


@dataclass(frozen=True)
class Action:
    id: int
    node: str
    kind: ActionKind
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
        *,
        degraded_weight: int | None = 1000,
        degraded_feature: str = "gf_degraded",
        metrics: ControllerMetrics | None = None,
    ) -> None:
        """`degraded_weight`/`degraded_feature`: what a "degrade" sets (the policy's
        PolicyConfig holds the operator's choice; the controller passes it here).
        `metrics`: finished actions are observed there when given."""
        self.store = store
        self.slurm = slurm
        self.shadow = shadow or slurm is None
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self._q: queue.Queue[Action] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slurm-actions", daemon=True)
        self._inflight: set[tuple[str, ActionKind]] = set()
        self._lock = threading.Lock()
        self.metrics = metrics
        self.degraded_weight = degraded_weight
        self.degraded_feature = degraded_feature

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)

    def depth(self) -> int:
        return self._q.qsize()

    def submit(self, node: str, kind: ActionKind, reason: str, fault_ms: int | None,
               actor: str = "policy") -> int | None:
        """Queue an action unless the same one is already queued; returns its id."""
        with self._lock:
            if (node, kind) in self._inflight:
                return None
            self._inflight.add((node, kind))
        status = ActionStatus.SHADOW if self.shadow else ActionStatus.QUEUED
        action_id = self.store.add_action(node, kind, reason, actor, status, fault_ms, now_ms())
        if self.shadow:
            audit.record(actor, kind, node, "controller", ActionStatus.SHADOW, reason=reason,
                         action_id=action_id)
            if self.metrics is not None:
                self.metrics.action_finished(kind, ActionStatus.SHADOW, None)
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
                    self.store.update_action(a.id, ActionStatus.FAILED, str(e), attempts,
                                             now_ms())
                    audit.record("policy", a.kind, a.node, "controller", ActionStatus.FAILED,
                                 reason=a.reason, error=str(e), action_id=a.id)
                    if self.metrics is not None:
                        self.metrics.action_finished(a.kind, ActionStatus.FAILED, None)
                    log.error("%s %s failed: %s", a.kind, a.node, e)
                    return
                if attempts == 1:
                    log.warning("%s %s: Slurm not answering (%s); retrying", a.kind, a.node, e)
                self.store.update_action(a.id, ActionStatus.QUEUED, f"retrying: {e}", attempts,
                                         None)
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
            log.warning("%s %s: %s %s", a.kind, a.node, status, detail)
            return

    def _apply(self, a: Action) -> tuple[ActionStatus, str]:
        """Do one action in Slurm; returns (status, detail) for the record."""
        assert self.slurm is not None  # noqa: S101
        apply = {
            ActionKind.DRAIN: self._drain, ActionKind.RESUME: self._resume,
            ActionKind.DEGRADE: self._degrade, ActionKind.RESTORE: self._restore,
            ActionKind.REASSERT: self._reassert,
        }.get(a.kind)
        if apply is None:
            raise SlurmError(f"unknown action {a.kind!r}", transient=False)
        return apply(a, self.slurm, self.slurm.node(a.node))

    def _drain(self, a: Action, slurm: SlurmClient, node: SlurmNode) -> tuple[ActionStatus, str]:
        if node.drained and not node.reason.startswith(REASON_PREFIX):
            # An admin (or NHC) drained it first: keep their reason, it says more to them.
            return ActionStatus.SKIPPED, f"already drained by someone else: {node.reason!r}"
        if node.drained:
            # the same fault reported again (a restarted agent): keep the first reason
            return ActionStatus.SKIPPED, f"already drained by gpufleet: {node.reason!r}"
        slurm.drain(a.node, a.reason)
        return ActionStatus.DONE, f"was {node.state}"

    def _resume(self, a: Action, slurm: SlurmClient, node: SlurmNode) -> tuple[ActionStatus, str]:
        if not node.drained:
            return ActionStatus.SKIPPED, f"not drained ({node.state})"
        if not node.reason.startswith(REASON_PREFIX):
            # Never resume a node gpufleet did not drain.
            return ActionStatus.SKIPPED, f"drained by someone else: {node.reason!r}"
        slurm.resume(a.node)
        return ActionStatus.DONE, f"was {node.state}"

    def _degrade(self, a: Action, slurm: SlurmClient, node: SlurmNode) -> tuple[ActionStatus, str]:
        if self.store.policy_state(a.node) is not None:
            return ActionStatus.SKIPPED, "already degraded by gpufleet"
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
        return ActionStatus.DONE, ", ".join(done) or "nothing to change"

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

    def _reassert(self, a: Action, slurm: SlurmClient, node: SlurmNode) -> tuple[ActionStatus, str]:
        """Put back a degraded node's weight/feature that Slurm lost; the original weight
        remembered at degrade time stays the one a restore puts back."""
        row = self.store.policy_state(a.node)
        if row is None:
            return ActionStatus.SKIPPED, "not degraded any more"
        done = []
        if row.original_weight is not None and self.degraded_weight is not None \
                and node.weight != self.degraded_weight:
            slurm.set_weight(a.node, self.degraded_weight)
            done.append(f"weight {node.weight} -> {self.degraded_weight}")
        if row.feature_added and row.feature_added not in node.features:
            slurm.set_features(a.node, (*node.features, row.feature_added))
            done.append(f"feature +{row.feature_added}")
        return ((ActionStatus.DONE, ", ".join(done)) if done
                else (ActionStatus.SKIPPED, "still in place"))

    def _restore(self, a: Action, slurm: SlurmClient, node: SlurmNode) -> tuple[ActionStatus, str]:
        row = self.store.policy_state(a.node)
        if row is None:
            return ActionStatus.SKIPPED, "nothing to restore"
        done = []
        if row.original_weight is not None and node.weight != row.original_weight:
            slurm.set_weight(a.node, row.original_weight)
            done.append(f"weight {node.weight} -> {row.original_weight}")
        if row.feature_added and row.feature_added in node.features:
            slurm.set_features(a.node, tuple(f for f in node.features if f != row.feature_added))
            done.append(f"feature -{row.feature_added}")
        self.store.clear_policy_state(a.node)
        return ActionStatus.DONE, ", ".join(done) or "nothing to change"

    def wait_idle(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._inflight and self._q.empty():
                    return True
            time.sleep(0.02)
        return False
