"""Alerts out of the controller, and Alertmanager's alerts into a chat channel.

- `AlertSender` posts the controller's own alerts (a node turned fatal, a node went silent:
  health/policy.py; a repair escalation: repair/link.py) to Alertmanager's API v2
  (`POST /api/v2/alerts`) and/or a generic webhook (JSON with a Slack-compatible `text`).
  It runs on its own thread: `fire`/`resolve` only put the alert on a bounded queue, so a
  slow or dead Alertmanager never delays ingest. Each POST has a timeout and a bounded
  number of retries with backoff; firing alerts are re-sent every `resend_interval_s` so
  Alertmanager does not resolve them on its own (its resolve_timeout).
- `AlertRelay` is an HTTP receiver for Alertmanager's webhook (payload version 4) that turns
  the group into a short text and posts `{"text": ...}` to a chat webhook (Slack, Mattermost,
  Rocket.Chat and most others accept that shape). It answers 502 when the chat endpoint
  fails, so Alertmanager retries.

Standard library HTTP only: two JSON POSTs do not justify a dependency.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from gpufleet.scheduler.observability.metrics import parse_listen

log = logging.getLogger(__name__)

__all__ = ["Alert", "AlertRelay", "AlertSender", "PayloadError", "format_alertmanager_text"]

MAX_BODY_BYTES = 1 << 20  # a webhook payload; Alertmanager's are a few KiB


class PayloadError(ValueError):
    """An Alertmanager webhook payload we cannot read; the message says what is wrong."""


def _rfc3339(ts_s: float) -> str:
    return datetime.fromtimestamp(ts_s, UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Alert:
    name: str
    node: str
    severity: str  # "page" | "warning", as in gpufleet-alerts.yml
    summary: str
    description: str = ""
    starts_at_s: float = field(default_factory=time.time)
    ends_at_s: float | None = None  # set when resolved

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, self.node)

    def to_alertmanager(self, generator_url: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "labels": {"alertname": self.name, "node": self.node, "severity": self.severity,
                       "source": "gpufleet-controller"},
            "annotations": {"summary": self.summary, "description": self.description},
            "startsAt": _rfc3339(self.starts_at_s),
        }
        if self.ends_at_s is not None:
            # Alertmanager refuses endsAt <= startsAt ("start time must be before end time")
            out["endsAt"] = _rfc3339(max(self.ends_at_s, self.starts_at_s + 0.001))
        if generator_url:
            out["generatorURL"] = generator_url
        return out


def post_json(url: str, body: Any, timeout_s: float, retries: int, backoff_s: float,
              stop: threading.Event | None = None) -> bool:
    """POST JSON; retry on connection errors and 5xx (not 4xx: resending will not help).
    Returns whether it got a 2xx."""
    data = json.dumps(body).encode()
    delay = backoff_s
    for attempt in range(1, retries + 2):
        req = urllib.request.Request(url, data=data, method="POST",  # noqa: S310 - http(s) URL from the admin
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310
                resp.read()
                return True
        except urllib.error.HTTPError as e:
            if e.code < 500:
                log.error("POST %s refused (%d): %s", url, e.code, e.read()[:200])
                return False
            err: str = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            err = str(e)
        if attempt > retries:
            log.error("POST %s failed after %d attempts: %s", url, attempt, err)
            return False
        if stop is not None and stop.wait(delay):
            return False
        if stop is None:
            time.sleep(delay)
        delay *= 2
    return False


class AlertSender:
    """Sends the controller's alerts off the ingest path (see the module docstring)."""

    def __init__(
        self,
        alertmanager_url: str | None = None,
        webhook_url: str | None = None,
        *,
        timeout_s: float = 5.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        resend_interval_s: float = 60.0,
        queue_max: int = 10_000,
        generator_url: str = "",
    ) -> None:
        if not alertmanager_url and not webhook_url:
            raise ValueError("AlertSender needs an Alertmanager URL or a webhook URL")
        self.alertmanager_url = alertmanager_url.rstrip("/") if alertmanager_url else None
        self.webhook_url = webhook_url
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.resend_interval_s = resend_interval_s
        self.generator_url = generator_url
        self._q: queue.Queue[Alert] = queue.Queue(maxsize=queue_max)
        self._active: dict[tuple[str, str], Alert] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alert-sender", daemon=True)
        self.sent = 0  # batches delivered to every configured endpoint
        self.failed = 0
        self.dropped = 0  # alerts refused because the queue was full

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout=timeout_s)

    def fire(self, alert: Alert) -> bool:
        """Queue a firing alert; False (and counted in `dropped`) if the queue is full."""
        try:
            self._q.put_nowait(alert)
        except queue.Full:
            self.dropped += 1
            return False
        return True

    def resolve(self, name: str, node: str, summary: str = "") -> bool:
        return self.fire(Alert(name, node, "page", summary or f"{node}: {name} resolved",
                               ends_at_s=time.time()))

    def _run(self) -> None:
        next_resend = time.monotonic() + self.resend_interval_s
        while not self._stop.is_set():
            batch: list[Alert] = []
            try:
                batch.append(self._q.get(timeout=min(1.0, self.resend_interval_s)))
                while len(batch) < 500:
                    batch.append(self._q.get_nowait())
            except queue.Empty:
                pass
            if not batch and time.monotonic() < next_resend:
                continue
            for a in batch:
                if a.ends_at_s is None:
                    self._active[a.key] = a
                else:
                    was = self._active.pop(a.key, None)
                    if was is not None:
                        # the same alert, ended: Alertmanager matches on every label, so the
                        # severity must be the firing one's (resolve() cannot know it)
                        a.starts_at_s, a.severity = was.starts_at_s, was.severity
            if not batch:  # a resend of what still fires
                next_resend = time.monotonic() + self.resend_interval_s
                batch = list(self._active.values())
                if not batch:
                    continue
            try:
                self._send(batch)
            except Exception:  # the sender must outlive one bad batch
                log.exception("sending %d alert(s) failed", len(batch))
                self.failed += 1

    def _send(self, batch: list[Alert]) -> None:
        ok = True
        if self.alertmanager_url:
            body = [a.to_alertmanager(self.generator_url) for a in batch]
            ok &= post_json(f"{self.alertmanager_url}/api/v2/alerts", body, self.timeout_s,
                            self.retries, self.backoff_s, self._stop)
        if self.webhook_url:
            text = "\n".join(
                f"[{'RESOLVED' if a.ends_at_s is not None else 'FIRING'}] {a.summary}"
                for a in batch
            )
            body2 = {"text": text, "source": "gpufleet-controller",
                     "alerts": [a.to_alertmanager(self.generator_url) for a in batch]}
            ok &= post_json(self.webhook_url, body2, self.timeout_s, self.retries,
                            self.backoff_s, self._stop)
        if ok:
            self.sent += 1
        else:
            self.failed += 1


# ----------------------------------------------------------------------------- the relay


def format_alertmanager_text(payload: Mapping[str, Any], max_alerts: int = 10) -> str:
    """Alertmanager webhook payload (version 4) -> a short chat message."""
    if not isinstance(payload, Mapping):
        raise PayloadError("payload is not a JSON object")
    version = payload.get("version")
    if version != "4":
        raise PayloadError(f"unsupported webhook payload version {version!r} (expected '4')")
    alerts = payload.get("alerts")
    if not isinstance(alerts, list) or not all(isinstance(a, Mapping) for a in alerts):
        raise PayloadError("'alerts' must be a list of objects")
    for a in alerts:
        if not isinstance(a.get("labels", {}), Mapping) or not isinstance(
                a.get("annotations", {}), Mapping):
            raise PayloadError("an alert's labels/annotations must be objects")
    status = str(payload.get("status", "firing"))
    group = payload.get("groupLabels") or {}
    name = (group.get("alertname") if isinstance(group, Mapping) else None) or (
        alerts[0].get("labels", {}).get("alertname", "alert") if alerts else "alert")
    firing = sum(1 for a in alerts if a.get("status") == "firing")
    head = f"[{status.upper()}:{firing if status == 'firing' else len(alerts)}] {name}"
    lines = [head]
    for a in alerts[:max_alerts]:
        labels = a.get("labels", {})
        ann = a.get("annotations", {})
        where = labels.get("node") or labels.get("instance") or ""
        text = ann.get("summary") or ann.get("description") or labels.get("alertname", "")
        mark = "resolved" if a.get("status") == "resolved" else labels.get("severity", "")
        lines.append(f"- {where + ': ' if where and where not in text else ''}{text}"
                     f"{f' ({mark})' if mark else ''}")
    if len(alerts) > max_alerts:
        lines.append(f"... and {len(alerts) - max_alerts} more")
    url = payload.get("externalURL")
    if url:
        lines.append(str(url))
    return "\n".join(lines)


class AlertRelay:
    """Alertmanager webhook receiver -> chat webhook. `start()` serves on a daemon thread."""

    def __init__(self, listen: str, forward_url: str, *, timeout_s: float = 5.0,
                 retries: int = 2, backoff_s: float = 0.5) -> None:
        self.forward_url = forward_url
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.forwarded = 0
        host, port = parse_listen(listen)
        relay = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                log.debug("alert relay: " + format, *args)

            def _answer(self, code: int, text: str) -> None:
                body = text.encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length <= 0 or length > MAX_BODY_BYTES:
                    self._answer(400, f"body length {length}: expected 1..{MAX_BODY_BYTES}")
                    return
                try:
                    payload = json.loads(self.rfile.read(length))
                    text = format_alertmanager_text(payload)
                except json.JSONDecodeError as e:
                    self._answer(400, f"body is not JSON: {e}")
                    return
                except PayloadError as e:
                    self._answer(400, str(e))
                    return
                if not post_json(relay.forward_url, {"text": text}, relay.timeout_s,
                                 relay.retries, relay.backoff_s):
                    self._answer(502, "chat endpoint did not accept the message")
                    return
                relay.forwarded += 1
                self._answer(200, "ok")

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="alert-relay",
                                        daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> AlertRelay:
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5.0)
