"""What both daemons do the same way towards their host: systemd readiness and `/metrics`.

Shared by the agent and the controller like `gpufleet.rpc.settings` (the only code they
share besides the wire contract), so the two never drift apart.

- `notify`: sd_notify. A datagram such as b"READY=1" sent to $NOTIFY_SOCKET; a name starting
  with '@' is a Linux abstract socket. Without $NOTIFY_SOCKET (not under systemd, or
  Type=simple) it does nothing. A failure to notify is logged and never stops the daemon:
  systemd then times the start out and says so itself.
- `serve_metrics`: a private Prometheus registry served on a daemon thread, with the
  process, platform and GC collectors client_python's global registry has. prometheus_client
  is imported only here, when a daemon serves metrics (both daemons' extras bring it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1", "STOPPING=1") to systemd; True if it was sent."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address[0] not in "/@":
        log.warning("NOTIFY_SOCKET=%r: neither a path nor an abstract name; not notifying",
                    address)
        return False
    target = "\0" + address[1:] if address[0] == "@" else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), target)
    except OSError as e:
        log.warning("sd_notify %s to %s failed: %s", state, address, e)
        return False
    return True


class MetricsHttpServer:
    """The running `/metrics` HTTP server; `shutdown` stops it and closes its socket."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        self._closed = False

    @property
    def port(self) -> int:
        """The bound port (useful after asking for port 0)."""
        return int(self._httpd.socket.getsockname()[1])

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5.0)


def register_process_collectors(registry: CollectorRegistry) -> None:
    """Process (CPU, RSS, fds), platform and GC collectors, as client_python's default has."""
    from prometheus_client.gc_collector import GCCollector
    from prometheus_client.platform_collector import PlatformCollector
    from prometheus_client.process_collector import ProcessCollector

    for make in (ProcessCollector, PlatformCollector, GCCollector):
        with contextlib.suppress(ValueError):  # DuplicateTimeseries: the caller's has it
            make(registry=registry)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> MetricsHttpServer:
    """Serve `registry` at http://HOST:PORT/metrics on a daemon thread (OSError: cannot bind)."""
    from prometheus_client import start_http_server

    httpd, thread = start_http_server(port, host, registry=registry)
    return MetricsHttpServer(httpd, thread)
