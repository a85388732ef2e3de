"""A fresh clone with nothing beside it passes its own tests: only the conformance suite
(tests/conformance/) may read the real-world corpus outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUTSIDE = re.compile(r"""["'/]shared["'/]|REPO\.parent|\.\./shared|/work/""")


def test_no_unit_test_reads_outside_the_repository() -> None:
    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        rel = path.relative_to(REPO)
        if rel.parts[1] == "conformance" or path.name == "test_self_contained.py":
            continue
        offenders += [f"{rel}:{n}: {line.strip()}"
                      for n, line in enumerate(path.read_text().splitlines(), 1)
                      if OUTSIDE.search(line) and not line.lstrip().startswith("#")]
    assert offenders == [], "read outside the clone (move to tests/conformance/):\n" + \
        "\n".join(offenders)
