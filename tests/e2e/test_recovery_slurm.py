"""End to end on a real Slurm 22.05: a 2-node checkpointing job, Xid 79 on its batch host ->
drain, signal, requeue without that node, running again from its last complete checkpoint
(a torn newer one is ignored), each step timed by the controller."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.recovery import FAULT_NODE, run
from tests.slurm.harness import SlurmLab

pytestmark = pytest.mark.slurm

RUNNING_AGAIN_TARGET_S = 10.0


@pytest.mark.parametrize("slurm", ["cli", "rest"])
def test_xid79_under_a_job_requeues_it_and_it_resumes_from_its_checkpoint(
    clean_slurm_lab: SlurmLab, tmp_path: Path, report_figure, slurm: str,
) -> None:
    """`slurm`: the controller's client; with rest the jobs are read from slurmrestd."""
    if slurm == "rest":
        clean_slurm_lab.start_restd()
    try:
        res = run(clean_slurm_lab, tmp_path, ckpt_every_s=1.0, grace_s=3.0, slurm=slurm)
    finally:
        if slurm == "rest":
            clean_slurm_lab.stop_restd()
    r = res.recovery
    for line in res.lines():
        report_figure(f"recovery e2e ({slurm}): " + line)

    assert FAULT_NODE in res.nodes_before
    assert res.nodes_after and FAULT_NODE not in res.nodes_after, res.nodes_after
    assert "DRAIN" in clean_slurm_lab.node_state(FAULT_NODE)
    assert r.status == "running_again" and r.restart == 1
    assert None not in (r.drain_ms, r.signal_ms, r.requeue_ms, r.running_ms)
    assert r.signal_ms <= r.requeue_ms <= r.running_ms  # type: ignore[operator]
    # the grace period (3 s, from the job's comment marker) was given
    assert r.requeue_ms - r.signal_ms >= 3000 - 100  # type: ignore[operator]
    running_s = (r.running_ms - res.fault_wall_ms) / 1000  # type: ignore[operator]
    assert running_s <= RUNNING_AGAIN_TARGET_S, f"fault -> running again took {running_s:.1f} s"
    # resumed from the newest complete checkpoint: at least what was registered at the
    # fault, exactly the last one the first run finished, never the torn one
    assert res.resumed_from_step >= res.registered_step_at_fault
    assert res.resumed_from_step == res.last_saved_step
    assert res.resumed_from_step != res.torn_step
    assert r.lost_work_ms is not None and r.lost_work_ms < 5_000
    assert "Restarts=1" in clean_slurm_lab.show_job(int(res.job_id))
