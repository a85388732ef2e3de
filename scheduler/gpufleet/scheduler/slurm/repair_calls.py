"""The two Slurm calls the repair loop adds: `scontrol reboot` and node -> partition.

Inside the one door to Slurm (gpufleet.scheduler.slurm), beside CliSlurmClient: commands
only, errors are SlurmError.

Why nextstate=DOWN and not RESUME: a node that comes back RESUMEd takes jobs before gpufleet
has diagnosed it. DOWN (with gpufleet's reason) keeps it out until the diagnostic passes and
the repair loop resumes it itself.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping

from gpufleet.scheduler.slurm.types import SlurmError, check_node_name, clean_reason


def _run(argv: list[str], env: Mapping[str, str] | None, timeout_s: float) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                           env=dict(env) if env is not None else None, check=False)
    except FileNotFoundError as e:
        raise SlurmError(f"{argv[0]} not found: is the Slurm client installed?",
                         transient=False) from e
    except subprocess.TimeoutExpired as e:
        raise SlurmError(f"`{' '.join(argv)}` timed out after {timeout_s} s") from e
    if p.returncode != 0:
        raise SlurmError(f"`{' '.join(argv)}` failed: {' '.join((p.stderr or p.stdout).split())}")
    return p.stdout


class CliRebooter:
    """`scontrol reboot ASAP nextstate=DOWN reason=... NODE`: slurmctld runs the site's
    RebootProgram on the node once it is idle (ASAP also keeps new jobs off it)."""

    def __init__(self, env: Mapping[str, str] | None = None, timeout_s: float = 10.0) -> None:
        self.env = env
        self.timeout_s = timeout_s

    def reboot(self, node: str, reason: str) -> None:
        _run(["scontrol", "reboot", "ASAP", "nextstate=DOWN", f"reason={clean_reason(reason)}",
              check_node_name(node)], self.env, self.timeout_s)


class CliPartitions:
    """node -> its first partition, from `sinfo -h -N -o '%N %R'` (cached for ttl_s)."""

    def __init__(self, env: Mapping[str, str] | None = None, timeout_s: float = 10.0,
                 ttl_s: float = 60.0) -> None:
        self.env = env
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self._cache: dict[str, str] = {}
        self._at = -1e18

    def __call__(self, node: str) -> str:
        import time

        now = time.monotonic()
        if now - self._at > self.ttl_s:
            try:
                out = _run(["sinfo", "-h", "-N", "-o", "%N %R"], self.env, self.timeout_s)
            except SlurmError:
                return self._cache.get(node, "")
            cache: dict[str, str] = {}
            for line in out.splitlines():
                parts = line.split()
                if len(parts) == 2:
                    cache.setdefault(parts[0], parts[1])
            self._cache, self._at = cache, now
        return self._cache.get(node, "")
