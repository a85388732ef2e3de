"""The project's Prometheus rules and metrics as tests read them: where the shipped rule files
are, promtool (required under CI=true), the series names the agent's and controller's registries
export, and the metric names a PromQL expression uses."""

from __future__ import annotations

import re
import shutil

from gpufleet.agent.metrics import AgentCollector
from gpufleet.scheduler.observability.metrics import ControllerMetrics
from prometheus_client import CollectorRegistry

from tests.conftest import REPO
from tests.support.ci import unavailable

MONITORING = REPO / "scheduler" / "gpufleet" / "scheduler" / "monitoring"
# Series Prometheus makes itself for every scrape target.
PROMETHEUS_SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "topk", "bottomk", "rate", "irate", "increase",
    "delta", "changes", "absent", "histogram_quantile", "vector", "by", "without", "or",
    "and", "unless", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "clamp_min", "clamp_max", "time", "abs", "label_replace", "max_over_time",
    "min_over_time", "avg_over_time", "quantile", "inf", "nan",
}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        unavailable("promtool is not installed (apt-get install prometheus)")
    return path


def known_series_names() -> set[str]:
    names = set(PROMETHEUS_SYNTHETIC)
    families = list(AgentCollector().describe())
    families += list(ControllerMetrics(CollectorRegistry()).registry.collect())
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum",
                                                                  "_created"),
                "gauge": ("",), "info": ("_info",), "summary": ("_count", "_sum")}
    for f in families:
        names.update(f.name + s for s in suffixes.get(f.type, ("",)))
        names.update(s.name for s in f.samples)
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (label matchers, groupings, ranges, strings out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    tokens = re.findall(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)", expr)
    return {t for t in tokens if t.lower() not in PROMQL_WORDS and not t.startswith("$")}
