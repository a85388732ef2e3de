"""The controller's state: nodes, their verdicts, health events, Slurm actions, and what the
degraded policy changed.

One interface (`StateStore`), two backends: SQLite (embedded default, WAL, one file) and
PostgreSQL (production, and a standby controller sharing the database). Schema changes are
numbered migrations applied in order at open, one numbering for both; a store written by a
newer gpufleet is refused rather than guessed at. Nothing here talks to Slurm or to agents.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import HEALTH_ORDER, now_ms
from .migrations import MIGRATIONS, PG_MIGRATIONS
from .protocols import (
    AcctStore,
    HealthStore,
    NodeStore,
    RecoveryStore,
    RelayStore,
    StateStore,
)
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
    StoreError,
    VerdictRow,
)
from .sqlite import SqliteStore

if TYPE_CHECKING:
    from .postgres import PostgresStore, describe_target  # noqa: F401 - lazy re-exports


def __getattr__(name: str) -> Any:
    """PostgreSQL on first use: psycopg is in `gpufleet[controller]`, not on every install."""
    if name in ("PostgresStore", "describe_target"):
        from . import postgres
        return getattr(postgres, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "HEALTH_ORDER",
    "MIGRATIONS",
    "PG_MIGRATIONS",
    "AcctStore",
    "ActionRow",
    "AgentCommandRow",
    "CheckpointRow",
    "CommandResultRow",
    "EventRow",
    "HealthChangeRow",
    "HealthStore",
    "NodeRow",
    "NodeStore",
    "PolicyRow",
    "PostgresStore",
    "RecoveryRow",
    "RecoveryStore",
    "RelayStore",
    "SqliteStore",
    "StateStore",
    "StoreError",
    "VerdictRow",
    "now_ms",
    "open_store",
]

_URL_SCHEMES = ("postgresql://", "postgres://")


def open_store(target: str | Path) -> StateStore:
    """A path (or `sqlite:///PATH`) -> SqliteStore; `postgresql://` / `postgres://` ->
    PostgresStore; any other URL is a StoreError naming it."""
    text = str(target).strip()
    if not text:
        raise StoreError("empty store target: give a file path or a postgresql:// URL")
    if text.startswith(_URL_SCHEMES):
        from .postgres import PostgresStore
        return PostgresStore(text)
    if text.startswith("sqlite:///"):
        return SqliteStore(text.removeprefix("sqlite://"))
    if "://" in text:
        scheme = text.split("://", 1)[0]
        from .postgres import describe_target
        shown = describe_target(text) if scheme.startswith("postgres") else f"{scheme}://..."
        raise StoreError(
            f"unsupported store target {shown!r}: use a file path (SQLite) or a "
            "postgresql:// URL"
        )
    return SqliteStore(text)
