"""Agent configuration: flag > environment (GPUFLEET_AGENT_*) > file > default.

The file is TOML (default /etc/gpufleet/agent.toml) with the same keys as the flags, using
underscores: `controller = "head1:50051"`, `interval_s = 1.0`, ...
"""

from __future__ import annotations

import socket
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = Path("/etc/gpufleet/agent.toml")


class ConfigError(Exception):
    """A configuration file or value is wrong; the message names it."""


@dataclass(frozen=True)
class AgentConfig:
    node_name: str = ""  # the Slurm NodeName; default: short host name
    controller: str = "localhost:50051"
    interval_s: float = 1.0
    gpu_backend: str = "nvml"  # "nvml" (real GPUs) or "simulated"
    sim_profile: str = "dgx-h100"
    sim_faults_path: str = ""  # default: <state_dir>/sim-faults.json
    state_dir: str = "/var/lib/gpufleet-agent"
    expected_gpu_count: int | None = None
    insecure: bool = True  # TLS comes with the certificates issue; plaintext for now

    def resolved_node_name(self) -> str:
        return self.node_name or socket.gethostname().split(".")[0]

    def resolved_faults_path(self) -> Path:
        return Path(self.sim_faults_path or Path(self.state_dir) / "sim-faults.json")

    def validate(self) -> AgentConfig:
        if not 0.05 <= self.interval_s <= 3600:
            raise ConfigError(f"interval_s={self.interval_s}: must be between 0.05 and 3600")
        if self.gpu_backend not in ("nvml", "simulated"):
            raise ConfigError(f"gpu_backend={self.gpu_backend!r}: use 'nvml' or 'simulated'")
        if ":" not in self.controller:
            raise ConfigError(f"controller={self.controller!r}: expected HOST:PORT")
        if self.expected_gpu_count is not None and self.expected_gpu_count < 0:
            raise ConfigError(f"expected_gpu_count={self.expected_gpu_count}: must be >= 0")
        return self


def load_file(path: Path | None) -> dict[str, Any]:
    """Read a TOML config file into a dict of known keys; a missing default file is fine."""
    if path is None:
        path = DEFAULT_CONFIG_PATH
        if not path.exists():
            return {}
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: no such config file") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    known = {f.name for f in fields(AgentConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {sorted(known)}")
    return data
