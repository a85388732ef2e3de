"""systemd readiness (sd_notify): tell the service manager the controller is up or stopping.

A datagram such as b"READY=1" sent to $NOTIFY_SOCKET; a name starting with '@' is a Linux
abstract socket. Without $NOTIFY_SOCKET (not under systemd, or Type=simple) it does nothing.
A failure to notify is logged and never stops the controller: systemd then times the start out
and says so itself. (The agent has its own copy: agent and controller share no code.)
"""

from __future__ import annotations

import logging
import os
import socket

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
