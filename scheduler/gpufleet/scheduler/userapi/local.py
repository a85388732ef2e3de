"""`LocalUserApi`: the user API over the store and Slurm. The head-node commands use it
directly; the controller's FleetUser servicer builds one per call for the caller munged
vouched for. So validation, authorisation and the answers themselves live here, once.

Authorisation: an admin reads and does everything; a plain user reads only their own usage
and jobs, may ask for placements, and may not drain or resume. It never trusts a user name
from a request: the Caller is given by whoever built this object.
"""

from __future__ import annotations

import pwd
import re
from collections.abc import Callable, Sequence

from gpufleet.scheduler.access import audit
from gpufleet.scheduler.accounting.ledger import GROUP_BY, UsageQuery, UsageTotal
from gpufleet.scheduler.health import admin
from gpufleet.scheduler.health.actions import REASON_PREFIX
from gpufleet.scheduler.placement.engine import place
from gpufleet.scheduler.placement.handed_out import HandedOut
from gpufleet.scheduler.placement.model import (
    KNOWN_UNHEALTHY,
    ClusterView,
    PlacementError,
    PlacementRequest,
)
from gpufleet.scheduler.placement.sources import (
    InventorySource,
    PlacementUnavailable,
    SlurmViewSource,
    apply_store,
)
from gpufleet.scheduler.slurm import SlurmClient, SlurmError, check_node_name
from gpufleet.scheduler.store import CheckpointRow, RecoveryRow, StateStore, StoreError
from gpufleet.scheduler.userapi.model import (
    JOB_ID,
    NAME,
    Caller,
    FailedPrecondition,
    InvalidRequest,
    JobCheckpoint,
    JobRecovery,
    JobReport,
    NodeActionResult,
    NotFound,
    PermissionDenied,
    PlaceAnswer,
    Unavailable,
)

MAX_LIST_ITEMS = 1000  # users, accounts, jobs, nodes per request
# any millisecond time a person can mean: 1970 .. ~2255; beyond that is a bug or an attack
MAX_TIME_MS = 2**53
PLACE_TIMEOUT_S = 2.0

ViewSource = Callable[[], ClusterView]


def slurm_view_source(timeout_s: float = PLACE_TIMEOUT_S) -> ViewSource:
    """The cluster as Slurm sees it now (sinfo/squeue on this host on every call; partitions
    and the switch tree kept 30 s: SlurmViewSource)."""
    return SlurmViewSource(None, timeout_s)


class LocalUserApi:
    """`store`: read (and, for drain/resume, written: the actions); `slurm`: what drain and
    resume act on (None: they fail); `caller`: who asks; `view_source`: the cluster before
    gpufleet's health is laid over it; `inventories`: each node's inventory (NVLink islands
    and NICs for placement);
    `source`: where the caller is, for the audit (None: this host's command line);
    `admin_group`: named in refusals; `handed_out`: GPUs answered a moment ago, held from
    this answer and holding this one's (the controller's, kept across calls; None: none)."""

    def __init__(self, store: StateStore, slurm: SlurmClient | None, caller: Caller,
                 view_source: ViewSource | None = None, inventories: InventorySource | None = None,
                 source: str | None = None, admin_group: str | None = None,
                 handed_out: HandedOut | None = None) -> None:
        self.store = store
        self.slurm = slurm
        self.caller = caller
        self.view_source = view_source or slurm_view_source()
        self.inventories = inventories
        self.source = source
        self.admin_group = admin_group
        self.handed_out = handed_out

    def close(self) -> None:
        self.store.close()

    # ------------------------------------------------------------ accounting

    def usage(self, query: UsageQuery, clip: bool = False) -> list[UsageTotal]:
        q = check_usage_query(query, clip)
        c = self.caller
        if not c.admin:
            others = sorted(set(q.users) - {c.user})
            if others:
                raise PermissionDenied(
                    f"user {c.user} may read only their own accounting, not that of "
                    f"{', '.join(others)} (admins: members of the admin group)",
                    target=",".join(others))
            if clip and q.group_by != "user":
                raise PermissionDenied(
                    f"clip by {q.group_by} sums every user's usage: admins only; user "
                    f"{c.user} may clip by user", target=q.group_by)
            q = UsageQuery(users=(c.user,), accounts=q.accounts, jobs=q.jobs,
                           since_ms=q.since_ms, until_ms=q.until_ms, group_by=q.group_by)
        if clip:
            rows = self.store.usage_by_minute(q.since_ms or 0, q.until_ms or MAX_TIME_MS,
                                              q.group_by)
            return rows if c.admin else [r for r in rows if r.key == c.user]
        return self.store.usage(q)

    # ------------------------------------------------------------ jobs

    def show_job(self, job_id: str) -> JobReport:
        if not JOB_ID.match(job_id):
            raise InvalidRequest(f"job_id {job_id[:40]!r}: not a Slurm job id")
        usage = self.store.usage_rows(job_id)
        ckpt = self.store.checkpoint(job_id)
        recs = self.store.recoveries(job_id)
        if not usage and ckpt is None and not recs:
            raise NotFound(f"job {job_id}: no recovery and no checkpoint recorded (and no "
                           "usage)")
        owner = next((u.user for u in usage if u.user), None)
        owner_uid = ckpt.uid if ckpt is not None else None
        c = self.caller
        if not c.admin:
            if owner is None and owner_uid is None:
                raise PermissionDenied(
                    f"job {job_id}: its owner is not known to the controller, so only admins "
                    "may read it", target=job_id)
            if not ((owner == c.user) if owner is not None else (owner_uid == c.uid)):
                raise PermissionDenied(
                    f"job {job_id} belongs to another user; {c.user} may read only their "
                    "own jobs", target=job_id)
        if owner is None and owner_uid is not None:
            try:
                owner = pwd.getpwuid(owner_uid).pw_name
            except KeyError:
                owner = str(owner_uid)  # as Slurm shows a uid without a passwd entry
        return JobReport(job_id, owner, _checkpoint(ckpt), tuple(_recovery(r) for r in recs))

    # ------------------------------------------------------------ placement

    def place(self, request: PlacementRequest) -> PlaceAnswer:
        try:
            request.check()
            view = apply_store(self.view_source(), self.store, self.inventories)
            if self.handed_out is not None:
                view = self.handed_out.apply(view)
            # excluded from Slurm's choice: nodes gpufleet KNOWS are unhealthy. A silent agent
            # (unreachable) says nothing about the node, and Slurm handles dead nodes itself:
            # excluding silent nodes would refuse every job while agents or the controller's
            # view are down, where plain sbatch runs them (never worse than plain sbatch)
            avoid = tuple(sorted(n.name for n in view.nodes.values()
                                 if n.health in KNOWN_UNHEALTHY))
            result = place(view, request)
            if self.handed_out is not None:  # pending until Slurm starts it: not free now
                self.handed_out.add(result)
            return PlaceAnswer(result, avoid)
        except PlacementError as e:
            raise InvalidRequest(str(e)) from e
        except PlacementUnavailable as e:
            raise Unavailable(f"no placement now: {e}") from e

    # ------------------------------------------------------------ drain / resume

    def drain(self, nodes: list[str], reason: str) -> NodeActionResult:
        return self._node_action("drain", nodes, reason)

    def resume(self, nodes: list[str]) -> NodeActionResult:
        return self._node_action("resume", nodes, "")

    def _node_action(self, kind: str, nodes: Sequence[str], reason: str) -> NodeActionResult:
        c = self.caller
        if not c.admin:
            raise PermissionDenied(
                f"user {c.user} may not {kind} nodes: admins only (root or a member of the "
                f"admin group {self.admin_group or '(none set)'})",
                target=",".join(n[:64] for n in nodes[:20]))
        try:
            check_nodes(nodes)
            reason = check_reason(reason) if kind == "drain" else ""
        except ValueError as e:
            raise InvalidRequest(str(e)) from e
        if self.slurm is None:
            raise FailedPrecondition(f"this controller runs without Slurm (--slurm none): it "
                                     f"cannot {kind} nodes")
        changed: list[str] = []
        unchanged: list[str] = []
        method = f"user.{kind.capitalize()}"
        source = self.source or audit_source()
        for node in nodes:
            try:
                done = self._act_one(self.slurm, kind, node, reason)
            except (admin.AdminError, StoreError) as e:
                audit.record(c.user, method, node, source, "failed", error=str(e),
                             reason=reason or None, done_before=changed or None)
                before = f"; done before it: {', '.join(changed)}" if changed else ""
                raise FailedPrecondition(f"{kind} {node} failed: {e}{before}") from e
            if not done:  # a change is audited by admin.py
                audit.record(c.user, method, node, source, "unchanged", reason=reason or None)
            (changed if done else unchanged).append(node)
        return NodeActionResult(tuple(changed), tuple(unchanged))

    def _act_one(self, slurm: SlurmClient, kind: str, node: str, reason: str) -> bool:
        """True when the node changed; False when it already was in that state (drained for
        this very reason: a drain for another reason, gpufleet's included, takes it over)."""
        try:
            before = slurm.node(node)
        except SlurmError as e:
            raise admin.AdminError(str(e)) from e
        if kind == "drain":
            if before.drained and before.reason == reason:
                return False
            admin.drain(self.store, slurm, node, reason, self.caller.user, source=self.source)
            return True
        if not before.drained:
            return False
        admin.resume(self.store, slurm, node, self.caller.user, source=self.source)
        return True


def audit_source() -> str:
    import socket

    return f"cli@{socket.gethostname()}"


# ---------------------------------------------------------------- validation


def names(values: Sequence[str], what: str, pattern: re.Pattern[str]) -> tuple[str, ...]:
    if len(values) > MAX_LIST_ITEMS:
        raise ValueError(f"{len(values)} {what}s: at most {MAX_LIST_ITEMS}")
    for v in values:
        if not pattern.match(v):
            raise ValueError(f"{v[:80]!r} is not a valid {what}")
    return tuple(values)


def _time(value: int | None, what: str) -> int | None:
    if value is not None and not 0 <= value <= MAX_TIME_MS:
        raise ValueError(f"{what}={value}: not epoch milliseconds in 0..{MAX_TIME_MS}")
    return value


def check_usage_query(q: UsageQuery, clip: bool) -> UsageQuery:
    """The query if every part of it is valid, else InvalidRequest naming the part."""
    try:
        return _usage_query(q, clip)
    except ValueError as e:
        raise InvalidRequest(str(e)) from e


def _usage_query(q: UsageQuery, clip: bool) -> UsageQuery:
    group_by = q.group_by or "job"
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by {group_by[:40]!r}: one of {', '.join(GROUP_BY)}")
    since, until = _time(q.since_ms, "since_ms"), _time(q.until_ms, "until_ms")
    if since is not None and until is not None and until <= since:
        raise ValueError(f"until_ms {until} is not after since_ms {since}")
    out = UsageQuery(users=names(q.users, "user name", NAME),
                     accounts=names(q.accounts, "account name", NAME),
                     jobs=names(q.jobs, "job id", JOB_ID),
                     since_ms=since, until_ms=until, group_by=group_by)
    if clip and (group_by not in ("user", "account") or out.accounts or out.jobs
                 or len(out.users) > 1):
        raise ValueError("clip works with group_by user|account and no account/job filter")
    return out


def check_nodes(nodes: Sequence[str]) -> None:
    if not nodes:
        raise ValueError("no nodes given")
    if len(nodes) > MAX_LIST_ITEMS:
        raise ValueError(f"{len(nodes)} nodes: at most {MAX_LIST_ITEMS} per call")
    for n in nodes:
        try:
            check_node_name(n)
        except SlurmError as e:
            raise ValueError(str(e)[:120]) from None


def check_reason(reason: str) -> str:
    reason = reason.strip()
    if not reason:
        raise ValueError("reason is empty: say why the node is drained")
    if len(reason) > 200:
        raise ValueError(f"reason is {len(reason)} characters: keep it under 200")
    if reason.startswith(REASON_PREFIX):
        # that prefix marks gpufleet's own drains, which the policy lifts by itself: a hand
        # drain must stay until a person resumes it
        raise ValueError(f"reason must not start with {REASON_PREFIX!r} (gpufleet's own "
                         "drains, which it resumes by itself)")
    if any(ord(ch) < 32 for ch in reason):
        raise ValueError("reason has control characters")
    return reason


# ---------------------------------------------------------------- store rows -> domain


def _checkpoint(c: CheckpointRow | None) -> JobCheckpoint | None:
    return None if c is None else JobCheckpoint(c.step, c.path, c.time_ms, c.node)


def _recovery(r: RecoveryRow) -> JobRecovery:
    return JobRecovery(r.node, r.status, r.detail, r.restart, r.fault_ms, r.drain_ms,
                       r.signal_ms, r.requeue_ms, r.running_ms, r.checkpoint_step,
                       r.checkpoint_ms, r.lost_work_ms, r.created_ms)
