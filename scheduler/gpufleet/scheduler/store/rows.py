"""The store's rows: what the controller keeps about nodes, health, actions and jobs.

Plain frozen dataclasses; the SQL that fills them is in base.py (shared by both backends).
"""

from __future__ import annotations

from dataclasses import dataclass


class StoreError(Exception):
    """The state store cannot be opened or used; the message names the file or server."""


@dataclass(frozen=True)
class NodeRow:
    name: str
    hostname: str
    gpu_count: int
    health: str
    health_reason: str
    health_evidence: str
    first_seen_ms: int
    last_seen_ms: int
    reachable: bool = True
    unreachable_since_ms: int | None = None


@dataclass(frozen=True)
class HealthChangeRow:
    """A verdict moved a node's health in an ingest process that does not act in Slurm;
    the acting one (the leader) reads it from the store (migration 10)."""

    id: int
    node: str
    before: str
    after: str
    reason_code: str
    evidence: str
    fault_ms: int | None
    created_ms: int


@dataclass(frozen=True)
class AgentCommandRow:
    """A repair command the leader queued for a node whose agent stream is on another
    ingest process; that process claims it (migration 12). `id` 0: not stored yet."""

    id: int
    node: str
    kind: str
    request_id: str
    gpus: tuple[int, ...]
    level: int
    created_ms: int


@dataclass(frozen=True)
class CommandResultRow:
    """An agent's answer to a repair command, received by a process that is not the leader;
    the leader reads it (migration 12). `id` 0: not stored yet."""

    id: int
    node: str
    request_id: str
    kind: str
    ok: bool
    could_not_run: bool
    detail: str
    failed_checks: tuple[str, ...]
    evidence: str
    created_ms: int


@dataclass(frozen=True)
class ActionRow:
    id: int
    node: str
    action: str
    reason: str
    actor: str
    status: str
    detail: str
    attempts: int
    created_ms: int
    done_ms: int | None
    fault_ms: int | None


@dataclass(frozen=True)
class VerdictRow:
    node: str
    check_name: str
    gpu_index: int | None
    subject: str
    severity: str
    reason_code: str
    evidence: str
    since_ms: int


@dataclass(frozen=True)
class EventRow:
    id: int
    node: str
    ts_ms: int  # when it happened, agent clock
    received_ms: int  # when the controller stored it
    kind: str
    severity: str
    reason_code: str
    evidence: str
    gpu_index: int | None
    xid: int | None


@dataclass(frozen=True)
class PolicyRow:
    """What the degraded policy changed on a node, so that recovery can undo exactly that."""

    node: str
    original_weight: int | None  # None: the weight was not changed
    feature_added: str  # "": no feature was added
    applied_ms: int


@dataclass(frozen=True)
class CheckpointRow:
    """The newest complete checkpoint a job registered through its node's agent."""

    job_id: str
    node: str
    step: int
    path: str
    time_ms: int
    uid: int | None
    received_ms: int


@dataclass(frozen=True)
class RecoveryRow:
    """One job's recovery from one fatal node: the steps taken and when (None: not reached).

    `id` 0 means not stored yet. fault_ms is the agent's clock, the rest the controller's.
    """

    id: int
    job_id: str
    node: str
    status: str  # running | requeued | running_again | not_requested | do_not_requeue |
    #              finished | limit | failed | shadow
    detail: str
    restart: int  # gpufleet's Nth restart of this job (0: not restarted by this recovery)
    fault_ms: int | None
    drain_ms: int | None
    signal_ms: int | None
    requeue_ms: int | None
    running_ms: int | None
    checkpoint_step: int | None
    checkpoint_ms: int | None
    lost_work_ms: int | None
    created_ms: int
