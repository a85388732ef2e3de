"""`wait_for`: poll a condition until it holds, the one way tests and benches wait for another
process or thread to do something. It asserts nothing about how long that took: the timeout
only bounds a test that would otherwise hang, so it is generous."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """The condition did not hold in time (an AssertionError, so pytest reports it as a failed
    check, with the message saying what was awaited)."""


def wait_for(cond: Callable[[], T], timeout_s: float = 15.0,
             what: str | Callable[[], object] = "the condition", *, step_s: float = 0.05,
             ignore: tuple[type[Exception], ...] = ()) -> T:
    """Call `cond` every `step_s` until it returns something true, and return that.

    `what` names what is awaited in the timeout's message; a callable is called then, so the
    message can show the state that was reached instead (e.g. a node's Slurm state). An
    exception of a class in `ignore` counts as "not yet" (a file or socket that a restarting
    process has not made again); the last one is chained to the timeout.
    """
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while True:
        try:
            value = cond()
        except ignore as e:
            last = e
        else:
            if value:
                return value
        if time.monotonic() >= deadline:
            break
        time.sleep(step_s)
    said = what() if callable(what) else what
    raise WaitTimeout(f"timed out after {timeout_s:g} s waiting for {said}") from last
