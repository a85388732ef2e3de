"""An agent in the test's own process, on the simulated NVML, for tests that drive the loop
through real gRPC on loopback without starting agent programs."""

from __future__ import annotations

from pathlib import Path

from gpufleet.agent.config import AgentConfig
from gpufleet.agent.nvml import NvmlBackend, load_library
from gpufleet.agent.runner import Agent


def make_agent(tmp_path: Path, port: int, node: str = "n1", profile: str = "dgx-h100") -> Agent:
    """Node `node` reporting to 127.0.0.1:`port` every 0.1 s (heartbeat 0.2 s); state under
    `tmp_path`/`node`. Run it with `agent.run(once=True)` or in a thread."""
    cfg = AgentConfig(node_name=node, controller=f"127.0.0.1:{port}", gpu_backend="simulated",
                      sim_profile=profile, state_dir=str(tmp_path / node), interval_s=0.1,
                      heartbeat_interval_s=0.2, metrics_listen="")
    return Agent(cfg, NvmlBackend(load_library("simulated", profile, None, node), "sim"))
