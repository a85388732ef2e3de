"""Agent overhead: the sample loop at 1 Hz on a simulated 8-GPU node (or the real GPUs).

Prints CPU time per cycle (us), CPU % of one core, RSS (MiB) and the NVML calls per cycle.
Target (issue 3): <= 0.5 % of one core and <= 60 MiB RSS; dcgm-exporter is reported at
15-131 % of a core and 71-248 MiB.

    .venv/bin/python bench/agent_overhead.py [--seconds 60] [--profile dgx-h100]
    .venv/bin/python bench/agent_overhead.py --gpu-backend nvml   # this machine's real GPUs

The loop is the agent's own (`Agent.sample`, wire encoding, health checks, outbox); the
controller is left out (reports are acked at once) so the figure is the node-side cost.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import tempfile
import time
from types import ModuleType

import psutil
from gpufleet.agent.config import AgentConfig
from gpufleet.agent.nvml import NvmlBackend, load_library
from gpufleet.agent.runner import Agent


def count_nvml_calls(lib: ModuleType) -> dict[str, int]:
    counts: dict[str, int] = {"total": 0}

    def wrap(fn):  # type: ignore[no-untyped-def]
        @functools.wraps(fn)
        def inner(*a, **kw):  # type: ignore[no-untyped-def]
            counts["total"] += 1
            return fn(*a, **kw)

        return inner

    # the agent looks functions up on the module at call time, so wrapping them counts every call
    for name in dir(lib):
        if name.startswith(("nvmlDevice", "nvmlSystem", "nvmlEvent")) and callable(
            getattr(lib, name)
        ):
            setattr(lib, name, wrap(getattr(lib, name)))
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--interval-s", type=float, default=1.0)
    ap.add_argument("--profile", default="dgx-h100", help="simulated hardware profile")
    ap.add_argument("--gpu-backend", choices=("simulated", "nvml"), default="simulated",
                    help="'nvml' measures against this machine's real GPUs")
    ap.add_argument("--counter-interval-s", type=float, default=10.0,
                    help="the agent's nvml_counter_interval_s (energy, PCIe replay, NVLink errors)")
    args = ap.parse_args()

    lib = load_library(args.gpu_backend, args.profile, None, "bench1")
    counts = count_nvml_calls(lib)
    with tempfile.TemporaryDirectory() as state:
        cfg = AgentConfig(node_name="bench1", gpu_backend=args.gpu_backend,
                          sim_profile=args.profile, state_dir=state, interval_s=args.interval_s,
                          nvml_counter_interval_s=args.counter_interval_s)
        agent = Agent(cfg, NvmlBackend(lib, args.gpu_backend, cfg.nvml_counter_interval_s))
        agent.inventory()
        agent.outbox.ack(agent.outbox.put_sample(agent.sample()))  # warm up: imports, caches
        proc = psutil.Process(os.getpid())
        cycles = 0
        calls0 = counts["total"]
        cpu0, wall0 = time.process_time(), time.monotonic()
        next_t = wall0
        per_cycle_us: list[float] = []
        while time.monotonic() - wall0 < args.seconds:
            c0 = time.process_time()
            seq = agent.outbox.put_sample(agent.sample())
            agent.outbox.ack(seq)
            per_cycle_us.append((time.process_time() - c0) * 1e6)
            cycles += 1
            next_t += args.interval_s
            time.sleep(max(0.0, next_t - time.monotonic()))
        cpu_s, wall_s = time.process_time() - cpu0, time.monotonic() - wall0
        rss_mib = proc.memory_info().rss / 2**20
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        per_cycle_us.sort()
        label = args.profile if args.gpu_backend == "simulated" else "real-nvml"
        print(f"agent_overhead backend={label} gpus={len(agent.backend.sample())} "
              f"counter_interval_s={args.counter_interval_s:g} "
              f"cycles={cycles} wall_s={wall_s:.1f}")
        print(f"  cpu_us_per_cycle      mean={cpu_s / cycles * 1e6:.0f} "
              f"p50={per_cycle_us[len(per_cycle_us) // 2]:.0f} "
              f"p99={per_cycle_us[int(len(per_cycle_us) * 0.99)]:.0f}")
        print(f"  cpu_pct_of_one_core   {cpu_s / wall_s * 100:.3f} %   (target <= 0.5 %)")
        print(f"  rss_mib               {rss_mib:.1f} (peak {peak_mib:.1f})   (target <= 60 MiB)")
        print(f"  nvml_calls_per_cycle  {(counts['total'] - calls0) / cycles:.0f}")


if __name__ == "__main__":
    main()
