"""What each part of the controller needs from the state store: one narrow Protocol per
domain, and `StateStore`, all of them (what SqliteStore and PostgresStore are).

A domain takes the narrowest one it uses, so its needs are written down where it is built
and a test double implements only that.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from gpufleet.scheduler.accounting.ledger import UsageDelta, UsageQuery, UsageRow, UsageTotal

from .rows import (
    ActionRow,
    AgentCommandRow,
    CheckpointRow,
    CommandResultRow,
    EventRow,
    HealthChangeRow,
    NodeRow,
    PolicyRow,
    RecoveryRow,
    VerdictRow,
)


class NodeStore(Protocol):
    """Nodes as agents announce them: inventory, sequence numbers, liveness."""

    def upsert_node(
        self, name: str, hostname: str, gpu_count: int, inventory: bytes, agent_instance: str,
        now_ms: int,
    ) -> None: ...

    def last_seq(self, name: str) -> tuple[str, int]: ...

    def touch_node(self, name: str, agent_instance: str, seq: int, now_ms: int) -> None: ...

    def touch_nodes(self, rows: Sequence[tuple[str, str, int, int]]) -> None: ...

    def set_reachable(self, name: str, reachable: bool, now_ms: int) -> bool: ...

    def nodes(self) -> list[NodeRow]: ...

    def liveness_changes(self, silent_before_ms: int) -> list[NodeRow]: ...

    def node(self, name: str) -> NodeRow | None: ...

    def inventory(self, name: str) -> bytes | None: ...


class HealthStore(NodeStore, Protocol):
    """Verdicts, the event timeline, Slurm actions and the degraded policy's own state."""

    def set_verdict(self, v: VerdictRow, *, publish: bool = False) -> tuple[str, str]: ...

    def health_changes(self, limit: int = 1000) -> list[HealthChangeRow]: ...

    def delete_health_changes(self, ids: Sequence[int]) -> None: ...

    def verdicts(self, node: str) -> list[VerdictRow]: ...

    def add_event(
        self, node: str, ts_ms: int, kind: str, severity: str, reason_code: str, evidence: str,
        gpu_index: int | None, xid: int | None, now_ms: int,
        report: tuple[str, int] | None = None,
    ) -> int | None: ...

    def events(
        self, node: str | None = None, since_ms: int = 0, limit: int = 1000
    ) -> list[EventRow]: ...

    def add_action(
        self, node: str, action: str, reason: str, actor: str, status: str, fault_ms: int | None,
        now_ms: int,
    ) -> int: ...

    def update_action(self, action_id: int, status: str, detail: str, attempts: int,
                      done_ms: int | None) -> None: ...

    def actions(self, node: str | None = None, since_ms: int = 0) -> list[ActionRow]: ...

    def policy_state(self, node: str) -> PolicyRow | None: ...

    def set_policy_state(self, row: PolicyRow) -> None: ...

    def clear_policy_state(self, node: str) -> None: ...


class RecoveryStore(Protocol):
    """Checkpoints jobs registered and the recoveries of jobs hit by a fault."""

    def record_checkpoint(self, row: CheckpointRow) -> bool: ...

    def checkpoint(self, job_id: str) -> CheckpointRow | None: ...

    def save_recovery(self, row: RecoveryRow) -> int: ...

    def recoveries(self, job_id: str | None = None, since_ms: int = 0) -> list[RecoveryRow]: ...


class AcctStore(Protocol):
    """The accounting ledger (store/acct.py)."""

    def record_usage(self, rows: Iterable[UsageRow]) -> list[UsageDelta]: ...

    def add_lost_time(self, job_id: str, node: str, lost_ms: int, run: int | None = None,
                      now_ms: int = 0) -> int: ...

    def rebuild_acct_rollups(self) -> None: ...

    def usage_rows(self, job_id: str) -> list[UsageRow]: ...

    def usage(self, q: UsageQuery) -> list[UsageTotal]: ...

    def usage_by_minute(self, since_ms: int, until_ms: int, group_by: str = "account"
                        ) -> list[UsageTotal]: ...


class RelayStore(Protocol):
    """Repair commands and their answers between ingest processes on one store (migration
    12, service/command_relay.py): who holds each node's stream, and two queues."""

    def publish_streams(self, holder: str, up: Sequence[str], down: Sequence[str],
                        now_ms: int) -> None: ...

    def stream_holders(self, live_since_ms: int, node: str | None = None
                       ) -> dict[str, str]: ...

    def forget_streams(self, holder: str) -> None: ...

    def prune_relay(self, dead_before_ms: int, commands_before_ms: int) -> tuple[int, int]: ...

    def queue_command(self, row: AgentCommandRow) -> int: ...

    def claim_commands(self, holder: str) -> list[AgentCommandRow]: ...

    def add_command_result(self, row: CommandResultRow) -> int: ...

    def command_results(self, limit: int = 1000) -> list[CommandResultRow]: ...

    def delete_command_results(self, ids: Sequence[int]) -> None: ...


class StateStore(HealthStore, RecoveryStore, AcctStore, RelayStore, Protocol):
    """Everything: what the controller process opens and hands to each part."""

    def schema_version(self) -> int: ...

    def close(self) -> None: ...
