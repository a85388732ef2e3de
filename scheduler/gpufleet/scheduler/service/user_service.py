"""FleetUser: the controller's gRPC service for people (`gpufleet acct`, `jobs show`, `sbatch`
placement, `drain`, `resume`), authenticated by MUNGE as Slurm does.

Every call carries a MUNGE credential in the metadata key "gpufleet-munge-cred"; the
controller's own munged says which uid made it (and refuses a bad, expired or replayed one).
That uid, never anything the request or the TLS certificate says, is who the caller is.
Admins: uid 0 and the members of one Unix group (`--admin-group`). What each may read or do
is decided once, in userapi/local.py (LocalUserApi), which the head-node commands use too.

Thin: authenticate, turn the request into domain types (user_wire.py), call LocalUserApi for
that caller off the event loop, map its errors to status codes. Every refusal is logged and
written to the audit log; every state-changing call is audited with its result. It never
answers a standby's calls (UNAVAILABLE: ask the active controller).
"""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import pwd
from collections.abc import Callable
from typing import NoReturn, TypeVar

import grpc
from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.rpc.v1 import fleet_pb2_grpc as pb_grpc
from gpufleet.scheduler.access import audit, munge
from gpufleet.scheduler.placement.handed_out import HandedOut
from gpufleet.scheduler.placement.model import PlacementError
from gpufleet.scheduler.service import user_wire as wire
from gpufleet.scheduler.service.convert import stored_inventories
from gpufleet.scheduler.slurm import SlurmClient
from gpufleet.scheduler.store import StateStore, StoreError
from gpufleet.scheduler.userapi.local import (
    MAX_TIME_MS,
    PLACE_TIMEOUT_S,
    LocalUserApi,
    ViewSource,
    slurm_view_source,
)
from gpufleet.scheduler.userapi.model import (
    Caller,
    FailedPrecondition,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    Unavailable,
)

__all__ = [
    "DEFAULT_ADMIN_GROUP",
    "MAX_TIME_MS",
    "METADATA_KEY",
    "PLACE_TIMEOUT_S",
    "Authenticator",
    "Caller",
    "FleetUserServicer",
    "ViewSource",
    "slurm_view_source",
]

log = logging.getLogger(__name__)

METADATA_KEY = "gpufleet-munge-cred"
DEFAULT_ADMIN_GROUP = "gpufleet-admins"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FleetUser"].full_name
_T = TypeVar("_T")
# domain error -> status code (PermissionDenied is a refusal: logged and audited as one)
_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
)


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
        # one for the controller's life: what was handed out is held from the next answers
        self.handed_out = HandedOut()
        self.inventories = stored_inventories(store)
        self.refused = 0
        # whether this controller runs switch holds (placement/switch_hold.py): only then does
        # Place tell the sbatch filter to ask for one (cost "switch_hold" = 1)
        self.switch_holds = False

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

    async def _call(self, context: grpc.aio.ServicerContext, method: str, caller: Caller,
                    call: Callable[[LocalUserApi], _T]) -> _T:
        """`call` on the user API as `caller`, off the event loop; its errors as status
        codes."""
        api = LocalUserApi(self.store, self.slurm, caller, self.view_source, self.inventories,
                           source=context.peer(), admin_group=self.auth.admin_group,
                           handed_out=self.handed_out)
        try:
            return await asyncio.to_thread(call, api)
        except PermissionDenied as e:
            await self._refuse(context, method, grpc.StatusCode.PERMISSION_DENIED, str(e),
                               actor=caller.user, target=e.target)
        except StoreError as e:
            log.error("FleetUser.%s: store failed: %s", method, e)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "controller store failed")
        except (InvalidRequest, NotFound, FailedPrecondition, Unavailable) as e:
            if isinstance(e, FailedPrecondition):
                log.warning("FleetUser.%s by %s failed: %s", method, caller.user, e)
            code = next(c for kind, c in _CODES if isinstance(e, kind))
            await context.abort(code, str(e))
        raise AssertionError("unreachable: context.abort raises")

    # ------------------------------------------------------------ calls

    async def WhoAmI(self, request: pb.WhoAmIRequest,
                     context: grpc.aio.ServicerContext) -> pb.WhoAmIReply:
        c = await self._caller(context, "WhoAmI")
        return pb.WhoAmIReply(uid=c.uid, user=c.user, admin=c.admin)

    async def Acct(self, request: pb.AcctRequest,
                   context: grpc.aio.ServicerContext) -> pb.AcctReply:
        c = await self._caller(context, "Acct")
        q, clip = wire.usage_query(request)
        rows = await self._call(context, "Acct", c, lambda api: api.usage(q, clip))
        return pb.AcctReply(rows=[wire.acct_row(r) for r in rows])

    async def ShowJob(self, request: pb.ShowJobRequest,
                      context: grpc.aio.ServicerContext) -> pb.ShowJobReply:
        c = await self._caller(context, "ShowJob")
        job = await self._call(context, "ShowJob", c, lambda api: api.show_job(request.job_id))
        return wire.show_job_reply(job)

    async def Place(self, request: pb.PlaceRequest,
                    context: grpc.aio.ServicerContext) -> pb.PlaceReply:
        c = await self._caller(context, "Place")
        try:
            req = wire.placement_request(request)
        except PlacementError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        answer = await self._call(context, "Place", c, lambda api: api.place(req))
        reply = wire.place_reply(answer)
        if self.switch_holds:
            reply.cost["switch_hold"] = 1.0
        return reply

    async def Drain(self, request: pb.NodeActionRequest,
                    context: grpc.aio.ServicerContext) -> pb.NodeActionReply:
        c = await self._caller(context, "Drain")
        nodes, reason = list(request.nodes), request.reason
        result = await self._call(context, "Drain", c, lambda api: api.drain(nodes, reason))
        return wire.node_action_reply(result)

    async def Resume(self, request: pb.NodeActionRequest,
                     context: grpc.aio.ServicerContext) -> pb.NodeActionReply:
        c = await self._caller(context, "Resume")
        nodes = list(request.nodes)
        result = await self._call(context, "Resume", c, lambda api: api.resume(nodes))
        return wire.node_action_reply(result)
