"""What a test does when something it needs is not here (a Debian package, root, a server that
would not start): under CI=true, whose setup provides all of it, that is a failure; elsewhere
the test is skipped. Either way the reason says what is missing."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def unavailable(reason: str) -> NoReturn:
    """Fail (CI=true) or skip the test, saying `reason`."""
    if IN_CI:
        pytest.fail(f"CI=true, and {reason}", pytrace=False)
    pytest.skip(reason)
