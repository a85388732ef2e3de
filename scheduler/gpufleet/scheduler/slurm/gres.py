"""Slurm's GRES strings, as squeue and scontrol print them on every version."""

from __future__ import annotations

import re

_GRES_IDX = re.compile(r"gpu(?::[^:(,]+)?:(\d+)\(IDX:([0-9,\-]*)\)")
_GRES_COUNT = re.compile(r"gpu(?::[^:(,]+)?:(\d+)")


def parse_gres_detail(text: str) -> set[int]:
    """`gpu:3(IDX:0-2)` / `gpu:h100:2(IDX:0,3)` -> GPU indices ({} when none are named)."""
    out: set[int] = set()
    for m in _GRES_IDX.finditer(text):
        for part in filter(None, m.group(2).split(",")):
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    return out


def gpu_count(gres: str) -> int:
    """"gpu:8", "gpu:h100:8(S:0-1)", "gpu:a:4,gpu:b:4" (several types: summed)."""
    return sum(int(m.group(1)) for m in _GRES_COUNT.finditer(gres or ""))
