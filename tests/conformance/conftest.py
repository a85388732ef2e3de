"""The conformance suite: gpufleet against real-world data it did not write.

The corpus (NVIDIA's XID catalog, ibnetdiscover dumps, nvidia-smi captures, Slurm configs,
dmesg logs) is not in this repository. Its folder comes from GPUFLEET_REAL_DATA, default
`<repo>/../shared/data/real`. When it is missing the suite is skipped with a reason naming that
variable, or fails where it must run: CI=true or GPUFLEET_CONFORMANCE=1.

Every test under tests/conformance/ carries the `conformance` marker: `pytest -m conformance`
runs the suite alone, `-m "not conformance"` leaves it out.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conformance import corpus

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
ENV = "GPUFLEET_REAL_DATA"


def real_data_path() -> Path:
    """Where the corpus is expected ($GPUFLEET_REAL_DATA or <repo>/../shared/data/real)."""
    return Path(os.environ.get(ENV) or REPO.parent / "shared" / "data" / "real")


def conformance_required() -> bool:
    return (os.environ.get("CI", "").lower() == "true"
            or os.environ.get("GPUFLEET_CONFORMANCE", "") == "1")


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The real-world corpus folder; skip (or fail under CI / GPUFLEET_CONFORMANCE=1) without it."""
    path = real_data_path()
    if not path.is_dir():
        msg = (f"real-world corpus {path} is missing: set {ENV} to its folder "
               "(the conformance suite; unit tests do not need it)")
        if conformance_required():
            pytest.fail(msg + " [CI=true or GPUFLEET_CONFORMANCE=1: it must be there]")
        pytest.skip(msg)
    return path


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.conformance)


@pytest.fixture(autouse=True)
def _corpus(real_data_dir: Path) -> None:
    """Every conformance test needs the corpus: tests.conformance.corpus.real_data() reads it."""
    corpus.use(real_data_dir)
