"""The closed sets of values the store keeps for health and Slurm actions: severities (a
verdict's, a node's health), action kinds and action statuses.

`StrEnum`s: each member IS its string ("drain" == ActionKind.DRAIN), so what the store keeps,
what audit records say and what metrics label stay the same strings they always were; the
enums only let mypy and readers see the whole set in one place. Here, in the storage layer,
because every layer that reads or writes those columns uses them: health decides with them,
recovery (below health) reads the actions back. Imports nothing.
"""

from __future__ import annotations

from enum import StrEnum


class Severity(StrEnum):
    """A verdict's severity, and a node's overall health (the worst of its verdicts).
    UNKNOWN: no verdict yet (a node that never reported one)."""

    UNKNOWN = "unknown"
    OK = "ok"
    WARN = "warn"
    DEGRADED = "degraded"
    FATAL = "fatal"


HEALTHY = frozenset({Severity.OK, Severity.WARN})


class ActionKind(StrEnum):
    """What the controller does to a node in Slurm (health/actions.py applies each)."""

    DRAIN = "drain"
    RESUME = "resume"
    DEGRADE = "degrade"  # raise Weight, add the degraded feature
    RESTORE = "restore"  # undo DEGRADE
    REASSERT = "reassert"  # put back a DEGRADE that slurmctld forgot on restart


class ActionStatus(StrEnum):
    """Where a recorded action stands (the `actions` table's status column)."""

    QUEUED = "queued"  # waiting for, or retrying against, Slurm
    SHADOW = "shadow"  # shadow mode: recorded, not done
    DONE = "done"
    SKIPPED = "skipped"  # nothing to do (e.g. someone else's drain stands)
    FAILED = "failed"  # Slurm refused it for good
