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

from gpufleet.scheduler.slurm import SlurmClient, SlurmError
from gpufleet.scheduler.store import SqliteStore, now_ms

log = logging.getLogger(__name__)

REASON_PREFIX = "gpufleet:"


@dataclass(frozen=True)
class Action:
    id: int
    node: str
    kind: str  # "drain" | "resume"
    reason: str
    fault_ms: int | None


class ActionQueue:
    def __init__(
        self,
        store: SqliteStore,
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
            if status == "done" and a.fault_ms is not None:
                self.fault_to_action_ms.append(done - a.fault_ms)
            log.warning("%s %s: %s %s", a.kind, a.node, status, detail)
            return

    def _apply(self, a: Action) -> tuple[str, str]:
        assert self.slurm is not None  # noqa: S101
        node = self.slurm.node(a.node)
        if a.kind == "drain":
            if node.drained and not node.reason.startswith(REASON_PREFIX):
                # An admin (or NHC) drained it first: keep their reason, it says more to them.
                return "skipped", f"already drained by someone else: {node.reason!r}"
            self.slurm.drain(a.node, a.reason)
            return "done", f"was {node.state}"
        if a.kind == "resume":
            if not node.drained:
                return "skipped", f"not drained ({node.state})"
            if not node.reason.startswith(REASON_PREFIX):
                # Never resume a node gpufleet did not drain.
                return "skipped", f"drained by someone else: {node.reason!r}"
            self.slurm.resume(a.node)
            return "done", f"was {node.state}"
        raise SlurmError(f"unknown action {a.kind!r}", transient=False)

    def wait_idle(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._inflight and self._q.empty():
                    return True
            time.sleep(0.02)
        return False
