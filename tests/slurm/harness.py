"""A real single-machine Slurm cluster for tests (22.05 from the host, 24.11/26.05 from a root).

`version` picks the Slurm: "22.05" runs the host's Debian bookworm packages; "24.11" and
"26.05" run every daemon and client command inside a Debian root built by
.ci/slurm-root.sh (see roots.py: chroot, bind mounts recorded and undone on stop).

Why a real Slurm: the controller's Slurm adapter parses `sinfo --json`, `scontrol show ...` and
drives drain/resume/requeue; fakes drift from what 22.05 actually prints. This module starts
munged (only if none works), one slurmctld and N `slurmd -N nX` daemons on distinct ports, with
fake GPU GRES backed by dummy character devices and a topology/tree of leaf switches + a spine.
With `accounting=True` it also starts its own MariaDB server (own datadir, socket, port and pid
file under lab_dir; never the system service) and its own slurmdbd, and registers the cluster,
accounts and users with `sacctmgr`. `prolog`/`epilog` name Prolog=/Epilog= programs
(`write_gpufleet_hooks()` writes ones that run `gpufleet-agent prolog|epilog` per node).

All runtime state lives under `lab_dir`; configs go to `etc_dir` (never /etc/slurm), so client
commands need SLURM_CONF: use `lab.env()` or `lab.run(...)`.

Code that runs Slurm commands itself (gpufleet's CLI Slurm client) gets wrappers with the
lab's SLURM_CONF (and chroot) from `lab.client_bin_dir()`: put it first on PATH.

CLI:  python tests/slurm/harness.py up [--lab DIR] [--nodes N] [--version V] | down | status
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script (python tests/slurm/harness.py): run the package module
    import runpy

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    runpy.run_module("tests.slurm.harness", run_name="__main__", alter_sys=True)
    raise SystemExit(0)

import argparse
import logging
from collections.abc import Sequence

from .daemons import Daemons
from .host import HostSetup
from .labconfig import SlurmCommandError, SlurmLabConfig, SlurmLabError, default_lab_dir
from .queries import Queries
from .slurmconf import SlurmConf, write_gpufleet_hooks
from .slurmdbd import Accounting
from .slurmrestd import Restd

__all__ = [
    "SlurmCommandError",
    "SlurmLab",
    "SlurmLabConfig",
    "SlurmLabError",
    "default_lab_dir",
    "write_gpufleet_hooks",
]


class SlurmLab(Daemons, HostSetup, Accounting, Restd, SlurmConf, Queries):
    """Start/stop/query one lab cluster. Needs root (daemons, mknod, munge key, /etc/hosts).

    One mixin per daemon or concern, over labcore.LabCore: see that module's docstring."""


# ---------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """up / down / status, for poking at the lab by hand."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a fresh lab and leave it running")
    down = sub.add_parser("down", help="stop the lab in --lab")
    status = sub.add_parser("status", help="daemons and sinfo of the lab in --lab")
    for p in (up, down, status):
        p.add_argument("--lab", type=Path, default=None, help="lab dir (default %(default)s)")
    up.add_argument("--nodes", type=int, default=8)
    up.add_argument("--leaves", type=int, default=2)
    up.add_argument("--timeout", type=float, default=90)
    up.add_argument("--port", type=int, default=6817, help="slurmctld port (slurmdbd +2, DB +3)")
    up.add_argument("--accounting", action="store_true", help="slurmdbd on a private MariaDB")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="[slurmlab %(relativeCreated)6.0fms] %(message)s"
    )
    lab_dir: Path = args.lab or default_lab_dir()
    try:
        if args.cmd == "up":
            lab = SlurmLab(SlurmLabConfig(
                lab_dir=lab_dir, nodes=args.nodes, leaves=args.leaves, ctld_port=args.port,
                node_port0=args.port + 10183, accounting=args.accounting))
            lab.start(timeout_s=args.timeout)
            print(f"export SLURM_CONF={lab.conf_path}")
        elif args.cmd == "down":
            SlurmLab.from_lab_dir(lab_dir).stop()
        else:
            lab = SlurmLab.from_lab_dir(lab_dir)
            for daemon, pid in lab.status().items():
                print(f"{daemon:16} {pid if pid else 'not running'}")
            if lab.ctld_alive():
                print(lab.run("sinfo", "-N", "-o", "%N %T %G %E", check=False).stdout, end="")
            print(f"export SLURM_CONF={lab.conf_path}")
    except SlurmLabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
