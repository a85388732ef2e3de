"""The controller's Prometheus metrics: what it ingests, what it does in Slurm, how far behind.

`ControllerMetrics` is the one object the rest of the controller calls: ingest counts reports
and errors, the action queue reports each finished action (and the fault -> action latency),
and gauges that describe state (nodes by health, queue depth, connected agents) are read
through callbacks at scrape time, so nothing has to keep them in step.

Cost on the ingest path matters (10,000 nodes at 1 Hz): every per-report call is a
pre-bound counter child's `inc()`, one short lock. A scrape may query the store (nodes by
health); it never blocks ingest beyond that query.

Naming follows https://prometheus.io/docs/practices/naming/: prefix `gpufleet_controller_`,
base units (seconds), `_total` on counters. Agent families (`gpufleet_gpu_*`, ...) are the
agent's, see gpufleet.agent.metrics; the two never share a name.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Mapping

from gpufleet.rpc.daemon import MetricsHttpServer, register_process_collectors, serve_metrics
from gpufleet.scheduler import __version__
from gpufleet.scheduler.accounting.metrics import AcctMetrics
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "ACTION_KINDS",
    "ACTION_STATUSES",
    "DEFAULT_LISTEN",
    "DEFAULT_PORT",
    "FAULT_TO_ACTION_BUCKETS_S",
    "HEALTH_STATES",
    "ControllerMetrics",
    "MetricsHttpServer",
    "parse_listen",
    "start_metrics_http",
]

DEFAULT_PORT = 9836  # the agent's exporter has 9835
DEFAULT_LISTEN = f"0.0.0.0:{DEFAULT_PORT}"

# Label values written up front, so a dashboard shows 0 rather than "no data" before the
# first of each happens (absent series also make rate() and alert rules harder to write).
HEALTH_STATES = ("unknown", "ok", "warn", "degraded", "fatal", "unreachable")
ACTION_KINDS = ("drain", "resume")
ACTION_STATUSES = ("done", "failed", "skipped", "shadow")
# pre-bound (labels() under a lock was ~4 us of every heartbeat, the steady-state report)
REPORT_KINDS = ("sample", "event", "heartbeat", "usage")
INGEST_ERROR_REASONS = ("invalid", "store")

# Fault -> action latency: the target is <= 1 s; Slurm's own NHC cycle is 300 s, so the top
# buckets tell "slow" (Slurm retrying) apart from "as slow as doing nothing".
FAULT_TO_ACTION_BUCKETS_S = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)
# Report lag (controller receive time - agent sample time): agents sample at 1 Hz, so
# anything past a few seconds is a backlog (or a skewed agent clock).
# Recovery steps, fault -> drain / signal / requeue / running again: the target for running
# again is <= 10 s (grace period included); Slurm alone takes 7-9 minutes.
RECOVERY_STEPS = ("drain", "signal", "requeue", "running")
RECOVERY_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
                      600.0)
# Work lost to a fault (requeue - last registered checkpoint): checkpoint intervals run from
# minutes to hours.
LOST_WORK_BUCKETS_S = (1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
                       14400.0, 43200.0)
REPORT_LAG_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                        60.0)


class _StateCollector(Collector):
    """Gauges read from the controller's state at scrape time, through callbacks."""

    def __init__(self, owner: ControllerMetrics) -> None:
        self._owner = owner

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "gpufleet_controller_nodes",
                "Nodes the controller knows, by health state (a count of nodes).",
                labels=["health"],
            ),
            GaugeMetricFamily(
                "gpufleet_controller_action_queue_depth",
                "Slurm actions queued and not yet finished (a count of actions).",
            ),
            GaugeMetricFamily(
                "gpufleet_controller_connected_agents",
                "Agents with an open stream that has said hello (a count of agents).",
            ),
        )

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        nodes, depth, agents = self._families()
        o = self._owner
        if o.nodes_by_health is not None:
            counts = dict.fromkeys(HEALTH_STATES, 0)
            # a failing store must not fail the whole scrape: the other families still
            # tell the operator what is going on, and the error counter says the store broke
            with contextlib.suppress(Exception):
                for state, n in o.nodes_by_health().items():
                    counts[state] = counts.get(state, 0) + int(n)
                for state, n in counts.items():
                    nodes.add_metric([state], float(n))
        if o.queue_depth is not None:
            with contextlib.suppress(Exception):
                depth.add_metric([], float(o.queue_depth()))
        agents.add_metric([], float(o.connected_agents))
        return [nodes, depth, agents]


class ControllerMetrics:
    """Counters and histograms the controller updates, plus callback gauges for state.

    Thread-safe: ingest runs on the gRPC event loop, actions on their worker thread, scrapes
    on the HTTP server's thread.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        nodes_by_health: Callable[[], Mapping[str, int]] | None = None,
        queue_depth: Callable[[], int] | None = None,
        process_metrics: bool = True,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.nodes_by_health = nodes_by_health
        self.queue_depth = queue_depth
        self._agents_lock = threading.Lock()
        self.connected_agents = 0
        r = self.registry
        self.acct = AcctMetrics(r)  # job accounting, per account (acct_metrics.py)
        self._reports = Counter(
            "gpufleet_controller_reports_received",
            "Agent reports the controller stored, a count: kind sample (the 1 Hz samples) or "
            "event (health events pushed at once). Replays are counted under "
            "gpufleet_controller_reports_duplicate_total instead.",
            ["kind"], registry=r,
        )
        self._duplicates = Counter(
            "gpufleet_controller_reports_duplicate",
            "Replayed agent reports acknowledged again but not applied twice, a count.",
            registry=r,
        )
        self._xids = Counter(
            "gpufleet_controller_xid_events",
            "XID events agents reported, a count per node (series exist only for nodes that "
            "had one, so the node label stays bounded by the cluster's size).",
            ["node"], registry=r,
        )
        self._rejected = Counter(
            "gpufleet_controller_reports_rejected",
            "Agent reports that failed validation, acked with a reason and never stored (the "
            "stream goes on), a count per report kind: sample, event, checkpoint, usage.",
            ["kind"], registry=r,
        )
        self._hellos = Counter(
            "gpufleet_controller_agent_connects",
            "Agent streams that opened with a valid hello, a count.", registry=r,
        )
        self._errors = Counter(
            "gpufleet_controller_ingest_errors",
            "Agent streams refused, a count: reason invalid (a malformed report) or store "
            "(the state store failed).",
            ["reason"], registry=r,
        )
        self._actions = Counter(
            "gpufleet_controller_actions",
            "Slurm actions finished, a count: action drain or resume; status done, failed, "
            "skipped (e.g. already drained by an admin) or shadow (shadow mode, not done).",
            ["action", "status"], registry=r,
        )
        self._fault_to_action = Histogram(
            "gpufleet_controller_fault_to_action_seconds",
            "From the fault (agent clock) to Slurm confirming the action, in seconds; only "
            "actions with status done that a fault caused.",
            ["action"], buckets=FAULT_TO_ACTION_BUCKETS_S, registry=r,
        )
        self._lag = Histogram(
            "gpufleet_controller_report_lag_seconds",
            "From the agent taking a sample to the controller storing it, in seconds (agent "
            "clock vs controller clock: skew shows up here too).",
            buckets=REPORT_LAG_BUCKETS_S, registry=r,
        )
        self._last_report = Gauge(
            "gpufleet_controller_last_report_timestamp_seconds",
            "When the controller last stored an agent report, in seconds since the Unix epoch.",
            registry=r,
        )
        # read at scrape time: a plain float written per report, not a Gauge.set (a lock)
        self._last_report_s = 0.0
        self._last_report.set_function(lambda: self._last_report_s)
        self._recovery_step = Histogram(
            "gpufleet_controller_recovery_step_seconds",
            "From a fault (agent clock) to each step of the recovery of a job on the faulty "
            "node, in seconds: step drain, signal, requeue or running (the job running again).",
            ["step"], buckets=RECOVERY_BUCKETS_S, registry=r,
        )
        self._lost_work = Histogram(
            "gpufleet_controller_recovery_lost_work_seconds",
            "Work a requeued job lost, in seconds: from its last registered checkpoint (or its "
            "start, without one) to the requeue.",
            buckets=LOST_WORK_BUCKETS_S, registry=r,
        )
        self._recoveries = Counter(
            "gpufleet_controller_recoveries",
            "Recoveries of jobs on a fatal node that reached a final status, a count: "
            "running_again, requeued (not seen running again), not_requested, do_not_requeue, "
            "finished, limit, failed, shadow.",
            ["status"], registry=r,
        )
        self._switch_holds_dropped = Counter(
            "gpufleet_controller_switch_holds_dropped",
            "Multi-node jobs whose one-leaf switch count (asked by gpufleet sbatch) the "
            "controller dropped because they could start across leaves, a count "
            "(placement/switch_hold.py).",
            registry=r,
        )
        self._store_up = Gauge(
            "gpufleet_controller_store_up",
            "1 while the state store takes writes, 0 from a failed write (a full disk, a "
            "lost database) to the next one that succeeds (no unit).",
            registry=r,
        )
        self._store_up.set(1)
        for step in RECOVERY_STEPS:
            self._recovery_step.labels(step)
        info = Gauge("gpufleet_controller_info",
                     "Constant 1; carries the controller's version (no unit).", ["version"],
                     registry=r)
        info.labels(__version__).set(1)
        r.register(_StateCollector(self))
        # Pre-bound children: labels() is a dict lookup under a lock; the hot path skips it.
        self._report_child = {k: self._reports.labels(k) for k in REPORT_KINDS}
        self._error_child = {k: self._errors.labels(k) for k in INGEST_ERROR_REASONS}
        for kind in ACTION_KINDS:
            self._fault_to_action.labels(kind)
            for status in ACTION_STATUSES:
                self._actions.labels(kind, status)
        if process_metrics:
            register_process_collectors(r)

    # ------------------------------------------------------------ ingest (hot path)

    def report_ingested(self, kind: str = "sample", agent_timestamp_ms: int | None = None,
                        now_s: float | None = None) -> None:
        """One agent report stored (kind: sample, event, heartbeat, usage)."""
        child = self._report_child.get(kind)
        if child is None:
            child = self._reports.labels(kind)
        child.inc()
        now = time.time() if now_s is None else now_s
        self._last_report_s = now
        if agent_timestamp_ms:
            # a negative lag is an agent clock ahead of ours: count it as 0, not as a bug
            self._lag.observe(max(0.0, now - agent_timestamp_ms / 1000.0))

    def xid_event(self, node: str) -> None:
        self._xids.labels(node).inc()

    def duplicate_report(self) -> None:
        self._duplicates.inc()

    def report_rejected(self, kind: str) -> None:
        """One agent report rejected (acked with a reason, not stored)."""
        # the label stays bounded whatever a fuzzing agent sends
        known = kind in ("sample", "event", "checkpoint", "usage")
        self._rejected.labels(kind if known else "other").inc()

    def ingest_error(self, reason: str) -> None:
        """A stream refused (reason: invalid | store)."""
        child = self._error_child.get(reason)
        if child is None:
            child = self._errors.labels(reason)
        child.inc()

    def switch_hold_dropped(self) -> None:
        self._switch_holds_dropped.inc()

    def store_up(self, up: bool) -> None:
        self._store_up.set(1 if up else 0)

    def agent_connected(self) -> None:
        self._hellos.inc()
        with self._agents_lock:
            self.connected_agents += 1

    def agent_disconnected(self) -> None:
        with self._agents_lock:
            self.connected_agents = max(0, self.connected_agents - 1)

    # ------------------------------------------------------------ actions

    def action_finished(self, kind: str, status: str, fault_to_done_s: float | None) -> None:
        """A Slurm action reached its final status; latency only for done, fault-caused ones."""
        self._actions.labels(kind, status).inc()
        if status == "done" and fault_to_done_s is not None:
            self._fault_to_action.labels(kind).observe(max(0.0, fault_to_done_s))


    # ------------------------------------------------------------ recovery

    def recovery_finished(self, status: str, fault_ms: int | None,
                          steps_ms: Mapping[str, int | None], lost_work_ms: int | None) -> None:
        """A job's recovery ended: count it, observe fault -> each step reached, lost work."""
        self._recoveries.labels(status).inc()
        if fault_ms is not None:
            for step, at_ms in steps_ms.items():
                if at_ms is not None:
                    self._recovery_step.labels(step).observe(max(0.0, (at_ms - fault_ms) / 1000))
        if lost_work_ms is not None:
            self._lost_work.observe(max(0.0, lost_work_ms / 1000))


def parse_listen(listen: str) -> tuple[str, int]:
    """"HOST:PORT", ":PORT" or "[::]:PORT" -> (host, port); a clear error otherwise."""
    host, sep, port_text = listen.rpartition(":")
    if not sep:
        raise ValueError(f"metrics listen address {listen!r}: expected HOST:PORT")
    try:
        port = int(port_text)
    except ValueError as e:
        raise ValueError(f"metrics listen address {listen!r}: port {port_text!r} is not a "
                         f"number") from e
    if not 0 <= port <= 65535:
        raise ValueError(f"metrics listen address {listen!r}: port {port} out of range")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - Prometheus scrapes from elsewhere
    return host, port


def start_metrics_http(
    metrics: ControllerMetrics, listen: str = DEFAULT_LISTEN,
) -> MetricsHttpServer:
    """Serve `metrics` at http://LISTEN/metrics on a daemon thread (OSError if it cannot bind)."""
    host, port = parse_listen(listen)
    return serve_metrics(metrics.registry, host, port)
