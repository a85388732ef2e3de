"""Helpers for the real-Slurm sbatch tests: a controller serving FleetUser.Place for the lab
and a client slurm.conf with gpufleet's cli_filter.lua (what a login node gets)."""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from gpufleet.rpc.v1 import fleet_pb2
from gpufleet.scheduler.cli.entry import filter_command
from gpufleet.scheduler.health.policy import PolicyConfig
from gpufleet.scheduler.placement.sources import SlurmViewSource
from gpufleet.scheduler.placement.switch_hold import DEFAULT_GRACE_S
from gpufleet.scheduler.service.server import Controller
from gpufleet.scheduler.slurm import CliSlurmClient
from gpufleet.scheduler.store import SqliteStore, VerdictRow, now_ms

from tests.scheduler.fakes import FakeSlurm
from tests.slurm.harness import SlurmLab
from tests.slurm.roots import HOST_VIEW

GPUFLEET = str(Path(sys.executable).with_name("gpufleet"))
LUA = Path(__file__).parents[2] / "scheduler/gpufleet/scheduler/data/cli_filter.lua"
# NVLink islands of a bridged PCIe box: pairs (0,1) (2,3) (4,5) (6,7)
PAIRS = [(0, 1), (2, 3), (4, 5), (6, 7)]


def _inventory(node: str) -> bytes:
    inv = fleet_pb2.NodeInventory(node_name=node, hostname=node)
    for i in range(8):
        inv.gpus.add(index=i, uuid=f"GPU-{node}-{i}")
        inv.gpu_nic_affinity.add(gpu_index=i, hca=f"mlx5_{i // 2}",
                                 pcie_relation=fleet_pb2.PCIE_RELATION_PIX)
    for a in range(8):
        for b in range(a + 1, 8):
            nv = 4 if (a, b) in PAIRS else 0
            inv.gpu_links.add(gpu_a=a, gpu_b=b, nvlink_count=nv,
                              pcie_relation=fleet_pb2.PCIE_RELATION_SYS)
    return inv.SerializeToString()


def write_store(path: Path, degraded: tuple[str, ...] = (),
                nodes: Sequence[str] = tuple(f"n{i}" for i in range(1, 9))) -> SqliteStore:
    store = SqliteStore(str(path))
    t = now_ms()
    for node in nodes:
        store.upsert_node(node, node, 8, _inventory(node), "inst-1", t)
        store.set_verdict(VerdictRow(node, "nvlink", None, "", "ok", "", "", t))
    for node in degraded:
        degrade(store, node)
    return store


def degrade(store: SqliteStore, node: str) -> None:
    """gpufleet's health calls node degraded (an IB port down-trained): Slurm does not know."""
    store.set_verdict(VerdictRow(node, "ib_port", None, "mlx5_0/1", "degraded", "ib_rate",
                                 "mlx5_0 port 1 at 200 Gb/s, expected 400", now_ms()))


def filter_argv(lab: SlurmLab | None = None) -> list[str]:
    """The helper command cli_filter.lua runs (GPUFLEET_FILTER): on the host's Slurm, what
    `gpufleet sbatch` hands it. A 24.11/26.05 lab's sbatch runs inside its root, where this
    Python and checkout are not: there the root's own python3 runs gpufleet's sources as the
    root sees them (the host's / at /host), as a login node runs its own gpufleet[client]
    (the helper needs only the standard library, munge and its own package)."""
    argv = shlex.split(filter_command())
    if lab is None or lab.root is None:
        return argv
    script = Path(argv[-1]).resolve()
    return ["/usr/bin/python3", "-I", "-S", f"{HOST_VIEW}{script}"]


def lab_client_conf(lab: SlurmLab, where: Path) -> Path:
    """A client copy of the lab's etc dir: slurm.conf + CliFilterPlugins=cli_filter/lua and
    gpufleet's cli_filter.lua next to it (what the Ansible login-node role installs)."""
    where.mkdir(parents=True, exist_ok=True)
    for f in lab.conf_path.parent.iterdir():
        if f.name not in {"slurm.conf", "cli_filter.lua"} and not (where / f.name).exists():
            (where / f.name).symlink_to(f)
    (where / "slurm.conf").write_text(lab.conf_path.read_text()
                                      + "\nCliFilterPlugins=cli_filter/lua\n")
    (where / "cli_filter.lua").write_text(LUA.read_text())
    return where / "slurm.conf"


class Placed:
    """A controller serving FleetUser.Place for the lab, and the client environment."""

    def __init__(self, lab: SlurmLab, tmp: Path, degraded: tuple[str, ...] = (),
                 switch_hold_grace_s: float | None = None) -> None:
        """`switch_hold_grace_s`: run the controller with switch holds (--switch-holds) and
        this grace; None: without (the default)."""
        self.lab = lab
        self.store = write_store(tmp / "state.db", degraded, lab.node_names)
        slurm = CliSlurmClient(env=lab.env(), timeout_s=5)  # as the controller's view source
        self.ctl_view_source = SlurmViewSource(slurm, 5)  # what `gpufleet controller` uses
        # no agent reports here: the stored verdicts stand for agents that do. With the
        # policy's 30 s of silence every node turned unreachable mid-trace and Place then
        # avoided nothing (bench/placement_vs_slurm.py --fill: traces of 88 s)
        self.ctl = Controller(self.store, FakeSlurm(list(lab.node_names)),
                              listen="127.0.0.1:0", user_view_source=self.ctl_view_source,
                              policy=PolicyConfig(unreachable_after_s=24 * 3600.0),
                              switch_holds_slurm=slurm if switch_hold_grace_s is not None
                              else None,
                              switch_hold_grace_s=switch_hold_grace_s or DEFAULT_GRACE_S)
        self.ctl.start()
        self.conf = lab_client_conf(lab, tmp / "client-etc")
        (tmp / "client.toml").write_text(
            f'controller = "127.0.0.1:{self.ctl.port}"\ninsecure = true\n')
        self.client_toml = tmp / "client.toml"

    def env(self, **extra: str) -> dict[str, str]:
        env = self.lab.env()
        env.update(SLURM_CONF=str(self.conf), GPUFLEET_CLIENT_CONFIG=str(self.client_toml))
        env.pop("GPUFLEET_FILTER", None)
        if self.lab.root is not None:  # `gpufleet sbatch` keeps one it is given
            env["GPUFLEET_FILTER"] = shlex.join(filter_argv(self.lab))
        env.update(extra)
        return env

    def close(self) -> None:
        self.ctl.stop(grace_s=0.2)
        self.store.close()




@pytest.fixture
def placed(clean_slurm_lab: SlurmLab,
           tmp_path: Path) -> Iterator[Callable[..., Placed]]:
    made: list[Placed] = []

    def make(degraded: tuple[str, ...] = (),
             switch_hold_grace_s: float | None = None) -> Placed:
        for p in made:
            p.close()
        made.clear()
        made.append(Placed(clean_slurm_lab, tmp_path / f"p{time.monotonic_ns()}", degraded,
                           switch_hold_grace_s))
        return made[-1]

    yield make
    for p in made:
        p.close()
