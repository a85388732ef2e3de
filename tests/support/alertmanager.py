"""HTTP endpoints an alert goes to, for tests: a recorder of JSON bodies (a chat webhook, an
Alertmanager API) and a real Alertmanager (Debian's prometheus-alertmanager) that routes every
alert through gpufleet's AlertRelay to a recorder. The fixtures are registered for
tests/scheduler/ by its conftest.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.support.ci import unavailable
from tests.support.net import free_port
from tests.support.waiting import wait_for


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
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True,
                                       kwargs={"poll_interval": 0.02})  # a quick close()
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


ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")



@pytest.fixture
def alertmanager(tmp_path: Path, recorder) -> Iterator[tuple[str, Recorder]]:
    """A real Alertmanager routing every alert to an AlertRelay that posts to a chat recorder."""
    if ALERTMANAGER is None:
        unavailable("prometheus-alertmanager is not installed "
                    "(apt-get install prometheus-alertmanager)")
    from gpufleet.scheduler.observability.alerting import AlertRelay

    chat = recorder()
    relay = AlertRelay("127.0.0.1:0", chat.url + "/chat", backoff_s=0.05).start()
    cfg = tmp_path / "alertmanager.yml"
    cfg.write_text(
        "route:\n  receiver: relay\n  group_by: [alertname]\n  group_wait: 0s\n"
        "  group_interval: 1s\n  repeat_interval: 1h\n"
        "receivers:\n  - name: relay\n    webhook_configs:\n"
        f"      - url: http://127.0.0.1:{relay.port}/\n        send_resolved: true\n"
    )
    port = free_port()
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

        wait_for(ready, 20, (tmp_path / "am.log").read_text)
        yield url, chat
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        relay.shutdown()
