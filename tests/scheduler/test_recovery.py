"""Job recovery over a real SQLite store, the real health policy and action queue, and the
in-memory Slurm: who gets signalled and requeued, when, and what is recorded."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from gpufleet.scheduler.cli.jobs import jobs
from gpufleet.scheduler.health.actions import ActionQueue
from gpufleet.scheduler.health.policy import HealthPolicy, PolicyConfig
from gpufleet.scheduler.observability.metrics import ControllerMetrics
from gpufleet.scheduler.recovery.manager import (
    RecoveryConfig,
    RecoveryConfigError,
    RecoveryManager,
    parse_marker,
)
from gpufleet.scheduler.store import CheckpointRow, RecoveryRow, SqliteStore, VerdictRow, now_ms

from .fakes import FakeSlurm
from .test_loop import wait_for

NODES = ["n1", "n2", "n3", "n4"]
GRACE_S = 0.3


class Fleet:
    def __init__(self, tmp_path: Path, shadow: bool = False, **cfg: object) -> None:
        self.db = tmp_path / "state.db"
        self.store = SqliteStore(self.db)
        self.slurm = FakeSlurm(NODES)
        for n in NODES:
            self.store.upsert_node(n, n, 8, b"", "i1", now_ms())
        self.actions = ActionQueue(self.store, self.slurm, shadow=shadow, retry_initial_s=0.01)
        self.actions.start()
        self.metrics = ControllerMetrics(process_metrics=False)
        config = RecoveryConfig(**{"grace_s": GRACE_S, "poll_s": 0.01,  # type: ignore[arg-type]
                                   "running_timeout_s": 5.0, **cfg})
        self.recovery = RecoveryManager(self.store, self.slurm, config, shadow=shadow,
                                        metrics=self.metrics)
        self.policy = HealthPolicy(self.store, self.actions, PolicyConfig(),
                                   recovery=self.recovery)

    def fatal(self, node: str) -> int:
        fault = now_ms()
        before, after = self.store.set_verdict(
            VerdictRow(node, "xid", 0, "", "fatal", "xid79", "GPU 0 Xid 79", fault))
        self.policy.on_health_change(node, before, after, "xid79", "GPU 0 Xid 79", fault)
        assert wait_for(self.recovery.idle, 10.0), "recovery did not finish"
        assert self.actions.wait_idle(5.0)
        return fault

    def only(self, job_id: str) -> RecoveryRow:
        (row,) = self.store.recoveries(job_id)
        return row

    def calls(self, job_id: str) -> list[str]:
        return [c[0] for c in self.slurm.job_calls if len(c) > 1 and c[1] == job_id]

    def close(self) -> None:
        self.recovery.stop()
        self.actions.stop()
        self.store.close()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    yield f
    f.close()


def test_marked_job_is_signalled_requeued_without_the_node_and_runs_again(fleet: Fleet) -> None:
    fleet.slurm.add_job("42", ("n1", "n2"), comment="train gpufleet-ckpt")
    fleet.store.record_checkpoint(CheckpointRow("42", "n2", 1200, "/ck/step-1200",
                                                now_ms() - 4_000, 1000, now_ms()))
    fault = fleet.fatal("n1")

    assert fleet.slurm.state["n1"][0] == "IDLE+DRAIN"
    assert ("signal", "42", "USR1", "batch") in fleet.slurm.job_calls
    assert fleet.calls("42") == ["signal", "requeue", "update"]
    # begin time cleared (no delay on a first restart); the bad node excluded, and the
    # killed instance's other node too (its slurmd refuses the job id for cred_expire)
    assert ("update", "42", "0", "n1,n2") in fleet.slurm.job_calls
    r = fleet.only("42")
    assert r.status == "running_again" and r.restart == 1 and r.node == "n1"
    assert r.fault_ms == fault
    assert r.drain_ms is not None and r.signal_ms is not None
    assert r.requeue_ms is not None and r.running_ms is not None
    assert fault <= r.signal_ms <= r.requeue_ms <= r.running_ms
    # the grace period was waited (the job kept running through it)
    assert r.requeue_ms - r.signal_ms >= GRACE_S * 1000
    assert r.checkpoint_step == 1200
    assert r.lost_work_ms is not None and 4_000 <= r.lost_work_ms < 4_000 + 3_000
    assert "n1" not in fleet.slurm.jobs["42"].nodes
    reg = fleet.metrics.registry
    assert reg.get_sample_value("gpufleet_controller_recovery_step_seconds_count",
                                {"step": "running"}) == 1
    assert reg.get_sample_value("gpufleet_controller_recovery_lost_work_seconds_count") == 1
    assert reg.get_sample_value("gpufleet_controller_recoveries_total",
                                {"status": "running_again"}) == 1


def test_job_that_did_not_ask_is_left_alone_beyond_the_drain(fleet: Fleet) -> None:
    fleet.slurm.add_job("7", ("n1",), comment="")  # requeueable by JobRequeue=1, no marker
    fleet.slurm.add_job("8", ("n1",), comment="gpufleet-ckpt", requeue=False)  # --no-requeue
    fleet.fatal("n1")
    assert fleet.slurm.state["n1"][0] == "IDLE+DRAIN"
    assert fleet.calls("7") == [] and fleet.calls("8") == []
    assert fleet.only("7").status == "not_requested"
    assert "no gpufleet-ckpt marker" in fleet.only("7").detail
    assert fleet.only("8").status == "not_requested"
    assert "not requeueable" in fleet.only("8").detail
    assert fleet.slurm.jobs["7"].state == "RUNNING"


def test_a_registered_checkpoint_is_asking_for_restart(fleet: Fleet) -> None:
    fleet.slurm.add_job("9", ("n1",))
    fleet.store.record_checkpoint(CheckpointRow("9", "n1", 5, "/ck/step-5", now_ms(), 0,
                                                now_ms()))
    fleet.fatal("n1")
    assert fleet.only("9").status == "running_again"


def test_exit_93_after_the_signal_is_not_requeued_and_ends_the_grace_early(
    fleet: Fleet,
) -> None:
    job = fleet.slurm.add_job("11", ("n1",), comment="gpufleet-ckpt:grace_s=30")
    fleet.slurm.on_signal["11"] = replace(job, state="FAILED", exit_status=93)
    t0 = now_ms()
    fleet.fatal("n1")
    assert now_ms() - t0 < 10_000, "waited the whole 30 s grace for a job that had ended"
    assert fleet.calls("11") == ["signal"]
    r = fleet.only("11")
    assert r.status == "do_not_requeue" and r.requeue_ms is None
    assert fleet.slurm.jobs["11"].state == "FAILED"


def test_a_job_the_fault_killed_is_requeued_without_a_signal(fleet: Fleet) -> None:
    fleet.slurm.add_job("12", ("n1",), comment="gpufleet-ckpt", state="NODE_FAIL",
                        exit_status=None, end_time_s=now_ms() // 1000)
    fleet.slurm.add_job("13", ("n1",), comment="gpufleet-ckpt", state="COMPLETED",
                        end_time_s=now_ms() // 1000)
    fleet.fatal("n1")
    assert fleet.calls("12") == ["requeue", "update"]
    assert fleet.only("12").status == "running_again"
    assert fleet.calls("13") == []
    assert fleet.only("13").status == "finished"


def test_restart_limit_stops_a_job_that_keeps_failing(fleet: Fleet) -> None:
    fleet.slurm.add_job("20", ("n1",), comment="gpufleet-ckpt:max_restarts=2")
    fleet.fatal("n1")
    assert fleet.slurm.jobs["20"].nodes == ("n2",)
    fleet.fatal("n2")
    assert fleet.slurm.jobs["20"].nodes == ("n3",)
    fleet.slurm.job_calls.clear()
    fleet.fatal("n3")
    rows = fleet.store.recoveries("20")
    assert [r.status for r in rows] == ["running_again", "running_again", "limit"]
    assert [r.restart for r in rows[:2]] == [1, 2]
    assert "max_restarts=2" in rows[2].detail
    assert fleet.calls("20") == []  # not signalled, not requeued


def test_backoff_grows_and_excluded_nodes_accumulate(tmp_path: Path) -> None:
    f = Fleet(tmp_path, backoff_initial_s=7.0, backoff_max_s=10.0, running_timeout_s=0.5)
    try:
        f.slurm.add_job("30", ("n1",), comment="gpufleet-ckpt")
        for node in ("n1", "n2", "n3"):
            assert f.slurm.jobs["30"].nodes == (node,)
            f.fatal(node)
        updates = [c for c in f.slurm.job_calls if c[0] == "update"]
        assert [c[2] for c in updates] == ["0", "7", "10"]  # none, initial, capped
        assert [c[3] for c in updates] == ["n1", "n1,n2", "n1,n2,n3"]
        assert f.slurm.jobs["30"].nodes == ("n4",)
    finally:
        f.close()
    assert RecoveryConfig(backoff_initial_s=30, backoff_max_s=600).backoff_s(4) == 120


def test_exclusion_narrows_to_the_bad_node_when_the_job_cannot_start_otherwise(
    tmp_path: Path,
) -> None:
    f = Fleet(tmp_path, cred_expire_s=0.2)
    try:
        f.slurm.add_job("31", ("n1", "n2", "n3"), comment="gpufleet-ckpt")
        f.fatal("n1")
        updates = [c[3] for c in f.slurm.job_calls if c[0] == "update"]
        assert updates == ["n1,n2,n3", "n1"]  # only n4 free: too few; then only n1 out
        r = f.only("31")
        assert r.status == "running_again" and "excluded only n1" in r.detail
        assert f.slurm.jobs["31"].nodes == ("n2", "n3", "n4")
    finally:
        f.close()
    assert RecoveryConfig(backoff_initial_s=30, backoff_max_s=600).backoff_s(4) == 120


def test_shadow_mode_records_and_does_nothing(tmp_path: Path) -> None:
    f = Fleet(tmp_path, shadow=True)
    try:
        f.slurm.add_job("40", ("n1",), comment="gpufleet-ckpt")
        f.fatal("n1")
        assert f.calls("40") == []
        r = f.only("40")
        assert r.status == "shadow" and "would signal USR1" in r.detail
    finally:
        f.close()


def test_requeue_refused_by_slurm_is_recorded_as_failed(fleet: Fleet) -> None:
    fleet.slurm.add_job("50", ("n1",), comment="gpufleet-ckpt")
    fleet.slurm.requeue_fails.add("50")
    fleet.fatal("n1")
    r = fleet.only("50")
    assert r.status == "failed" and "requeue failed" in r.detail and r.signal_ms is not None


def test_marker_options_and_bad_ones() -> None:
    cfg = RecoveryConfig()
    assert parse_marker("nothing here", cfg) is None
    assert parse_marker("xgpufleet-ckpt", cfg) is None
    req = parse_marker("a gpufleet-ckpt:grace_s=12.5,max_restarts=0 b", cfg)
    assert req is not None and (req.grace_s, req.max_restarts, req.problem) == (12.5, 0, "")
    bad = parse_marker("gpufleet-ckpt:grace_s=-1,colour=red", cfg)
    assert bad is not None and bad.grace_s == cfg.grace_s
    assert "'grace_s=-1'" in bad.problem and "'colour=red'" in bad.problem
    with pytest.raises(RecoveryConfigError, match="signal_scope"):
        RecoveryConfig(signal_scope="all").validate()
    with pytest.raises(RecoveryConfigError, match="invalid signal"):
        RecoveryConfig(signal="USR1; rm").validate()


def test_jobs_show_prints_the_timeline(fleet: Fleet) -> None:
    fleet.slurm.add_job("42", ("n1",), comment="gpufleet-ckpt")
    fleet.store.record_checkpoint(CheckpointRow("42", "n1", 77, "/ck/step-77",
                                                now_ms() - 2_000, 0, now_ms()))
    fleet.fatal("n1")
    runner = CliRunner()
    out = runner.invoke(jobs, ["show", "42", "--db", str(fleet.db)])
    assert out.exit_code == 0, out.output
    assert "recovery 1: node n1, status running_again, restart 1" in out.output
    for step in ("drain", "signal", "requeue", "running again", "lost work"):
        assert step in out.output
    assert "since checkpoint step 77" in out.output
    js = runner.invoke(jobs, ["show", "42", "--db", str(fleet.db), "--json"])
    assert '"running_ms"' in js.output and '"step": 77' in js.output
    missing = runner.invoke(jobs, ["show", "999", "--db", str(fleet.db)])
    assert missing.exit_code != 0 and "no recovery and no checkpoint" in missing.output


def _ledger(fleet: Fleet, job_id: str, gpus: dict[str, int], start_ms: int) -> None:
    from gpufleet.scheduler.accounting.ledger import UsageRow

    fleet.store.record_usage([
        UsageRow(job_id, node, g, "ann", "phys", start_ms, None, start_ms + 30_000, 30_000,
                 15_000, 9_000_000) for node, n in gpus.items() for g in range(n)])


def test_lost_work_is_charged_to_every_gpu_of_the_killed_run_once(fleet: Fleet) -> None:
    from gpufleet.scheduler.accounting.ledger import UsageQuery

    job = fleet.slurm.add_job("42", ("n1", "n2"), comment="gpufleet-ckpt")
    _ledger(fleet, "42", {"n1": 2, "n2": 4}, job.start_time_s * 1000)
    fleet.store.record_checkpoint(CheckpointRow("42", "n2", 1200, "/ck/step-1200",
                                                now_ms() - 4_000, 1000, now_ms()))
    fleet.fatal("n1")
    r = fleet.only("42")
    assert r.status == "running_again" and r.lost_work_ms is not None
    # the work since the checkpoint, on each of the 6 GPUs the run held on both its nodes
    (total,) = fleet.store.usage(UsageQuery(jobs=("42",)))
    assert total.lost_ms == 6 * r.lost_work_ms
    per_gpu = {(u.node, u.gpu_index) for u in fleet.store.usage_rows("42")}
    assert len(per_gpu) == 6
    # the step retried (same killed run): nothing more
    fleet.recovery._charge_lost_time(job, r, r.requeue_ms or 0, r.lost_work_ms)
    assert fleet.store.usage(UsageQuery(jobs=("42",)))[0].lost_ms == 6 * r.lost_work_ms
    # a new store object (a restarted controller) finds the charge made as well
    again = SqliteStore(fleet.db)
    try:
        assert again.add_lost_time("42", "n1", r.lost_work_ms, run=job.restart_count) == 0
    finally:
        again.close()
    (acct,) = fleet.store.usage(UsageQuery(group_by="account"))
    assert acct.lost_ms == 6 * r.lost_work_ms


def test_lost_work_is_capped_at_the_killed_runs_own_time(fleet: Fleet) -> None:
    """A checkpoint from an earlier run: only this run's GPU time can have been lost."""
    from gpufleet.scheduler.accounting.ledger import UsageQuery

    job = fleet.slurm.add_job("43", ("n1",), comment="gpufleet-ckpt",
                              start_time_s=now_ms() // 1000 - 10)
    _ledger(fleet, "43", {"n1": 1}, job.start_time_s * 1000)
    fleet.store.record_checkpoint(CheckpointRow("43", "n1", 5, "/ck/step-5",
                                                now_ms() - 3_600_000, 1000, now_ms()))
    fleet.fatal("n1")
    r = fleet.only("43")
    assert r.lost_work_ms is not None and r.lost_work_ms >= 3_600_000
    lost = fleet.store.usage(UsageQuery(jobs=("43",)))[0].lost_ms
    assert 10_000 <= lost < 10_000 + 5_000


def test_a_job_left_to_slurm_is_charged_nothing(fleet: Fleet) -> None:
    from gpufleet.scheduler.accounting.ledger import UsageQuery

    job = fleet.slurm.add_job("44", ("n1",), comment="")  # did not ask for restart
    _ledger(fleet, "44", {"n1": 2}, job.start_time_s * 1000)
    fleet.fatal("n1")
    assert fleet.only("44").status == "not_requested"
    assert fleet.store.usage(UsageQuery(jobs=("44",)))[0].lost_ms == 0
