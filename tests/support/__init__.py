"""Helpers shared by tests and benches: one of each (`wait_for`, the simulated fleet, the
recovery run). Test modules import from here, never from each other."""

from tests.support.waiting import WaitTimeout, wait_for

__all__ = ["WaitTimeout", "wait_for"]
