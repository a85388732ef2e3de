"""The repair state machine: fault -> (idle, cap, policy) -> remediation -> diagnostic ->
resume or escalate.

One case per fault of a node gpufleet drained:
  waiting      drained by gpufleet, waiting until Slurm shows no job on it, the partition's
               cap leaves room, and (policy "ask") an admin approved
  approval     policy "ask": waits for `gpufleet repair approve|skip|cancel NODE`
  remediating  GPU reset sent to the agent / `scontrol reboot ASAP` requested
  diagnosing   `diag` sent to the agent; its result decides
and it ends as one of:
  resumed      diagnostic passed, node resumed (only a drain whose reason is gpufleet's)
  escalated    diagnostic failed, remediation failed or timed out, RMA class, policy never:
               stays drained, reason `gpufleet:diag-failed <check>`, escalated with evidence
  quarantined  the Nth failure within the window: never auto-resumed, escalated once
  cancelled    an admin took over; stays drained, gpufleet keeps its hands off
  left         not gpufleet's drain (an admin's, NHC's): never touched
  shadow       shadow mode: what would have been done is recorded, nothing is done
  released     a routine diagnostic let go before its result: resumed at once (a job
               waits for the node, no answer in time, the diag could not run)

Routine diagnostics (off while routine_every_s is 0): a node IDLE in Slurm with no reason,
idle at least routine_idle_s (Slurm's LastBusyTime), not diagnosed within routine_every_s,
whose agent is connected, in a partition where no pending job could start on it and no
repair is open, is drained with reason `gpufleet:routine-diag` (at most routine_batch per
partition, within the partition cap) and diagnosed like a repaired node: resumed on a pass,
kept drained and escalated on a fail. A pending job that could use it, or no answer within
routine_timeout_s, resumes it at once; a fault that arrives meanwhile turns it into a repair.

Never: resumes a drain that is not gpufleet's; reboots or resets a node Slurm shows a job on;
remediates more nodes of one partition at once than the cap; retries an RMA-class fault;
drains a node for a routine diagnostic that a waiting job could use.
Slurm, the agents, Alertmanager and the clock come in through the constructor.

One module (~850 lines): the repair state machine (remediate, diagnose, resume, escalate,
quarantine, routine diagnostics) and its safety caps are one set of transitions.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Protocol

from gpufleet.scheduler.access import audit
from gpufleet.scheduler.poll_loop import PollLoop
from gpufleet.scheduler.repair.catalog import Resolution, resolve
from gpufleet.scheduler.repair.journal import Journal, JournalError
from gpufleet.scheduler.slurm import (
    SlurmClient,
    SlurmError,
    SlurmJob,
    SlurmNode,
    SlurmNodeInfo,
    SlurmQueueClient,
)

log = logging.getLogger(__name__)

REASON_PREFIX = "gpufleet:"
ACTOR = "repair"
POLICIES = ("auto", "ask", "never")
_GPU_RE = re.compile(r"^GPU (\d+)\b")
RESET_RETRY_MS = 30_000  # a GPU a process still holds: ask again this much later
_BUSY_STATES = {"ALLOCATED", "MIXED", "COMPLETING"}
ROUTINE_CODE = "routine-diag"
ROUTINE_REASON = f"{REASON_PREFIX}{ROUTINE_CODE}"
# pending jobs that wait for something other than nodes: they are not held back by a diag
_NOT_WAITING_FOR_NODES = frozenset({"JobHeldUser", "JobHeldAdmin", "Dependency",
                                    "DependencyNeverSatisfied"})


class Step(StrEnum):
    WAITING = "waiting"
    APPROVAL = "approval"
    REMEDIATING = "remediating"
    DIAGNOSING = "diagnosing"
    RESUMED = "resumed"
    ESCALATED = "escalated"
    QUARANTINED = "quarantined"
    CANCELLED = "cancelled"
    LEFT = "left"
    SHADOW = "shadow"
    RELEASED = "released"


OPEN = frozenset({Step.WAITING, Step.APPROVAL, Step.REMEDIATING, Step.DIAGNOSING})
ACTIVE = frozenset({Step.REMEDIATING, Step.DIAGNOSING})  # count against the cap
# a node whose last case ended so is gpufleet's to keep drained (the health policy must not
# resume it after its quiet period)
HOLDING = OPEN | {Step.ESCALATED, Step.QUARANTINED, Step.CANCELLED}
# a routine diagnostic's result, by the step that closed it (RELEASED names its own)
ROUTINE_RESULTS = ("passed", "failed", "released", "incomplete", "superseded", "shadow",
                   "cancelled", "left")
_ROUTINE_RESULT_OF = {Step.RESUMED: "passed", Step.ESCALATED: "failed",
                      Step.QUARANTINED: "failed", Step.SHADOW: "shadow",
                      Step.CANCELLED: "cancelled", Step.LEFT: "left"}


@dataclass(frozen=True)
class RepairConfig:
    shadow: bool = False
    # per resolution class: auto (do it), ask (wait for an admin), never (escalate)
    policy: Mapping[str, str] = field(default_factory=lambda: {
        Resolution.RESET_GPU: "auto", Resolution.REBOOT: "auto", Resolution.NONE: "auto"})
    max_per_partition: int = 1  # nodes of one partition in remediation/diagnosis at once
    fail_limit: int = 3  # this many failures within fail_window_s: quarantined
    fail_window_s: float = 7 * 86400.0
    diag_level: int = 1
    reset_timeout_s: float = 600.0
    reboot_timeout_s: float = 1800.0
    diag_timeout_s: float = 1800.0
    tick_s: float = 2.0
    # routine diagnostics on idle nodes (docs/repair.md); off while routine_every_s is 0
    routine_every_s: float = 0.0  # each node at most once per this period
    routine_idle_s: float = 3600.0  # idle in Slurm at least this long
    routine_batch: int = 1  # nodes of one partition in a routine diagnostic at once
    routine_level: int = 1
    routine_timeout_s: float = 600.0  # never held out of scheduling longer than this
    routine_scan_s: float = 60.0  # how often idle nodes and the queue are read for new ones

    def validate(self) -> RepairConfig:
        for cls, pol in self.policy.items():
            if cls not in {r.value for r in Resolution} or cls == Resolution.CONTACT_SUPPORT:
                raise ValueError(f"repair policy class {cls!r}: use reset_gpu, reboot or none "
                                 "(contact_support is never retried)")
            if pol not in POLICIES:
                raise ValueError(f"repair policy {cls}={pol!r}: use auto, ask or never")
        if self.max_per_partition < 1:
            raise ValueError(f"max_per_partition={self.max_per_partition}: must be >= 1")
        if self.fail_limit < 1:
            raise ValueError(f"fail_limit={self.fail_limit}: must be >= 1")
        if self.diag_level not in (1, 2, 3):
            raise ValueError(f"diag_level={self.diag_level}: use 1, 2 or 3")
        if self.routine_level not in (1, 2, 3):
            raise ValueError(f"routine_level={self.routine_level}: use 1, 2 or 3")
        if self.routine_batch < 1:
            raise ValueError(f"routine_batch={self.routine_batch}: must be >= 1")
        for name in ("fail_window_s", "reset_timeout_s", "reboot_timeout_s", "diag_timeout_s",
                     "tick_s", "routine_timeout_s", "routine_scan_s"):
            if not 0 < getattr(self, name) < math.inf:  # nan fails too
                raise ValueError(f"{name}={getattr(self, name)}: must be > 0")
        for name in ("routine_every_s", "routine_idle_s"):
            if not 0 <= getattr(self, name) < math.inf:  # nan fails too
                raise ValueError(f"{name}={getattr(self, name)}: must be a number >= 0")
        return self


@dataclass(frozen=True)
class AgentCommand:
    """A command for a node's agent, sent on its stream (the server turns it into proto)."""

    node: str
    kind: str  # "reset_gpu" | "diag"
    request_id: str
    gpus: tuple[int, ...] = ()  # reset_gpu: these GPUs; empty: every GPU
    level: int = 1  # diag


@dataclass(frozen=True)
class CommandResult:
    node: str
    request_id: str
    kind: str
    ok: bool
    could_not_run: bool = False  # reset refused (a process holds the GPU), diag exit 2
    detail: str = ""
    failed_checks: tuple[str, ...] = ()
    evidence: str = ""


class AgentLink(Protocol):
    def send(self, cmd: AgentCommand) -> bool:
        """Queue `cmd` for the node's agent; False when it has no stream now."""
        ...

    def boot_id(self, node: str) -> str | None:
        """The boot id in the node's latest inventory (None: never seen)."""
        ...

    def has_stream(self, node: str) -> bool:
        """Whether the node's agent has a stream now (routine diagnostics ask first)."""
        ...


class Rebooter(Protocol):
    def reboot(self, node: str, reason: str) -> None: ...


Escalate = Callable[[str, str, str, str], None]  # node, alert name, summary, evidence


@dataclass
class Case:
    id: str
    node: str
    reason_code: str
    evidence: str
    resolution: Resolution
    fault_ms: int
    gpu_index: int | None = None
    step: Step = Step.WAITING
    step_ms: int = 0
    approved: bool = False
    skip_remedy: bool = False
    partition: str = ""
    request_id: str = ""
    remedy: str = ""  # what is running: reset_gpu | reboot | ""
    boot_before: str | None = None
    deadline_ms: int = 0
    note: str = ""  # the last "waiting because" written to the journal (not repeated)
    not_before_ms: int = 0  # after a refused reset: not tried again before this
    routine: bool = False  # a routine diagnostic of an idle node, not a fault's repair
    partitions: tuple[str, ...] = ()  # routine: the node's partitions (for waiting jobs)


def _idle(n: SlurmNode) -> bool:
    return not (set(n.state.split("+")) & _BUSY_STATES)


def _gpufleets(n: SlurmNode) -> bool:
    return n.reason.startswith(REASON_PREFIX)


def could_start_on(job: SlurmJob, node: str, partitions: tuple[str, ...]) -> bool:
    """Whether pending `job` could start on `node` (in `partitions`) were it free. Held jobs
    and jobs waiting on a dependency cannot; a job that excludes the node or names other
    nodes cannot. Constraints and GRES are not matched: in doubt, the job could."""
    if job.state != "PENDING" or job.state_reason in _NOT_WAITING_FOR_NODES:
        return False
    if node in job.excluded_nodes or (job.required_nodes and node not in job.required_nodes):
        return False
    return not (job.partitions and partitions and not set(job.partitions) & set(partitions))


class RepairManager:
    def __init__(
        self,
        slurm: SlurmClient,
        journal: Journal,
        config: RepairConfig,
        agents: AgentLink,
        rebooter: Rebooter,
        escalate: Escalate,
        partition_of: Callable[[str], str] = lambda _n: "",
        clock: Callable[[], int] = lambda: int(time.time() * 1000),
        queue: SlurmQueueClient | None = None,
    ) -> None:
        self.slurm = slurm
        self.journal = journal
        self.config = config.validate()
        self.agents = agents
        self.rebooter = rebooter
        self.escalate = escalate
        self.partition_of = partition_of
        self.clock = clock
        if self.config.routine_every_s > 0 and queue is None:
            raise ValueError("routine diagnostics need a Slurm client that lists nodes and "
                             "pending jobs (--slurm cli or rest)")
        self.queue = queue
        self._lock = threading.RLock()
        self.cases: dict[str, Case] = {}  # node -> its latest case
        self._failures: dict[str, list[int]] = {}
        self._escalated_quarantine: set[str] = set()
        self._handled_requests: set[str] = set()
        # what arrives from the ingest path waits here, under its own short lock: the tick
        # holds self._lock across Slurm calls that can take their whole timeout
        self._inbox_lock = threading.Lock()
        self._faults: list[tuple[str, str, str, int, int | None]] = []
        self._results: list[CommandResult] = []
        self._pending_requests: list[dict[str, Any]] = []
        # figures for the metrics (gpufleet.scheduler.repair.metrics)
        self.outcomes: dict[str, int] = {}
        self.drained_s_by_cause: dict[str, float] = {}
        self.repair_seconds: list[float] = []  # fault -> resumed, per resumed case
        self.routine_results: dict[str, int] = {}
        # routine diagnostics: when each node was last diagnosed (a diag result, or a
        # routine attempt that got none), first seen idle (where Slurm has no LastBusyTime),
        # and when idle nodes are next read
        self._diagnosed_ms: dict[str, int] = {}
        self._idle_seen_ms: dict[str, int] = {}
        self._next_scan_ms = 0
        self._loop = PollLoop("repair", self.tick, config.tick_s, log, "repair tick")
        self._replay()

    # ------------------------------------------------------------ journal

    def _record(self, case: Case, step: str, detail: str = "", **extra: Any) -> None:
        # stamped with the loop's own clock: replay compares these with it
        rec = {"ts_ms": self.clock(), "type": "step", "node": case.node, "case": case.id,
               "step": step, "detail": detail, "resolution": case.resolution.value,
               **({"routine": True} if case.routine else {}),
               **{k: v for k, v in extra.items() if v is not None}}
        try:
            rec = self.journal.append(rec)
        except JournalError as e:
            log.error("%s", e)
        self._note_diagnosed(rec)
        extra = {k: v for k, v in extra.items() if v is not None}
        actor = str(extra.pop("actor", ACTOR))  # an admin's request: the admin acted
        audit.record(actor, f"repair_{step}", case.node, "controller",
                     "shadow" if self.config.shadow else "ok", detail=detail, case=case.id,
                     **extra)

    def _note_diagnosed(self, rec: Mapping[str, Any]) -> None:
        """A diag result, or a routine attempt that ended without one, counts as the node's
        diagnosis for the routine period (a job that took the node back does not)."""
        if rec.get("step") in ("diag_passed", "failure") or \
                rec.get("routine_result") in ("incomplete", "shadow"):
            node = str(rec.get("node"))
            ts = int(rec.get("ts_ms", 0))
            self._diagnosed_ms[node] = max(self._diagnosed_ms.get(node, 0), ts)

    def _replay(self) -> None:  # noqa: PLR0912 - one branch per record kind
        """Rebuild cases, failures and handled requests from the journal."""
        try:
            records = self.journal.read_new()
        except JournalError as e:
            log.error("repair state not restored: %s", e)
            return
        for r in records:
            node = str(r.get("node", ""))
            if r.get("type") == "handled":
                self._handled_requests.add(str(r.get("request")))
            elif r.get("type") == "request":
                continue  # handled below when not yet handled
            elif r.get("type") == "step" and r.get("step") in ("fault", "routine"):
                self.cases[node] = Case(
                    str(r["case"]), node, str(r.get("reason_code", "")),
                    str(r.get("evidence", "")), Resolution(r.get("resolution", "none")),
                    int(r.get("fault_ms", r["ts_ms"])), r.get("gpu_index"),
                    step_ms=int(r["ts_ms"]), routine=r.get("step") == "routine",
                    partitions=tuple(r.get("partitions") or ()),
                    partition=str(r.get("partition", "")))
            elif r.get("type") == "step" and node in self.cases:
                c = self.cases[node]
                step = str(r.get("step"))
                if step == "failure":
                    self._failures.setdefault(node, []).append(int(r["ts_ms"]))
                elif step in Step.__members__.values():
                    c.step, c.step_ms = Step(step), int(r["ts_ms"])
                    c.remedy = str(r.get("remedy", c.remedy))
                    c.boot_before = r.get("boot_before", c.boot_before)
                if step == "approved":
                    c.approved = True
                if step == "quarantined":
                    self._escalated_quarantine.add(node)
            if r.get("type") == "step":
                self._note_diagnosed(r)
        now = self.clock()
        for c in self.cases.values():
            # a command in flight when the controller stopped is lost: do that step again
            if c.step == Step.DIAGNOSING or (c.step == Step.REMEDIATING and
                                             c.remedy != Resolution.REBOOT):
                c.step, c.approved = Step.WAITING, True
            if c.step == Step.REMEDIATING:
                c.deadline_ms = now + int(self.config.reboot_timeout_s * 1000)
        # requests written while the controller was away are taken on the first tick
        self._pending_requests = [r for r in records if r.get("type") == "request"
                                  and str(r.get("id")) not in self._handled_requests]

    # ------------------------------------------------------------ inputs

    def node_fatal(self, node: str, reason_code: str, evidence: str,
                   fault_ms: int | None = None, gpu_index: int | None = None) -> None:
        """The health policy drained (or is draining) `node` for this fault. Called on the
        ingest path: it only queues; the repair thread opens the case on its next tick."""
        with self._inbox_lock:
            self._faults.append((node, reason_code, evidence, fault_ms or self.clock(),
                                 gpu_index))

    def _open_case(self, node: str, reason_code: str, evidence: str, fault_ms: int,
                   gpu_index: int | None) -> None:
        now = self.clock()
        if gpu_index is None and (m := _GPU_RE.match(evidence)):
            gpu_index = int(m.group(1))  # the policy passes evidence, not the GPU
        old = self.cases.get(node)
        if old is not None and old.step in OPEN and old.routine:
            # a fault during a routine diagnostic: the node is a repair case now, and its
            # Slurm reason says the fault (the policy's drain found it drained already)
            self._close(old, Step.RELEASED, f"a fault arrived ({reason_code}): handed to the "
                        "repair loop, stays drained", routine_result="superseded")
            try:
                self.slurm.drain(node, f"{REASON_PREFIX}{reason_code} {evidence}".strip())
            except SlurmError as e:
                log.warning("repair of %s: cannot set the fault's reason: %s", node, e)
        elif old is not None and old.step in OPEN:
            self._record(old, "fault_again", f"{reason_code} {evidence}".strip())
            return
        case = Case(uuid.uuid4().hex[:12], node, reason_code, evidence, resolve(reason_code),
                    fault_ms, gpu_index, step_ms=now)
        quarantined = self._quarantined(node, now)
        self.cases[node] = case
        self._record(case, "fault", evidence, reason_code=reason_code, fault_ms=fault_ms,
                     gpu_index=gpu_index)
        if quarantined:
            self._close(case, Step.QUARANTINED, "quarantined: a new fault stays drained")

    def on_result(self, result: CommandResult) -> None:
        """An agent answered a command (from the stream; handled on the next tick)."""
        with self._inbox_lock:
            self._results.append(result)

    def holds(self, node: str) -> bool:
        """Whether gpufleet's repair keeps `node` drained (the health policy must not
        resume it when it looks healthy again). Never waits for a tick in progress."""
        with self._inbox_lock:
            if any(f[0] == node for f in self._faults):
                return True
        c = self.cases.get(node)
        return c is not None and c.step in HOLDING

    # ------------------------------------------------------------ admin

    def _admin(self, req: Mapping[str, Any]) -> None:
        node, action = str(req.get("node")), str(req.get("action"))
        actor = str(req.get("actor", "?"))
        c = self.cases.get(node)
        result = "done"
        if action == "approve" and c is not None and c.step == Step.QUARANTINED:
            # an admin vouches for the node: clear its failures and try once more
            self._failures.pop(node, None)
            self._escalated_quarantine.discard(node)
            c.step, c.approved = Step.WAITING, True
            self._record(c, "approved", f"by {actor}: quarantine lifted", actor=actor)
        elif c is None or c.step not in OPEN:
            result = "nothing pending"
        elif action == "approve":
            c.approved = True
            if c.step == Step.APPROVAL:
                c.step = Step.WAITING
            self._record(c, "approved", f"by {actor}", actor=actor)
        elif action == "skip":
            c.approved = c.skip_remedy = True
            if c.step in (Step.APPROVAL, Step.WAITING):
                c.step = Step.WAITING
            self._record(c, "skipped", f"by {actor}: remediation skipped, diagnose only",
                         actor=actor)
        elif action == "cancel":
            self._close(c, Step.CANCELLED, f"by {actor}: stays drained for a person",
                        actor=actor)
        try:
            self.journal.append({"type": "handled", "request": req.get("id"), "node": node,
                                 "action": action, "actor": actor, "result": result})
        except JournalError as e:
            log.error("%s", e)
        self._handled_requests.add(str(req.get("id")))

    # ------------------------------------------------------------ the loop

    def tick(self) -> None:
        with self._lock:
            try:
                new = self.journal.read_new()
            except JournalError as e:
                log.error("%s", e)
                new = []
            reqs = self._pending_requests + [r for r in new if r.get("type") == "request"]
            self._pending_requests = []
            for r in reqs:
                if str(r.get("id")) not in self._handled_requests:
                    self._admin(r)
            with self._inbox_lock:
                faults, self._faults = self._faults, []
                results, self._results = self._results, []
            for f in faults:
                self._open_case(*f)
            for res in results:
                self._take_result(res)
            now = self.clock()
            for c in list(self.cases.values()):
                if c.step not in OPEN:
                    continue
                try:
                    self._advance(c, now)
                except SlurmError as e:
                    log.warning("repair of %s waits: Slurm: %s", c.node, e)
            if self.queue is not None:
                try:
                    self._routine(now)
                except SlurmError as e:
                    log.warning("routine diagnostics wait: Slurm: %s", e)

    def _wait(self, c: Case, why: str) -> None:
        if c.note != why:
            c.note = why
            self._record(c, "waiting", why)

    def _advance(self, c: Case, now: int) -> None:
        if c.routine:
            self._advance_routine(c, now)
        elif c.step in ACTIVE:
            self._check_active(c, now)
        elif self._may_start(c, now):
            self._start(c, now)

    def _check_active(self, c: Case, now: int) -> None:
        if c.step == Step.REMEDIATING and c.remedy == Resolution.REBOOT:
            boot = self.agents.boot_id(c.node)
            if boot is not None and boot != c.boot_before:
                self._record(c, "rebooted", f"boot id {c.boot_before} -> {boot}")
                self._diagnose(c, now)
            elif now > c.deadline_ms:
                self._fail(c, "timeout-reboot", "no agent with a new boot id within "
                           f"{self.config.reboot_timeout_s:g} s")
        elif now > c.deadline_ms:
            self._fail(c, f"timeout-{'diag' if c.step == Step.DIAGNOSING else 'reset'}",
                       f"no answer from the agent by the deadline ({c.step})")

    def _may_start(self, c: Case, now: int) -> bool:  # noqa: PLR0911 - one gate per rule
        """Every rule that can hold a remediation back, in order; False: not now."""
        node = self.slurm.node(c.node)
        if node.drained and not _gpufleets(node):
            self._close(c, Step.LEFT, f"drained by someone else ({node.reason!r}): untouched")
            return False
        if not node.drained and "DOWN" not in node.state.split("+"):
            if now - c.step_ms > int(self.config.diag_timeout_s * 1000):
                self._close(c, Step.LEFT, f"not drained ({node.state}): nothing to repair")
            else:
                self._wait(c, "the drain has not reached Slurm yet")
            return False
        if c.resolution == Resolution.CONTACT_SUPPORT:
            self._escalate_close(c, Step.ESCALATED, "contact_support",
                                 f"RMA class, never retried: {c.evidence}")
            return False
        policy = self.config.policy.get(c.resolution, "auto")
        if policy == "never" and not c.approved:
            self._escalate_close(c, Step.ESCALATED, "policy-never",
                                 f"policy for {c.resolution} is 'never', needs a person: "
                                 f"{c.evidence}")
            return False
        if policy == "ask" and not c.approved:
            if c.step != Step.APPROVAL:
                c.step = Step.APPROVAL
                self._record(c, "approval", f"policy for {c.resolution} is 'ask': "
                             f"`gpufleet repair approve|skip|cancel {c.node}`")
                self._notify_ask(c)
            return False
        if not _idle(node):
            self._wait(c, f"Slurm shows jobs on it ({node.state})")
            return False
        if now < c.not_before_ms:
            return False
        c.partition = self.partition_of(c.node)
        busy = [o.node for o in self.cases.values()
                if o.step in ACTIVE and o.partition == c.partition and o.node != c.node]
        if len(busy) >= self.config.max_per_partition:
            self._wait(c, f"partition {c.partition or '(all)'} cap "
                       f"{self.config.max_per_partition} reached: {', '.join(sorted(busy))}")
            return False
        return True

    def _start(self, c: Case, now: int) -> None:
        remedy = Resolution.NONE if c.skip_remedy else c.resolution
        if self.config.shadow:
            self._close(c, Step.SHADOW, f"shadow mode: would {remedy} then diag level "
                        f"{self.config.diag_level}")
        elif remedy == Resolution.RESET_GPU:
            c.request_id = uuid.uuid4().hex[:12]
            gpus = (c.gpu_index,) if c.gpu_index is not None else ()
            if not self.agents.send(AgentCommand(c.node, "reset_gpu", c.request_id, gpus)):
                self._wait(c, "agent not connected: GPU reset not sent")
                return
            c.step, c.step_ms, c.remedy = Step.REMEDIATING, now, remedy
            c.deadline_ms = now + int(self.config.reset_timeout_s * 1000)
            self._record(c, "remediating", f"GPU reset sent (GPUs {list(gpus) or 'all'})",
                         remedy=remedy.value, request=c.request_id)
        elif remedy == Resolution.REBOOT:
            c.boot_before = self.agents.boot_id(c.node)
            reason = f"{REASON_PREFIX}reboot {c.reason_code}"
            self.rebooter.reboot(c.node, reason)
            c.step, c.step_ms, c.remedy = Step.REMEDIATING, now, remedy
            c.deadline_ms = now + int(self.config.reboot_timeout_s * 1000)
            self._record(c, "remediating", f"scontrol reboot ASAP nextstate=DOWN "
                         f"reason={reason!r}", remedy=remedy.value, boot_before=c.boot_before)
        else:
            self._diagnose(c, now)

    def _diagnose(self, c: Case, now: int) -> None:
        cfg = self.config
        level = cfg.routine_level if c.routine else cfg.diag_level
        c.request_id = uuid.uuid4().hex[:12]
        if not self.agents.send(AgentCommand(c.node, "diag", c.request_id, level=level)):
            if c.routine:  # not worth holding an idle node for
                self._release(c, "incomplete", "agent not connected: diag not sent")
                return
            # stay where we are; the next tick tries again until the step's deadline
            self._wait(c, "agent not connected: diag not sent")
            if c.step != Step.REMEDIATING:
                c.step, c.approved = Step.WAITING, True
            return
        c.step, c.step_ms, c.remedy = Step.DIAGNOSING, now, ""
        timeout_s = cfg.routine_timeout_s if c.routine else cfg.diag_timeout_s
        c.deadline_ms = now + int(timeout_s * 1000)
        self._record(c, "diagnosing", f"diag level {level} sent", request=c.request_id)

    def _take_result(self, res: CommandResult) -> None:
        c = self.cases.get(res.node)
        if c is None or c.request_id != res.request_id or c.step not in ACTIVE:
            log.info("repair: a stale %s result from %s (%s)", res.kind, res.node,
                     res.request_id)
            return
        now = self.clock()
        if res.kind == "reset_gpu":
            if res.ok:
                self._record(c, "reset_done", res.detail)
                self._diagnose(c, now)
            elif res.could_not_run and now <= c.deadline_ms:
                # a process still holds the GPU: back to waiting; tried again next tick
                c.step, c.approved = Step.WAITING, True
                c.not_before_ms = now + RESET_RETRY_MS
                self._record(c, "reset_refused", res.detail)
            else:
                self._fail(c, "reset-failed", res.detail or res.evidence)
            return
        if res.ok:
            self._record(c, "diag_passed", res.detail, evidence=res.evidence)
            self._resume(c)
        elif c.routine and res.could_not_run:
            # no verdict on a node that was in service: back to it, not escalated
            self._release(c, "incomplete", f"diag could not run: {res.detail or res.evidence}")
        else:
            check = res.failed_checks[0] if res.failed_checks else (
                "diag-error" if res.could_not_run else "diag")
            self._fail(c, check, res.evidence or res.detail)

    def _resume(self, c: Case) -> None:
        node = self.slurm.node(c.node)
        if not _gpufleets(node) or (c.routine and node.reason != ROUTINE_REASON):
            self._close(c, Step.LEFT, f"diag passed, but the node is not gpufleet's any more "
                        f"({node.state}, {node.reason!r}): not resumed")
            return
        self.slurm.resume(c.node)
        now = self.clock()
        if not c.routine:  # MTTR counts repairs, not routine checks of healthy nodes
            self.repair_seconds.append((now - c.fault_ms) / 1000)
        self._close(c, Step.RESUMED, f"was {node.state}")

    def _fail(self, c: Case, check: str, evidence: str) -> None:
        now = self.clock()
        self._failures.setdefault(c.node, []).append(now)
        self._record(c, "failure", check, evidence=evidence)
        try:
            self.slurm.drain(c.node, f"{REASON_PREFIX}diag-failed {check}")
        except SlurmError as e:
            log.error("repair of %s: cannot set the diag-failed reason: %s", c.node, e)
        if self._quarantined(c.node, now):
            self._close(c, Step.QUARANTINED,
                        f"{len(self._recent(c.node, now))} failures within "
                        f"{self.config.fail_window_s / 86400:g} d: never auto-resumed")
            if c.node not in self._escalated_quarantine:
                self._escalated_quarantine.add(c.node)
                self.escalate(c.node, "GpufleetNodeQuarantined",
                              f"{c.node} quarantined after {self.config.fail_limit} failed "
                              f"repairs", f"last: {check}: {evidence}")
            return
        self._escalate_close(c, Step.ESCALATED, check, evidence)

    def _escalate_close(self, c: Case, step: Step, check: str, evidence: str) -> None:
        self.escalate(c.node, "GpufleetRepairEscalated",
                      f"{c.node} stays drained: {check} ({c.reason_code})", evidence)
        self._close(c, step, f"{check}: {evidence}", escalated=True)

    def _notify_ask(self, c: Case) -> None:
        self.escalate(c.node, "GpufleetRepairAwaitsApproval",
                      f"{c.node}: {c.resolution} for {c.reason_code} awaits approval",
                      c.evidence)

    def _close(self, c: Case, step: Step, detail: str, **extra: Any) -> None:
        c.step, c.step_ms = step, self.clock()
        if c.routine:  # counted apart: a routine diagnostic is not a repair
            result = str(extra.pop("routine_result", None) or _ROUTINE_RESULT_OF[step])
            extra["routine_result"] = result
            self.routine_results[result] = self.routine_results.get(result, 0) + 1
        else:
            self.outcomes[step.value] = self.outcomes.get(step.value, 0) + 1
        cause = c.reason_code or "unknown"
        self.drained_s_by_cause[cause] = self.drained_s_by_cause.get(cause, 0.0) + \
            max(0, c.step_ms - c.fault_ms) / 1000
        self._record(c, step.value, detail, **extra)
        log.warning("repair %s: %s: %s", c.node, step.value, detail)

    # ------------------------------------------------------------ routine diagnostics

    def _advance_routine(self, c: Case, now: int) -> None:
        node = self.slurm.node(c.node)
        if node.reason != ROUTINE_REASON:
            # an admin resumed it or drained it for their own reason: theirs now
            self._close(c, Step.LEFT, f"no longer gpufleet's routine drain ({node.state}, "
                        f"{node.reason!r}): untouched")
        elif c.step == Step.DIAGNOSING:
            if now > c.deadline_ms:
                self._release(c, "incomplete", "no diag result within "
                              f"{self.config.routine_timeout_s:g} s")
        else:  # waiting: the controller restarted mid-diagnostic; ask again
            self._diagnose(c, now)

    def _release(self, c: Case, result: str, why: str) -> None:
        """Let a routine diagnostic go: resume the node at once if it still carries the
        routine reason (an admin's or a fault's reason is left as it is)."""
        node = self.slurm.node(c.node)
        if node.reason == ROUTINE_REASON:
            self.slurm.resume(c.node)
            done = "resumed"
        else:
            done = f"left as it is ({node.state}, {node.reason!r})"
        self._close(c, Step.RELEASED, f"{why}: {done}", routine_result=result)

    def _routine(self, now: int) -> None:
        """Release held nodes a pending job could use; every routine_scan_s, start new
        routine diagnostics on idle nodes."""
        assert self.queue is not None  # noqa: S101 - tick calls this only with a queue
        held = [c for c in self.cases.values() if c.routine and c.step in OPEN]
        pending: list[SlurmJob] | None = None
        if held:
            pending = self.queue.pending_jobs()
            for c in held:
                job = next((j for j in pending if could_start_on(j, c.node, c.partitions)),
                           None)
                if job is not None:
                    self._release(c, "released", f"job {job.job_id} waits in "
                                  f"{','.join(job.partitions) or 'its partition'}")
        if self.config.routine_every_s <= 0 or now < self._next_scan_ms:
            return
        self._next_scan_ms = now + int(self.config.routine_scan_s * 1000)
        infos = self.queue.node_infos()
        if pending is None:
            pending = self.queue.pending_jobs()
        self._routine_scan(now, infos, pending)

    def _idle_for_s(self, info: SlurmNodeInfo, now: int) -> float:
        """How long the node has been idle: Slurm's LastBusyTime, or (a Slurm that does not
        print it: 23.02) since this controller first saw it idle."""
        if info.last_busy_s is not None:
            self._idle_seen_ms.pop(info.node.name, None)
            return now / 1000 - info.last_busy_s
        return (now - self._idle_seen_ms.setdefault(info.node.name, now)) / 1000

    def _routine_scan(self, now: int, infos: Mapping[str, SlurmNodeInfo],
                      pending: list[SlurmJob]) -> None:
        cfg = self.config
        period_ms = int(cfg.routine_every_s * 1000)
        candidates: list[tuple[int, float, SlurmNodeInfo]] = []
        for name, info in infos.items():
            n = info.node
            if n.state != "IDLE" or n.reason:  # any flag (DRAIN, RESERVED, PLANNED, ...)
                self._idle_seen_ms.pop(name, None)
                continue
            idle_s = self._idle_for_s(info, now)
            case = self.cases.get(name)
            if idle_s < cfg.routine_idle_s or (case is not None and case.step in OPEN):
                continue
            last = self._diagnosed_ms.get(name)
            if last is not None and now - last < period_ms:
                continue
            if any(could_start_on(j, name, info.partitions) for j in pending):
                continue
            candidates.append((last or 0, -idle_s, info))
        if not candidates:
            return
        # partitions with a repair open: repairs first, no routine work beside them
        repairing = {self.partition_of(c.node) for c in self.cases.values()
                     if c.step in OPEN and not c.routine}
        shadow_started: dict[str, int] = {}
        for _last, neg_idle, info in sorted(candidates, key=lambda t: (t[0], t[1])):
            name = info.node.name
            if not self.agents.has_stream(name):
                continue
            part = self.partition_of(name)
            if part in repairing:
                continue
            active = sum(1 for o in self.cases.values()
                         if o.step in ACTIVE and o.partition == part)
            routine = sum(1 for o in self.cases.values()
                          if o.routine and o.step in OPEN and o.partition == part)
            routine += shadow_started.get(part, 0)
            if active >= cfg.max_per_partition or routine >= cfg.routine_batch:
                continue
            self._start_routine(info, part, -neg_idle, now)
            if cfg.shadow:
                shadow_started[part] = shadow_started.get(part, 0) + 1

    def _start_routine(self, info: SlurmNodeInfo, part: str, idle_s: float, now: int) -> None:
        cfg = self.config
        name = info.node.name
        c = Case(uuid.uuid4().hex[:12], name, ROUTINE_CODE, "", Resolution.NONE, now,
                 step_ms=now, routine=True, partitions=info.partitions, partition=part)
        self.cases[name] = c
        self._record(c, "routine", f"idle {idle_s:.0f} s, no job waiting in "
                     f"{','.join(info.partitions) or '(no partition)'}: routine diag level "
                     f"{cfg.routine_level}", reason_code=ROUTINE_CODE, fault_ms=now,
                     partitions=list(info.partitions), partition=part)
        if cfg.shadow:
            self._close(c, Step.SHADOW, f"shadow mode: would drain ({ROUTINE_REASON}), diag "
                        f"level {cfg.routine_level}, resume on a pass")
            return
        self.slurm.drain(name, ROUTINE_REASON)
        node = self.slurm.node(name)
        if not _idle(node):  # a job started between the read and the drain: let it be
            self._release(c, "released", f"Slurm shows a job on it ({node.state})")
            return
        self._diagnose(c, now)

    def _recent(self, node: str, now: int) -> list[int]:
        window = int(self.config.fail_window_s * 1000)
        return [t for t in self._failures.get(node, []) if now - t <= window]

    def _quarantined(self, node: str, now: int) -> bool:
        return len(self._recent(node, now)) >= self.config.fail_limit

    # ------------------------------------------------------------ views and thread

    def open_cases(self) -> list[Case]:
        with self._lock:
            return [replace(c) for c in self.cases.values() if c.step in OPEN]

    def in_remediation(self) -> dict[str, int]:
        """Nodes in remediation or diagnosis per partition (for the metrics)."""
        with self._lock:
            out: dict[str, int] = {}
            for c in self.cases.values():
                if c.step in ACTIVE:
                    out[c.partition] = out.get(c.partition, 0) + 1
            return out

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()

