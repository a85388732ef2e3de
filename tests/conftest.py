"""Shared test helpers.

Real-world data lives in ../shared/data/real (never copied into the repository). Under
CI=true a test that needs it fails when it is missing; elsewhere it is skipped.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REAL_DATA = REPO.parent / "shared" / "data" / "real"
IN_CI = os.environ.get("CI", "").lower() == "true"


_FIGURES: list[str] = []


@pytest.fixture
def report_figure() -> Callable[[str], None]:
    """Record a measured figure; all of them are printed at the end of the run."""
    return _FIGURES.append


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _FIGURES:
        terminalreporter.section("measured figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)


def real_data(relative: str) -> Path:
    """Path of a file in the shared real-world data; fail under CI, skip elsewhere."""
    path = REAL_DATA / relative
    if not path.exists():
        msg = f"real-world data {path} is missing"
        if IN_CI:
            pytest.fail(msg + " (CI=true: it must be there)")
        pytest.skip(msg)
    return path


# The real-Slurm fixtures (tests/slurm/fixtures.py), for tests outside tests/slurm too.
from tests.slurm.fixtures import clean_slurm_lab, slurm_lab, slurm_version  # noqa: E402

__all__ = [
    "IN_CI", "REAL_DATA", "REPO", "clean_slurm_lab", "real_data", "report_figure", "slurm_lab",
    "slurm_version",
]
