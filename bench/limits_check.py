"""Cost of limits.check per report, on the messages a simulated DGX H100 agent really sends.

Prints microseconds per call (best of several timeit repeats) for: the hello (inventory), a
first sample (every verdict), a steady-state sample (no verdict changed), a usage report of
8 GPUs, a health event and a checkpoint registration.

    .venv/bin/python bench/limits_check.py [--profile dgx-h100] [--number 2000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import timeit

from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.scheduler.service import limits


def messages(profile: str) -> dict[str, pb.AgentMessage]:
    from gpufleet.agent.config import AgentConfig
    from gpufleet.agent.nvml import NvmlBackend, load_library
    from gpufleet.agent.runner import Agent

    now = int(time.time() * 1000)
    with tempfile.TemporaryDirectory() as state:
        cfg = AgentConfig(node_name="bench", gpu_backend="simulated", sim_profile=profile,
                          state_dir=state, metrics_listen="")
        agent = Agent(cfg, NvmlBackend(load_library("simulated", profile, None, "bench"), "sim"))
        inv = agent.inventory()
        first = agent.sample()
        steady = agent.sample()
        agent.backend.close()
    usage = pb.JobUsageReport(node="bench", usage=[
        pb.JobGpuUsage(job_id="123456", gpu_index=i, user="alice", account="physics",
                       start_ms=now - 3_600_000, as_of_ms=now, allocated_ms=3_600_000,
                       busy_ms=3_000_000, energy_mj=2_000_000_000, phase=pb.JOB_PHASE_RUNNING,
                       run=0, source="hook")
        for i in range(len(inv.gpus))])
    event = pb.HealthEvent(timestamp_ms=now, kind=pb.EVENT_KIND_XID, gpu_index=3, xid=79,
                           verdict=pb.Verdict(check="xid", severity=pb.SEVERITY_FATAL,
                                              reason_code="xid79", since_ms=now, gpu_index=3,
                                              evidence="GPU 3 (0000:9b:00.0) Xid 79 fallen "
                                                       "off the bus"))
    ckpt = pb.CheckpointRegistered(job_id="123456", step=4000, path="/scratch/alice/ckpt/4000",
                                   time_ms=now, node="bench", uid=1000, received_ms=now)
    base = {"seq": 7, "agent_instance": "0123456789abcdef"}
    return {
        "hello": pb.AgentMessage(hello=pb.Hello(inventory=inv), **base),  # type: ignore[arg-type]
        "sample (first, all verdicts)": pb.AgentMessage(sample=first, **base),  # type: ignore[arg-type]
        "sample (steady)": pb.AgentMessage(sample=steady, **base),  # type: ignore[arg-type]
        "usage (8 GPUs)": pb.AgentMessage(usage=usage, **base),  # type: ignore[arg-type]
        "event": pb.AgentMessage(event=event, **base),  # type: ignore[arg-type]
        "checkpoint": pb.AgentMessage(checkpoint=ckpt, **base),  # type: ignore[arg-type]
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="dgx-h100")
    ap.add_argument("--number", type=int, default=2000)
    args = ap.parse_args()
    now = int(time.time() * 1000)
    for name, msg in messages(args.profile).items():
        limits.check(msg, now)  # must pass: these are what a healthy agent sends
        def one(m: pb.AgentMessage = msg) -> None:
            limits.check(m, now)
        # CPU time, not wall time: the figure holds on a loaded machine too
        best = min(timeit.repeat(one, number=args.number, repeat=5, timer=time.process_time))
        print(f"{name:30s} {best / args.number * 1e6:8.1f} us  ({msg.ByteSize()} bytes)")


if __name__ == "__main__":
    main()
