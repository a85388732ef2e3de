"""Each extra in its own bare virtual environment, as a machine of that kind installs it:
every command's `--help` works, one documented command per extra runs, and nothing prints a
traceback (a command whose extra is missing says which one to install, in one line).

Slow (a wheel, a download into a local wheel cache, four venvs): marked `slow`. The wheels of
the dependencies come from `pip download` into GPUFLEET_WHEEL_CACHE (default
~/.cache/gpufleet-tests/wheels); the installs themselves are `--no-index` from that folder.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

CACHE = Path(os.environ.get("GPUFLEET_WHEEL_CACHE")
             or Path.home() / ".cache" / "gpufleet-tests" / "wheels")


def _run(argv: list[str], timeout: float = 300, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,  # type: ignore[call-overload]
                          check=False, **kw)


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
              "-w", str(out), str(REPO)])
    assert r.returncode == 0, r.stderr
    (whl,) = out.glob("gpufleet-*.whl")
    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"\nextras: pip download of the dependencies into {CACHE} ...", flush=True)
    r = _run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
              "-d", str(CACHE), f"{whl}[agent,client,controller]"], timeout=600)
    assert r.returncode == 0, f"pip download failed (no index reachable?):\n{r.stderr[-2000:]}"
    for old in CACHE.glob("gpufleet-*.whl"):
        old.unlink()  # only the wheel of this tree
    (CACHE / whl.name).write_bytes(whl.read_bytes())
    return CACHE


def _venv(root: Path, extra: str, wheelhouse: Path) -> Path:
    venv = root / (extra or "plain")
    r = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    assert r.returncode == 0, r.stderr
    spec = f"gpufleet[{extra}]" if extra else "gpufleet"
    print(f"extras: installing {spec} into a bare venv ...", flush=True)
    r = _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
              "-q", "--disable-pip-version-check", "--no-index", "--find-links", str(wheelhouse),
              spec])
    assert r.returncode == 0, r.stderr
    return venv


def _commands(venv: Path, prog: str, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path under `prog`, from the "Commands:" sections of --help."""
    # sbatch and place hand --help to the real sbatch (a drop-in), which needs a Slurm
    # config this machine may lack; gpufleet's own help for them is --gpufleet-help
    flag = "--gpufleet-help" if prog == "gpufleet" and path in {("sbatch",), ("place",)} \
        else "--help"
    r = _run([str(venv / "bin" / prog), *path, flag], timeout=60)
    assert r.returncode == 0 and "Traceback" not in r.stdout + r.stderr, (path, r.stderr)
    found = [path]
    if "Commands:" in r.stdout:
        for line in r.stdout.split("Commands:", 1)[1].splitlines():
            m = re.match(r"^  (\S+)", line)
            if m:
                found += _commands(venv, prog, (*path, m.group(1)))
    return found


def _no_traceback(r: subprocess.CompletedProcess[str]) -> str:
    out = r.stdout + r.stderr
    assert "Traceback" not in out and "Error" not in out.replace("Error:", ""), out
    return out


EXTRAS = ["", "agent", "client", "controller"]


@pytest.mark.parametrize("extra", EXTRAS)
def test_extra_in_a_bare_venv(extra: str, wheelhouse: Path, tmp_path: Path) -> None:
    venv = _venv(tmp_path, extra, wheelhouse)
    bin_ = venv / "bin"
    helps = _commands(venv, "gpufleet") + _commands(venv, "gpufleet-agent")
    assert len(helps) > 20, helps  # every command's --help ran (checked in _commands)
    env = {**os.environ, "HOME": str(tmp_path), "GPUFLEET_CA_DIR": str(tmp_path / "ca")}

    # a command of another machine's extra: one line naming the extra, no traceback
    if extra in ("", "agent", "client"):
        r = _run([str(bin_ / "gpufleet"), "certs", "init", "--ca-dir", str(tmp_path / "ca")],
                 env=env)
        out = _no_traceback(r)
        assert r.returncode == 1 and "pip install 'gpufleet[controller]'" in out, out
    if extra in ("", "client", "controller"):
        r = _run([str(bin_ / "gpufleet-agent"), "collect", "--gpu-backend", "simulated",
                  "--state-dir", str(tmp_path / "agent")], env=env)
        out = _no_traceback(r)
        assert r.returncode == 1 and "'gpufleet[agent]'" in out, out

    if extra == "agent":  # the documented node command: read once and print, write nothing
        state = tmp_path / "agent-state"
        r = _run([str(bin_ / "gpufleet-agent"), "collect", "--gpu-backend", "simulated",
                  "--sim-profile", "dgx-h100", "--state-dir", str(state)], env=env)
        out = _no_traceback(r)
        assert r.returncode == 0 and "8 GPU(s)" in out, out
        assert not state.exists() or list(state.iterdir()) == [], list(state.rglob("*"))
    elif extra == "client":  # a login node: sbatch/place/acct run (here: no controller)
        r = _run([str(bin_ / "gpufleet"), "acct", "--controller", "127.0.0.1:9", "--insecure",
                  "-S", "2026-11-01"], env=env)
        out = _no_traceback(r)
        assert r.returncode != 0 and "127.0.0.1:9" in out and "pip install" not in out, out
        r = _run([str(bin_ / "python"), "-c", "import psycopg"])
        assert r.returncode != 0  # no database driver on a login node
    elif extra == "controller":  # the README's certificate lines (CA dir: GPUFLEET_CA_DIR)
        r = _run([str(bin_ / "gpufleet"), "demo", "--slurm", "none"], env=env, timeout=60)
        out = _no_traceback(r)  # its agents need the agent extra: said at once, not after 30 s
        assert r.returncode == 1 and "'gpufleet[agent,controller]'" in out, out
        r = _run(["sh", "-c", "gpufleet certs init && "
                  "gpufleet certs issue head1 --role controller && ls"],
                 env={**env, "PATH": f"{bin_}:{os.environ['PATH']}"}, cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        _no_traceback(r)
