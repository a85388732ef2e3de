"""Local health checks: turn samples and events into verdicts, every cycle, on the node.

A verdict says what is wrong (reason code), how bad (severity), with what evidence, since
when. The controller decides what to do with it; the agent never acts on Slurm itself.

Debounce: an observation changes a verdict only after N consecutive cycles agree (N per
check, `HealthConfig.debounce`), except a move *into* fatal, which is taken at once: a GPU
that fell off the bus must not wait three seconds. Recovery from fatal is debounced like any
other change, which gives hysteresis for free.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum

from gpufleet.agent.telemetry import GpuSample, HostSample, IbPortSample, XidEvent
from gpufleet.agent.xid_catalog import XID_CATALOG, classify


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
    subject: str = ""  # an IB port "mlx5_0/1" or a path, when the check is not about a GPU


# NVML clocksThrottleReasons bits (nvml.h)
THROTTLE_SW_THERMAL = 0x20
THROTTLE_HW_THERMAL = 0x40
THROTTLE_HW_POWER_BRAKE = 0x80

CHECKS = ("gpu_lost", "gpu_count", "ecc", "row_remap", "thermal", "power", "nvlink",
          "nvlink_errors", "pcie", "ib_port", "ib_errors", "disk")


@dataclass(frozen=True)
class HealthConfig:
    """Thresholds and expected values; every field can be set in the agent's config file."""

    expected_gpu_count: int | None = None
    expected_ib_rate_gbps: float | None = None  # e.g. 400 for NDR; None: not checked
    ib_hcas: tuple[str, ...] = ()  # compute rails to check; empty: every InfiniBand port
    gpu_temperature_degraded_c: float = 92.0
    nvlink_crc_errors_per_min_degraded: float = 100.0
    ib_errors_per_min_degraded: float = 10.0
    nvlink_down_severity: Severity = Severity.DEGRADED
    ib_port_down_severity: Severity = Severity.DEGRADED
    disk_used_pct_warn: float = 95.0
    debounce_default: int = 3
    debounce: tuple[tuple[str, int], ...] = ()  # (check, cycles) overrides

    def cycles(self, check: str) -> int:
        return dict(self.debounce).get(check, self.debounce_default)


def classify_xid(xid: int, message: str = "") -> tuple[Severity, str]:
    """Severity and description of an XID from NVIDIA's catalog (gpufleet.agent.xid_catalog).

    Fatal in the catalog means the GPU needs a reset or the node a reboot: the node must
    leave service. Non-fatal ones (application errors, informational) are warnings. For the
    Xids whose variant decides (NVLink5 144-150), `message` is the driver's kernel line; a
    variant not known (NVML's event carries no text) is a warning until the kernel line
    tells. An XID the catalog does not know is a warning that keeps its number, so nobody is
    drained on a code nobody has classified.
    """
    if xid not in XID_CATALOG:
        return Severity.WARN, f"Xid {xid} (not in the catalog)"
    c = classify(xid, message)
    variant = f"; {c.variant}" if c.variant else ""
    return ((Severity.FATAL if c.fatal else Severity.WARN),
            f"Xid {xid} {c.about} ({c.resolution}{variant})")


Key = tuple[str, int | str | None]  # (check, GPU index or IB port "mlx5_0/1" or path)
Observation = tuple[Severity, str, str]  # severity, reason code, evidence

_OK: Observation = (Severity.OK, "ok", "")
RATE_WINDOW_MS = 60_000


@dataclass
class _Pending:
    observation: Observation
    count: int


def _rate_per_min(now_ms: int, then_ms: int, now_v: int | None, then_v: int | None) -> float:
    if now_v is None or then_v is None or now_ms <= then_ms:
        return 0.0
    delta = now_v - then_v
    if delta < 0:  # counter reset (driver reload, port reset): no rate from this pair
        return 0.0
    return delta * 60_000.0 / (now_ms - then_ms)


@dataclass
class HealthState:
    """Keeps the current verdict per (check, subject) and reports the ones that changed."""

    config: HealthConfig = field(default_factory=HealthConfig)
    current: dict[Key, Verdict] = field(default_factory=dict)
    _pending: dict[Key, _Pending] = field(default_factory=dict)
    _history: dict[Key, deque[tuple[int, int]]] = field(default_factory=dict)

    # ------------------------------------------------------------ events

    def on_xid(self, event: XidEvent, bus_ids: dict[int, str]) -> Verdict:
        """An XID acts at once; its verdict only ever gets worse until the agent restarts
        (a reset GPU comes back with a new agent boot), so a later milder XID cannot hide a
        fatal one."""
        where = (f"GPU {event.gpu_index} ({bus_ids.get(event.gpu_index, '?')})"
                 if event.gpu_index is not None else "GPU ?")
        if event.lost:  # the driver's words, no Xid: as fatal as Xid 79, and named for it
            verdict = Verdict("xid", Severity.FATAL, "gpu_lost",
                              f"{where} fell off the bus (kernel log, no Xid): "
                              f"{event.message[:200]}", event.timestamp_ms, event.gpu_index)
        else:
            severity, text = classify_xid(event.xid, event.message)
            verdict = Verdict("xid", severity, f"xid{event.xid}", f"{where} {text}",
                              event.timestamp_ms, event.gpu_index)
        key: Key = ("xid", event.gpu_index)
        old = self.current.get(key)
        if old is None or verdict.severity > old.severity or (
                verdict.severity == old.severity and not event.lost):  # an Xid names it better
            self.current[key] = verdict
        return verdict

    # ------------------------------------------------------------ per-cycle checks

    def evaluate(
        self,
        gpus: list[GpuSample],
        now_ms: int,
        ib_ports: Iterable[IbPortSample] = (),
        host: HostSample | None = None,
    ) -> list[Verdict]:
        """Run every check on this cycle's samples; return the verdicts that changed."""
        observed: dict[Key, Observation] = {}
        for g in gpus:
            self._gpu_checks(g, now_ms, observed)
        if self.config.expected_gpu_count is not None:
            seen = sum(1 for g in gpus if not g.lost)
            want = self.config.expected_gpu_count
            observed[("gpu_count", None)] = (
                (Severity.FATAL, "gpu_count", f"{seen} of {want} expected GPUs answer")
                if seen < want else _OK)
        for p in ib_ports:
            self._ib_checks(p, now_ms, observed)
        if host is not None:
            for d in host.disks:
                pct = 100.0 * d.used_bytes / d.total_bytes if d.total_bytes else 0.0
                observed[("disk", d.path)] = (
                    (Severity.WARN, "disk_full", f"{d.path} {pct:.0f}% used")
                    if pct >= self.config.disk_used_pct_warn else _OK)
        return [v for key, obs in observed.items()
                if (v := self._observe(key, obs, now_ms)) is not None]

    def _gpu_checks(self, g: GpuSample, now_ms: int, out: dict[Key, Observation]) -> None:
        cfg = self.config
        i = g.index
        out[("gpu_lost", i)] = (
            (Severity.FATAL, "gpu_lost", f"GPU {i} does not answer NVML (lost from the bus)")
            if g.lost else _OK)
        if g.lost:
            return  # nothing else can be read from it
        if g.ecc_dbe_volatile:
            out[("ecc", i)] = (Severity.FATAL, "ecc_dbe",
                               f"GPU {i} {g.ecc_dbe_volatile} uncorrectable (DBE) ECC errors "
                               "since the last reset")
        elif g.ecc_dbe_volatile is not None:
            out[("ecc", i)] = _OK
        if g.remapped_rows_failure:
            out[("row_remap", i)] = (Severity.FATAL, "row_remap_failure",
                                     f"GPU {i} row remapping failed: the GPU needs service")
        elif g.remapped_rows_pending:
            out[("row_remap", i)] = (Severity.DEGRADED, "row_remap_pending",
                                     f"GPU {i} row remap pending: reset the GPU when idle")
        elif g.remapped_rows_failure is not None:
            out[("row_remap", i)] = _OK
        reasons = g.throttle_reasons or 0
        hot = g.temperature_c is not None and g.temperature_c >= cfg.gpu_temperature_degraded_c
        if reasons & THROTTLE_HW_THERMAL or hot:
            out[("thermal", i)] = (Severity.DEGRADED, "thermal",
                                   f"GPU {i} {g.temperature_c or 0:.0f} C, hardware thermal "
                                   f"slowdown {'on' if reasons & THROTTLE_HW_THERMAL else 'off'}")
        elif reasons & THROTTLE_SW_THERMAL:
            out[("thermal", i)] = (Severity.WARN, "thermal_sw",
                                   f"GPU {i} {g.temperature_c or 0:.0f} C, software thermal "
                                   "slowdown")
        elif g.throttle_reasons is not None or g.temperature_c is not None:
            out[("thermal", i)] = _OK
        if g.throttle_reasons is not None:
            out[("power", i)] = (
                (Severity.DEGRADED, "power_brake",
                 f"GPU {i} hardware power brake slowdown (external power signal)")
                if reasons & THROTTLE_HW_POWER_BRAKE else _OK)
        if g.nvlink_up_count + g.nvlink_down_count:
            out[("nvlink", i)] = (
                (cfg.nvlink_down_severity, "nvlink_down",
                 f"GPU {i} {g.nvlink_down_count} of "
                 f"{g.nvlink_up_count + g.nvlink_down_count} NVLinks down")
                if g.nvlink_down_count else _OK)
            rate = self._rate(("nvlink_errors", i), now_ms, g.nvlink_crc_errors)
            out[("nvlink_errors", i)] = (
                (Severity.DEGRADED, "nvlink_errors",
                 f"GPU {i} {rate:.0f} NVLink CRC errors/min")
                if rate >= cfg.nvlink_crc_errors_per_min_degraded else _OK)
        if g.pcie_link_width is not None and g.pcie_link_width_max:
            # width, not generation: GPUs lower the PCIe generation on their own when idle
            out[("pcie", i)] = (
                (Severity.DEGRADED, "pcie_downtrained",
                 f"GPU {i} PCIe x{g.pcie_link_width} of x{g.pcie_link_width_max}")
                if g.pcie_link_width < g.pcie_link_width_max else _OK)

    def _ib_checks(self, p: IbPortSample, now_ms: int, out: dict[Key, Observation]) -> None:
        cfg = self.config
        if cfg.ib_hcas and p.hca not in cfg.ib_hcas:
            return
        port = f"{p.hca}/{p.port}"
        if p.state != "ACTIVE":
            obs = (cfg.ib_port_down_severity, "ib_port_down",
                   f"{port} {p.state} ({p.phys_state})")
        elif cfg.expected_ib_rate_gbps is not None and p.rate_gbps < cfg.expected_ib_rate_gbps:
            obs = (Severity.DEGRADED, "ib_rate_low",
                   f"{port} at {p.rate_gbps:g} Gb/s, expected {cfg.expected_ib_rate_gbps:g}")
        else:
            obs = _OK
        out[("ib_port", port)] = obs
        errors = None
        counters = (p.symbol_error, p.link_downed, p.link_error_recovery, p.port_rcv_errors)
        if any(c is not None for c in counters):
            errors = sum(c or 0 for c in counters)
        rate = self._rate(("ib_errors", port), now_ms, errors)
        out[("ib_errors", port)] = (
            (Severity.DEGRADED, "ib_errors",
             f"{port} {rate:.0f} errors/min (symbol, link downed, recovery, receive)")
            if rate >= cfg.ib_errors_per_min_degraded else _OK)

    def _rate(self, key: Key, now_ms: int, value: int | None) -> float:
        """Counter increase per minute over the last RATE_WINDOW_MS.

        A window, not the last cycle: a burst of errors keeps the rate up for a minute, so
        the debounce sees it in consecutive cycles instead of once.
        """
        if value is None:
            self._history.pop(key, None)
            return 0.0
        hist = self._history.setdefault(key, deque())
        if hist and value < hist[-1][1]:
            hist.clear()  # counter reset (driver reload, port reset): start again
        hist.append((now_ms, value))
        while len(hist) > 2 and now_ms - hist[1][0] >= RATE_WINDOW_MS:
            hist.popleft()
        return _rate_per_min(now_ms, hist[0][0], value, hist[0][1])

    def _observe(self, key: Key, obs: Observation, now_ms: int) -> Verdict | None:
        """Apply debounce; return the new verdict when this observation changes it."""
        old = self.current.get(key)
        old_obs: Observation = (old.severity, old.reason_code, old.evidence) if old else _OK
        if obs[:2] == old_obs[:2]:
            self._pending.pop(key, None)
            return None
        immediate = obs[0] == Severity.FATAL and obs[0] > old_obs[0]
        pending = self._pending.get(key)
        if pending is not None and pending.observation[:2] == obs[:2]:
            pending.count += 1
        else:
            pending = self._pending[key] = _Pending(obs, 1)
        if not immediate and pending.count < self.config.cycles(key[0]):
            return None
        del self._pending[key]
        gpu = key[1] if isinstance(key[1], int) else None
        subject = key[1] if isinstance(key[1], str) else ""
        verdict = Verdict(key[0], obs[0], obs[1], obs[2], now_ms, gpu, subject)
        if obs[0] == Severity.OK:
            self.current.pop(key, None)
        else:
            self.current[key] = verdict
        return verdict

    def worst(self) -> Verdict | None:
        bad = [v for v in self.current.values() if v.severity > Severity.OK]
        return max(bad, key=lambda v: (v.severity, -v.since_ms)) if bad else None
