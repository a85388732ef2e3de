"""Local health checks: turn samples and events into verdicts, every cycle, on the node.

A verdict says what is wrong (reason code), how bad (severity), with what evidence, since
when. The controller decides what to do with it; the agent never acts on Slurm itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from gpufleet.agent.telemetry import GpuSample, XidEvent
from gpufleet.agent.xid_catalog import XID_CATALOG


class Severity(IntEnum):
    """Ordered; values match the wire contract's Severity enum."""

    OK = 1
    WARN = 2
    DEGRADED = 3
    FATAL = 4


@dataclass(frozen=True, slots=True)
class Verdict:
    check: str
    severity: Severity
    reason_code: str
    evidence: str
    since_ms: int
    gpu_index: int | None = None


def classify_xid(xid: int) -> tuple[Severity, str]:
    """Severity and description of an XID from NVIDIA's catalog.

    FATAL in the catalog means the GPU needs a reset or the node a reboot: the node must
    leave service. NONFATAL ones (application errors, informational) are warnings. An XID
    the catalog does not know is a warning that keeps its number, so nobody is drained on
    a code nobody has classified.
    """
    entry = XID_CATALOG.get(xid)
    if entry is None:
        return Severity.WARN, f"Xid {xid} (not in the catalog)"
    mnemonic, action, fatal = entry
    return (Severity.FATAL if fatal else Severity.WARN), f"Xid {xid} {mnemonic} ({action})"


@dataclass
class HealthState:
    """Keeps the current verdict per (check, gpu) and reports the ones that changed."""

    expected_gpu_count: int | None = None
    current: dict[tuple[str, int | None], Verdict] = field(default_factory=dict)

    def on_xid(self, event: XidEvent, bus_ids: dict[int, str]) -> Verdict:
        severity, text = classify_xid(event.xid)
        where = (
            f"GPU {event.gpu_index} ({bus_ids.get(event.gpu_index, '?')})"
            if event.gpu_index is not None
            else "GPU ?"
        )
        verdict = Verdict(
            check="xid",
            severity=severity,
            reason_code=f"xid{event.xid}",
            evidence=f"{where} {text}",
            since_ms=event.timestamp_ms,
            gpu_index=event.gpu_index,
        )
        key = ("xid", event.gpu_index)
        old = self.current.get(key)
        # an XID verdict only ever gets worse until the agent restarts (a reset GPU comes
        # back with a new agent boot); a later milder XID must not hide a fatal one
        if old is None or verdict.severity >= old.severity:
            self.current[key] = verdict
        return verdict

    def evaluate(self, samples: list[GpuSample], now_ms: int) -> list[Verdict]:
        """Run the per-cycle checks; return the verdicts whose severity or reason changed."""
        fresh: dict[tuple[str, int | None], Verdict] = {}
        for s in samples:
            if s.lost:
                fresh[("gpu_lost", s.index)] = Verdict(
                    "gpu_lost", Severity.FATAL, "gpu_lost",
                    f"GPU {s.index} does not answer NVML (lost from the bus)", now_ms, s.index,
                )
            else:
                fresh[("gpu_lost", s.index)] = Verdict(
                    "gpu_lost", Severity.OK, "ok", "", now_ms, s.index
                )
        if self.expected_gpu_count is not None:
            seen = sum(1 for s in samples if not s.lost)
            if seen < self.expected_gpu_count:
                fresh[("gpu_count", None)] = Verdict(
                    "gpu_count", Severity.FATAL, "gpu_count",
                    f"{seen} of {self.expected_gpu_count} expected GPUs answer", now_ms,
                )
            else:
                fresh[("gpu_count", None)] = Verdict("gpu_count", Severity.OK, "ok", "", now_ms)
        changed = []
        for key, v in fresh.items():
            old = self.current.get(key)
            if old is None or (old.severity, old.reason_code) != (v.severity, v.reason_code):
                self.current[key] = v
                if old is not None or v.severity != Severity.OK:
                    changed.append(v)
        return changed

    def worst(self) -> Verdict | None:
        bad = [v for v in self.current.values() if v.severity > Severity.OK]
        return max(bad, key=lambda v: (v.severity, -v.since_ms)) if bad else None
