"""The repair journal: one JSON line per step of every repair, and the admins' requests.

Append-only (O_APPEND, 0600), so the controller and an admin's `gpufleet repair approve`
on the same head node never interleave within a line. The controller rebuilds its repair
state from it at start, `gpufleet nodes history` reads it, and `gpufleet repair
approve|skip|cancel` writes requests into it that the controller picks up on its next tick.

Merge note: one file per controller host; a PostgreSQL-shared store (standby controllers)
should move these records into the state store.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ADMIN_ACTIONS = ("approve", "skip", "cancel")


class JournalError(Exception):
    """The journal cannot be read or written; the message names the file."""


class Journal:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._offset = 0  # how far read_new has read

    def append(self, rec: dict[str, Any]) -> dict[str, Any]:
        rec = {"ts_ms": int(time.time() * 1000), **rec}
        line = json.dumps(rec, sort_keys=True, default=str) + "\n"
        with self._lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                with os.fdopen(fd, "a") as f:
                    f.write(line)
            except OSError as e:
                raise JournalError(f"cannot write repair journal {self.path}: {e}") from e
        return rec

    def records(self) -> list[dict[str, Any]]:
        return list(self._read(0)[0])

    def read_new(self) -> list[dict[str, Any]]:
        """Records appended since the last call (the first call reads everything)."""
        with self._lock:
            recs, self._offset = self._read(self._offset)
            return list(recs)

    def _read(self, offset: int) -> tuple[Iterator[dict[str, Any]], int]:
        try:
            with self.path.open("rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return iter(()), offset
        except OSError as e:
            raise JournalError(f"cannot read repair journal {self.path}: {e}") from e
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next read
        out = []
        for n, raw in enumerate(data[:end].splitlines()):
            try:
                rec = json.loads(raw)
            except ValueError:
                log.error("%s: skipping an unreadable line near byte %d", self.path,
                          offset + n)
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return iter(out), offset + end

    def request(self, node: str, action: str, actor: str, note: str = "") -> dict[str, Any]:
        """An admin's request for the controller (approve, skip or cancel NODE's step)."""
        if action not in ADMIN_ACTIONS:
            raise ValueError(f"repair action {action!r}: use one of {', '.join(ADMIN_ACTIONS)}")
        return self.append({"type": "request", "id": uuid.uuid4().hex, "node": node,
                            "action": action, "actor": actor, "note": note})

    def history(self, node: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("node") == node]
