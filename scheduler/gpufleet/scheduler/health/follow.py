"""On the leader: act on the health changes other ingest processes queued in the store.

Several controller processes may ingest agents' reports into one PostgreSQL store; only the
leader (the advisory-lock holder) acts in Slurm. A process that is not the leader stores a
verdict that moved a node's health together with the change (`set_verdict(publish=True)`);
the leader polls the queue every `poll_s` and hands each change to its health policy, as its
own ingest does for the streams it holds, then deletes it. The poll is one index probe on
an (almost always) empty table: its cost follows the changes, not the number of nodes.

A leader that dies between acting and deleting leaves the changes to the next leader, which
acts again: the policy skips a drain that stands, and the action queue skips a node Slurm
shows drained by gpufleet already, so nothing is done twice in Slurm. Liveness needs nothing
of this: every process writes its nodes' last-seen times to the shared store, where the
leader's liveness tick reads them.
"""

from __future__ import annotations

import logging

from gpufleet.scheduler.health.policy import HealthPolicy
from gpufleet.scheduler.poll_loop import PollLoop
from gpufleet.scheduler.store import HealthStore, StoreError

log = logging.getLogger(__name__)


class ChangeFollower:
    def __init__(self, store: HealthStore, policy: HealthPolicy, poll_s: float = 0.05,
                 batch: int = 1000) -> None:
        self.store = store
        self.policy = policy
        self.poll_s = poll_s
        self.batch = batch
        self.applied = 0  # changes handed to the policy (tests, metrics)
        self._loop = PollLoop("health-follow", self._round, poll_s, log,
                              "acting on other processes' health changes",
                              expected=(StoreError,))

    def poll_once(self) -> int:
        """Act on the queued changes (at most `batch`, oldest first); how many were taken."""
        rows = self.store.health_changes(self.batch)
        done: list[int] = []
        try:
            for r in rows:
                self.policy.on_health_change(r.node, r.before, r.after, r.reason_code,
                                             r.evidence, r.fault_ms)
                done.append(r.id)
                self.applied += 1
        finally:
            # what was acted on goes, even when a later change failed (it is retried)
            self.store.delete_health_changes(done)
        return len(rows)

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()

    def _round(self) -> bool:
        # a full batch is a backlog (a takeover after a storm): no wait between batches
        return self.poll_once() >= self.batch
