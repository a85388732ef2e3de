"""Routine diagnostics on idle nodes, in the repair loop, against the in-memory Slurm: only
nodes idle long enough, never in a partition where a job waits, in small batches, shadow
mode acting on nothing, fail -> escalated, pass -> resumed, a job that arrives -> released
at once; and what the controller, its options and its metrics make of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from gpufleet.scheduler.cli.main import main
from gpufleet.scheduler.repair import Journal, RepairConfig, RepairManager
from gpufleet.scheduler.repair.engine import (
    ROUTINE_REASON,
    Step,
    could_start_on,
)
from gpufleet.scheduler.repair.metrics import RepairCollector
from gpufleet.scheduler.slurm import SlurmJob
from prometheus_client import CollectorRegistry

from tests.scheduler.fakes import FakeSlurm
from tests.scheduler.test_repair import Lab

HOUR_S = 3600
DAY_S = 86400
ROUTINE = {"routine_every_s": 7 * DAY_S, "routine_idle_s": HOUR_S}


def idle_lab(tmp_path: Path, nodes: int = 4, idle_s: float = 2 * HOUR_S,
             **cfg: object) -> Lab:
    """A lab whose nodes have all been idle `idle_s` by Slurm's LastBusyTime."""
    lab = Lab(tmp_path, nodes=nodes, **{**ROUTINE, **cfg})
    for n in lab.names:
        lab.slurm.last_busy[n] = int(lab.clock.ms / 1000 - idle_s)
    return lab


def scan(lab: Lab) -> None:
    """One tick past the scan interval: idle nodes and the queue are read again."""
    lab.tick(RepairConfig().routine_scan_s + 1)


def in_diag(lab: Lab) -> list[str]:
    return sorted(n for n, (_state, reason) in lab.slurm.state.items()
                  if reason == ROUTINE_REASON)


def diags_sent(lab: Lab) -> list[str]:
    return sorted(c.node for c in lab.agents.sent if c.kind == "diag")


def test_a_node_idle_too_short_is_left_alone(tmp_path: Path) -> None:
    lab = idle_lab(tmp_path, nodes=2, idle_s=600,  # 10 min of a required hour
                   routine_batch=2, max_per_partition=2)
    lab.slurm.last_busy["n2"] = int(lab.clock.ms / 1000 - 2 * HOUR_S)
    scan(lab)
    assert in_diag(lab) == ["n2"] and diags_sent(lab) == ["n2"]
    assert "n1" not in lab.rm.cases and lab.slurm.state["n1"] == ("IDLE", "")
    lab.answer("n2")
    lab.tick(HOUR_S)  # n1 idle long enough now (no job since)
    assert lab.agents.last("n1").kind == "diag" and in_diag(lab) == ["n1"]


def test_busy_drained_or_reasoned_nodes_are_never_candidates(tmp_path: Path) -> None:
    lab = idle_lab(tmp_path, nodes=4, routine_batch=4, max_per_partition=4)
    lab.slurm.state["n1"] = ("MIXED", "")
    lab.slurm.drain("n2", "disk swap, ticket 4411")  # an admin's drain
    lab.slurm.state["n3"] = ("IDLE+RESERVED", "")  # in a reservation
    scan(lab)
    assert diags_sent(lab) == ["n4"]
    assert lab.slurm.state["n2"] == ("IDLE+DRAIN", "disk swap, ticket 4411")
    assert ("resume", "n2") not in lab.slurm.calls


def test_a_pending_job_in_the_partition_holds_routine_diags_off(tmp_path: Path) -> None:
    lab = idle_lab(tmp_path, nodes=3, routine_batch=3, max_per_partition=3)
    lab.slurm.partitions["n3"] = ("cpu",)
    lab.slurm.add_pending("41", ("gpu",))
    scan(lab)
    assert diags_sent(lab) == ["n3"]  # gpu's queue has a job; cpu's does not
    assert lab.slurm.state["n1"] == lab.slurm.state["n2"] == ("IDLE", "")
    # once the job is gone (started elsewhere, cancelled), gpu's idle nodes are diagnosed
    del lab.slurm.jobs["41"]
    scan(lab)
    assert diags_sent(lab) == ["n1", "n2", "n3"]


def test_jobs_that_cannot_use_the_node_do_not_hold_it_off(tmp_path: Path) -> None:
    lab = idle_lab(tmp_path, nodes=1)
    lab.slurm.add_pending("50", ("gpu",), reason="JobHeldUser")
    lab.slurm.add_pending("51", ("gpu",), reason="Dependency")
    lab.slurm.add_pending("52", ("gpu",), excluded=("n1",))
    lab.slurm.add_pending("53", ("gpu",), required=("n9",))
    lab.slurm.add_pending("54", ("debug",))
    scan(lab)
    assert diags_sent(lab) == ["n1"]


def test_could_start_on() -> None:
    def job(**kw: object) -> SlurmJob:
        base = {"job_id": "1", "state": "PENDING", "nodes": (), "requeue": True, "batch": True,
                "comment": "", "restart_count": 0, "exit_status": None, "exit_signal": 0,
                "excluded_nodes": (), "start_time_s": 0, "state_reason": "Priority",
                "partitions": ("gpu", "debug")}
        return SlurmJob(**{**base, **kw})  # type: ignore[arg-type]

    assert could_start_on(job(), "n1", ("debug",))
    assert could_start_on(job(partitions=()), "n1", ("gpu",))  # in doubt: it could
    assert not could_start_on(job(), "n1", ("cpu",))
    assert not could_start_on(job(state="RUNNING"), "n1", ("gpu",))
    assert not could_start_on(job(state_reason="JobHeldAdmin"), "n1", ("gpu",))
    assert not could_start_on(job(excluded_nodes=("n1",)), "n1", ("gpu",))
    assert could_start_on(job(required_nodes=("n1", "n2")), "n1", ("gpu",))
    assert not could_start_on(job(required_nodes=("n2",)), "n1", ("gpu",))


def test_batch_cap_per_partition(tmp_path: Path) -> None:
    lab = idle_lab(tmp_path, nodes=6, routine_batch=2, max_per_partition=3)
    scan(lab)
    first = in_diag(lab)
    assert len(first) == 2 and diags_sent(lab) == first
    assert lab.rm.in_remediation() == {"gpu": 2}
    scan(lab)
    assert in_diag(lab) == first  # still 2: the batch is full
    for n in first:
        lab.answer(n)
    assert in_diag(lab) == []
    scan(lab)
    second = in_diag(lab)
    assert len(second) == 2 and not set(second) & set(first)  # diagnosed ones wait a period
    # the partition cap binds too: a cap of 1 lets one node at a time
    lab2 = idle_lab(tmp_path / "cap", nodes=4, routine_batch=3, max_per_partition=1)
    scan(lab2)
    assert len(in_diag(lab2)) == 1


def test_no_routine_diag_beside_an_open_repair(tmp_path: Path) -> None:
    lab = idle_lab(tmp_path, nodes=3, policy={"reboot": "ask"}, max_per_partition=2)
    lab.fault("n1", "xid79")  # waits for approval: a repair is open in gpu
    scan(lab)
    assert diags_sent(lab) == [] and in_diag(lab) == []


def test_shadow_mode_journals_and_audits_what_it_would_do(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    audit_log = tmp_path / "audit.jsonl"
    monkeypatch.setenv("GPUFLEET_AUDIT_LOG", str(audit_log))
    lab = idle_lab(tmp_path, nodes=4, shadow=True, routine_batch=2, max_per_partition=2)
    scan(lab)
    assert not lab.agents.sent and ("drain", "n1") not in lab.slurm.calls
    assert all(state == ("IDLE", "") for state in lab.slurm.state.values())
    shadowed = sorted(n for n, c in lab.rm.cases.items() if c.step == Step.SHADOW)
    assert len(shadowed) == 2  # the batch cap holds in shadow mode too
    would = [r for r in lab.journal.records() if r.get("step") == "shadow"]
    assert len(would) == 2 and all("would drain" in r["detail"] for r in would)
    audited = [json.loads(line) for line in audit_log.read_text().splitlines()]
    assert {(a["action"], a["result"]) for a in audited if a["target"] in shadowed} == {
        ("repair_routine", "shadow"), ("repair_shadow", "shadow")}
    scan(lab)  # the other two, then nobody again within the period
    scan(lab)
    assert len([r for r in lab.journal.records() if r.get("step") == "shadow"]) == 4
    assert lab.rm.routine_results == {"shadow": 4}


def test_fail_stays_drained_and_escalates_like_a_repair(tmp_path: Path) -> None:
    lab = idle_lab(tmp_path, nodes=1)
    scan(lab)
    lab.answer("n1", ok=False, checks=("nvlink",), evidence="GPU 5 16 of 18 NVLinks up")
    assert lab.step("n1") == Step.ESCALATED
    assert lab.slurm.state["n1"] == ("IDLE+DRAIN", "gpufleet:diag-failed nvlink")
    [(node, name, _summary, evidence)] = lab.alerts
    assert (node, name) == ("n1", "GpufleetRepairEscalated") and "16 of 18" in evidence
    assert lab.rm.holds("n1")  # the health policy must not resume it
    assert ("resume", "n1") not in lab.slurm.calls
    assert lab.steps("n1") == ["routine", "diagnosing", "failure", "escalated"]
    assert lab.rm.routine_results == {"failed": 1} and lab.rm.outcomes == {}


def test_pass_resumes_and_is_not_a_repair(tmp_path: Path) -> None:
    lab = idle_lab(tmp_path, nodes=1, routine_level=2)
    scan(lab)
    assert lab.slurm.state["n1"] == ("IDLE+DRAIN", ROUTINE_REASON)
    assert lab.rm.holds("n1")
    assert lab.agents.last("n1").level == 2
    lab.answer("n1", evidence="all checks passed")
    assert lab.step("n1") == Step.RESUMED and lab.slurm.state["n1"] == ("IDLE", "")
    assert not lab.rm.holds("n1") and not lab.alerts
    assert lab.steps("n1") == ["routine", "diagnosing", "diag_passed", "resumed"]
    # counted apart: not a repair outcome, not in MTTR
    assert lab.rm.routine_results == {"passed": 1}
    assert lab.rm.outcomes == {} and lab.rm.repair_seconds == []
    scan(lab)  # diagnosed within the period: not again
    assert diags_sent(lab) == ["n1"]
    lab.tick(7 * DAY_S)
    assert diags_sent(lab) == ["n1", "n1"]


def test_a_job_that_arrives_releases_the_node_at_once(tmp_path: Path) -> None:
    lab = idle_lab(tmp_path, nodes=2)
    scan(lab)
    [held] = in_diag(lab)
    lab.slurm.add_pending("77", ("gpu",))
    lab.tick()  # the next tick, not the next scan
    assert lab.step(held) == Step.RELEASED
    assert lab.slurm.state[held] == ("IDLE", "")
    assert "job 77 waits in gpu" in lab.journal.history(held)[-1]["detail"]
    lab.answer(held)  # the diag's late result is stale: nothing happens
    assert lab.step(held) == Step.RELEASED and lab.slurm.calls.count(("resume", held)) == 1
    assert lab.rm.routine_results == {"released": 1}
    scan(lab)
    assert in_diag(lab) == []  # the job still waits: nobody else is taken


def test_never_held_longer_than_the_routine_timeout(tmp_path: Path) -> None:
    lab = idle_lab(tmp_path, nodes=1, routine_timeout_s=120.0)
    scan(lab)
    lab.tick(60)
    assert lab.step("n1") == Step.DIAGNOSING
    lab.tick(61)
    assert lab.step("n1") == Step.RELEASED and lab.slurm.state["n1"] == ("IDLE", "")
    assert not lab.alerts  # no answer from a node in service is not a failure
    assert lab.rm.routine_results == {"incomplete": 1}


def test_a_node_whose_agent_is_away_is_not_drained(tmp_path: Path) -> None:
    lab = idle_lab(tmp_path, nodes=1)
    lab.agents.offline.add("n1")
    scan(lab)
    assert ("drain", "n1") not in lab.slurm.calls and "n1" not in lab.rm.cases


def test_a_fault_during_a_routine_diag_becomes_a_repair(tmp_path: Path) -> None:
    lab = idle_lab(tmp_path, nodes=1)
    scan(lab)
    lab.rm.node_fatal("n1", "xid79", "GPU 3 fell off the bus", lab.clock.ms, 3)
    lab.tick()
    assert lab.rm.cases["n1"].routine is False
    assert lab.rebooter.calls == [("n1", "gpufleet:reboot xid79")]
    assert lab.slurm.state["n1"][1] == "gpufleet:xid79 GPU 3 fell off the bus"
    assert lab.rm.routine_results == {"superseded": 1}


def test_an_admin_taking_the_node_over_is_left_alone(tmp_path: Path) -> None:
    lab = idle_lab(tmp_path, nodes=1)
    scan(lab)
    lab.slurm.drain("n1", "bios update, ticket 9")
    lab.tick()
    assert lab.step("n1") == Step.LEFT
    lab.answer("n1")
    assert lab.slurm.state["n1"] == ("IDLE+DRAIN", "bios update, ticket 9")
    assert ("resume", "n1") not in lab.slurm.calls


def test_controller_restart_mid_diag_asks_again(tmp_path: Path) -> None:
    lab = idle_lab(tmp_path, nodes=1)
    scan(lab)
    lab.rm = lab.manager()  # a new controller process, same journal
    assert lab.rm.holds("n1") and lab.rm.cases["n1"].routine
    lab.tick()
    assert diags_sent(lab) == ["n1", "n1"]
    lab.answer("n1")
    assert lab.slurm.state["n1"] == ("IDLE", "")
    scan(lab)  # the journal says it was diagnosed: not again within the period
    assert diags_sent(lab) == ["n1", "n1"]


def test_without_last_busy_idle_time_is_counted_from_first_seen(tmp_path: Path) -> None:
    lab = Lab(tmp_path, nodes=1, **ROUTINE)  # last_busy None: a Slurm that does not print it
    scan(lab)
    assert diags_sent(lab) == []
    lab.tick(HOUR_S)
    assert diags_sent(lab) == ["n1"]


def test_off_by_default_and_the_queue_read_only_when_on(tmp_path: Path) -> None:
    lab = Lab(tmp_path, nodes=2)
    for n in lab.names:
        lab.slurm.last_busy[n] = 0
    scan(lab)
    lab.tick(30 * DAY_S)
    assert not lab.agents.sent and ("pending_jobs",) not in lab.slurm.job_calls


def test_routine_needs_a_queue_client_and_valid_settings(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    with pytest.raises(ValueError, match="lists nodes and pending jobs"):
        RepairManager(lab.slurm, lab.journal, RepairConfig(routine_every_s=3600.0),
                      lab.agents, lab.rebooter, lambda *a: None)
    for bad, msg in (({"routine_batch": 0}, "routine_batch"),
                     ({"routine_level": 4}, "routine_level"),
                     ({"routine_timeout_s": 0.0}, "routine_timeout_s"),
                     ({"routine_idle_s": -1.0}, "routine_idle_s"),
                     ({"routine_every_s": float("nan")}, "routine_every_s"),
                     ({"routine_scan_s": float("inf")}, "routine_scan_s")):
        with pytest.raises(ValueError, match=msg):
            RepairConfig(**bad).validate()  # type: ignore[arg-type]


def test_metrics_count_routine_results_apart(tmp_path: Path) -> None:
    lab = idle_lab(tmp_path, nodes=2, routine_batch=2, max_per_partition=2)
    reg = CollectorRegistry()
    reg.register(RepairCollector(lab.rm))
    scan(lab)
    assert reg.get_sample_value("gpufleet_controller_repair_in_progress",
                                {"partition": "gpu"}) == 2
    lab.answer("n1")
    lab.answer("n2", ok=False, checks=("ecc",), evidence="GPU 1 1 DBE")
    assert reg.get_sample_value("gpufleet_controller_routine_diags_total",
                                {"result": "passed"}) == 1
    assert reg.get_sample_value("gpufleet_controller_routine_diags_total",
                                {"result": "failed"}) == 1
    assert reg.get_sample_value("gpufleet_controller_routine_diags_total",
                                {"result": "released"}) == 0
    assert reg.get_sample_value("gpufleet_controller_repairs_total",
                                {"outcome": "escalated"}) == 0
    assert reg.get_sample_value("gpufleet_controller_repairs_total",
                                {"outcome": "released"}) is None
    drained = reg.get_sample_value("gpufleet_controller_repair_drained_seconds_total",
                                   {"cause": "routine-diag"})
    assert drained is not None and drained > 0
    # n2 failed: it stays drained, held by the repair loop
    assert reg.get_sample_value("gpufleet_controller_repair_drained_nodes",
                                {"cause": "routine-diag"}) == 1


def test_repair_list_and_history_show_routine_diags(tmp_path: Path) -> None:
    lab = idle_lab(tmp_path, nodes=1)
    scan(lab)
    journal = str(lab.journal.path)
    r = CliRunner().invoke(main, ["repair", "list", "--repair-journal", journal])
    assert r.exit_code == 0, r.output
    assert "n1" in r.output and "diagnosing" in r.output and "routine-diag" in r.output
    lab.answer("n1")
    r = CliRunner().invoke(main, ["nodes", "history", "n1", "--repair-journal", journal,
                                  "--db", str(tmp_path / "none.db"), "--json"])
    assert r.exit_code == 0, r.output
    whats = [row["what"] for row in json.loads(r.output)]
    assert whats == ["repair routine", "repair diagnosing", "repair diag_passed",
                     "repair resumed"]


def test_controller_options_and_toml(tmp_path: Path) -> None:
    from gpufleet.scheduler.cli.repair import repair_config

    def opts(**kw: object) -> dict[str, object]:
        base: dict[str, object] = {
            "repair": True, "repair_shadow": False, "repair_policy": (),
            "repair_max_per_partition": 2, "repair_fail_limit": 3,
            "repair_fail_window_s": 604800.0, "repair_diag_level": 1,
            "routine_diag_every_s": 0.0, "routine_diag_idle_s": 3600.0,
            "routine_diag_batch": 1, "routine_diag_level": 1, "routine_diag_timeout_s": 600.0}
        return {**base, **kw}

    cfg = repair_config(opts(routine_diag_every_s=86400.0, routine_diag_batch=2,
                             routine_diag_level=2))
    assert cfg is not None
    assert (cfg.routine_every_s, cfg.routine_batch, cfg.routine_level) == (86400.0, 2, 2)
    # routine diagnostics live in the repair loop: without --repair they are refused
    r = CliRunner().invoke(main, ["controller", "--insecure", "--db", str(tmp_path / "s.db"),
                                  "--routine-diag-every-s", "86400"])
    assert r.exit_code == 2 and "--routine-diag-every-s needs --repair" in r.output
    assert "Traceback" not in r.output
    toml = tmp_path / "controller.toml"
    r = CliRunner().invoke(main, ["controller", "--insecure", "--db", str(tmp_path / "s.db"),
                                  "--repair", "--routine-diag-every-s", "nan"])
    assert r.exit_code == 2 and "--routine-diag-every-s" in r.output  # nan would mean off
    toml.write_text("insecure = true\nrouting_diag_every_s = 86400\n")
    r = CliRunner().invoke(main, ["--config", str(toml), "controller", "--db",
                                  str(tmp_path / "s.db")])
    assert r.exit_code == 2 and "routing_diag_every_s" in r.output  # a typo is named
    toml.write_text("insecure = true\nroutine_diag_every_s = 86400\nroutine_diag_batch = 0\n")
    r = CliRunner().invoke(main, ["--config", str(toml), "controller", "--db",
                                  str(tmp_path / "s.db")])
    assert r.exit_code == 2 and "routine-diag-batch" in r.output.lower()
    assert "Traceback" not in r.output


# ----------------------------------------------------------------------------- over the wire


@pytest.mark.slow  # ~5 s: a controller and a simulated agent over loopback; CI runs it
def test_routine_diag_over_the_agents_stream(tmp_path: Path) -> None:
    """A controller (gRPC, health policy, repair loop) and a simulated agent: the idle node
    is drained for the routine diag, the agent runs it and answers on its stream, and the
    node is back in Slurm with nothing else touched."""
    from gpufleet.scheduler.health.policy import PolicyConfig
    from gpufleet.scheduler.service.server import Controller
    from gpufleet.scheduler.store import SqliteStore
    from prometheus_client import generate_latest

    from tests.scheduler.test_repair_loop import Rebooter, start_agent, steps
    from tests.support import wait_for

    slurm = FakeSlurm(["n1", "n2"])
    store = SqliteStore(tmp_path / "state.db")
    journal = Journal(tmp_path / "repair.jsonl")
    ctl = Controller(store, slurm, listen="127.0.0.1:0",
                     policy=PolicyConfig(tick_s=0.1, resume_quiet_s=0.5),
                     repair=RepairConfig(tick_s=0.1, routine_every_s=DAY_S,
                                         routine_idle_s=0.0, routine_scan_s=0.2),
                     repair_journal=str(journal.path), rebooter=Rebooter(),
                     partition_of=lambda _n: "gpu", metrics_listen=None)
    ctl.start()
    agent, t = start_agent(tmp_path, ctl.port, "n1")
    try:
        wait_for(lambda: "resumed" in steps(journal, "n1"), 20, "n1's routine diag")
        assert steps(journal, "n1") == ["routine", "diagnosing", "diag_passed", "resumed"]
        assert slurm.calls == [("drain", "n1"), ("resume", "n1")]  # n2 has no agent: untouched
        assert slurm.state["n1"] == ("IDLE", "")
        text = generate_latest(ctl.metrics.registry).decode()
        assert 'gpufleet_controller_routine_diags_total{result="passed"} 1.0' in text
    finally:
        agent.stop.set()
        t.join(5)
        ctl.stop()
        store.close()
