"""The repair loop's Prometheus metrics, read from the RepairManager at scrape time.

- gpufleet_controller_repairs_total{outcome}: closed repair cases by outcome (resumed,
  escalated, quarantined, cancelled, left, shadow)
- gpufleet_controller_repair_drained_seconds_total{cause}: time nodes spent drained, fault
  to the case's end, per reason code (xid79, ecc_dbe, ...)
- gpufleet_controller_repair_seconds (summary): fault -> back in service, resumed cases;
  MTTR = rate(_sum) / rate(_count)
- gpufleet_controller_repair_in_progress{partition}: nodes in remediation or diagnosis
- gpufleet_controller_repair_open{step}: open cases by step (waiting, approval, ...)
- gpufleet_controller_repair_drained_nodes{cause}: nodes the repair loop keeps drained now
  (open, escalated, quarantined, cancelled), by reason code
- gpufleet_controller_routine_diags_total{result}: routine diagnostics of idle nodes ended,
  by result (passed, failed, released: a job wanted the node, incomplete: no answer in time
  or the diag could not run, superseded: a fault arrived, shadow, cancelled, left)

Routine diagnostics count in repair_open, repair_in_progress, repair_drained_nodes and
repair_drained_seconds (cause "routine-diag"), not in repairs_total or repair_seconds (MTTR
is about repairs).
"""

from __future__ import annotations

from collections.abc import Iterable

from gpufleet.scheduler.repair.engine import (
    HOLDING,
    OPEN,
    ROUTINE_RESULTS,
    RepairManager,
    Step,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

OUTCOMES = tuple(s.value for s in Step if s not in OPEN and s != Step.RELEASED)


class RepairCollector(Collector):
    def __init__(self, repair: RepairManager) -> None:
        self.repair = repair

    def _families(self) -> tuple[CounterMetricFamily, CounterMetricFamily, SummaryMetricFamily,
                                 GaugeMetricFamily, GaugeMetricFamily, CounterMetricFamily,
                                 GaugeMetricFamily]:
        return (
            CounterMetricFamily("gpufleet_controller_repairs",
                                "Repair cases closed, by outcome.", labels=["outcome"]),
            CounterMetricFamily("gpufleet_controller_repair_drained_seconds",
                                "Seconds nodes spent drained, fault to the end of their "
                                "repair, by cause (reason code).", labels=["cause"]),
            SummaryMetricFamily("gpufleet_controller_repair_seconds",
                                "Fault to back in service, for repaired nodes."),
            GaugeMetricFamily("gpufleet_controller_repair_in_progress",
                              "Nodes in remediation or diagnosis, by partition.",
                              labels=["partition"]),
            GaugeMetricFamily("gpufleet_controller_repair_open",
                              "Open repair cases, by step.", labels=["step"]),
            CounterMetricFamily("gpufleet_controller_routine_diags",
                                "Routine diagnostics of idle nodes ended, by result.",
                                labels=["result"]),
            GaugeMetricFamily("gpufleet_controller_repair_drained_nodes",
                              "Nodes the repair loop keeps drained now (open, escalated, "
                              "quarantined, cancelled), by cause (reason code).",
                              labels=["cause"]),
        )

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        outcomes, drained, seconds, progress, open_, routine, held = self._families()
        r = self.repair
        with r._lock:  # a consistent view; the figures are small dicts
            counts = dict(r.outcomes)
            by_cause = dict(r.drained_s_by_cause)
            durations = list(r.repair_seconds)
            routine_counts = dict(r.routine_results)
            steps: dict[str, int] = {}
            held_by_cause: dict[str, int] = {}
            for c in r.cases.values():
                if c.step in OPEN:
                    steps[c.step.value] = steps.get(c.step.value, 0) + 1
                if c.step in HOLDING:
                    cause = c.reason_code or "unknown"
                    held_by_cause[cause] = held_by_cause.get(cause, 0) + 1
        for o in OUTCOMES:
            outcomes.add_metric([o], counts.get(o, 0))
        for cause, s in sorted(by_cause.items()):
            drained.add_metric([cause], s)
        seconds.add_metric([], len(durations), sum(durations))
        for part, n in sorted(r.in_remediation().items()):
            progress.add_metric([part or "(all)"], n)
        for st in OPEN:
            open_.add_metric([st.value], steps.get(st.value, 0))
        for res in ROUTINE_RESULTS:
            routine.add_metric([res], routine_counts.get(res, 0))
        for cause, n in sorted(held_by_cause.items()):
            held.add_metric([cause], n)
        return [outcomes, drained, seconds, progress, open_, routine, held]
