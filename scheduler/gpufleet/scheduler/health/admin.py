"""What the admin commands do, apart from parsing: drain/resume by hand, the node view, the
event timeline. Every state change is recorded as an action with the admin's name as actor.
"""

from __future__ import annotations

import os
import pwd
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from gpufleet.scheduler.access import audit
from gpufleet.scheduler.slurm import SlurmClient, SlurmError, check_node_name
from gpufleet.scheduler.store import HealthStore, now_ms
from gpufleet.scheduler.store.values import ActionKind, ActionStatus

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class AdminError(Exception):
    """An admin command cannot be done; the message says why and names the input."""


def caller_name() -> str:
    """Who is acting: the sudo caller if any, else the login of the effective uid."""
    sudo = os.environ.get("SUDO_USER")
    if sudo and os.geteuid() == 0:
        return sudo
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid{os.geteuid()}"


def parse_since(text: str, now: float | None = None) -> int:
    """'30m', '2h', '1d', '1w', or an ISO 8601 time -> epoch milliseconds."""
    now = time.time() if now is None else now
    m = _DURATION.match(text)
    if m:
        ms = (now - float(m.group(1)) * _UNIT_S[m.group(2)]) * 1000
        if not ms >= 0:  # also nan: 1e400d
            raise AdminError(f"--since {text!r}: goes back past 1970, the earliest time kept")
        return int(ms)
    try:
        when = datetime.fromisoformat(text.strip())
        if when.tzinfo is None:
            when = when.astimezone()  # a naive time is the admin's local time
        ms = int(when.timestamp() * 1000)
    except (ValueError, OverflowError, OSError):
        raise AdminError(
            f"--since {text!r}: expected a duration like 30m, 2h, 1d, 1w or an ISO time like "
            "2026-11-23T08:00 (after 1970)"
        ) from None
    if ms < 0:
        raise AdminError(f"--since {text!r}: before 1970, the earliest time kept")
    if ms > now * 1000:
        raise AdminError(f"--since {text!r} is in the future")
    return ms


def drain(store: HealthStore, slurm: SlurmClient, node: str, reason: str, actor: str,
          source: str | None = None) -> str:
    """Drain by hand. The reason is the admin's own words: the policy never lifts it."""
    _check(node)
    reason = reason.strip()
    if not reason:
        raise AdminError("--reason is empty: say why the node is drained")
    if len(reason) > 200:
        raise AdminError(f"--reason is {len(reason)} characters: keep it under 200")
    return _act(store, node, ActionKind.DRAIN, reason, actor, lambda: slurm.drain(node, reason),
                source)


def resume(store: HealthStore, slurm: SlurmClient, node: str, actor: str,
           source: str | None = None) -> str:
    """Resume by hand, whoever drained it: the admin decides."""
    _check(node)
    try:
        before = slurm.node(node)
    except SlurmError as e:
        raise AdminError(str(e)) from e
    if not before.drained:
        raise AdminError(f"{node} is not drained ({before.state}); nothing to resume")
    detail = f"was {before.state} reason {before.reason!r}"
    return _act(store, node, ActionKind.RESUME, f"by hand ({detail})", actor,
                lambda: slurm.resume(node), source)


def _check(node: str) -> None:
    try:
        check_node_name(node)
    except SlurmError as e:
        raise AdminError(str(e)) from e


def _act(
    store: HealthStore, node: str, kind: ActionKind, reason: str, actor: str,
    call: Callable[[], None], source: str | None = None,
) -> str:
    """`source`: where the admin is (a gRPC peer); None: this host's command line."""
    action_id = store.add_action(node, kind, reason, actor, ActionStatus.QUEUED, None, now_ms())
    source = source or f"cli@{socket.gethostname()}"
    try:
        call()
    except SlurmError as e:
        store.update_action(action_id, ActionStatus.FAILED, str(e), 1, now_ms())
        audit.record(actor, kind, node, source, ActionStatus.FAILED, reason=reason, error=str(e),
                     action_id=action_id)
        raise AdminError(f"{kind} {node} failed: {e}") from e
    store.update_action(action_id, ActionStatus.DONE, "", 1, now_ms())
    audit.record(actor, kind, node, source, ActionStatus.DONE, reason=reason, action_id=action_id)
    return f"{kind} {node}: done (recorded as action {action_id}, actor {actor})"


@dataclass(frozen=True)
class TimelineEntry:
    ts_ms: int
    node: str
    what: str  # "event" or "action"
    kind: str  # XID, HEALTH, ... or drain, resume, ...
    severity_or_status: str
    text: str
    actor: str

    def as_dict(self) -> dict[str, object]:
        return {
            "ts_ms": self.ts_ms, "node": self.node, "what": self.what, "kind": self.kind,
            "status": self.severity_or_status, "text": self.text, "actor": self.actor,
        }


def timeline(
    store: HealthStore, node: str | None, since_ms: int, limit: int = 1000
) -> list[TimelineEntry]:
    """Health events and actions, oldest first, at most `limit` of the newest."""
    out = [
        TimelineEntry(e.ts_ms, e.node, "event", e.kind, e.severity,
                      f"{e.reason_code} {e.evidence}".strip(), "agent")
        for e in store.events(node, since_ms, limit)
    ]
    out += [
        TimelineEntry(a.created_ms, a.node, "action", a.action, a.status,
                      f"{a.reason}{' -> ' + a.detail if a.detail else ''}", a.actor)
        for a in store.actions(node, since_ms)
    ]
    out.sort(key=lambda t: t.ts_ms)
    return out[-limit:]


def format_ts(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).astimezone().strftime("%Y-%m-%d %H:%M:%S")
