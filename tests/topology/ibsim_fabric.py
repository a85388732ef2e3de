"""Runs the real `ibnetdiscover` (infiniband-diags) against a small fabric simulated by ibsim,
so the parser is tested on what the tool itself prints in each of its output forms.

The fabric is ours: two spines, two leaves, four hosts named in their node descriptions, one
host with the vendor's default description (no hostname), one dual-port host cabled to both
leaves, a switch whose description holds '#', one link trained at 1x and one at DDR.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.ci import unavailable

IN_CI = os.environ.get("CI", "").lower() == "true"
TOOLS = ("ibsim", "ibsim-run", "ibnetdiscover")

NET = """\
# gpufleet test fabric for the ibnetdiscover parser
speed=7
switchguid=0x0c42a10300200000
Switch\t8 "spine1"\t# "MF0;spine-1:MQM9790/U1" enhanced port 0 lid 1 lmc 0
[1]\t"leaf1"[5]
[2]\t"leaf2"[5]

Switch\t8 "spine2"\t# "Voltaire 4036 # 4036-8C5C" base port 0 lid 2 lmc 0
[1]\t"leaf1"[6]\tw=1
[2]\t"leaf2"[6]\ts=2

Switch\t8 "leaf1"\t# "MF0;leaf-1:MQM9790/U1" enhanced port 0 lid 3 lmc 0
[1]\t"gpu01"[1]
[2]\t"gpu02"[1]
[3]\t"dual"[1]
[5]\t"spine1"[1]
[6]\t"spine2"[1]\tw=1

Switch\t8 "leaf2"\t# "MF0;leaf-2:MQM9790/U1" enhanced port 0 lid 4 lmc 0
[1]\t"gpu03"[1]
[2]\t"nohost"[1]
[3]\t"dual"[2]
[5]\t"spine1"[2]
[6]\t"spine2"[2]\ts=2

caguid=0x0c42a10300100000
Hca\t1 "gpu01"\t# "gpu01 mlx5_0"
[1]\t"leaf1"[1]\t# lid 11 lmc 0

Hca\t1 "gpu02"\t# "gpu02 mlx5_0"
[1]\t"leaf1"[2]\t# lid 12 lmc 0

Hca\t1 "gpu03"\t# "gpu03 mlx5_0"
[1]\t"leaf2"[1]\t# lid 13 lmc 0

Hca\t1 "nohost"\t# "MT4129 ConnectX7   Mellanox Technologies"
[1]\t"leaf2"[2]\t# lid 14 lmc 0

Hca\t2 "dual"\t# "gpu04 HCA-1"
[1]\t"leaf1"[3]\t# lid 15 lmc 0
[2]\t"leaf2"[3]\t# lid 16 lmc 0
"""

# The output forms tried, by name -> ibnetdiscover arguments.
FORMS: dict[str, list[str]] = {
    "plain": [],
    "full": ["-f"],
    "show": ["-s"],
    "grouping": ["-g"],
    "grouping_show": ["-g", "-s"],
    "max_hops": ["-m"],
    "full_show": ["-f", "-s"],
    "ports": ["-p"],
    "ports_show": ["-p", "-s"],
    "list": ["-l"],
    "hca_list": ["-H"],
    "switch_list": ["-S"],
}


def require_tools() -> None:
    """Skip (locally) or fail (CI, where .ci/setup installs them) without ibsim."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        unavailable(f"{', '.join(missing)} not installed (Debian: apt-get install ibsim-utils "
                    "infiniband-diags)")


@contextmanager
def simulated_fabric(workdir: Path) -> Iterator[dict[str, str]]:
    """Start ibsim on NET; yield environment for `ibsim-run` clients; stop it."""
    net = workdir / "fabric.net"
    net.write_text(NET)
    # a socket name of our own, so parallel runs (other engineers, xdist) never meet
    env = {**os.environ, "IBSIM_SOCKNAME": f"gpufleet-{os.getpid()}-{time.monotonic_ns()}"}
    log = (workdir / "ibsim.log").open("w")
    sim = subprocess.Popen(["ibsim", "-s", "-n", str(net)], stdin=subprocess.DEVNULL,
                           stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 15
        while True:  # ibsim listens a moment after it starts
            probe = subprocess.run(["ibsim-run", "ibnetdiscover", "-l"], env=env,
                                   capture_output=True, text=True, timeout=30, check=False)
            if probe.returncode == 0 and "Switch" in probe.stdout:
                break
            if sim.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ibsim did not start: "
                                   + (workdir / "ibsim.log").read_text()[-2000:]
                                   + probe.stderr[-500:])
            time.sleep(0.2)
        yield env
    finally:
        sim.terminate()
        try:
            sim.wait(timeout=10)
        except subprocess.TimeoutExpired:
            sim.kill()
            sim.wait()
        log.close()


def discover(env: dict[str, str], args: list[str]) -> tuple[str, str]:
    """(stdout, stderr) of `ibnetdiscover ARGS` on the simulated fabric."""
    out = subprocess.run(["ibsim-run", "ibnetdiscover", *args], env=env, capture_output=True,
                         text=True, timeout=60, check=True)
    return out.stdout, out.stderr
