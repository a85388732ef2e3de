"""The controller's background pollers' one thread loop: a daemon thread that runs a round
every `interval_s` until stopped. A failing round is logged (an `expected` error as one
warning line, anything else with its traceback) and the next comes after `backoff_s`: one
bad round never ends the loop. A round that returns True (the bool; counts and lists are
not) ran into a backlog and is run again at once. Used by health/follow.py,
repair/engine.py, service/command_relay.py and placement/switch_hold.py.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable


class PollLoop:
    def __init__(self, name: str, round_: Callable[[], object], interval_s: float,
                 log: logging.Logger, what: str,
                 expected: tuple[type[Exception], ...] = (), backoff_s: float = 1.0) -> None:
        if interval_s <= 0:
            raise ValueError(f"{name}: interval_s={interval_s}: must be > 0")
        self.name = name
        self.round = round_
        self.interval_s = interval_s
        self.log = log
        self.what = what  # "relaying repair commands": logged as "... failed: <error>"
        self.expected = expected
        self.backoff_s = backoff_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                while self.round() is True and not self._stop.is_set():
                    pass  # a backlog: the next round at once
            except self.expected as e:
                self.log.warning("%s failed: %s", self.what, e)
                self._stop.wait(self.backoff_s)
            except Exception:
                self.log.exception("%s failed", self.what)
                self._stop.wait(self.backoff_s)
