"""`gpufleet sbatch` before sbatch runs: what it tells cli_filter.lua, and the launcher that
starts it without site (entry.launcher, what the login-node role installs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from gpufleet.scheduler.cli.entry import launcher, sbatch_argv

# a fake sbatch: prints what the real one would get
FAKE_SBATCH = '#!/bin/sh\necho "PLACE=$GPUFLEET_PLACE ARGS=$*"\n'


def test_placement_off_without_a_controller_configured(tmp_path: Path) -> None:
    conf = tmp_path / "client.toml"
    env = {"GPUFLEET_CLIENT_CONFIG": str(conf)}
    assert sbatch_argv(["-N1", "x.sh"], env) == ["sbatch", "-N1", "x.sh"]
    assert env["GPUFLEET_PLACE"] == "0"  # no file, no variable: the lua starts no helper
    conf.write_text('controller = "head:50051"\n')
    env = {"GPUFLEET_CLIENT_CONFIG": str(conf)}
    sbatch_argv(["x.sh"], env)
    assert env["GPUFLEET_PLACE"] == "1"
    env = {"GPUFLEET_CLIENT_CONFIG": str(tmp_path / "none"), "GPUFLEET_CONTROLLER": "h:1"}
    sbatch_argv(["x.sh"], env)
    assert env["GPUFLEET_PLACE"] == "1"
    env = {"GPUFLEET_CLIENT_CONFIG": str(conf)}
    sbatch_argv(["--gpufleet-no-place", "x.sh"], env)
    assert env["GPUFLEET_PLACE"] == "0"
    env = {"GPUFLEET_CLIENT_CONFIG": str(tmp_path / "none")}
    sbatch_argv(["--gpufleet-ckpt", "/ck", "x.sh"], env)  # the lua still runs the helper
    assert env["GPUFLEET_PLACE"] == "0" and env["GPUFLEET_CKPT_DIR"] == "/ck"


def _launcher(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    exe = tmp_path / "gpufleet"
    exe.write_text(launcher(sys.executable))
    exe.chmod(0o755)
    conf = tmp_path / "client.toml"
    conf.write_text('controller = "head:50051"\n')
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "GPUFLEET_CLIENT_CONFIG": str(conf)}
    return exe, env


def test_launcher_execs_sbatch_having_imported_only_the_entry(tmp_path: Path) -> None:
    exe, env = _launcher(tmp_path)
    p = subprocess.run([str(exe), "sbatch", "--gpufleet-verbose", "-N", "2", "--wrap", "a b"],
                       env=env, capture_output=True, text=True, check=False, timeout=60)
    assert (p.returncode, p.stdout) == (0, "PLACE=1 ARGS=-N 2 --wrap a b\n"), p.stderr
    # as its shebang runs it (-IS), with -X importtime: nothing but the entry module
    p = subprocess.run([sys.executable, "-X", "importtime", "-I", "-S", str(exe), "sbatch",
                        "--gpufleet-no-place", "x.sh"],
                       env=env, capture_output=True, text=True, check=False, timeout=60)
    assert p.stdout == "PLACE=0 ARGS=x.sh\n", p.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in p.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "gpufleet.scheduler.cli.entry" in imported
    assert not imported & {"site", "typing", "collections", "re", "click", "json"}


def test_launcher_runs_every_other_command(tmp_path: Path) -> None:
    exe, env = _launcher(tmp_path)
    p = subprocess.run([str(exe), "--help"], env=env, capture_output=True, text=True,
                       check=False, timeout=60)
    assert p.returncode == 0 and "sbatch" in p.stdout, p.stderr
