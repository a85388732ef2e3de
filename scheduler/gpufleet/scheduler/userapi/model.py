"""The user API's contract: the `UserApi` Protocol, the domain types it answers with, and the
errors it raises (each maps to one gRPC status code in service/, and to one line on the
terminal in cli/). Nothing here knows which side of the wire it runs on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from gpufleet.scheduler.accounting.ledger import UsageQuery, UsageTotal
from gpufleet.scheduler.placement.model import Placement, PlacementRequest

# what a user, account and Slurm job id may look like, wherever one is read
NAME = re.compile(r"^[A-Za-z0-9._@+-]{1,64}$")
JOB_ID = re.compile(r"^[0-9]{1,12}([_+][0-9]{1,9})?$")


@dataclass(frozen=True)
class Caller:
    """Who asks: on the controller, the uid/gid munged vouched for, with the host's user
    database's name and admin-group membership; on the head node, whoever can open the store
    (an admin: the store's file permissions are the authorisation there)."""

    uid: int
    gid: int
    user: str
    admin: bool


@dataclass(frozen=True)
class JobCheckpoint:
    """The newest complete checkpoint a job registered (node "" when not known)."""

    step: int
    path: str
    time_ms: int
    node: str = ""


@dataclass(frozen=True)
class JobRecovery:
    """One recovery of a job from one fatal node; a step's time None: not reached."""

    node: str
    status: str
    detail: str
    restart: int
    fault_ms: int | None
    drain_ms: int | None
    signal_ms: int | None
    requeue_ms: int | None
    running_ms: int | None
    checkpoint_step: int | None
    checkpoint_ms: int | None
    lost_work_ms: int | None
    created_ms: int


@dataclass(frozen=True)
class JobReport:
    """`jobs show`: a job's owner (None: not known), last checkpoint and recoveries."""

    job_id: str
    user: str | None
    checkpoint: JobCheckpoint | None
    recoveries: tuple[JobRecovery, ...]


@dataclass(frozen=True)
class PlaceAnswer:
    """A placement, and the nodes whose health keeps new jobs off them now (what sbatch's
    cli_filter excludes when it does not pin the job)."""

    placement: Placement
    avoid: tuple[str, ...]


@dataclass(frozen=True)
class NodeActionResult:
    """drain/resume: the nodes changed, and those already in that state (nothing done)."""

    changed: tuple[str, ...]
    unchanged: tuple[str, ...]


class UserApiError(Exception):
    """A call cannot be answered; the message is one line for the person who asked."""


class InvalidRequest(UserApiError):
    """The request itself is wrong (a bad name, id, count or reason)."""


class NotFound(UserApiError):
    """Nothing is recorded about what was asked for."""


class PermissionDenied(UserApiError):
    """The caller may not do or read this; `target` names what was refused (for the audit)."""

    def __init__(self, message: str, target: str = "") -> None:
        super().__init__(message)
        self.target = target


class FailedPrecondition(UserApiError):
    """The request is fine but cannot be done in this state (Slurm refused, no Slurm)."""


class Unavailable(UserApiError):
    """No answer now (controller away, store or Slurm failing): try again later."""


class UserApi(Protocol):
    """Every call a user command makes; both implementations answer the same."""

    def usage(self, query: UsageQuery, clip: bool = False) -> list[UsageTotal]:
        """Accounting totals (`gpufleet acct`); clip: only usage inside the window, per
        user or account. A plain user gets only their own usage."""
        ...

    def show_job(self, job_id: str) -> JobReport:
        """One job's checkpoint and recoveries; NotFound when nothing is recorded."""
        ...

    def place(self, request: PlacementRequest) -> PlaceAnswer:
        """A placement for a job now; Unavailable when the cluster cannot be read."""
        ...

    def drain(self, nodes: list[str], reason: str) -> NodeActionResult:
        """Drain by hand (admins); a node already drained for that reason is unchanged."""
        ...

    def resume(self, nodes: list[str]) -> NodeActionResult:
        """Resume by hand (admins); a node that is not drained is unchanged."""
        ...

    def close(self) -> None:
        """Release the store or the channel."""
        ...
