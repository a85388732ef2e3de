"""Paths into the real-world corpus for the conformance tests.

tests/conformance/conftest.py points this at the `real_data_dir` fixture's folder before each
test (and skips or fails the test when there is none), so helpers and parametrized tests can
name corpus files as `real_data("ibnetdiscover/...")`.
"""

from __future__ import annotations

from pathlib import Path

_ROOT: list[Path] = []


def use(root: Path) -> None:
    _ROOT[:] = [root]


def real_data(relative: str) -> Path:
    """A file or folder of the corpus; a missing one is a failure (the corpus is incomplete)."""
    if not _ROOT:
        raise RuntimeError("real_data() outside a conformance test (no real_data_dir fixture)")
    path = _ROOT[0] / relative
    if not path.exists():
        raise FileNotFoundError(f"{path}: not in the real-world corpus {_ROOT[0]}")
    return path
