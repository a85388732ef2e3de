"""The conformance suite: our parsers and tables against real-world files written by others.

Those files are never copied into this repository. They are read from GPUFLEET_REAL_DATA,
by default <repo root>/../shared/data/real. When the folder is missing the suite fails under
CI=true or GPUFLEET_CONFORMANCE=1 (it must run there) and is skipped elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _required() -> bool:
    return (os.environ.get("CI", "").lower() == "true"
            or os.environ.get("GPUFLEET_CONFORMANCE", "") == "1")


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The folder of real-world reference data (see its README.md and SOURCES.tsv)."""
    path = Path(os.environ.get("GPUFLEET_REAL_DATA", REPO.parent / "shared" / "data" / "real"))
    if not path.is_dir():
        msg = (f"real-world data folder {path} is missing: set GPUFLEET_REAL_DATA to the "
               "shared/data/real folder")
        if _required():
            pytest.fail(msg + " (CI=true or GPUFLEET_CONFORMANCE=1: the suite must run)")
        pytest.skip(msg)
    return path

