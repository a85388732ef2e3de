"""Health policy: what the controller does in Slurm when a node's health changes.

- fatal            -> drain, reason `gpufleet:<code> <evidence>` (at once);
- degraded         -> raise the node's Weight (Slurm allocates low weights first, so the node
                      is chosen last) and add a feature (`gf_degraded`, shown by
                      `sinfo -o "%N %f"` and avoided by gpufleet's placement); the original
                      weight is remembered so it can be put back;
- healthy again    -> after `resume_quiet_s` without a relapse: undo the degraded changes and
                      resume the node, but only if gpufleet drained it (ActionQueue re-checks
                      Slurm's reason before resuming: an admin's drain is never lifted);
- silent           -> `unreachable` after `unreachable_after_s` with an alert; drained on
                      silence alone only when `drain_unreachable` is set.

With an `AlertSender` (the controller's --alertmanager-url / --alert-webhook-url) the
controller's own alerts go out the moment the policy sees them: `GpufleetNodeFatal` when a
node turns fatal (resolved when it is healthy again) and `GpufleetNodeUnreachable` when it
goes silent (resolved when it reports again), labelled `source="gpufleet-controller"`.
They need no Prometheus in between; the rules in monitoring/ raise the same names from
metrics, a minute or two later.

Decisions are made here; ActionQueue applies them off the ingest path, retries and records
them. Shadow mode is the ActionQueue's: everything below is still decided and recorded.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpufleet.scheduler.health.actions import REASON_PREFIX, ActionQueue
from gpufleet.scheduler.observability.alerting import Alert
from gpufleet.scheduler.slurm import SlurmError
from gpufleet.scheduler.store import StateStore, now_ms
from gpufleet.scheduler.store.values import HEALTHY, ActionKind, ActionStatus, Severity

if TYPE_CHECKING:
    from gpufleet.scheduler.observability.alerting import AlertSender
    from gpufleet.scheduler.recovery.manager import RecoveryManager
    from gpufleet.scheduler.repair import RepairManager

log = logging.getLogger(__name__)

ALERT_FATAL = "GpufleetNodeFatal"
ALERT_UNREACHABLE = "GpufleetNodeUnreachable"


@dataclass(frozen=True)
class PolicyConfig:
    resume_quiet_s: float = 300.0  # healthy this long before gpufleet undoes what it did
    degraded_weight: int | None = 1000  # None: leave Weight alone
    degraded_feature: str = "gf_degraded"  # "": add no feature
    unreachable_after_s: float = 30.0  # no report for this long: unreachable
    drain_unreachable: bool = False  # also drain on silence alone
    tick_s: float = 1.0
    # how often Slurm is read back for the degraded nodes' weight/feature, which slurmctld
    # forgets when it restarts (one `sinfo --json`, only while some node is degraded)
    reassert_s: float = 30.0

    def validate(self) -> PolicyConfig:
        if self.resume_quiet_s < 0:
            raise ValueError(f"resume_quiet_s={self.resume_quiet_s}: must be >= 0")
        if self.reassert_s <= 0:
            raise ValueError(f"reassert_s={self.reassert_s}: must be > 0")
        if self.unreachable_after_s <= 0:
            raise ValueError(f"unreachable_after_s={self.unreachable_after_s}: must be > 0")
        if self.degraded_weight is not None and not 0 <= self.degraded_weight <= 2**31 - 2:
            raise ValueError(f"degraded_weight={self.degraded_weight}: out of Slurm's range")
        if self.degraded_feature and not self.degraded_feature.replace("_", "").isalnum():
            raise ValueError(
                f"degraded_feature={self.degraded_feature!r}: letters, digits and _ only"
            )
        return self


class HealthPolicy:
    """Turns node health transitions and silence into queued Slurm actions."""

    def __init__(self, store: StateStore, actions: ActionQueue, config: PolicyConfig, *,
                 recovery: RecoveryManager | None = None, repair: RepairManager | None = None,
                 alerts: AlertSender | None = None) -> None:
        """`actions` must do what `config` says a degrade is (ActionQueue's degraded_weight
        and degraded_feature). `recovery`: fatal nodes get their jobs requeued; `repair`:
        drained nodes are remediated, diagnosed and resumed by it (the quiet-period resume
        leaves its nodes alone); `alerts`: the controller's own alerts go out through it.
        Each None: that part is off."""
        self.store = store
        self.actions = actions
        self.config = config.validate()
        if (actions.degraded_weight, actions.degraded_feature) != (
                config.degraded_weight, config.degraded_feature):
            raise ValueError(
                f"the action queue degrades with weight={actions.degraded_weight} feature="
                f"{actions.degraded_feature!r}, the policy says weight={config.degraded_weight}"
                f" feature={config.degraded_feature!r}: build both from one PolicyConfig")
        self.recovery = recovery
        self.repair = repair
        self.alerts = alerts
        self._lock = threading.Lock()
        started = now_ms()
        # When each node last became healthy. After a controller restart nobody knows, so a
        # node counts as healthy since the start: it waits one full quiet period, never less.
        self._healthy_since_ms: dict[str, int] = {}
        self._started_ms = started
        # when this policy started acting (start()): silence before it is not counted
        self._acting_since_ms = 0
        # nodes where gpufleet may have something to undo (drained or degraded by policy)
        self._to_undo: set[str] = set()
        self._read_to_undo()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reassert_thread: threading.Thread | None = None

    # ------------------------------------------------------------ transitions (ingest path)

    def on_health_change(
        self, node: str, before: str, after: str, reason_code: str, evidence: str,
        fault_ms: int | None,
    ) -> None:
        """Called by ingest when a verdict moves the node's overall health."""
        if after == before:
            return
        with self._lock:
            if after in HEALTHY:
                self._healthy_since_ms[node] = now_ms()
            else:
                self._healthy_since_ms.pop(node, None)
        if self.alerts is not None and before == Severity.FATAL:
            self.alerts.resolve(ALERT_FATAL, node, f"{node}: no longer fatal ({after})")
        if after == Severity.FATAL:
            if self.alerts is not None:
                self.alerts.fire(Alert(ALERT_FATAL, node, "page",
                                       f"{node}: GPU node health is fatal ({reason_code})",
                                       evidence))
            if self._drain_stands(node):
                # e.g. a restarted agent reports the same fault afresh (its hello reset the
                # node's verdicts): the node is gpufleet's drained one already
                log.info("node %s fatal again (%s): gpufleet's drain still stands", node,
                         evidence)
                return
            reason = f"{REASON_PREFIX}{reason_code} {evidence}".strip()
            if self.actions.submit(node, ActionKind.DRAIN, reason, fault_ms) is not None:
                log.warning("node %s fatal: %s -> drain", node, evidence)
                if self.repair is not None:
                    self.repair.node_fatal(node, reason_code, evidence, fault_ms)
            self._mark_undo(node)
            if self.recovery is not None:  # returns at once: the work runs on its own pool
                self.recovery.node_fatal(node, fault_ms)
        elif after == Severity.DEGRADED and before in (*HEALTHY, Severity.UNKNOWN):
            reason = f"{REASON_PREFIX}{reason_code} {evidence}".strip()
            if self.actions.submit(node, ActionKind.DEGRADE, reason, fault_ms) is not None:
                log.warning("node %s degraded: %s -> weight/feature", node, evidence)
            self._mark_undo(node)

    def _drain_stands(self, node: str) -> bool:
        """gpufleet's last drain/resume of `node` is a drain still queued or recorded in shadow
        mode. One that reached Slurm ("done") is not trusted here: an admin may have resumed
        the node with scontrol since; ActionQueue reads Slurm and skips a standing drain."""
        last = next((a for a in reversed(self.store.actions(node))
                     if a.actor == "policy" and a.action in (ActionKind.DRAIN, ActionKind.RESUME)),
                    None)
        return last is not None and last.action == ActionKind.DRAIN \
            and last.status in (ActionStatus.QUEUED, ActionStatus.SHADOW)

    def _mark_undo(self, node: str) -> None:
        with self._lock:
            self._to_undo.add(node)

    # ------------------------------------------------------------ periodic (own thread)

    def tick(self, now: int | None = None) -> None:
        """Liveness and recovery; cheap enough to run every second on 10,000 nodes: the store
        returns only the nodes whose reachability is due to change (a full read of every
        node, each second, was ~10 % of a core and held the store 0.4 s at 10,000 nodes),
        and only the nodes policy may have something to undo are read one by one."""
        now = now_ms() if now is None else now
        cfg = self.config
        silent_ms = int(cfg.unreachable_after_s * 1000)
        quiet_ms = int(cfg.resume_quiet_s * 1000)
        with self._lock:
            candidates = sorted(self._to_undo)
        # A controller that has just started (a restart, a standby taking over) cannot tell
        # a dead node from one whose agent has not reconnected yet: after a restart every
        # stored last-seen time is old, and thousands of agents reconnect at once. Silence
        # is counted from when this policy started acting, so every node gets one full
        # unreachable_after_s to come back before it is called unreachable.
        settling = now - self._acting_since_ms <= silent_ms
        for n in self.store.liveness_changes(now - silent_ms):
            silent = now - n.last_seen_ms > silent_ms
            if silent and n.reachable and settling:
                continue
            if silent and n.reachable:
                if self.store.set_reachable(n.name, False, now):
                    log.warning("node %s unreachable: no report for %.0f s", n.name,
                                (now - n.last_seen_ms) / 1000)
                    with self._lock:
                        self._healthy_since_ms.pop(n.name, None)
                    if self.alerts is not None:
                        self.alerts.fire(Alert(
                            ALERT_UNREACHABLE, n.name, "warning",
                            f"{n.name}: GPU node silent, no agent report for "
                            f"{(now - n.last_seen_ms) // 1000} s"))
                    if cfg.drain_unreachable:
                        self.actions.submit(
                            n.name, ActionKind.DRAIN,
                            f"{REASON_PREFIX}unreachable no report for "
                            f"{(now - n.last_seen_ms) // 1000} s", n.last_seen_ms,
                        )
                        self._mark_undo(n.name)
            elif not silent and not n.reachable and self.store.set_reachable(n.name, True, now):
                log.warning("node %s reachable again", n.name)
                with self._lock:
                    self._healthy_since_ms[n.name] = now
                if self.alerts is not None:
                    self.alerts.resolve(ALERT_UNREACHABLE, n.name, f"{n.name}: reports again")
        for name in candidates:
            row = self.store.node(name)
            if row is None or now - row.last_seen_ms > silent_ms or row.health not in HEALTHY:
                continue
            with self._lock:
                since = self._healthy_since_ms.setdefault(name, self._started_ms)
            if now - since < quiet_ms:
                continue
            self._undo(name)

    def _undo(self, node: str) -> None:
        """Quiet period over: restore what policy changed, then resume a policy drain."""
        if self.repair is not None and self.repair.holds(node):
            return  # the repair loop resumes it after a diagnostic, or keeps it drained
        undone = True
        if self.store.policy_state(node) is not None:
            self.actions.submit(node, ActionKind.RESTORE, "healthy again", None)
            undone = False  # come back next tick to check the restore went through
        # a skipped drain changed nothing in Slurm (someone else's drain, or gpufleet's own
        # standing one): what counts is the last drain or resume that did something
        last = next(
            (a for a in reversed(self.store.actions(node))
             if a.actor == "policy" and a.action in (ActionKind.DRAIN, ActionKind.RESUME)
             and not (a.action == ActionKind.DRAIN and a.status == ActionStatus.SKIPPED)),
            None,
        )
        if last is not None and last.action == ActionKind.DRAIN \
                and last.status == ActionStatus.DONE:
            self.actions.submit(node, ActionKind.RESUME,
                                f"healthy for {self.config.resume_quiet_s:g} s", None)
            undone = False
        elif last is not None and last.action == ActionKind.DRAIN \
                and last.status == ActionStatus.QUEUED:
            undone = False  # the drain has not reached Slurm yet
        if undone:
            with self._lock:
                self._to_undo.discard(node)

    def reassert_degraded(self) -> int:
        """Queue a `reassert` for every node gpufleet holds degraded whose weight or feature
        Slurm lost; returns how many. Runs on its own thread: `sinfo` can take its whole
        timeout while slurmctld is away, and liveness ticks must not wait for it."""
        slurm = self.actions.slurm
        if slurm is None or self.actions.shadow:
            return 0
        with self._lock:
            degraded = [n for n in self._to_undo if self.store.policy_state(n) is not None]
        if not degraded:
            return 0
        try:
            shown = slurm.nodes()
        except SlurmError as e:
            log.debug("degraded nodes not checked in Slurm this round: %s", e)
            return 0
        queued = 0
        for name in degraded:
            node = shown.get(name)
            if node is None or not self.actions.degraded_but_lost(node):
                continue
            if self.actions.submit(name, ActionKind.REASSERT,
                                   "Slurm lost gpufleet's degraded weight/feature", None):
                log.warning("node %s: Slurm lost its degraded weight/feature (slurmctld "
                            "restarted?): putting them back", name)
                queued += 1
        return queued

    def _read_to_undo(self) -> None:
        found = {a.node for a in self.store.actions()
                 if a.actor == "policy" and a.action in (ActionKind.DRAIN, ActionKind.DEGRADE)}
        with self._lock:
            self._to_undo |= found

    def start(self) -> None:
        # again: a standby built long ago takes over what the old leader drained since
        self._read_to_undo()
        self._acting_since_ms = now_ms()
        self._thread = threading.Thread(target=self._run, name="health-policy", daemon=True)
        self._thread.start()
        self._reassert_thread = threading.Thread(target=self._run_reassert,
                                                 name="policy-reassert", daemon=True)
        self._reassert_thread.start()

    def stop(self) -> None:
        self._stop.set()
        for t in (self._thread, self._reassert_thread):
            if t is not None:
                t.join(timeout=5.0)

    def _run_reassert(self) -> None:
        while not self._stop.wait(self.config.reassert_s):
            try:
                self.reassert_degraded()
            except Exception:  # like tick: the loop must outlive one bad round
                log.exception("checking degraded nodes in Slurm failed")

    def _run(self) -> None:
        while not self._stop.wait(self.config.tick_s):
            try:
                self.tick()
            except Exception:  # the policy loop must outlive one bad tick
                log.exception("health policy tick failed")
