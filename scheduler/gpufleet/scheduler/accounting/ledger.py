"""Accounting's domain types: a job's use of a GPU (UsageRow), what a report added
(UsageDelta), a group's totals (UsageTotal), which jobs a query counts (UsageQuery), and the
time arithmetic of the rollups (minutes, UTC days).

The ledger's rules (cumulative reports, runs, identity, lost time) are stored and explained
in gpufleet.scheduler.store.acct; everything outside the store uses these types only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MINUTE_MS = 60_000
DAY_MS = 86_400_000  # rollup days are UTC days: epoch ms // DAY_MS
MAX_SPLIT_MINUTES = 24 * 60  # a longer gap between two reports goes into its last minute
GROUP_BY = ("user", "account", "job", "node")


@dataclass(frozen=True)
class UsageRow:
    """One job's cumulative use of one GPU on one node, as of as_of_ms."""

    job_id: str
    node: str
    gpu_index: int
    user: str
    account: str
    start_ms: int
    end_ms: int | None
    as_of_ms: int
    allocated_ms: int
    busy_ms: int
    energy_mj: int
    idle_since_ms: int | None = None
    run: int = 0  # Slurm's restart count of the run (module docstring: Runs)
    source: str = ""  # 'hook' (exact), 'proc' (/proc safety net), '' unknown


@dataclass(frozen=True)
class UsageDelta:
    """What one applied report added (for counters: the difference to the stored row)."""

    job_id: str
    account: str
    user: str
    allocated_ms: int
    busy_ms: int
    energy_mj: int


@dataclass(frozen=True)
class UsageTotal:
    """Totals of one group (`key` is the user, account, job id or node; "" for all).

    allocated_ms, busy_ms: GPU-ms; energy_mj: millijoules; lost_ms: GPU-ms lost to failures
    (see the module docstring); start_ms/end_ms: the job's or node's span (None for user and
    account groups); user/account: the job's (group_by job only)."""

    key: str
    jobs: int
    gpus: int
    allocated_ms: int
    busy_ms: int
    energy_mj: int
    lost_ms: int
    start_ms: int | None = None
    end_ms: int | None = None
    user: str = ""
    account: str = ""
    runs: int = 0  # group_by job: the job's runs (a requeued job ran more than once)


@dataclass(frozen=True)
class UsageQuery:
    """Which jobs `usage()` totals, like sacct: a job counts WHOLE (all its GPU time, also
    outside the window) when it ran at any moment inside [since_ms, until_ms), i.e. it started
    before until_ms and had not ended before since_ms (a running job has not ended). None:
    unbounded on that side. `usage_by_minute` is the other view ("clip", `gpufleet acct
    --clip`): only the usage that fell inside the window, per user or account.
    """

    users: tuple[str, ...] = ()
    accounts: tuple[str, ...] = ()
    jobs: tuple[str, ...] = ()
    since_ms: int | None = None  # jobs still running at or after this time
    until_ms: int | None = None  # jobs started before this time
    group_by: str = "job"


def minute_split(prev_ms: int, as_of_ms: int) -> list[tuple[int, float]]:
    """(minute start, share) of the interval (prev_ms, as_of_ms]: time-proportional shares."""
    if as_of_ms <= prev_ms:
        return [((as_of_ms // MINUTE_MS) * MINUTE_MS, 1.0)]
    first = prev_ms // MINUTE_MS
    last = (as_of_ms - 1) // MINUTE_MS
    if last - first > MAX_SPLIT_MINUTES:
        return [(last * MINUTE_MS, 1.0)]
    span = as_of_ms - prev_ms
    out = []
    for m in range(first, last + 1):
        lo = max(prev_ms, m * MINUTE_MS)
        hi = min(as_of_ms, (m + 1) * MINUTE_MS)
        out.append((m * MINUTE_MS, (hi - lo) / span))
    return out


def spread(total: int, shares: Sequence[tuple[int, float]]) -> list[int]:
    """Integer parts of `total` by share, summing exactly to `total` (no ms lost to rounding)."""
    parts = [int(total * s) for _m, s in shares]
    parts[-1] += total - sum(parts)
    return parts


def day_of(ms: int) -> int:
    """The UTC day (its first ms) holding `ms`; the same as SQL's (ms / 86400000) * 86400000
    for the non-negative times the ledger holds."""
    return (ms // DAY_MS) * DAY_MS
