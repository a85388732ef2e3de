"""bench/placement_vs_slurm.py at CI size: the same trace through plain sbatch and through
gpufleet sbatch on the session's 8-node, 2-leaf lab. Prints the bench's table; asserts only
behaviour: every job ran to completion both ways, on the node count it asked, and gpufleet
placed none on a node its health called unhealthy when the job was submitted."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from gpufleet.scheduler.cli.sbatch_filter import SWITCH_HOLD

from tests.slurm.harness import SlurmLab

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

_BENCH = Path(__file__).parents[2] / "bench" / "placement_vs_slurm.py"


def _bench():  # type: ignore[no-untyped-def]  # a script, loaded as a module
    spec = importlib.util.spec_from_file_location("placement_vs_slurm", _BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _run(lab: SlurmLab, tmp_path: Path, report_figure: Callable[[str], None],
         trace, title: str) -> None:  # type: ignore[no-untyped-def]  # the bench's Trace
    bench = _bench()
    plain, gf = bench.run_both(lab, trace, tmp_path)
    report_figure(f"placement vs Slurm ({title}):\n" + bench.table(trace, plain, gf))
    for run in (plain, gf):
        assert [r.state for r in run.jobs] == ["COMPLETED"] * len(trace.jobs), run.how
        assert [len(r.nodes) for r in run.jobs] == [j.nodes for j in trace.jobs], run.how
    assert [r.on_unhealthy for r in gf.jobs] == [[]] * len(trace.jobs)
    # every submission was answered (none went on as plain sbatch) and kept off the node
    # degraded from the start: a pin (it starts now), the exclusion, and for a multi-node
    # job not pinned the one-leaf switch hold, which ends on one leaf or is dropped by the
    # controller (the job could start across leaves)
    assert gf.fallbacks == []
    hold = f"ex+sw=1@{SWITCH_HOLD}"
    for g in gf.jobs:
        assert g.added in {"pin+ex", "ex", hold, hold + "/dropped"}, g.job.name
        if g.added.startswith(hold):
            assert g.job.nodes > 1, g.job.name
            assert g.leaves == 1 or g.added.endswith("/dropped"), g.job.name


def test_trace_through_plain_and_gpufleet_sbatch(
        clean_slurm_lab: SlurmLab, tmp_path: Path,
        report_figure: Callable[[str], None]) -> None:
    bench = _bench()
    trace = bench.make_trace(clean_slurm_lab.config.nodes, 10, seed=3, gap_s=0.6,
                             run_s=(2.0, 5.0))
    assert {j.kind for j in trace.jobs} == set(bench.KINDS)
    _run(clean_slurm_lab, tmp_path, report_figure, trace, "CI size, 8 nodes, 2 leaves")


def test_fill_trace_through_plain_and_gpufleet_sbatch(
        clean_slurm_lab: SlurmLab, tmp_path: Path,
        report_figure: Callable[[str], None]) -> None:
    """The --fill trace's shape, short: small jobs fill the lab, then 2-node jobs arrive
    while it is full. Jobs that cannot start at once must get no pin nor switch count."""
    bench = _bench()
    trace = bench.make_fill_trace(clean_slurm_lab.config.nodes, 16, seed=1, gap_s=0.3,
                                  run_scale=0.2)
    assert sum(j.nodes > 1 for j in trace.jobs) >= 4
    _run(clean_slurm_lab, tmp_path, report_figure, trace, "--fill, CI size, 8 nodes, 2 leaves")
