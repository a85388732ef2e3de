"""Shared test helpers.

Real-world data lives in ../shared/data/real (never copied into the repository). Under
CI=true a test that needs it fails when it is missing; elsewhere it is skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REAL_DATA = REPO.parent / "shared" / "data" / "real"
IN_CI = os.environ.get("CI", "").lower() == "true"


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
from tests.slurm.fixtures import clean_slurm_lab, slurm_lab  # noqa: E402

__all__ = ["IN_CI", "REAL_DATA", "REPO", "clean_slurm_lab", "real_data", "slurm_lab"]
