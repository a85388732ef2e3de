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


def _launcher(tmp_path: Path) -> tuple[Path, dict[str, str], Path]:
    """The launcher as the login role writes it, with a fake sbatch on PATH and a python
    that leaves a mark when it starts (and runs under -X importtime)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    mark = tmp_path / "python-started"
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\necho >>{mark}\nexec {sys.executable} -X importtime "$@"\n')
    python.chmod(0o755)
    exe = tmp_path / "gpufleet"
    exe.write_text(launcher(str(python)))
    exe.chmod(0o755)
    conf = tmp_path / "client.toml"
    conf.write_text('controller = "head:50051"\n')
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "GPUFLEET_CLIENT_CONFIG": str(conf)}
    return exe, env, mark


def _run(exe: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(exe), *args], env=env, capture_output=True, text=True,
                          check=False, timeout=60)


def test_launcher_execs_sbatch_having_imported_only_the_entry(tmp_path: Path) -> None:
    exe, env, mark = _launcher(tmp_path)
    p = _run(exe, env, "sbatch", "--gpufleet-verbose", "-N", "2", "--wrap", "a b")
    assert (p.returncode, p.stdout) == (0, "PLACE=1 ARGS=-N 2 --wrap a b\n"), p.stderr
    assert mark.exists()  # placement on: the entry runs in Python, without site
    imported = {line.rsplit("|", 1)[1].strip() for line in p.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "gpufleet.scheduler.cli.entry" in imported
    assert not imported & {"site", "typing", "collections", "re", "click", "json"}


def test_launcher_is_plain_sbatch_without_python_when_placement_is_off(tmp_path: Path) -> None:
    exe, env, mark = _launcher(tmp_path)
    p = _run(exe, env, "sbatch", "--gpufleet-no-place", "-J", "a b", "x.sh", "--gpufleet-x")
    assert p.stdout == "PLACE=0 ARGS=-J a b x.sh --gpufleet-x\n", p.stderr
    none = {**env, "GPUFLEET_CLIENT_CONFIG": str(tmp_path / "none.toml")}
    p = _run(exe, none, "sbatch", "-N1", "x.sh")  # no controller configured
    assert p.stdout == "PLACE=0 ARGS=-N1 x.sh\n", p.stderr
    p = _run(exe, none, "sbatch")  # the script on stdin
    assert p.stdout == "PLACE=0 ARGS=\n", p.stderr
    assert not mark.exists()  # the shell exec'd sbatch itself
    # what the shell does not judge goes to Python, which answers as before
    p = _run(exe, none, "sbatch", "--gpufleet-no-place", "--gpufleet-verbose", "x.sh")
    assert p.stdout == "PLACE=0 ARGS=x.sh\n", p.stderr
    p = _run(exe, {**none, "GPUFLEET_CONTROLLER": "h:1"}, "sbatch", "x.sh")
    assert p.stdout == "PLACE=1 ARGS=x.sh\n", p.stderr
    p = _run(exe, none, "sbatch", "--gpufleet-bogus", "x.sh")
    assert p.returncode == 2 and "unknown gpufleet option --gpufleet-bogus" in p.stderr
    assert mark.exists()


def test_launcher_without_sbatch_says_so_in_one_line(tmp_path: Path) -> None:
    exe, env, _mark = _launcher(tmp_path)
    (tmp_path / "bin" / "sbatch").unlink()
    env = {**env, "GPUFLEET_CLIENT_CONFIG": str(tmp_path / "none.toml"),
           "PATH": f"{tmp_path / 'bin'}:/nonexistent"}
    p = _run(exe, env, "sbatch", "--gpufleet-no-place", "x.sh")
    errors = [line for line in p.stderr.splitlines() if not line.startswith("import time:")]
    assert p.returncode == 127 and len(errors) == 1 and "cannot run sbatch" in errors[0]


def test_launcher_runs_every_other_command(tmp_path: Path) -> None:
    exe, env, _mark = _launcher(tmp_path)
    p = _run(exe, env, "--help")
    assert p.returncode == 0 and "sbatch" in p.stdout, p.stderr
