"""What each NVML call the agent makes costs on this machine (CPU and wall time per call).

Real NVML calls are ioctls into the driver, and some cost far more than others; this names
them, so the agent's per-field cadence rests on a measurement, not a guess. It also prints
the process's RSS before and after `nvmlInit`, since the driver library maps memory the
agent is charged for.

    .venv/bin/python bench/nvml_call_cost.py [--gpu-backend nvml] [--rounds 30]
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections import defaultdict
from types import ModuleType

import psutil
from gpufleet.agent.nvml import NvmlBackend, load_library


def rss_mib() -> float:
    return psutil.Process(os.getpid()).memory_info().rss / 2**20


def time_calls(lib: ModuleType) -> dict[str, list[tuple[float, float]]]:
    """Wrap every nvmlDevice* function; record (cpu_s, wall_s) per call."""
    costs: dict[str, list[tuple[float, float]]] = defaultdict(list)

    def wrap(name, fn):  # type: ignore[no-untyped-def]
        @functools.wraps(fn)
        def inner(*a, **kw):  # type: ignore[no-untyped-def]
            c0, w0 = time.process_time(), time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                costs[name].append((time.process_time() - c0, time.perf_counter() - w0))

        return inner

    for name in dir(lib):
        if name.startswith("nvmlDevice") and callable(getattr(lib, name)):
            setattr(lib, name, wrap(name, getattr(lib, name)))
    return costs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu-backend", choices=("simulated", "nvml"), default="nvml")
    ap.add_argument("--profile", default="dgx-h100", help="simulated hardware profile")
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()

    rss_before = rss_mib()
    lib = load_library(args.gpu_backend, args.profile, None, "bench1")
    backend = NvmlBackend(lib, args.gpu_backend)
    backend.inventory()
    rss_after = rss_mib()
    costs = time_calls(lib)
    for _ in range(args.rounds):
        backend.sample()
    print(f"nvml_call_cost backend={args.gpu_backend} gpus={backend.gpu_count} "
          f"rounds={args.rounds}")
    print(f"  rss_mib before nvmlInit {rss_before:.1f}, after inventory {rss_after:.1f}")
    print(f"  {'function':44} {'calls/round':>11} {'cpu_us/call':>11} {'wall_us/call':>12}")
    rows = sorted(costs.items(), key=lambda kv: -sum(c for c, _ in kv[1]))
    total_cpu = 0.0
    for name, samples in rows:
        cpu = sum(c for c, _ in samples) / len(samples) * 1e6
        wall = sum(w for _, w in samples) / len(samples) * 1e6
        total_cpu += sum(c for c, _ in samples)
        print(f"  {name:44} {len(samples) / args.rounds:11.1f} {cpu:11.0f} {wall:12.0f}")
    print(f"  total cpu_us per round {total_cpu / args.rounds * 1e6:.0f}")


if __name__ == "__main__":
    main()
