"""`gpufleet-agent diag`: the checks a node passes before it goes back into service.

Two runners, one report shape:
- `dcgmi diag -r N -j` when DCGM is installed (its JSON is read, 3.x "DCGM GPU Diagnostic"
  and 4.x "DCGM Diagnostic" alike; every test result becomes one check with its warnings
  as evidence);
- otherwise gpufleet's own checks, through the agent's one door to NVML and its InfiniBand
  sysfs reader: every GPU enumerates, no uncorrectable ECC errors since the last reset, no
  pending or failed row remap, no retired pages pending, PCIe at its expected width, every
  NVLink up, every IB port ACTIVE at the expected rate; at level 2 and 3 a watch of clocks,
  power, temperature and throttle reasons over a few seconds (NVML-visible only: without
  CUDA gpufleet cannot put a load on the GPU itself, and says so in the evidence).

Exit codes: 0 every check passed, 1 one failed, 2 the diagnostic could not run. It only reads
the hardware (and runs `dcgmi`); it never resets a GPU or touches Slurm.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from gpufleet.agent.telemetry import GpuBackendError, GpuInfo, GpuSample, IbPortSample

EXIT_PASS = 0
EXIT_FAIL = 1
EXIT_ERROR = 2

# NVML clocksThrottleReasons bits that mean the hardware is holding the GPU back
_HW_SLOWDOWN = 0x8
_HW_THERMAL = 0x40
_HW_POWER_BRAKE = 0x80
# seconds of clock/power watch per level (level 1 has none)
WATCH_S = {1: 0.0, 2: 2.0, 3: 10.0}
DCGMI_TIMEOUT_S = {1: 120.0, 2: 900.0, 3: 3600.0}


@dataclass(frozen=True)
class Check:
    name: str  # "gpu_enumerate", "row_remap", "pcie", "nvlink", "ib_port", ... or a DCGM test
    passed: bool
    evidence: str
    gpu_index: int | None = None
    subject: str = ""  # an IB port "mlx5_0/1" when the check is not about a GPU


@dataclass
class DiagReport:
    level: int
    tool: str  # "gpufleet" | "dcgmi"
    checks: list[Check] = field(default_factory=list)
    error: str = ""  # set when the diagnostic could not run
    duration_s: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.error and all(c.passed for c in self.checks)

    @property
    def exit_code(self) -> int:
        if self.error:
            return EXIT_ERROR
        return EXIT_PASS if self.passed else EXIT_FAIL

    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level, "tool": self.tool, "passed": self.passed,
            "exit_code": self.exit_code, "error": self.error,
            "duration_s": round(self.duration_s, 3),
            "checks": [asdict(c) for c in self.checks],
        }


@dataclass(frozen=True)
class Expectations:
    """What a healthy node looks like; None: take the hardware's own maximum / skip."""

    gpu_count: int | None = None
    pcie_width: int | None = None  # None: each GPU's maximum width
    ib_rate_gbps: float | None = None
    ib_hcas: tuple[str, ...] = ()  # empty: every port
    temperature_max_c: float = 92.0


class DiagBackend(Protocol):
    """The part of the agent's GPU door the diagnostic uses."""

    def inventory(self) -> list[GpuInfo]: ...

    def sample(self) -> list[GpuSample]: ...


# ---------------------------------------------------------------- gpufleet's own checks


def gpu_checks(infos: list[GpuInfo], samples: list[GpuSample], expect: Expectations,
               retired_pending: Mapping[int, bool | None] | None = None) -> list[Check]:
    """Level-1 checks of one sample of every GPU."""
    out: list[Check] = []
    answering = [s for s in samples if not s.lost]
    lost = [s.index for s in samples if s.lost]
    want = expect.gpu_count if expect.gpu_count is not None else len(samples)
    ok = len(answering) >= want and not lost
    ev = f"{len(answering)} GPU(s) answer NVML, {want} expected"
    if lost:
        ev += f"; lost from the bus: {', '.join(map(str, lost))}"
    out.append(Check("gpu_enumerate", ok, ev + f"; inventory lists {len(infos)}"))
    bus = {g.index: g.pci_bus_id for g in infos}
    for s in answering:
        i = s.index
        where = f"GPU {i} ({bus.get(i, '?')})"
        if s.ecc_dbe_volatile is not None:
            out.append(Check("ecc", s.ecc_dbe_volatile == 0,
                             f"{where} {s.ecc_dbe_volatile} uncorrectable ECC error(s) since "
                             "the last reset", i))
        if s.remapped_rows_failure is not None or s.remapped_rows_pending is not None:
            failure, pending = s.remapped_rows_failure or 0, s.remapped_rows_pending or 0
            out.append(Check("row_remap", not failure and not pending,
                             f"{where} row remap pending={pending} failure={failure}", i))
        rp = (retired_pending or {}).get(i)
        if rp is not None:
            out.append(Check("retired_pages", not rp,
                             f"{where} retired pages pending: {'yes' if rp else 'no'}", i))
        if s.pcie_link_width is not None:
            want_w = expect.pcie_width or s.pcie_link_width_max
            if want_w:
                out.append(Check("pcie", s.pcie_link_width >= want_w,
                                 f"{where} PCIe x{s.pcie_link_width} gen {s.pcie_link_gen} "
                                 f"(expected x{want_w}, max gen {s.pcie_link_gen_max})", i))
        links = s.nvlink_up_count + s.nvlink_down_count
        if links:
            out.append(Check("nvlink", s.nvlink_down_count == 0,
                             f"{where} {s.nvlink_up_count} of {links} NVLinks up", i))
    return out


def ib_checks(ports: Iterable[IbPortSample], expect: Expectations) -> list[Check]:
    out = []
    for p in ports:
        if expect.ib_hcas and p.hca not in expect.ib_hcas:
            continue
        name = f"{p.hca}/{p.port}"
        ok = p.state == "ACTIVE"
        ev = f"{name} {p.state} ({p.phys_state}) at {p.rate_gbps:g} Gb/s"
        if expect.ib_rate_gbps is not None:
            ok = ok and p.rate_gbps >= expect.ib_rate_gbps
            ev += f", expected {expect.ib_rate_gbps:g}"
        out.append(Check("ib_port", ok, ev, subject=name))
    return out


def watch_checks(rounds: list[list[GpuSample]], expect: Expectations, watched_s: float
                 ) -> list[Check]:
    """Level 2-3: clocks, power, temperature and throttle reasons over the watch."""
    per_gpu: dict[int, list[GpuSample]] = {}
    for r in rounds:
        for s in r:
            per_gpu.setdefault(s.index, []).append(s)
    out = []
    for i, ss in sorted(per_gpu.items()):
        problems = []
        if any(s.lost for s in ss):
            problems.append("lost during the watch")
        live = [s for s in ss if not s.lost]
        if live and all(s.sm_clock_mhz in (None, 0) for s in live):
            problems.append("no SM clock reported")
        if live and all(s.power_w is None for s in live):
            problems.append("no power reading")
        hot = max((s.temperature_c or 0.0) for s in live) if live else 0.0
        if hot >= expect.temperature_max_c:
            problems.append(f"{hot:.0f} C >= {expect.temperature_max_c:g} C")
        bits = 0
        for s in live:
            bits |= s.throttle_reasons or 0
        for bit, what in ((_HW_SLOWDOWN, "hardware slowdown"), (_HW_THERMAL, "hardware "
                          "thermal slowdown"), (_HW_POWER_BRAKE, "hardware power brake")):
            if bits & bit:
                problems.append(what)
        clocks = [s.sm_clock_mhz for s in live if s.sm_clock_mhz]
        power = [s.power_w for s in live if s.power_w is not None]
        ev = (f"GPU {i} over {watched_s:g} s ({len(ss)} reads): SM clock "
              f"{min(clocks) if clocks else '-'}-{max(clocks) if clocks else '-'} MHz, power "
              f"{min(power) if power else 0:.0f}-{max(power) if power else 0:.0f} W, max "
              f"{hot:.0f} C; no load generated (NVML only)")
        if problems:
            ev += ": " + "; ".join(problems)
        out.append(Check("clocks_power", not problems, ev, i))
    return out


def run_own(backend: DiagBackend, level: int, expect: Expectations,
            ib_sample: Callable[[], list[IbPortSample]] | None = None,
            retired_pending: Callable[[], Mapping[int, bool | None]] | None = None,
            sleep: Callable[[float], None] = time.sleep) -> DiagReport:
    t0 = time.monotonic()
    report = DiagReport(level, "gpufleet")
    try:
        infos = backend.inventory()
        samples = backend.sample()
        report.checks += gpu_checks(infos, samples, expect,
                                    retired_pending() if retired_pending else None)
        if ib_sample is not None:
            report.checks += ib_checks(ib_sample(), expect)
        watch_s = WATCH_S.get(level, 0.0)
        if watch_s:
            rounds = [samples]
            steps = max(1, int(watch_s))
            for _ in range(steps):
                sleep(watch_s / steps)
                rounds.append(backend.sample())
            report.checks += watch_checks(rounds, expect, watch_s)
    except GpuBackendError as e:
        report.error = f"GPU library: {e}"
    report.duration_s = time.monotonic() - t0
    return report


# ---------------------------------------------------------------- DCGM


def parse_dcgmi(text: str, level: int) -> DiagReport:
    """Read `dcgmi diag -r N -j` output (DCGM 3.x and 4.x shapes) into a report."""
    report = DiagReport(level, "dcgmi")
    start, end = text.find("{"), text.rfind("}")
    try:
        doc = json.loads(text[start:end + 1]) if start >= 0 else None
    except ValueError as e:
        report.error = f"dcgmi printed JSON that does not parse: {e}"
        return report
    if not isinstance(doc, dict):
        report.error = "dcgmi printed no JSON object"
        return report
    body = doc.get("DCGM GPU Diagnostic") or doc.get("DCGM Diagnostic")
    if not isinstance(body, dict) or not isinstance(body.get("test_categories"), list):
        report.error = "dcgmi JSON has no 'DCGM (GPU) Diagnostic' test_categories"
        return report
    for cat in body["test_categories"]:
        for test in (cat.get("tests") or []) if isinstance(cat, dict) else []:
            name = str(test.get("name", "?"))
            for r in test.get("results") or []:
                if not isinstance(r, dict):
                    continue
                status = str(r.get("status", "")).lower()
                if status in ("skip", "skipped", "not run", ""):
                    continue
                gpu = r.get("gpu_id", r.get("entity_id"))
                gids = r.get("gpu_ids")
                if gpu is None and isinstance(gids, list) and len(gids) == 1:
                    gpu = gids[0]
                texts = [str(w.get("warning", w)) if isinstance(w, dict) else str(w)
                         for w in (r.get("warnings") or [])]
                info = r.get("info")
                texts += [str(x) for x in info] if isinstance(info, list) else (
                    [str(info)] if info else [])
                ev = f"{cat.get('category', '?')}/{name}: {r.get('status')}"
                if texts:
                    ev += ": " + "; ".join(texts)
                report.checks.append(Check(
                    f"dcgm:{name.lower().replace(' ', '_')}", status in ("pass", "warn"), ev,
                    int(gpu) if isinstance(gpu, (int, str)) and str(gpu).isdecimal() else None))
    if not report.checks:
        report.error = "dcgmi reported no test results"
    return report


def run_dcgmi(level: int, dcgmi: str = "dcgmi",
              run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run
              ) -> DiagReport:
    t0 = time.monotonic()
    try:
        p = run([dcgmi, "diag", "-r", str(level), "-j"], capture_output=True, text=True,
                timeout=DCGMI_TIMEOUT_S[level], check=False)
    except subprocess.TimeoutExpired:
        rep = DiagReport(level, "dcgmi", error=f"dcgmi diag -r {level} timed out after "
                         f"{DCGMI_TIMEOUT_S[level]:g} s")
    except OSError as e:
        rep = DiagReport(level, "dcgmi", error=f"cannot run {dcgmi}: {e}")
    else:
        rep = parse_dcgmi(p.stdout, level)
        if rep.error and p.returncode != 0:
            msg = " ".join((p.stderr or p.stdout).split())[:300]
            rep.error = f"dcgmi diag -r {level} exited {p.returncode}: {msg}"
    rep.duration_s = time.monotonic() - t0
    return rep


def find_dcgmi() -> str | None:
    return shutil.which("dcgmi")


def format_text(report: DiagReport) -> str:
    lines = [f"diag level {report.level} ({report.tool}): "
             f"{'PASS' if report.passed else 'ERROR' if report.error else 'FAIL'} "
             f"in {report.duration_s:.1f} s"]
    if report.error:
        lines.append(f"  could not run: {report.error}")
    for c in report.checks:
        lines.append(f"  {'ok  ' if c.passed else 'FAIL'} {c.name}: {c.evidence}")
    return "\n".join(lines)
