"""What a Slurm lab is: its shape (SlurmLabConfig, saved as lab.json in its directory), where it
lives by default, and the errors the lab raises."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .roots import HOST_VERSION, VERSIONS

TOPOLOGIES = ("tree", "block", "yaml")


def default_lab_dir() -> Path:
    """$GPUFLEET_SLURM_LAB or /tmp/gpufleet-slurm-lab: one well-known place so `down` finds it."""
    return Path(os.environ.get("GPUFLEET_SLURM_LAB", "/tmp/gpufleet-slurm-lab"))


class SlurmLabError(Exception):
    """The lab could not be started, stopped or queried; the message names the log to read."""


class SlurmCommandError(SlurmLabError, subprocess.CalledProcessError):
    """A Slurm client command failed; also a CalledProcessError so callers can use either."""

    def __init__(self, cmd: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        subprocess.CalledProcessError.__init__(self, returncode, list(cmd), stdout, stderr)

    def __str__(self) -> str:
        detail = (self.stderr or self.stdout or "").strip()
        return f"`{shlex.join(self.cmd)}` exited {self.returncode}: {detail}"


@dataclass(frozen=True)
class SlurmLabConfig:
    """Shape of the fake cluster. Paths are made absolute (slurm.conf needs absolute paths)."""

    lab_dir: Path = dataclasses.field(default_factory=default_lab_dir)
    etc_dir: Path | None = None  # None -> lab_dir / "etc"
    nodes: int = 8
    leaves: int = 2
    cpus: int = 4
    mem_mb: int = 2000
    gpus: int = 8
    ctld_port: int = 6817
    node_port0: int = 17000  # node nX listens on node_port0 + X
    slurmd_timeout_s: int = 60
    topology_conf: str | None = None  # written verbatim instead of the generated tree
    extra_conf: str = ""  # appended to slurm.conf (a later key overrides an earlier one)
    cluster_name: str = "lab"
    restd: bool = False  # also start slurmrestd (JWT auth, unix socket) in start()
    # slurmdbd on a private MariaDB: sacct, AllocTRES with gres/gpu (accounting_storage/none
    # without it)
    accounting: bool = False
    dbd_port: int = 0  # 0 -> ctld_port + 2 (as 6817/6819 upstream)
    db_port: int = 0  # MariaDB's TCP port; 0 -> ctld_port + 3
    # (user, account) associations registered with sacctmgr; a user's first is its default
    associations: tuple[tuple[str, str], ...] = (("root", "physics"), ("nobody", "chemistry"))
    prolog: str = ""  # Prolog= program (absolute path), '' -> none
    epilog: str = ""  # Epilog= program (absolute path), '' -> none
    # Alloc: the Prolog runs when the job is allocated (Slurm's Start time), not at its first
    # step, so hook times and sacct's Start/End describe the same interval
    prolog_flags: str = "Alloc"
    # which Slurm: "22.05" (host), "24.11" (trixie root), "26.05" (sid root)
    version: str = HOST_VERSION
    # tree: topology/tree, leaf switches + spine; block: topology/block, one block per leaf
    # (BlockSizes=leaf size, all nodes); yaml: topology.yaml (25.05+) with a tree and a block
    # topology, the partition "main" on the tree and "blocks" on the block one
    topology: str = "tree"

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            raise ValueError(f"version {self.version!r}: known are {', '.join(VERSIONS)}")
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"topology {self.topology!r}: one of {', '.join(TOPOLOGIES)}")
        if self.topology == "block" and self.version == "22.05":
            raise ValueError("topology/block needs Slurm 23.11+ (version 24.11 or 26.05)")
        if self.topology == "yaml" and self.version in ("22.05", "24.11"):
            raise ValueError("topology.yaml needs Slurm 25.05+ (version 26.05)")
        lab_dir = Path(self.lab_dir).absolute()
        object.__setattr__(self, "lab_dir", lab_dir)
        etc = lab_dir / "etc" if self.etc_dir is None else Path(self.etc_dir).absolute()
        object.__setattr__(self, "etc_dir", etc)
        if self.nodes < 1 or not 1 <= self.leaves <= self.nodes:
            raise ValueError(f"need 1 <= leaves ({self.leaves}) <= nodes ({self.nodes})")
        if self.cpus < 1 or self.mem_mb < 1 or self.gpus < 0:
            raise ValueError("cpus and mem_mb must be >= 1, gpus >= 0")
        if self.node_port0 <= self.ctld_port <= self.node_port0 + self.nodes:
            raise ValueError("ctld_port collides with the slurmd port range")
        object.__setattr__(self, "dbd_port", self.dbd_port or self.ctld_port + 2)
        object.__setattr__(self, "db_port", self.db_port or self.ctld_port + 3)
        object.__setattr__(
            self, "associations", tuple((str(u), str(a)) for u, a in self.associations)
        )
        for what, path in (("prolog", self.prolog), ("epilog", self.epilog)):
            if path and not Path(path).is_absolute():
                raise ValueError(f"{what}={path!r}: slurmd needs an absolute path")
        if self.accounting:
            ports = {self.ctld_port, self.dbd_port, self.db_port}
            if len(ports) != 3 or any(
                self.node_port0 < p <= self.node_port0 + self.nodes for p in ports
            ):
                raise ValueError(
                    f"ctld_port {self.ctld_port}, dbd_port {self.dbd_port}, db_port "
                    f"{self.db_port} and the slurmd ports must all differ"
                )

    @property
    def etc(self) -> Path:
        """etc_dir after defaulting (typed as Path, which the field cannot be)."""
        assert self.etc_dir is not None  # set in __post_init__
        return self.etc_dir

    def to_json(self) -> str:
        """Saved in lab_dir so `down`/`status` (another process) know etc_dir and the shape."""
        return json.dumps(
            {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()},
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> SlurmLabConfig:
        """Inverse of to_json; unknown keys (from another harness version) are ignored."""
        raw: dict[str, Any] = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in names}
        for key in ("lab_dir", "etc_dir"):
            if kwargs.get(key) is not None:
                kwargs[key] = Path(kwargs[key])
        if "associations" in kwargs:  # JSON made the pairs lists
            kwargs["associations"] = tuple(tuple(pair) for pair in kwargs["associations"])
        return cls(**kwargs)
