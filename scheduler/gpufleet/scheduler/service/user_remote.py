"""`RemoteUserApi`: the user API over gRPC (FleetUser, as the calling user, MUNGE), for login
nodes; and `GrpcPlacementSource`, placement's PlacementSource over the same call.

It answers exactly what LocalUserApi answers on the controller: the servicer runs that very
code for the caller. The controller's refusals come back as the same domain errors, with the
controller's own words; a call that never got an answer (controller away, no munged here, TLS)
is Unavailable or a UserApiError saying where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import grpc
from gpufleet.scheduler.accounting.ledger import UsageQuery, UsageTotal
from gpufleet.scheduler.placement.model import Placement, PlacementError, PlacementRequest
from gpufleet.scheduler.placement.sources import PlacementUnavailable
from gpufleet.scheduler.service import user_wire as wire
from gpufleet.scheduler.service.user_client import UserClient, UserClientError, tls_from_env
from gpufleet.scheduler.userapi.model import (
    FailedPrecondition,
    InvalidRequest,
    JobReport,
    NodeActionResult,
    NotFound,
    PermissionDenied,
    PlaceAnswer,
    Unavailable,
    UserApiError,
)

__all__ = ["GrpcPlacementSource", "RemoteUserApi", "domain_error"]

_T = TypeVar("_T")
# status codes that carry the controller's domain answer (LocalUserApi's error, in its words)
_DOMAIN: dict[grpc.StatusCode, Callable[[str], UserApiError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
}


def domain_error(e: UserClientError) -> UserApiError:
    """The client's error as the user API's: a domain answer as LocalUserApi raised it; no
    answer (unreachable, too slow, standby, store failing) as Unavailable; anything else
    (not authenticated, no munged here) as a UserApiError with the client's message."""
    make = _DOMAIN.get(e.code) if e.code is not None else None
    if make is not None:
        return make(e.details)
    if e.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable(str(e))
    return UserApiError(str(e))


class RemoteUserApi:
    """The UserApi through one UserClient (closed by `close()`)."""

    def __init__(self, client: UserClient, place_timeout_s: float | None = None) -> None:
        self.client = client
        self.place_timeout_s = place_timeout_s

    def close(self) -> None:
        self.client.close()

    @staticmethod
    def _ask(call: Callable[[], _T]) -> _T:
        try:
            return call()
        except UserClientError as e:
            raise domain_error(e) from e

    def usage(self, query: UsageQuery, clip: bool = False) -> list[UsageTotal]:
        reply = self._ask(lambda: self.client.acct(wire.acct_request(query, clip)))
        return [wire.usage_total(r) for r in reply.rows]

    def show_job(self, job_id: str) -> JobReport:
        return wire.job_report(self._ask(lambda: self.client.show_job(job_id)))

    def place(self, request: PlacementRequest) -> PlaceAnswer:
        reply = self._ask(lambda: self.client.place(wire.place_request(request),
                                                    self.place_timeout_s))
        return wire.place_answer(reply, request)

    def drain(self, nodes: list[str], reason: str) -> NodeActionResult:
        return wire.node_action_result(self._ask(lambda: self.client.drain(nodes, reason)))

    def resume(self, nodes: list[str]) -> NodeActionResult:
        return wire.node_action_result(self._ask(lambda: self.client.resume(nodes)))


@dataclass
class GrpcPlacementSource:
    """Asks the controller's FleetUser.Place (MUNGE-authenticated; any user may ask).

    TLS settings and the munged socket come from `env` (default: this process's
    environment): GPUFLEET_TLS_CA / _CERT / _KEY or GPUFLEET_INSECURE, GPUFLEET_MUNGE_SOCKET.
    Anything that stops an answer (controller away, slow, no munge here, refused) is
    PlacementUnavailable, so `gpufleet sbatch` submits as plain sbatch with one warning; a
    request the controller calls invalid is a PlacementError.
    """

    address: str
    timeout_s: float = 2.0
    env: Mapping[str, str] | None = None

    def place(self, request: PlacementRequest) -> Placement:
        # None: munge.socket_path reads GPUFLEET_MUNGE_SOCKET from this process's environment
        sock = None if self.env is None else self.env.get("GPUFLEET_MUNGE_SOCKET")
        try:
            client = UserClient(self.address, tls_from_env(self.env), sock,
                                timeout_s=self.timeout_s)
        except UserClientError as e:
            raise PlacementUnavailable(str(e)) from e
        api = RemoteUserApi(client)
        try:
            return api.place(request).placement
        except InvalidRequest as e:
            raise PlacementError(str(e)) from e
        except UserApiError as e:
            raise PlacementUnavailable(str(e)) from e
        finally:
            api.close()
