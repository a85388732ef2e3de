"""The controller's /metrics: real gRPC ingest from a real agent, scraped over HTTP, checked by
the real promtool."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
from gpufleet.agent import nvml_sim
from gpufleet.scheduler.observability.metrics import (
    ControllerMetrics,
    parse_listen,
    start_metrics_http,
)
from gpufleet.scheduler.service.server import Controller
from gpufleet.scheduler.store import SqliteStore
from prometheus_client import CollectorRegistry

from tests.scheduler.fakes import FakeSlurm
from tests.support import wait_for
from tests.support.agents import make_agent


@pytest.fixture
def controller(tmp_path) -> Iterator[Controller]:
    store = SqliteStore(tmp_path / "state.db")
    ctl = Controller(store, FakeSlurm(["n1", "n2", "n3"]), listen="127.0.0.1:0",
                     metrics_listen="127.0.0.1:0")
    ctl.start()
    yield ctl
    ctl.stop()
    store.close()


def scrape(ctl: Controller) -> str:
    assert ctl.metrics_server is not None
    url = f"http://127.0.0.1:{ctl.metrics_server.port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


def value(ctl: Controller, name: str, labels: dict[str, str] | None = None) -> float | None:
    return ctl.metrics.registry.get_sample_value(name, labels or {})


def test_ingest_counts_reports_agents_and_nodes_by_health(controller, tmp_path) -> None:
    ctl = controller
    assert value(ctl, "gpufleet_controller_last_report_timestamp_seconds") == 0
    started_s = time.time()
    agent = make_agent(tmp_path, ctl.port, node="n3")
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    try:
        # the first sample, then heartbeats (no verdict changes)
        wait_for(lambda: (value(ctl, "gpufleet_controller_reports_received_total",
                                {"kind": "heartbeat"}) or 0) >= 2)
        assert value(ctl, "gpufleet_controller_last_report_timestamp_seconds") >= started_s
        assert (value(ctl, "gpufleet_controller_reports_received_total", {"kind": "sample"})
                or 0) >= 1
        assert value(ctl, "gpufleet_controller_connected_agents") == 1
        assert value(ctl, "gpufleet_controller_agent_connects_total") == 1
        assert value(ctl, "gpufleet_controller_nodes", {"health": "ok"}) == 1
        assert value(ctl, "gpufleet_controller_nodes", {"health": "fatal"}) == 0
        # the agent samples every 0.1 s over loopback: lag far below a second
        assert (value(ctl, "gpufleet_controller_report_lag_seconds_bucket", {"le": "1.0"})
                == value(ctl, "gpufleet_controller_report_lag_seconds_count"))

        nvml_sim.inject({"kind": "xid", "gpu": 3, "xid": 79})
        wait_for(lambda: value(ctl, "gpufleet_controller_nodes",
                               {"health": "fatal"}) == 1)
        assert value(ctl, "gpufleet_controller_reports_received_total", {"kind": "event"}) >= 1
        assert value(ctl, "gpufleet_controller_xid_events_total", {"node": "n3"}) == 1
        assert value(ctl, "gpufleet_controller_nodes", {"health": "ok"}) == 0
        assert ctl.actions.wait_idle(5)
        assert value(ctl, "gpufleet_controller_action_queue_depth") == 0
        text = scrape(ctl)
        assert 'gpufleet_controller_nodes{health="fatal"} 1.0' in text
        assert "process_cpu_seconds_total" in text
    finally:
        agent.stop.set()
        t.join(5)
    wait_for(lambda: value(ctl, "gpufleet_controller_connected_agents") == 0)


def test_a_replayed_report_counts_as_duplicate_not_as_report(controller, tmp_path) -> None:
    from gpufleet.rpc.v1 import fleet_pb2 as pb

    ctl = controller
    agent = make_agent(tmp_path, ctl.port, node="n1")
    hello = pb.AgentMessage(seq=0, agent_instance="i1", hello=agent.hello())
    ctl.ingest.hello(hello)
    sample = pb.AgentMessage(seq=1, agent_instance="i1", sample=agent.sample())
    ctl.ingest.handle("n1", sample)
    ctl.ingest.handle("n1", sample)
    assert value(ctl, "gpufleet_controller_reports_received_total", {"kind": "sample"}) == 1
    assert value(ctl, "gpufleet_controller_reports_duplicate_total") == 1
    agent.backend.close()


def test_batched_touches_reach_the_store(controller, tmp_path) -> None:
    """A plain sample's last-seen time is written in a batch, at the latest on flush."""
    from gpufleet.rpc.v1 import fleet_pb2 as pb

    ctl = controller
    agent = make_agent(tmp_path, ctl.port, node="n2")
    ctl.ingest.hello(pb.AgentMessage(seq=0, agent_instance="i2", hello=agent.hello()))
    ctl.ingest.handle("n2", pb.AgentMessage(seq=1, agent_instance="i2", sample=agent.sample()))
    agent.sample()
    before = ctl.store.node("n2")
    time.sleep(0.01)
    plain = agent.sample()
    assert not plain.verdicts
    ctl.ingest.handle("n2", pb.AgentMessage(seq=2, agent_instance="i2", sample=plain))
    ctl.ingest.flush()
    after = ctl.store.node("n2")
    assert before is not None and after is not None
    assert after.last_seen_ms > before.last_seen_ms
    assert ctl.store.last_seq("n2") == ("i2", 2)
    # idempotency holds across the batch: seq 2 again is a duplicate
    ctl.ingest.handle("n2", pb.AgentMessage(seq=2, agent_instance="i2", sample=plain))
    assert value(ctl, "gpufleet_controller_reports_duplicate_total") == 1
    agent.backend.close()


def test_heartbeats_are_batched_and_written_off_the_loop(controller, tmp_path) -> None:
    """A heartbeat is a sign of life only: counted, batched, written by the flush worker
    in one transaction, and never moves the stored time or sequence back."""
    from gpufleet.rpc.v1 import fleet_pb2 as pb

    ctl = controller
    agent = make_agent(tmp_path, ctl.port, node="n3")
    ctl.ingest.hello(pb.AgentMessage(seq=0, agent_instance="i3", hello=agent.hello()))
    ctl.ingest.handle("n3", pb.AgentMessage(seq=1, agent_instance="i3", sample=agent.sample()))
    before = ctl.store.node("n3")
    assert before is not None
    writers: list[str] = []
    touch_nodes = ctl.store.touch_nodes

    def recording(rows):  # type: ignore[no-untyped-def]
        writers.append(threading.current_thread().name)
        touch_nodes(rows)

    ctl.store.touch_nodes = recording  # type: ignore[method-assign]
    time.sleep(0.01)
    ctl.ingest._next_flush = 0.0  # due now
    beat = pb.Heartbeat(timestamp_ms=int(time.time() * 1000))
    ctl.ingest.handle("n3", pb.AgentMessage(seq=2, agent_instance="i3", heartbeat=beat))
    assert ctl.ingest._flushing is not None
    ctl.ingest._flushing.result(timeout=10)
    assert writers and writers[0].startswith("ingest-flush")
    after = ctl.store.node("n3")
    assert after is not None and after.last_seen_ms > before.last_seen_ms
    assert ctl.store.last_seq("n3") == ("i3", 2)
    assert value(ctl, "gpufleet_controller_reports_received_total", {"kind": "heartbeat"}) == 1
    # a batch landing late (older time, older seq) moves nothing back
    ctl.store.touch_nodes([("n3", "i3", 1, before.last_seen_ms)])
    late = ctl.store.node("n3")
    assert late is not None and late.last_seen_ms == after.last_seen_ms
    assert ctl.store.last_seq("n3") == ("i3", 2)
    agent.backend.close()


def test_agent_sends_heartbeats_between_changes(tmp_path) -> None:
    """The first sample and any with a changed verdict go out whole; otherwise a heartbeat
    every heartbeat_interval_s and nothing in between; 0 sends every sample."""
    from gpufleet.agent.config import AgentConfig
    from gpufleet.agent.nvml import NvmlBackend, load_library
    from gpufleet.agent.runner import Agent
    from gpufleet.rpc.v1 import fleet_pb2 as pb

    def agent(hb: float) -> Agent:
        cfg = AgentConfig(node_name="hb", gpu_backend="simulated", metrics_listen="",
                          state_dir=str(tmp_path / str(hb)), interval_s=0.01,
                          heartbeat_interval_s=hb)
        return Agent(cfg, NvmlBackend(load_library("simulated", "dgx-h100", None, "hb"), "sim"))

    a = agent(0.05)
    sent = [a.report(a.sample())]
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        sent.append(a.report(a.sample()))
        time.sleep(0.01)
    assert sent[0] == "sample"
    assert "heartbeat" in sent and "" in sent
    assert sent.count("heartbeat") <= 0.5 / 0.05 + 1
    changed = a.sample()
    changed.verdicts.append(pb.Verdict(check="xid", severity=pb.SEVERITY_FATAL))
    assert a.report(changed) == "sample"
    a.backend.close()
    every = agent(0)
    assert [every.report(every.sample()) for _ in range(3)] == ["sample"] * 3
    every.backend.close()


def test_action_finished_feeds_counter_and_latency_histogram() -> None:
    m = ControllerMetrics(CollectorRegistry(), process_metrics=False)
    m.action_finished("drain", "done", 0.3)
    m.action_finished("drain", "done", 4.0)
    m.action_finished("drain", "skipped", 0.1)  # skipped: not a drain, no latency
    m.action_finished("resume", "shadow", None)
    g = m.registry.get_sample_value
    assert g("gpufleet_controller_actions_total", {"action": "drain", "status": "done"}) == 2
    assert g("gpufleet_controller_actions_total", {"action": "drain", "status": "skipped"}) == 1
    assert g("gpufleet_controller_actions_total", {"action": "resume", "status": "shadow"}) == 1
    assert g("gpufleet_controller_fault_to_action_seconds_count", {"action": "drain"}) == 2
    assert g("gpufleet_controller_fault_to_action_seconds_bucket",
             {"action": "drain", "le": "0.5"}) == 1
    assert g("gpufleet_controller_fault_to_action_seconds_bucket",
             {"action": "drain", "le": "5.0"}) == 2
    assert g("gpufleet_controller_fault_to_action_seconds_bucket",
             {"action": "drain", "le": "300.0"}) == 2


def test_a_failing_store_does_not_fail_the_scrape() -> None:
    def broken() -> dict[str, int]:
        raise RuntimeError("database is locked")

    m = ControllerMetrics(CollectorRegistry(), nodes_by_health=broken, queue_depth=lambda: 7,
                          process_metrics=False)
    assert m.registry.get_sample_value("gpufleet_controller_action_queue_depth") == 7
    assert m.registry.get_sample_value("gpufleet_controller_nodes", {"health": "ok"}) is None


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian prometheus) absent")
def test_exposition_passes_promtool_check_metrics(tmp_path) -> None:
    m = ControllerMetrics(CollectorRegistry(), nodes_by_health=lambda: {"ok": 3, "fatal": 1},
                          queue_depth=lambda: 2)
    m.report_ingested("sample", int(time.time() * 1000) - 200)
    m.report_ingested("event", int(time.time() * 1000) - 50)
    m.xid_event("n3")
    m.ingest_error("invalid")
    m.action_finished("drain", "done", 0.25)
    m.agent_connected()
    server = start_metrics_http(m, "127.0.0.1:0")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            text = r.read().decode()
    finally:
        server.shutdown()
    done = subprocess.run(["promtool", "check", "metrics"], input=text, text=True,
                          capture_output=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert 'gpufleet_controller_nodes{health="fatal"} 1.0' in text
    assert 'gpufleet_controller_xid_events_total{node="n3"} 1.0' in text


@pytest.mark.parametrize(("listen", "expected"), [
    ("0.0.0.0:9836", ("0.0.0.0", 9836)), (":9836", ("0.0.0.0", 9836)),  # noqa: S104
    ("[::]:9836", ("::", 9836)), ("127.0.0.1:0", ("127.0.0.1", 0)),
])
def test_parse_listen(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize(("listen", "problem"), [
    ("9836", "expected HOST:PORT"), ("host:http", "not a number"), ("host:70000", "out of range"),
])
def test_parse_listen_names_the_problem(listen: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as e:
        parse_listen(listen)
    assert listen in str(e.value)


def test_metrics_port_in_use_fails_at_start(tmp_path) -> None:
    first = start_metrics_http(ControllerMetrics(CollectorRegistry(), process_metrics=False),
                               "127.0.0.1:0")
    store = SqliteStore(tmp_path / "s.db")
    try:
        ctl = Controller(store, None, listen="127.0.0.1:0",
                         metrics_listen=f"127.0.0.1:{first.port}")
        with pytest.raises(OSError, match=r"[Aa]ddress already in use"):
            ctl.start()
    finally:
        first.shutdown()
        store.close()
