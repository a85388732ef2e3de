"""Active/standby controllers on one PostgreSQL database: the active one holds a session-level
advisory lock on a connection of its own.

PostgreSQL releases a session lock the moment the holder's connection ends (the process
died, was killed -9, or lost the network long enough for TCP keepalives to give up), so a
standby polling `pg_try_advisory_lock` takes over without any lease arithmetic. The holder
checks its connection every `check_interval_s`; if it is gone, so may be the lock, and the
controller must stop acting at once (`on_lost`): two actives would drain twice.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import psycopg

log = logging.getLogger(__name__)

# any 64-bit number unique to this use; the store's migration lock uses a different one
LEADER_LOCK_KEY = 0x6770_666C_6565_7401  # "gpfleet" + 1


class LeaderLock:
    def __init__(self, dsn: str, poll_interval_s: float = 0.2, check_interval_s: float = 1.0,
                 key: int = LEADER_LOCK_KEY) -> None:
        self.dsn = dsn
        self.key = key
        self.poll_interval_s = poll_interval_s
        self.check_interval_s = check_interval_s
        self.acquired = threading.Event()
        self.lost = threading.Event()
        self._conn: psycopg.Connection[Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, on_acquired: Callable[[], None], on_lost: Callable[[], None]) -> None:
        self._thread = threading.Thread(target=self._run, args=(on_acquired, on_lost),
                                        name="leader-lock", daemon=True)
        self._thread.start()

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(
            self.dsn, autocommit=True, connect_timeout=5,
            application_name="gpufleet-controller-leader",
            # dead peers are noticed by the server within ~15 s, so the lock frees even when
            # a host vanishes without closing its socket
            keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=5,
        )

    def _run(self, on_acquired: Callable[[], None], on_lost: Callable[[], None]) -> None:
        waiting_logged = False
        while not self._stop.is_set():
            try:
                if self._conn is None or self._conn.closed or self._conn.broken:
                    self._conn = self._connect()
                row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
            except psycopg.Error as e:
                log.warning("leader election: PostgreSQL unreachable (%s); retrying", e)
                self._stop.wait(max(self.poll_interval_s, 1.0))
                continue
            if row and row[0]:
                break
            if not waiting_logged:
                log.warning("standby: another controller is active; waiting to take over")
                waiting_logged = True
            self._stop.wait(self.poll_interval_s)
        if self._stop.is_set():
            return
        log.warning("this controller is now active (holds the leader lock)")
        self.acquired.set()
        on_acquired()
        while not self._stop.wait(self.check_interval_s):
            try:
                assert self._conn is not None  # noqa: S101 - set before the lock was taken
                self._conn.execute("SELECT 1")
            except psycopg.Error as e:
                log.critical("lost the leader lock's connection (%s): stepping down", e)
                self.lost.set()
                on_lost()
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self._conn is not None:
            self._conn.close()  # releases the lock at once for the standby
