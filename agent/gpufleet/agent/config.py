"""Agent configuration: flag > environment (GPUFLEET_AGENT_*) > file > default.

The file is TOML (default /etc/gpufleet/agent.toml) with the same keys as the flags, using
underscores: `controller = "head1:50051"`, `interval_s = 1.0`, ...

`controller` may list several controllers, comma-separated (active and standbys): the
agent tries the next one when a stream fails.

TLS (mTLS to the controller): set all of `ca_path`, `cert_path`, `key_path` (the Ansible
role stages them as /etc/gpufleet/tls/{ca.crt,agent.crt,agent.key}) and the agent connects
with TLS. With none of them set the agent speaks plaintext, which only a controller started
with --insecure accepts (the demo and tests keep working unchanged). `insecure = false`
with no certificates is an error (a site that wants TLS enforced on the agent side too
sets it), and so is `insecure = true` with certificates.
"""

from __future__ import annotations

import socket
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from gpufleet.agent.health import CHECKS, HealthConfig
from gpufleet.rpc import settings
from gpufleet.rpc.settings import SettingError

DEFAULT_CONFIG_PATH = Path("/etc/gpufleet/agent.toml")
DEFAULT_JOB_SOCKET = "/run/gpufleet-agent/job.sock"


@dataclass(frozen=True)
class ClientTls:
    """The stream's mTLS files (gpufleet.agent.client reads them at every connect)."""

    ca_path: Path
    cert_path: Path
    key_path: Path


MAX_GPUS = 64  # what the controller takes from one node
# float settings: (lowest, highest); checked finite and in range
# (interval_s: 10 ms is far faster than a node needs; fault tests use it to pack minutes of
# 1 Hz reports into seconds)
_FLOAT_RANGES: dict[str, tuple[float, float]] = {
    "interval_s": (0.01, 3600), "nvml_counter_interval_s": (0, 3600),
    "expected_ib_rate_gbps": (0, 1e6), "gpu_temperature_degraded_c": (0, 200),
    "nvlink_crc_errors_per_min_degraded": (0, 1e12), "ib_errors_per_min_degraded": (0, 1e12),
    "disk_used_pct_warn": (0, 100),
}  # (the spool's are checked with the spool's settings, _validate_spool)


class ConfigError(Exception):
    """A configuration file or value is wrong; the message names it."""


@dataclass(frozen=True)
class AgentConfig:
    node_name: str = ""  # the Slurm NodeName; default: short host name
    controller: str = "localhost:50051"
    interval_s: float = 1.0
    # at steady state (no verdict changed) the controller gets a small heartbeat this often
    # instead of every sample; 0 sends every sample (the per-second series are for
    # Prometheus, which scrapes the agent). Keep the controller's unreachable_after_s at
    # several heartbeats.
    heartbeat_interval_s: float = 5.0
    gpu_backend: str = "nvml"  # "nvml" (real GPUs) or "simulated"
    sim_profile: str = "dgx-h100"
    sim_faults_path: str = ""  # default: <state_dir>/sim-faults.json
    state_dir: str = "/var/lib/gpufleet-agent"
    expected_gpu_count: int | None = None
    # None: TLS when ca_path/cert_path/key_path are set, else plaintext with a warning
    insecure: bool | None = None
    ca_path: str = ""  # the cluster CA (ca.crt from `gpufleet certs init`)
    cert_path: str = ""  # this node's certificate (`gpufleet certs issue NODE`)
    key_path: str = ""  # its key (mode 0600)
    metrics_listen: str = "0.0.0.0:9835"  # Prometheus /metrics; "" turns it off
    sysfs_root: str = "/sys"  # InfiniBand ports are read below <sysfs_root>/class/infiniband
    kmsg_path: str = "auto"  # kernel log for NVRM Xid lines: auto = /dev/kmsg with real NVML
    disk_paths: tuple[str, ...] = ("/",)  # add job scratch (e.g. /tmp, /local) in the file
    # energy, PCIe replay and NVLink error counters: costly NVML calls, read this often
    nvml_counter_interval_s: float = 10.0
    # health thresholds (see gpufleet.agent.health.HealthConfig)
    expected_ib_rate_gbps: float | None = None
    ib_hcas: tuple[str, ...] = ()
    gpu_temperature_degraded_c: float = 92.0
    nvlink_crc_errors_per_min_degraded: float = 100.0
    ib_errors_per_min_degraded: float = 10.0
    disk_used_pct_warn: float = 95.0
    debounce_cycles: int = 3
    debounce: tuple[tuple[str, int], ...] = ()  # [debounce] table in TOML: check = cycles
    # unix socket where jobs register checkpoints (gpufleet.agent.job); "" turns it off.
    # Must match the jobs' GPUFLEET_AGENT_SOCKET (the helper's default is the nvml one).
    # auto = /run/gpufleet-agent/job.sock with real NVML, off with the simulator (tests and
    # demos run many simulated agents on one host: they must not fight over one socket)
    job_socket_path: str = "auto"
    # unacked reports on disk (gpufleet.agent.outbox): "" = <state_dir>/spool. Bounded in
    # bytes; past it the oldest samples go first, health events and job usage never. 32 MiB
    # holds several hours of 1 Hz samples of an 8-GPU node.
    spool_dir: str = ""
    spool_max_bytes: int = 32 * 1024 * 1024
    # samples are fsync'd at most this often (events, usage, checkpoints at once)
    spool_sync_interval_s: float = 5.0
    # after a failed spool write (disk full), reports stay in memory and the disk is
    # tried again this often
    spool_disk_retry_s: float = 10.0

    def resolved_node_name(self) -> str:
        return self.node_name or socket.gethostname().split(".")[0]

    def resolved_faults_path(self) -> Path:
        return Path(self.sim_faults_path or Path(self.state_dir) / "sim-faults.json")

    def resolved_job_socket_path(self) -> str:
        if self.job_socket_path == "auto":
            return DEFAULT_JOB_SOCKET if self.gpu_backend == "nvml" else ""
        return self.job_socket_path

    def resolved_spool_dir(self) -> Path:
        return Path(self.spool_dir or Path(self.state_dir) / "spool")

    def dead_letter_path(self) -> Path:
        """Reports the controller rejected, one JSON line each (bounded, rotated once)."""
        return Path(self.state_dir) / "rejected.jsonl"

    def resolved_kmsg_path(self) -> Path | None:
        if self.kmsg_path == "auto":
            return Path("/dev/kmsg") if self.gpu_backend == "nvml" else None
        return Path(self.kmsg_path) if self.kmsg_path else None

    def client_tls(self) -> ClientTls | None:
        """The stream's TLS files; None for plaintext (validate() checked the combination)."""
        if not self.ca_path:
            return None
        return ClientTls(Path(self.ca_path), Path(self.cert_path), Path(self.key_path))

    def controller_targets(self) -> list[str]:
        return [t.strip() for t in self.controller.split(",") if t.strip()]

    def health_config(self) -> HealthConfig:
        return HealthConfig(
            expected_gpu_count=self.expected_gpu_count,
            expected_ib_rate_gbps=self.expected_ib_rate_gbps,
            ib_hcas=self.ib_hcas,
            gpu_temperature_degraded_c=self.gpu_temperature_degraded_c,
            nvlink_crc_errors_per_min_degraded=self.nvlink_crc_errors_per_min_degraded,
            ib_errors_per_min_degraded=self.ib_errors_per_min_degraded,
            disk_used_pct_warn=self.disk_used_pct_warn,
            debounce_default=self.debounce_cycles,
            debounce=self.debounce,
        )

    def _validate_heartbeat(self) -> None:
        if not (self.heartbeat_interval_s == 0 or 0.01 <= self.heartbeat_interval_s <= 3600):
            raise ConfigError(f"heartbeat_interval_s={self.heartbeat_interval_s}: must be 0 "
                              "(send every sample) or between 0.01 and 3600")

    def validate(self) -> AgentConfig:
        try:
            self._validate_settings()
        except SettingError as e:
            raise ConfigError(str(e)) from None
        for f in fields(self):
            # a number where a string belongs (`controller = 0`) is the file's fault: name it
            if f.type == "str" and not isinstance(getattr(self, f.name), str):
                raise ConfigError(f"{f.name}={getattr(self, f.name)!r}: must be a string")
        self._validate_heartbeat()
        if self.gpu_backend not in ("nvml", "simulated"):
            raise ConfigError(f"gpu_backend={self.gpu_backend!r}: use 'nvml' or 'simulated'")
        targets = self.controller_targets()
        if not targets or any(":" not in t for t in targets):
            raise ConfigError(
                f"controller={self.controller!r}: expected HOST:PORT, or several separated "
                "by commas")
        self._validate_tls()
        for check, cycles in self.debounce:
            if check not in CHECKS:
                raise ConfigError(f"debounce.{check}: unknown check; known: {', '.join(CHECKS)}")
            if not isinstance(cycles, int) or cycles < 1:
                raise ConfigError(f"debounce.{check}={cycles!r}: must be a whole number >= 1")
        if self.metrics_listen and ":" not in self.metrics_listen:
            raise ConfigError(f"metrics_listen={self.metrics_listen!r}: expected HOST:PORT or ''")
        self._validate_job_socket()
        self._validate_spool()
        return self

    def _validate_settings(self) -> None:
        """Every number finite and in range, addresses HOST:PORT, the simulator's profile
        one it has (the shared checks of gpufleet.rpc.settings)."""
        for name, (lo, hi) in _FLOAT_RANGES.items():
            value = getattr(self, name)
            if value is not None:
                settings.finite(name, value, lo, hi)
        if self.expected_gpu_count is not None:
            settings.whole("expected_gpu_count", self.expected_gpu_count, 0, MAX_GPUS)
        settings.whole("debounce_cycles", self.debounce_cycles, 1, 100_000)
        if isinstance(self.controller, str):
            for target in self.controller_targets():
                settings.host_port("controller", target)
        if self.metrics_listen and isinstance(self.metrics_listen, str):
            settings.host_port("metrics_listen", self.metrics_listen)
        if self.gpu_backend == "simulated":
            from gpufleet.agent.nvml_sim import PROFILES

            settings.one_of("sim_profile", self.sim_profile, PROFILES)

    def _validate_spool(self) -> None:
        # bool is an int to Python; `spool_max_bytes = true` is still the file's mistake
        if isinstance(self.spool_max_bytes, bool) or not isinstance(self.spool_max_bytes, int):
            raise ConfigError(f"spool_max_bytes={self.spool_max_bytes!r}: must be a whole "
                              "number of bytes")
        if not 64 * 1024 <= self.spool_max_bytes <= 64 * 1024**3:
            raise ConfigError(f"spool_max_bytes={self.spool_max_bytes}: must be between "
                              "65536 (64 KiB) and 68719476736 (64 GiB)")
        for key in ("spool_sync_interval_s", "spool_disk_retry_s"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not 0 <= value <= 3600:
                raise ConfigError(f"{key}={value!r}: must be a number of seconds, 0..3600")
        if self.spool_dir and not self.spool_dir.startswith("/"):
            raise ConfigError(f"spool_dir={self.spool_dir!r}: must be an absolute path or ''")

    def _validate_tls(self) -> None:
        files = {"ca_path": self.ca_path, "cert_path": self.cert_path,
                 "key_path": self.key_path}
        given = [k for k, v in files.items() if v]
        if given and len(given) < len(files):
            missing = ", ".join(k for k in files if k not in given)
            raise ConfigError(f"TLS needs ca_path, cert_path and key_path together: {missing} "
                              "not set")
        if given and self.insecure:
            raise ConfigError("insecure = true together with ca_path/cert_path/key_path: "
                              "choose TLS or plaintext")
        if not given and self.insecure is False:
            raise ConfigError("insecure = false needs ca_path, cert_path and key_path (from "
                              "`gpufleet certs issue NODE`)")
        for key in given:
            path = Path(files[key])
            if not path.is_file():
                raise ConfigError(f"{key}={files[key]!r}: no such file")

    def _validate_job_socket(self) -> None:
        if not self.job_socket_path or self.job_socket_path == "auto":
            return
        if not self.job_socket_path.startswith("/"):
            raise ConfigError(
                f"job_socket_path={self.job_socket_path!r}: must be an absolute path or ''")
        # sockaddr_un.sun_path holds 108 bytes, the terminating NUL included
        if len(self.job_socket_path.encode()) > 107:
            raise ConfigError(
                f"job_socket_path={self.job_socket_path!r}: longer than the 107 bytes a "
                "unix socket path may have")


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
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    known = {f.name for f in fields(AgentConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {sorted(known)}")
    # TOML tables and arrays become the tuples the frozen config holds
    if "debounce" in data:
        if not isinstance(data["debounce"], dict):
            raise ConfigError(f"{path}: debounce must be a table, e.g. [debounce] thermal = 5")
        data["debounce"] = tuple(data["debounce"].items())
    for key in ("disk_paths", "ib_hcas"):
        if key in data:
            if not isinstance(data[key], list):
                raise ConfigError(f"{path}: {key} must be a list of strings")
            data[key] = tuple(str(x) for x in data[key])
    return data
