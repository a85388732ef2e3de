"""FleetUser: the controller's gRPC service for people (`gpufleet acct`, `jobs show`, `sbatch`
placement, `drain`, `resume`), authenticated by MUNGE as Slurm does.

Every call carries a MUNGE credential in the metadata key "gpufleet-munge-cred"; the
controller's own munged says which uid made it (and refuses a bad, expired or replayed one).
That uid, never anything the request or the TLS certificate says, is who the caller is.
Admins: uid 0 and the members of one Unix group (`--admin-group`). A plain user reads their
own accounting and jobs and asks for placements; only admins drain, resume and read others'.

Thin: validate, authorise, call the domain (store, admin.py, the placement engine) off the
event loop, map errors to status codes. Every refusal is logged and written to the audit log;
every state-changing call is audited with its result. It never trusts a user name sent in a
request, and never answers a standby's calls (UNAVAILABLE: ask the active controller).
"""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import pwd
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

import grpc
from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.rpc.v1 import fleet_pb2_grpc as pb_grpc
from gpufleet.scheduler.access import audit, munge
from gpufleet.scheduler.accounting.ledger import GROUP_BY, UsageQuery, UsageTotal
from gpufleet.scheduler.health import admin
from gpufleet.scheduler.health.actions import REASON_PREFIX
from gpufleet.scheduler.placement.engine import place
from gpufleet.scheduler.placement.model import (
    ClusterView,
    Placement,
    PlacementError,
    PlacementRequest,
)
from gpufleet.scheduler.placement.sources import (
    PlacementUnavailable,
    apply_store,
    view_from_slurm,
)
from gpufleet.scheduler.slurm import SlurmClient, SlurmError, check_node_name
from gpufleet.scheduler.store import StateStore, StoreError

log = logging.getLogger(__name__)

METADATA_KEY = "gpufleet-munge-cred"
DEFAULT_ADMIN_GROUP = "gpufleet-admins"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FleetUser"].full_name
MAX_LIST_ITEMS = 1000  # users, accounts, jobs, nodes, constraints, excludes per request
MAX_NODES = 100_000
MAX_GPUS = 1_000_000
MAX_TIME_LIMIT_MIN = 366 * 24 * 60
# any millisecond time a person can mean: 1970 .. ~2255; beyond that is a bug or an attack
MAX_TIME_MS = 2**53
_NAME = re.compile(r"^[A-Za-z0-9._@+-]{1,64}$")
_JOB_ID = re.compile(r"^[0-9]{1,12}([_+][0-9]{1,9})?$")
_FEATURE = re.compile(r"^[A-Za-z0-9_.|&:-]{1,64}$")
PLACE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Caller:
    """Who made the call, as munged vouches for it (uid/gid) and the host's user database
    maps it (user name, admin group membership)."""

    uid: int
    gid: int
    user: str
    admin: bool


class Authenticator:
    """Credential -> Caller, with this host's munged and user database. Blocking (runs
    unmunge): call it off the event loop.

    `admin_group` None or "": only uid 0 is an admin. A group that does not exist on this
    host is the same (logged once at start): nobody is made an admin by a typo."""

    def __init__(self, munge_socket: str | None = None,
                 admin_group: str | None = DEFAULT_ADMIN_GROUP,
                 timeout_s: float = munge.DEFAULT_TIMEOUT_S) -> None:
        self.munge_socket = munge.socket_path(munge_socket)
        self.admin_group = admin_group or None
        self.timeout_s = timeout_s
        if self.admin_group is not None and self._admin_gid() is None:
            log.warning("admin group %r does not exist on this host: only root is an admin",
                        self.admin_group)

    def _admin_gid(self) -> int | None:
        if self.admin_group is None:
            return None
        try:
            return grp.getgrnam(self.admin_group).gr_gid
        except KeyError:
            return None

    def caller(self, uid: int, gid: int) -> Caller:
        """The Caller for a uid/gid munged vouched for (the group file is read on every call:
        adding or removing an admin needs no controller restart)."""
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = str(uid)  # as Slurm shows a uid without a passwd entry
        is_admin = uid == 0
        admin_gid = self._admin_gid()
        if not is_admin and admin_gid is not None:
            try:
                groups = set(os.getgrouplist(user, gid))
            except (KeyError, OSError):
                groups = {gid}
            is_admin = admin_gid in groups
        return Caller(uid, gid, user, is_admin)

    def identify(self, credential: bytes | str) -> Caller:
        """munged decodes (and so consumes) the credential; raises munge.CredentialRejected or
        munge.MungeUnavailable."""
        cred = munge.decode(credential, self.munge_socket, self.timeout_s)
        return self.caller(cred.uid, cred.gid)


ViewSource = Callable[[], ClusterView]


def slurm_view_source(timeout_s: float = PLACE_TIMEOUT_S) -> ViewSource:
    """The cluster as Slurm sees it now (sinfo/squeue/scontrol on the controller host)."""
    return lambda: view_from_slurm(None, timeout_s)


class FleetUserServicer(pb_grpc.FleetUserServicer):
    """`active`: whether this controller serves (a standby answers UNAVAILABLE). `slurm`:
    what drain/resume act on (None: they fail with FAILED_PRECONDITION). `view_source`: the
    cluster for placements before gpufleet's health is laid over it (default: Slurm's
    commands on this host)."""

    def __init__(self, store: StateStore, slurm: SlurmClient | None, auth: Authenticator,
                 active: Callable[[], bool] = lambda: True,
                 view_source: ViewSource | None = None) -> None:
        self.store = store
        self.slurm = slurm
        self.auth = auth
        self.active = active
        self.view_source = view_source or slurm_view_source()
        self.refused = 0

    # ------------------------------------------------------------ authentication

    async def _refuse(self, context: grpc.aio.ServicerContext, method: str,
                      code: grpc.StatusCode, why: str, actor: str = "unauthenticated",
                      target: str = "") -> NoReturn:
        self.refused += 1
        peer = context.peer()
        log.warning("FleetUser.%s refused for %s from %s (%s): %s", method, actor, peer,
                    code.name, why)
        audit.record(actor=actor, action=f"user.{method}", target=target, source=peer,
                     result="refused", code=code.name, reason=why)
        await context.abort(code, why)
        raise AssertionError("unreachable: context.abort raises")  # for type checkers

    async def _caller(self, context: grpc.aio.ServicerContext, method: str) -> Caller:
        if not self.active():
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "standby controller: another controller is active, ask it")
        cred: str | bytes | None = None
        for key, value in context.invocation_metadata() or ():
            if key == METADATA_KEY:
                cred = value
                break
        if not cred:
            await self._refuse(context, method, grpc.StatusCode.UNAUTHENTICATED,
                               f"no MUNGE credential (metadata {METADATA_KEY!r}): use the "
                               "gpufleet client on a host running munged")
        try:
            return await asyncio.to_thread(self.auth.identify, cred)
        except munge.CredentialRejected as e:
            await self._refuse(context, method, grpc.StatusCode.UNAUTHENTICATED, str(e))
        except munge.MungeError as e:
            # munged down on the controller: nobody is refused for who they are, the
            # controller just cannot tell now
            log.error("FleetUser.%s: cannot verify credentials: %s", method, e)
            await self._refuse(context, method, grpc.StatusCode.UNAVAILABLE,
                               f"controller cannot verify MUNGE credentials now: {e}")

    # ------------------------------------------------------------ calls

    async def WhoAmI(self, request: pb.WhoAmIRequest,
                     context: grpc.aio.ServicerContext) -> pb.WhoAmIReply:
        c = await self._caller(context, "WhoAmI")
        return pb.WhoAmIReply(uid=c.uid, user=c.user, admin=c.admin)

    async def Acct(self, request: pb.AcctRequest,
                   context: grpc.aio.ServicerContext) -> pb.AcctReply:
        c = await self._caller(context, "Acct")
        try:
            q, clip = _usage_query(request)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if not c.admin:
            others = sorted(set(q.users) - {c.user})
            if others:
                await self._refuse(
                    context, "Acct", grpc.StatusCode.PERMISSION_DENIED,
                    f"user {c.user} may read only their own accounting, not that of "
                    f"{', '.join(others)} (admins: members of the admin group)",
                    actor=c.user, target=",".join(others))
            if clip and q.group_by != "user":
                await self._refuse(
                    context, "Acct", grpc.StatusCode.PERMISSION_DENIED,
                    f"clip by {q.group_by} sums every user's usage: admins only; user "
                    f"{c.user} may clip by user", actor=c.user, target=q.group_by)
            q = UsageQuery(users=(c.user,), accounts=q.accounts, jobs=q.jobs,
                           since_ms=q.since_ms, until_ms=q.until_ms, group_by=q.group_by)
        try:
            rows = await asyncio.to_thread(self._usage, q, clip)
        except StoreError as e:
            log.error("FleetUser.Acct: store failed: %s", e)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "controller store failed")
        if clip and not c.admin:
            rows = [r for r in rows if r.key == c.user]
        return pb.AcctReply(rows=[_acct_row(r) for r in rows])

    def _usage(self, q: UsageQuery, clip: bool) -> list[UsageTotal]:
        if clip:
            return self.store.usage_by_minute(q.since_ms or 0, q.until_ms or MAX_TIME_MS,
                                              q.group_by)
        return self.store.usage(q)

    async def ShowJob(self, request: pb.ShowJobRequest,
                      context: grpc.aio.ServicerContext) -> pb.ShowJobReply:
        c = await self._caller(context, "ShowJob")
        job_id = request.job_id
        if not _JOB_ID.match(job_id):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"job_id {job_id[:40]!r}: not a Slurm job id")
        try:
            owner, owner_uid, reply = await asyncio.to_thread(self._job, job_id)
        except StoreError as e:
            log.error("FleetUser.ShowJob: store failed: %s", e)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "controller store failed")
        if reply is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"job {job_id}: no recovery, checkpoint or usage recorded")
        if not c.admin:
            if owner is None and owner_uid is None:
                await self._refuse(
                    context, "ShowJob", grpc.StatusCode.PERMISSION_DENIED,
                    f"job {job_id}: its owner is not known to the controller, so only admins "
                    "may read it", actor=c.user, target=job_id)
            mine = (owner == c.user) if owner is not None else (owner_uid == c.uid)
            if not mine:
                await self._refuse(
                    context, "ShowJob", grpc.StatusCode.PERMISSION_DENIED,
                    f"job {job_id} belongs to another user; {c.user} may read only their "
                    "own jobs", actor=c.user, target=job_id)
        return reply  # type: ignore[return-value]

    def _job(self, job_id: str) -> tuple[str | None, int | None, pb.ShowJobReply | None]:
        """(owner name from the ledger, owner uid from the checkpoint, the reply or None)."""
        usage = self.store.usage_rows(job_id)
        ckpt = self.store.checkpoint(job_id)
        recs = self.store.recoveries(job_id)
        if not usage and ckpt is None and not recs:
            return None, None, None
        owner = next((u.user for u in usage if u.user), None)
        owner_uid = ckpt.uid if ckpt is not None else None
        reply = pb.ShowJobReply(job_id=job_id, user=owner or "")
        if owner is None and owner_uid is not None:
            try:
                reply.user = pwd.getpwuid(owner_uid).pw_name
            except KeyError:
                reply.user = str(owner_uid)
        if ckpt is not None:
            reply.checkpoint_step = ckpt.step
            reply.checkpoint_path = ckpt.path
            reply.checkpoint_ms = ckpt.time_ms
        for r in recs:
            jr = reply.recoveries.add(node=r.node, status=r.status, detail=r.detail,
                                      restart=r.restart, created_ms=r.created_ms)
            for name in ("fault_ms", "drain_ms", "signal_ms", "requeue_ms", "running_ms",
                         "checkpoint_step", "checkpoint_ms", "lost_work_ms"):
                value = getattr(r, name)
                if value is not None:
                    setattr(jr, name, value)
        return owner, owner_uid, reply

    async def Place(self, request: pb.PlaceRequest,
                    context: grpc.aio.ServicerContext) -> pb.PlaceReply:
        await self._caller(context, "Place")
        try:
            req = _placement_request(request)
            result, avoid = await asyncio.to_thread(self._place, req)
        except PlacementError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except PlacementUnavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"no placement now: {e}")
        except StoreError as e:
            log.error("FleetUser.Place: store failed: %s", e)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "controller store failed")
        reply = _place_reply(result)
        reply.avoid.extend(avoid)
        return reply

    def _place(self, req: PlacementRequest) -> tuple[Placement, list[str]]:
        """The placement, and the nodes whose health keeps new jobs off them now (what
        sbatch's cli_filter excludes when it does not pin the job)."""
        view = apply_store(self.view_source(), self.store)
        avoid = sorted(n.name for n in view.nodes.values() if not n.healthy)
        return place(view, req), avoid

    async def Drain(self, request: pb.NodeActionRequest,
                    context: grpc.aio.ServicerContext) -> pb.NodeActionReply:
        return await self._node_action("Drain", request, context)

    async def Resume(self, request: pb.NodeActionRequest,
                     context: grpc.aio.ServicerContext) -> pb.NodeActionReply:
        return await self._node_action("Resume", request, context)

    async def _node_action(self, method: str, request: pb.NodeActionRequest,
                           context: grpc.aio.ServicerContext) -> pb.NodeActionReply:
        c = await self._caller(context, method)
        nodes = list(request.nodes)
        target = ",".join(n[:64] for n in nodes[:20])
        if not c.admin:
            await self._refuse(
                context, method, grpc.StatusCode.PERMISSION_DENIED,
                f"user {c.user} may not {method.lower()} nodes: admins only (root or a member "
                f"of the admin group {self.auth.admin_group or '(none set)'})",
                actor=c.user, target=target)
        try:
            _check_nodes(nodes)
            reason = _check_reason(request.reason) if method == "Drain" else ""
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if self.slurm is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this controller runs without Slurm (--slurm none): it cannot "
                                f"{method.lower()} nodes")
        reply = pb.NodeActionReply()
        peer = context.peer()
        for node in nodes:
            try:
                changed = await asyncio.to_thread(self._act_one, method, node, reason, c.user,
                                                  peer)
            except (admin.AdminError, StoreError) as e:
                audit.record(c.user, f"user.{method}", node, peer, "failed", error=str(e),
                             reason=reason or None, done_before=list(reply.changed) or None)
                log.warning("FleetUser.%s of %s by %s failed: %s", method, node, c.user, e)
                done = f"; done before it: {', '.join(reply.changed)}" if reply.changed else ""
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"{method.lower()} {node} failed: {e}{done}")
            if not changed:  # a change is audited by admin.py, with this peer as source
                audit.record(c.user, f"user.{method}", node, peer, "unchanged",
                             reason=reason or None)
            (reply.changed if changed else reply.unchanged).append(node)
        return reply

    def _act_one(self, method: str, node: str, reason: str, actor: str, peer: str) -> bool:
        """True when the node changed; False when it already was in that state."""
        if self.slurm is None:  # checked by the caller; kept for the type checker
            raise admin.AdminError("this controller runs without Slurm")
        try:
            before = self.slurm.node(node)
        except SlurmError as e:
            raise admin.AdminError(str(e)) from e
        if method == "Drain":
            if before.drained:
                return False
            admin.drain(self.store, self.slurm, node, reason, actor, source=peer)
            return True
        if not before.drained:
            return False
        admin.resume(self.store, self.slurm, node, actor, source=peer)
        return True


# ---------------------------------------------------------------- request validation


def _names(values: Sequence[str], what: str, pattern: re.Pattern[str]) -> tuple[str, ...]:
    if len(values) > MAX_LIST_ITEMS:
        raise ValueError(f"{len(values)} {what}s: at most {MAX_LIST_ITEMS}")
    for v in values:
        if not pattern.match(v):
            raise ValueError(f"{v[:80]!r} is not a valid {what}")
    return tuple(values)


def _time(value: int, what: str) -> int:
    if not 0 <= value <= MAX_TIME_MS:
        raise ValueError(f"{what}={value}: not epoch milliseconds in 0..{MAX_TIME_MS}")
    return value


def _usage_query(r: pb.AcctRequest) -> tuple[UsageQuery, bool]:
    group_by = r.group_by or "job"
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by {group_by[:40]!r}: one of {', '.join(GROUP_BY)}")
    since = _time(r.since_ms, "since_ms") if r.HasField("since_ms") else None
    until = _time(r.until_ms, "until_ms") if r.HasField("until_ms") else None
    if since is not None and until is not None and until <= since:
        raise ValueError(f"until_ms {until} is not after since_ms {since}")
    q = UsageQuery(users=_names(r.users, "user name", _NAME),
                   accounts=_names(r.accounts, "account name", _NAME),
                   jobs=_names(r.jobs, "job id", _JOB_ID),
                   since_ms=since, until_ms=until, group_by=group_by)
    if r.clip and (group_by not in ("user", "account") or q.accounts or q.jobs
                   or len(q.users) > 1):
        raise ValueError("clip works with group_by user|account and no account/job filter")
    return q, r.clip


def _acct_row(t: UsageTotal) -> pb.AcctRow:
    row = pb.AcctRow(key=t.key, jobs=t.jobs, gpus=t.gpus, allocated_ms=t.allocated_ms,
                     busy_ms=t.busy_ms, energy_mj=t.energy_mj, lost_ms=t.lost_ms,
                     user=t.user, account=t.account)
    if t.start_ms is not None:
        row.start_ms = t.start_ms
    if t.end_ms is not None:
        row.end_ms = t.end_ms
    return row


def _bounded(r: pb.PlaceRequest, field: str, top: int) -> int | None:
    if not r.HasField(field):  # type: ignore[arg-type]  # one of the optional counts
        return None
    value = int(getattr(r, field))
    if not 1 <= value <= top:
        raise PlacementError(f"request: {field} must be in 1..{top}, got {value}")
    return value


def _placement_request(r: pb.PlaceRequest) -> PlacementRequest:
    if r.partition and not _NAME.match(r.partition):
        raise PlacementError(f"request: partition {r.partition[:40]!r} is not a valid name")
    try:
        constraints = _names(r.constraints, "feature", _FEATURE)
        exclude = [check_node_name(n) for n in _names(r.exclude, "node name", _NAME)]
    except (ValueError, SlurmError) as e:
        raise PlacementError(f"request: {e}") from e
    req = PlacementRequest(
        nodes=_bounded(r, "nodes", MAX_NODES),
        gpus_per_node=_bounded(r, "gpus_per_node", 1024),
        total_gpus=_bounded(r, "total_gpus", MAX_GPUS),
        partition=r.partition or None, constraints=constraints,
        time_limit_min=_bounded(r, "time_limit_min", MAX_TIME_LIMIT_MIN),
        exclude=frozenset(exclude),
    )
    req.check()
    return req


def _place_reply(p: Placement) -> pb.PlaceReply:
    reply = pb.PlaceReply(ok=p.ok, flags=p.flags, score=p.score, explanation=p.explanation)
    reply.cost.update({k: float(v) for k, v in p.cost.items()})
    reply.env.update(p.env)
    for c in p.nodes:
        reply.nodes.add(node=c.node, leaf=c.leaf, gpus=c.gpus, nvlink_islands=c.islands,
                        nic_rank=c.nic_rank, free_gpus_left=c.free_gpus_left)
    return reply


def _check_nodes(nodes: list[str]) -> None:
    if not nodes:
        raise ValueError("no nodes given")
    if len(nodes) > MAX_LIST_ITEMS:
        raise ValueError(f"{len(nodes)} nodes: at most {MAX_LIST_ITEMS} per call")
    for n in nodes:
        try:
            check_node_name(n)
        except SlurmError as e:
            raise ValueError(str(e)[:120]) from None


def _check_reason(reason: str) -> str:
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
