"""Prometheus metrics of job accounting: counters per account, and jobs idling on their GPUs.

Counters are per account only (not per job or user): a cluster runs millions of jobs a month
and each label value is a series forever. The idle gauge does name jobs, but only jobs that
are idle right now (at 0 % on every GPU they hold for at least `idle_min_s`), so its series
count is bounded by the idle jobs, which an alert is there to drive to zero.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class _IdleCollector(Collector):
    def __init__(self, owner: AcctMetrics) -> None:
        self._owner = owner

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "gpufleet_acct_job_idle_seconds",
            "Seconds a running job has held all its GPUs at 0 % utilisation (only jobs idle "
            "for at least a minute have a series).",
            labels=["job_id", "user", "account"],
        )

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        fam = self._family()
        for (job, user, account), idle_s in self._owner.idle_jobs().items():
            fam.add_metric([job, user, account], idle_s)
        return [fam]


class AcctMetrics:
    """Fed by ingest with what each applied usage report added; thread-safe."""

    def __init__(self, registry: CollectorRegistry, idle_min_s: float = 60.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.idle_min_s = idle_min_s
        self._clock = clock
        self._lock = threading.Lock()
        # (job, node, gpu) -> (idle_since_ms or None, user, account)
        self._gpus: dict[tuple[str, str, int], tuple[int | None, str, str]] = {}
        self._allocated = Counter(
            "gpufleet_acct_gpu_allocated_seconds",
            "GPU-seconds allocated to jobs (Prolog to Epilog), per Slurm account.",
            ["account"], registry=registry,
        )
        self._busy = Counter(
            "gpufleet_acct_gpu_busy_seconds",
            "GPU-seconds busy, utilisation-weighted (50 % for 2 s is 1 s), per Slurm account.",
            ["account"], registry=registry,
        )
        self._energy = Counter(
            "gpufleet_acct_gpu_energy_joules",
            "Energy the GPUs of jobs used (NVML total-energy counter), per Slurm account.",
            ["account"], registry=registry,
        )
        registry.register(_IdleCollector(self))

    def usage(self, account: str, allocated_ms: int, busy_ms: int, energy_mj: int) -> None:
        # a final report may correct a slightly ahead running one downwards; a counter
        # cannot go down, so the correction is dropped (it is at most a second or so)
        if allocated_ms > 0:
            self._allocated.labels(account).inc(allocated_ms / 1000.0)
        if busy_ms > 0:
            self._busy.labels(account).inc(busy_ms / 1000.0)
        if energy_mj > 0:
            self._energy.labels(account).inc(energy_mj / 1000.0)

    def gpu_state(self, job_id: str, node: str, gpu: int, user: str, account: str,
                  idle_since_ms: int | None, ended: bool) -> None:
        with self._lock:
            if ended:
                self._gpus.pop((job_id, node, gpu), None)
            else:
                self._gpus[(job_id, node, gpu)] = (idle_since_ms, user, account)

    def idle_jobs(self) -> dict[tuple[str, str, str], float]:
        """(job, user, account) -> seconds idle, for jobs idle on every GPU they hold."""
        now_ms = self._clock() * 1000.0
        latest: dict[tuple[str, str, str], int | None] = {}
        with self._lock:
            for (job, _node, _gpu), (since, user, account) in self._gpus.items():
                key = (job, user, account)
                if since is None:
                    latest[key] = None  # one busy GPU: the job is not idle
                elif key not in latest:
                    latest[key] = since
                elif latest[key] is not None:
                    latest[key] = max(since, latest[key] or since)
        out = {}
        for key, since in latest.items():
            if since is not None and (now_ms - since) / 1000.0 >= self.idle_min_s:
                out[key] = (now_ms - since) / 1000.0
        return out
