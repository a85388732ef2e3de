"""Audit log: one JSON line per state-changing action or refused connection: who, what,
on what, from where, with what result.

Written to the Python logger `gpufleet.audit` (so journald / a log shipper gets it) and,
when configured, appended to a file (`configure(path)`, or $GPUFLEET_AUDIT_LOG for the admin
commands, which run in their own processes). An audit write that fails is logged and never
stops the action it records: losing the controller's ability to drain because a log disk is
full would be worse than a gap in the log.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("gpufleet.audit")
ENV_PATH = "GPUFLEET_AUDIT_LOG"

_lock = threading.Lock()
_path: Path | None = None


def configure(path: str | Path | None) -> None:
    """Also append audit records to `path` (None: logger only, unless $GPUFLEET_AUDIT_LOG)."""
    global _path  # noqa: PLW0603 - one audit sink per process, set at start-up
    with _lock:
        _path = Path(path) if path else None


def _target_path() -> Path | None:
    if _path is not None:
        return _path
    env = os.environ.get(ENV_PATH)
    return Path(env) if env else None


def record(actor: str, action: str, target: str, source: str, result: str,
           **detail: Any) -> dict[str, Any]:
    """Write one audit record; returns it (for tests and callers that show it)."""
    rec: dict[str, Any] = {
        "ts_ms": int(time.time() * 1000), "actor": actor, "action": action,
        "target": target, "source": source, "result": result,
    }
    rec.update({k: v for k, v in detail.items() if v is not None})
    line = json.dumps(rec, sort_keys=True, default=str)
    log.info("%s", line)
    path = _target_path()
    if path is not None:
        try:
            with _lock:
                # O_APPEND: lines from several processes (controller, admin CLIs) never
                # interleave within a line; 0600: the log names users and hosts
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                with os.fdopen(fd, "a") as f:
                    f.write(line + "\n")
        except OSError as e:
            logging.getLogger(__name__).error("cannot write audit log %s: %s", path, e)
    return rec
