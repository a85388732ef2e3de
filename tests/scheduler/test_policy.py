"""The health policy over a real SQLite store and the in-memory Slurm: drain, degrade, resume
after the quiet period, never lift someone else's drain, unreachable nodes, shadow mode."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from gpufleet.scheduler.health.actions import ActionQueue
from gpufleet.scheduler.health.policy import HealthPolicy, PolicyConfig
from gpufleet.scheduler.observability.alerting import Alert
from gpufleet.scheduler.store import SqliteStore, VerdictRow, now_ms

from .fakes import FakeSlurm

QUIET_S = 300.0
NODES = ["n1", "n2", "n3"]


def queue_for(config: PolicyConfig, store: SqliteStore, slurm: FakeSlurm,
              shadow: bool = False) -> ActionQueue:
    """The action queue as the controller builds it: degrading as `config` says."""
    return ActionQueue(store, slurm, shadow=shadow, retry_initial_s=0.01,
                       degraded_weight=config.degraded_weight,
                       degraded_feature=config.degraded_feature)


class Cluster:
    def __init__(self, tmp_path: Path, shadow: bool = False, alerts: object = None,
                 **config: object) -> None:
        self.store = SqliteStore(tmp_path / "state.db")
        self.slurm = FakeSlurm(NODES)
        for n in NODES:
            self.store.upsert_node(n, n, 8, b"", "i1", now_ms())
        self.config = PolicyConfig(resume_quiet_s=QUIET_S, **config)  # type: ignore[arg-type]
        self.actions = queue_for(self.config, self.store, self.slurm, shadow=shadow)
        self.actions.start()
        self.policy = HealthPolicy(self.store, self.actions, self.config,
                                   alerts=alerts)  # type: ignore[arg-type]

    def verdict(self, node: str, severity: str, code: str = "x", check: str = "xid") -> None:
        """What ingest does with a verdict: store it, tell the policy about the transition."""
        before, after = self.store.set_verdict(
            VerdictRow(node, check, 0, "", severity, code, f"evidence {code}", now_ms())
        )
        self.policy.on_health_change(node, before, after, code, f"evidence {code}", now_ms())
        assert self.actions.wait_idle(5.0)

    def tick_after(self, seconds: float) -> None:
        """A policy tick `seconds` from now, with every node still reporting."""
        for n in NODES:
            self.store.touch_node(n, "i1", 0, now_ms() + int(seconds * 1000))
        self.policy.tick(now_ms() + int(seconds * 1000))
        assert self.actions.wait_idle(5.0)

    def close(self) -> None:
        self.actions.stop()
        self.store.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    c.close()


def test_fatal_drains_and_resumes_only_after_the_quiet_period(cluster: Cluster) -> None:
    cluster.verdict("n1", "fatal", "xid79")
    state, reason = cluster.slurm.state["n1"]
    assert "DRAIN" in state and reason.startswith("gpufleet:xid79")
    cluster.verdict("n1", "ok")
    cluster.tick_after(QUIET_S / 2)
    assert "DRAIN" in cluster.slurm.state["n1"][0]  # not yet
    cluster.tick_after(QUIET_S + 1)
    assert cluster.slurm.state["n1"] == ("IDLE", "")
    resumes = [a for a in cluster.store.actions("n1") if a.action == "resume"]
    assert [(a.actor, a.status) for a in resumes] == [("policy", "done")]
    cluster.tick_after(QUIET_S * 2)  # nothing more to undo: no second resume
    assert len([a for a in cluster.store.actions("n1") if a.action == "resume"]) == 1


def test_a_relapse_restarts_the_quiet_period(cluster: Cluster) -> None:
    cluster.verdict("n1", "fatal", "xid79")
    cluster.verdict("n1", "ok")
    cluster.verdict("n1", "fatal", "xid48")  # second fault inside the quiet period
    cluster.tick_after(QUIET_S + 1)
    assert "DRAIN" in cluster.slurm.state["n1"][0]
    cluster.verdict("n1", "ok")
    cluster.tick_after(QUIET_S + 1)
    assert cluster.slurm.state["n1"] == ("IDLE", "")


def test_an_admin_drain_is_never_lifted(cluster: Cluster) -> None:
    cluster.slurm.state["n2"] = ("IDLE+DRAIN", "bad fan, ticket 4711")
    cluster.verdict("n2", "fatal", "xid79")
    cluster.verdict("n2", "ok")
    cluster.tick_after(QUIET_S + 1)
    assert cluster.slurm.state["n2"] == ("IDLE+DRAIN", "bad fan, ticket 4711")
    assert ("resume", "n2") not in cluster.slurm.calls
    drain = next(a for a in cluster.store.actions("n2") if a.action == "drain")
    assert drain.status == "skipped"


def test_an_admin_who_redrains_after_gpufleet_keeps_the_node(cluster: Cluster) -> None:
    cluster.verdict("n3", "fatal", "xid79")
    cluster.slurm.state["n3"] = ("IDLE+DRAIN", "RMA open")  # admin took it over
    cluster.verdict("n3", "ok")
    cluster.tick_after(QUIET_S + 1)
    assert cluster.slurm.state["n3"] == ("IDLE+DRAIN", "RMA open")
    resume = next(a for a in cluster.store.actions("n3") if a.action == "resume")
    assert resume.status == "skipped"


def test_degraded_raises_weight_and_adds_feature_then_restores(cluster: Cluster) -> None:
    cluster.slurm.weight["n1"] = 7
    cluster.verdict("n1", "degraded", "pcie_downtrained", check="pcie")
    assert cluster.slurm.weight["n1"] == 1000
    assert cluster.slurm.features["n1"] == ("gpu", "gf_degraded")
    assert "DRAIN" not in cluster.slurm.state["n1"][0]  # degraded is not drained
    row = cluster.store.policy_state("n1")
    assert row is not None and row.original_weight == 7 and row.feature_added == "gf_degraded"
    cluster.verdict("n1", "ok", check="pcie")
    cluster.tick_after(QUIET_S + 1)
    assert cluster.slurm.weight["n1"] == 7
    assert cluster.slurm.features["n1"] == ("gpu",)
    assert cluster.store.policy_state("n1") is None


def test_a_feature_the_admin_set_is_not_removed(cluster: Cluster) -> None:
    cluster.slurm.features["n1"] = ("gpu", "gf_degraded")  # set by an admin beforehand
    cluster.verdict("n1", "degraded", "thermal", check="thermal")
    cluster.verdict("n1", "ok", check="thermal")
    cluster.tick_after(QUIET_S + 1)
    assert cluster.slurm.features["n1"] == ("gpu", "gf_degraded")


def test_silent_node_is_unreachable_but_not_drained(cluster: Cluster) -> None:
    later = now_ms() + 60_000
    cluster.store.touch_node("n1", "i1", 0, later)
    cluster.store.touch_node("n2", "i1", 0, later)  # n3 stays silent
    cluster.policy.tick(later)
    assert cluster.actions.wait_idle(5.0)
    n3 = cluster.store.node("n3")
    assert n3 is not None and not n3.reachable and n3.unreachable_since_ms == later
    assert cluster.store.node("n1").reachable  # type: ignore[union-attr]
    assert not cluster.slurm.calls
    cluster.store.touch_node("n3", "i1", 0, later + 1000)
    cluster.policy.tick(later + 1000)
    assert cluster.store.node("n3").reachable  # type: ignore[union-attr]


def test_drain_unreachable_when_configured(tmp_path: Path) -> None:
    c = Cluster(tmp_path, drain_unreachable=True)
    try:
        c.policy.tick(now_ms() + 60_000)
        assert c.actions.wait_idle(5.0)
        assert all(c.slurm.state[n][1].startswith("gpufleet:unreachable") for n in NODES)
    finally:
        c.close()


def test_shadow_mode_decides_and_records_but_changes_nothing(tmp_path: Path) -> None:
    c = Cluster(tmp_path, shadow=True)
    try:
        c.verdict("n1", "fatal", "xid79")
        c.verdict("n2", "degraded", "thermal", check="thermal")
        assert not c.slurm.calls
        assert {(a.node, a.action, a.status) for a in c.store.actions()} == {
            ("n1", "drain", "shadow"), ("n2", "degrade", "shadow")
        }
    finally:
        c.close()


def test_after_a_controller_restart_it_waits_a_full_quiet_period(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    c.verdict("n1", "fatal", "xid79")
    c.verdict("n1", "ok")
    c.actions.stop()
    # a new controller process on the same store: it must still know it drained n1
    c.actions = queue_for(c.config, c.store, c.slurm)
    c.actions.start()
    c.policy = HealthPolicy(c.store, c.actions, c.config)
    try:
        c.tick_after(QUIET_S / 2)
        assert "DRAIN" in c.slurm.state["n1"][0]
        c.tick_after(QUIET_S + 1)
        assert c.slurm.state["n1"] == ("IDLE", "")
    finally:
        c.close()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("resume_quiet_s", -1.0, "resume_quiet_s=-1.0"),
        ("unreachable_after_s", 0.0, "unreachable_after_s=0.0"),
        ("degraded_weight", -5, "degraded_weight=-5"),
        ("degraded_feature", "gf degraded", "degraded_feature='gf degraded'"),
    ],
)
def test_bad_policy_config_names_the_key(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PolicyConfig(**{field: value}).validate()  # type: ignore[arg-type]


def test_slurm_losing_a_degraded_weight_gets_it_back_once(cluster: Cluster) -> None:
    """slurmctld forgets scontrol-set weights/features when it restarts: the policy puts them
    back while it still holds the node degraded, and leaves healthy nodes alone."""
    cluster.slurm.weight["n1"] = 7
    cluster.verdict("n1", "degraded", "pcie_downtrained", check="pcie")
    assert cluster.policy.reassert_degraded() == 0  # all in place: nothing queued
    # slurmctld restarted: slurm.conf's weight back, the feature gone
    cluster.slurm.weight["n1"] = 7
    cluster.slurm.features["n1"] = ("gpu",)
    assert cluster.policy.reassert_degraded() == 1
    assert cluster.actions.wait_idle(5.0)
    assert cluster.slurm.weight["n1"] == 1000
    assert cluster.slurm.features["n1"] == ("gpu", "gf_degraded")
    assert cluster.policy.reassert_degraded() == 0
    kinds = [(a.action, a.status) for a in cluster.store.actions("n1")]
    assert kinds == [("degrade", "done"), ("reassert", "done")]
    # the original weight remembered at degrade time is still what a restore puts back
    cluster.verdict("n1", "ok", check="pcie")
    cluster.tick_after(QUIET_S + 1)
    assert (cluster.slurm.weight["n1"], cluster.slurm.features["n1"]) == (7, ("gpu",))
    assert cluster.policy.reassert_degraded() == 0  # not degraded any more
    assert [n for n, _ in cluster.slurm.calls if n == "set_weight"] == ["set_weight"] * 3


def test_reassert_waits_for_slurm_to_answer(cluster: Cluster) -> None:
    cluster.verdict("n2", "degraded", "thermal", check="thermal")
    cluster.slurm.weight["n2"] = 1
    cluster.slurm.down = True
    assert cluster.policy.reassert_degraded() == 0  # no error, tried next round
    cluster.slurm.down = False
    assert cluster.policy.reassert_degraded() == 1


def test_the_same_fault_reported_again_does_not_drain_twice(cluster: Cluster) -> None:
    """A restarted agent reports the fault again (its hello reset the node's verdicts): the
    node is gpufleet's drained one already, so Slurm is not asked again."""
    cluster.verdict("n1", "fatal", "xid48")
    cluster.verdict("n1", "ok")  # the new agent's hello resets verdicts
    cluster.verdict("n1", "fatal", "xid48")
    drains = [(a.action, a.status) for a in cluster.store.actions("n1") if a.action == "drain"]
    assert drains == [("drain", "done"), ("drain", "skipped")]
    assert cluster.slurm.calls.count(("drain", "n1")) == 1
    assert cluster.slurm.state["n1"][1].startswith("gpufleet:xid48")


def test_in_shadow_mode_a_repeated_fault_is_recorded_once(tmp_path: Path) -> None:
    c = Cluster(tmp_path, shadow=True)
    try:
        c.verdict("n3", "fatal", "xid79")
        c.verdict("n3", "ok")
        c.verdict("n3", "fatal", "xid79")
        assert [(a.action, a.status) for a in c.store.actions("n3")] == [("drain", "shadow")]
    finally:
        c.close()


def test_a_node_resumed_behind_gpufleets_back_is_drained_on_a_new_fault(cluster: Cluster) -> None:
    """An admin's `scontrol update state=resume` is not recorded by gpufleet: a new fault
    after it must still drain (the drain-stands shortcut trusts only queued/shadow drains)."""
    cluster.verdict("n2", "fatal", "xid79")
    cluster.slurm.state["n2"] = ("IDLE", "")  # resumed with scontrol
    cluster.verdict("n2", "ok")
    cluster.verdict("n2", "fatal", "xid79")
    assert "DRAIN" in cluster.slurm.state["n2"][0]
    assert cluster.slurm.calls.count(("drain", "n2")) == 2


class AlertLog:
    """What AlertSender is asked to send (its delivery is tested in test_alerting.py)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, str, str]] = []

    def fire(self, alert: Alert) -> bool:
        self.sent.append(("fire", alert.name, alert.node, alert.severity))
        return True

    def resolve(self, name: str, node: str, summary: str = "") -> bool:
        self.sent.append(("resolve", name, node, ""))
        return True


def test_fatal_and_silent_nodes_are_alerted_and_resolved(tmp_path: Path) -> None:
    alerts = AlertLog()
    c = Cluster(tmp_path, alerts=alerts)
    try:
        c.verdict("n1", "fatal", "xid79")
        c.verdict("n1", "fatal", "gpu_lost")  # still fatal: no second alert
        assert alerts.sent == [("fire", "GpufleetNodeFatal", "n1", "page")]
        c.verdict("n1", "ok")
        assert alerts.sent[1:] == [("resolve", "GpufleetNodeFatal", "n1", "")]
        c.verdict("n2", "degraded", "thermal")  # degraded is Prometheus's (for: 5m), not ours
        assert len(alerts.sent) == 2
        del alerts.sent[:]
        later = now_ms() + 60_000
        c.store.touch_node("n1", "i1", 0, later)
        c.store.touch_node("n2", "i1", 0, later)  # n3 stays silent
        c.policy.tick(later)
        assert alerts.sent == [("fire", "GpufleetNodeUnreachable", "n3", "warning")]
        c.policy.tick(later)  # still silent: alerted once
        c.store.touch_node("n3", "i1", 0, later + 1000)
        c.policy.tick(later + 1000)
        assert alerts.sent[1:] == [("resolve", "GpufleetNodeUnreachable", "n3", "")]
    finally:
        c.close()


def test_the_queue_and_the_policy_must_agree_on_what_degrade_does(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    queue = ActionQueue(store, None, degraded_weight=5)
    with pytest.raises(ValueError, match=r"weight=5 .* weight=1000"):
        HealthPolicy(store, queue, PolicyConfig())
