"""Alerts: the controller's sender and the Alertmanager -> chat relay, against real HTTP servers
on loopback, and (where Debian's prometheus-alertmanager is installed) a real Alertmanager."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from gpufleet.scheduler.observability.alerting import (
    Alert,
    AlertRelay,
    AlertSender,
    PayloadError,
    format_alertmanager_text,
)

from tests.conftest import IN_CI


class Recorder:
    """A loopback HTTP endpoint that records JSON bodies; answers `fail_first` times with 500."""

    def __init__(self, fail_first: int = 0, status: int = 200) -> None:
        self.bodies: list[tuple[str, Any]] = []
        self.fail_first = fail_first
        self.status = status
        self.hits = 0
        rec = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def do_POST(self) -> None:
                rec.hits += 1
                body = self.rfile.read(int(self.headers["Content-Length"]))
                code = 500 if rec.hits <= rec.fail_first else rec.status
                if code == 200:
                    rec.bodies.append((self.path, json.loads(body)))
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def recorder() -> Iterator[Callable[..., Recorder]]:
    made: list[Recorder] = []

    def make(**kw: Any) -> Recorder:
        made.append(Recorder(**kw))
        return made[-1]

    yield make
    for r in made:
        r.close()


def wait_for(cond: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def fatal(node: str = "n3") -> Alert:
    return Alert("GpufleetNodeFatal", node, "page", f"{node}: GPU node health is fatal",
                 "Xid 79 on GPU 3")


def test_sender_posts_v2_alerts_and_slack_text(recorder) -> None:
    am, hook = recorder(), recorder()
    s = AlertSender(am.url, hook.url + "/hook", backoff_s=0.01)
    s.start()
    try:
        assert s.fire(fatal())
        assert wait_for(lambda: am.bodies and hook.bodies)
        path, body = am.bodies[0]
        assert path == "/api/v2/alerts"
        (alert,) = body
        assert alert["labels"] == {"alertname": "GpufleetNodeFatal", "node": "n3",
                                   "severity": "page", "source": "gpufleet-controller"}
        assert alert["annotations"]["summary"] == "n3: GPU node health is fatal"
        assert alert["startsAt"].endswith("Z") and "endsAt" not in alert
        path, body = hook.bodies[0]
        assert path == "/hook" and body["text"] == "[FIRING] n3: GPU node health is fatal"
        assert s.resolve("GpufleetNodeFatal", "n3")
        assert wait_for(lambda: len(am.bodies) == 2)
        assert "endsAt" in am.bodies[1][1][0]
    finally:
        s.stop()


def test_a_resolved_alert_keeps_the_firing_ones_labels(recorder) -> None:
    """Alertmanager matches a resolution on every label: resolve() does not know the
    severity, so the sender takes it from the alert it fired."""
    am = recorder()
    s = AlertSender(am.url, backoff_s=0.01)
    s.start()
    try:
        s.fire(Alert("GpufleetNodeUnreachable", "n4", "warning", "n4: silent"))
        assert wait_for(lambda: len(am.bodies) == 1)
        s.resolve("GpufleetNodeUnreachable", "n4")
        assert wait_for(lambda: len(am.bodies) == 2)
        fired, resolved = am.bodies[0][1][0], am.bodies[1][1][0]
        assert resolved["labels"] == fired["labels"]
        assert resolved["labels"]["severity"] == "warning"
        assert resolved["startsAt"] == fired["startsAt"] and "endsAt" in resolved
    finally:
        s.stop()


def test_sender_retries_5xx_then_delivers(recorder) -> None:
    am = recorder(fail_first=2)
    s = AlertSender(am.url, retries=3, backoff_s=0.01)
    s.start()
    try:
        s.fire(fatal())
        assert wait_for(lambda: am.bodies)
        assert am.hits == 3 and s.sent == 1 and s.failed == 0
    finally:
        s.stop()


def test_sender_gives_up_after_bounded_retries_and_goes_on(recorder) -> None:
    am = recorder(fail_first=100)
    s = AlertSender(am.url, retries=2, backoff_s=0.01)
    s.start()
    try:
        s.fire(fatal("n1"))
        assert wait_for(lambda: s.failed == 1)
        assert am.hits == 3  # one try + 2 retries, then it stops
        am.fail_first = 0
        s.fire(fatal("n2"))
        assert wait_for(lambda: am.bodies)
        assert am.bodies[0][1][0]["labels"]["node"] == "n2"
    finally:
        s.stop()


def test_sender_does_not_retry_a_4xx(recorder) -> None:
    am = recorder(status=400)
    s = AlertSender(am.url, retries=3, backoff_s=0.01)
    s.start()
    try:
        s.fire(fatal())
        assert wait_for(lambda: s.failed == 1)
        assert am.hits == 1
    finally:
        s.stop()


def test_fire_never_blocks_when_alertmanager_hangs() -> None:
    # a socket that accepts and never answers: the POST times out off the caller's thread
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    s = AlertSender(f"http://127.0.0.1:{sock.getsockname()[1]}", timeout_s=0.3, retries=0,
                    queue_max=5)
    s.start()
    try:
        t0 = time.monotonic()
        results = [s.fire(fatal(f"n{i}")) for i in range(50)]
        assert time.monotonic() - t0 < 0.1
        assert results.count(False) >= 40 and s.dropped == results.count(False)
        assert wait_for(lambda: s.failed >= 1, 5)
    finally:
        s.stop()
        sock.close()


def test_sender_resends_firing_alerts(recorder) -> None:
    am = recorder()
    s = AlertSender(am.url, resend_interval_s=0.2, backoff_s=0.01)
    s.start()
    try:
        s.fire(fatal())
        assert wait_for(lambda: len(am.bodies) >= 3, 5)  # first send + resends
        s.resolve("GpufleetNodeFatal", "n3")
        time.sleep(0.3)
        n = len(am.bodies)
        time.sleep(0.6)
        assert len(am.bodies) == n  # nothing fires any more: no resends
    finally:
        s.stop()


def test_sender_needs_a_destination() -> None:
    with pytest.raises(ValueError, match="URL"):
        AlertSender()


AM_PAYLOAD = {
    "version": "4", "groupKey": "{}:{alertname=\"GpufleetNodeFatal\"}", "status": "firing",
    "receiver": "relay", "groupLabels": {"alertname": "GpufleetNodeFatal"},
    "commonLabels": {"alertname": "GpufleetNodeFatal"}, "commonAnnotations": {},
    "externalURL": "http://am:9093", "truncatedAlerts": 0,
    "alerts": [
        {"status": "firing", "labels": {"alertname": "GpufleetNodeFatal", "instance": "n3:9835",
                                        "severity": "page"},
         "annotations": {"summary": "n3:9835: GPU node health is fatal"},
         "startsAt": "2026-11-23T05:00:00Z", "endsAt": "0001-01-01T00:00:00Z"},
        {"status": "firing", "labels": {"alertname": "GpufleetNodeFatal", "node": "n5",
                                        "severity": "page"},
         "annotations": {"summary": "GPU node health is fatal"},
         "startsAt": "2026-11-23T05:00:01Z", "endsAt": "0001-01-01T00:00:00Z"},
    ],
}


def test_format_alertmanager_text() -> None:
    assert format_alertmanager_text(AM_PAYLOAD) == (
        "[FIRING:2] GpufleetNodeFatal\n"
        "- n3:9835: GPU node health is fatal (page)\n"
        "- n5: GPU node health is fatal (page)\n"
        "http://am:9093"
    )


@pytest.mark.parametrize(("payload", "problem"), [
    ({"version": "3", "alerts": []}, "version '3'"),
    ({"version": "4", "alerts": {}}, "'alerts' must be a list"),
    ({"version": "4", "alerts": [{"labels": []}]}, "labels/annotations"),
    ([], "not a JSON object"),
])
def test_format_refuses_bad_payloads(payload: Any, problem: str) -> None:
    with pytest.raises(PayloadError, match=problem):
        format_alertmanager_text(payload)


def _post(url: str, body: bytes) -> int:
    req = urllib.request.Request(url, data=body, method="POST",  # noqa: S310 - loopback http
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:  # noqa: S310
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_relay_forwards_text_and_reports_failures(recorder) -> None:
    chat = recorder()
    relay = AlertRelay("127.0.0.1:0", chat.url + "/slack", backoff_s=0.01).start()
    try:
        url = f"http://127.0.0.1:{relay.port}/"
        assert _post(url, json.dumps(AM_PAYLOAD).encode()) == 200
        (path, body), = chat.bodies
        assert path == "/slack" and body == {"text": format_alertmanager_text(AM_PAYLOAD)}
        assert _post(url, b"{not json") == 400
        assert _post(url, json.dumps({"version": "2", "alerts": []}).encode()) == 400
        chat.status = 500  # chat down: 502, so Alertmanager retries
        assert _post(url, json.dumps(AM_PAYLOAD).encode()) == 502
        assert relay.forwarded == 1
    finally:
        relay.shutdown()


# ----------------------------------------------------------------------------- real Alertmanager

ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def alertmanager(tmp_path: Path, recorder) -> Iterator[tuple[str, Recorder]]:
    """A real Alertmanager routing every alert to an AlertRelay that posts to a chat recorder."""
    if ALERTMANAGER is None:
        if IN_CI:
            pytest.fail("CI=true: Debian's prometheus-alertmanager must be installed")
        pytest.skip("prometheus-alertmanager not installed "
                    "(apt-get install prometheus-alertmanager)")
    chat = recorder()
    relay = AlertRelay("127.0.0.1:0", chat.url + "/chat", backoff_s=0.05).start()
    cfg = tmp_path / "alertmanager.yml"
    cfg.write_text(
        "route:\n  receiver: relay\n  group_by: [alertname]\n  group_wait: 0s\n"
        "  group_interval: 1s\n  repeat_interval: 1h\n"
        "receivers:\n  - name: relay\n    webhook_configs:\n"
        f"      - url: http://127.0.0.1:{relay.port}/\n        send_resolved: true\n"
    )
    port = _free_port()
    proc = subprocess.Popen(
        [ALERTMANAGER, f"--config.file={cfg}", f"--storage.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=",
         "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "am.log").open("w"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            try:
                with urllib.request.urlopen(url + "/-/ready", timeout=1) as r:  # noqa: S310
                    return r.status == 200
            except OSError:
                return False

        assert wait_for(ready, 20), (tmp_path / "am.log").read_text()
        yield url, chat
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        relay.shutdown()


def test_controller_alert_through_real_alertmanager_reaches_chat(alertmanager) -> None:
    url, chat = alertmanager
    s = AlertSender(url, backoff_s=0.05)
    s.start()
    try:
        s.fire(fatal("n3"))
        assert wait_for(lambda: bool(chat.bodies), 20), "Alertmanager never called the relay"
        text = chat.bodies[0][1]["text"]
        assert text.startswith("[FIRING:1] GpufleetNodeFatal")
        assert "n3: GPU node health is fatal (page)" in text
        # Alertmanager's own API lists it, with our labels
        with urllib.request.urlopen(url + "/api/v2/alerts", timeout=5) as r:  # noqa: S310
            listed = json.loads(r.read())
        assert [a["labels"]["node"] for a in listed] == ["n3"]
        s.resolve("GpufleetNodeFatal", "n3")
        assert wait_for(lambda: any(b["text"].startswith("[RESOLVED")
                                    for _, b in chat.bodies), 20)
    finally:
        s.stop()


def _listed(url: str) -> list[dict[str, Any]]:
    """Alertmanager's API v2: the alerts it holds active now."""
    with urllib.request.urlopen(url + "/api/v2/alerts", timeout=5) as r:  # noqa: S310
        return list(json.loads(r.read()))


def test_controller_delivers_its_own_alerts_to_a_real_alertmanager(alertmanager,
                                                                   tmp_path: Path) -> None:
    """`gpufleet controller --alertmanager-url`: a node that turns fatal and a node that goes
    silent reach Alertmanager from the controller itself (no Prometheus in between); the
    fatal one is resolved there when the node is healthy again."""
    from gpufleet.rpc.v1 import fleet_pb2 as pb
    from gpufleet.scheduler.health.policy import PolicyConfig
    from gpufleet.scheduler.service.server import Controller
    from gpufleet.scheduler.store import SqliteStore, now_ms

    from tests.scheduler.fakes import FakeSlurm

    url, _chat = alertmanager
    store = SqliteStore(tmp_path / "state.db")
    ctl = Controller(store, FakeSlurm(["n1", "n2"]), listen="127.0.0.1:0",
                     policy=PolicyConfig(unreachable_after_s=1.0, tick_s=0.1),
                     alerts=AlertSender(url, backoff_s=0.05))
    ctl.start()
    seq = 0

    def report(node: str, severity: int) -> None:
        nonlocal seq
        seq += 1
        ctl.ingest.handle(node, pb.AgentMessage(seq=seq, agent_instance="i1", sample=pb.NodeSample(
            verdicts=[pb.Verdict(check="xid", severity=severity, reason_code="xid79",  # type: ignore[arg-type]
                                 evidence="GPU 3 Xid 79", since_ms=now_ms())])))

    def names(node: str) -> set[str]:
        return {a["labels"]["alertname"] for a in _listed(url)
                if a["labels"]["node"] == node
                and a["labels"].get("source") == "gpufleet-controller"}

    try:
        for node in ("n1", "n2"):
            ctl.ingest.hello(pb.AgentMessage(seq=0, agent_instance="i1", hello=pb.Hello(
                inventory=pb.NodeInventory(node_name=node))))
        report("n1", pb.SEVERITY_FATAL)
        assert wait_for(lambda: "GpufleetNodeFatal" in names("n1"), 20), _listed(url)
        (fatal_alert,) = [a for a in _listed(url) if a["labels"]["node"] == "n1"
                          and a["labels"]["alertname"] == "GpufleetNodeFatal"]
        assert fatal_alert["labels"]["severity"] == "page"
        assert "xid79" in fatal_alert["annotations"]["summary"]
        assert fatal_alert["annotations"]["description"] == "GPU 3 Xid 79"
        report("n1", pb.SEVERITY_OK)
        # n1 keeps reporting; n2 said nothing since its hello: silent after 1 s
        assert wait_for(lambda: (report("n1", pb.SEVERITY_OK) or True)
                        and "GpufleetNodeFatal" not in names("n1")
                        and "GpufleetNodeUnreachable" in names("n2"), 20), _listed(url)
        assert "GpufleetNodeUnreachable" not in names("n1")
    finally:
        ctl.stop()
        store.close()
