"""The real rollout: `ansible-playbook site.yml` against two hosts on this machine.

Each host is `ansible_connection=local` with its own install root (head1/ and gpu01/ under a
temporary prefix), so every task really runs: the package goes from a wheel built here into a
virtual environment, config files are written and checked, certificates are issued, units
are installed. Then the second run must report changed=0, `systemd-analyze verify` must pass
on the installed units, and the controller and the agent are started from what was installed
(the units' ExecStart lines, the installed config files) until the agent is registered.

Dependencies: the roles install gpufleet itself from the wheel (`--no-deps`); the third-party
libraries come from the repository's .venv through a .pth file in the staged venvs, so the
test needs no package index.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.support.net import free_port

ANSIBLE_DIR = REPO / "ansible"
pytestmark = [
    pytest.mark.skipif(shutil.which("ansible-playbook") is None,
                       reason="ansible is not installed (.ci/setup)"),
    pytest.mark.slow,  # two playbook runs: minutes
]



def _base_python() -> str:
    """The interpreter .venv was made from: same ABI as the libraries the .pth points at."""
    exe = getattr(sys, "_base_executable", sys.executable)
    return str(Path(exe).resolve())


def _stage_venv(venv: Path) -> None:
    subprocess.run([_base_python(), "-m", "venv", "--without-pip", str(venv)], check=True)
    # pip for the role's pip module, from this venv's pip (no network)
    (site,) = venv.glob("lib/python*/site-packages")
    here = Path(sysconfig.get_paths()["purelib"])
    (site / "zz_deps_from_repo_venv.pth").write_text(f"{here}\n")
    pip = venv / "bin" / "pip"
    pip.write_text(f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom pip._internal.cli.main "
                   "import main\nsys.exit(main())\n")
    pip.chmod(0o755)


@pytest.fixture(scope="module")
def rollout(tmp_path_factory: pytest.TempPathFactory,
            progress: Callable[[str], None]) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("rollout")
    progress("site.yml: building the wheel and staging two venvs (head1, gpu01) ...")
    wheel_dir = tmp / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheel_dir), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = wheel_dir.glob("gpufleet-*.whl")
    prefix = tmp / "prefix"
    for host in ("head1", "gpu01"):
        _stage_venv(prefix / host / "opt" / "gpufleet" / "venv")
    grpc_port, metrics_port = free_port(), free_port()
    rules = tmp / "extra-alerts.yml"
    rules.write_text(
        "groups:\n  - name: site\n    rules:\n      - alert: GpufleetSiteTest\n"
        "        expr: up{job=\"gpufleet-agent\"} == 0\n        for: 1m\n"
    )
    certs_cmd = f"{sys.executable} -m gpufleet.scheduler.cli.certs"
    common = {
        "ansible_connection": "local",
        "ansible_python_interpreter": "/usr/bin/python3",
        "ansible_become": False,  # already root; no sudo on a bare machine
    }
    inventory = {
        "gpufleet_controller": {"hosts": {"head1": {
            **common,
            "gpufleet_controller_root": str(prefix / "head1"),
            "gpufleet_controller_wheel": str(wheel),
            "gpufleet_controller_python": _base_python(),
            "gpufleet_controller_pip_extra_args": "--no-deps --no-index",
            "gpufleet_controller_user": "root",
            "gpufleet_controller_group": "root",
            "gpufleet_controller_manage_service": False,
            "gpufleet_controller_listen": f"127.0.0.1:{grpc_port}",
            "gpufleet_controller_slurm": "none",
            "gpufleet_controller_tls_ca_dir": str(tmp / "ca"),
            "gpufleet_controller_tls_extra_sans": ["127.0.0.1"],  # what the agent dials
            "gpufleet_controller_certs_command": certs_cmd,
        }}},
        "gpufleet_agents": {"hosts": {"gpu01": {
            **common,
            "gpufleet_agent_root": str(prefix / "gpu01"),
            "gpufleet_agent_wheel": str(wheel),
            "gpufleet_agent_python": _base_python(),
            "gpufleet_agent_pip_extra_args": "--no-deps --no-index",
            "gpufleet_agent_user": "root",
            "gpufleet_agent_group": "root",
            "gpufleet_agent_create_user": False,
            "gpufleet_agent_supplementary_groups": [],
            "gpufleet_agent_manage_service": False,
            "gpufleet_agent_controller": f"127.0.0.1:{grpc_port}",
            "gpufleet_agent_gpu_backend": "simulated",
            "gpufleet_agent_expected_gpu_count": 8,
            "gpufleet_agent_metrics_listen": f"127.0.0.1:{metrics_port}",
            "gpufleet_agent_disk_paths": [str(tmp)],
            "gpufleet_agent_debounce": {"thermal": 5},
            "gpufleet_agent_slurm_healthcheck": True,
            "gpufleet_agent_tls_ca_dir": str(tmp / "ca"),
            "gpufleet_agent_certs_command": certs_cmd,
        }}},
        "all": {"vars": {"gpufleet_controller_alert_rules_files": [str(rules)]}},
    }
    inv_path = tmp / "inventory.json"
    inv_path.write_text(json.dumps(inventory))
    return {"tmp": tmp, "prefix": prefix, "inventory": inv_path, "grpc_port": grpc_port}


def _run_playbook(r: dict[str, object], *extra: str,
                  say: Callable[[str], None] | None = None,
                  what: str = "site.yml") -> subprocess.CompletedProcess[str]:
    """ansible-playbook; each PLAY/TASK line goes to `say` as it starts (runs take minutes)."""
    tmp = r["tmp"]
    assert isinstance(tmp, Path)
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_HOME": str(tmp / "ansible-home"),
           "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-tmp"), "ANSIBLE_RETRY_FILES_ENABLED": "0"}
    argv = ["ansible-playbook", "-i", str(r["inventory"]), "site.yml", *extra]
    t0 = time.monotonic()
    lines: list[str] = []
    with tempfile.TemporaryFile("w+") as err, subprocess.Popen(
            argv, cwd=ANSIBLE_DIR, env=env, stdout=subprocess.PIPE, stderr=err,
            text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if say is not None and line.startswith(("PLAY [", "TASK [", "PLAY RECAP")):
                title = line.strip(" *\n")
                say(f"{what} at {time.monotonic() - t0:5.1f} s: {title}")
            if time.monotonic() - t0 > 240:
                proc.kill()
                raise AssertionError(f"{what}: ansible-playbook ran over 240 s:\n"
                                     + "".join(lines[-40:]))
        code = proc.wait()
        err.seek(0)
        stderr = err.read()
    return subprocess.CompletedProcess(argv, code, "".join(lines), stderr)


def _playbook(r: dict[str, object], say: Callable[[str], None] | None = None,
              what: str = "site.yml") -> str:
    proc = _run_playbook(r, say=say, what=what)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    return proc.stdout


def _recap(stdout: str) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for m in re.finditer(r"^(\S+)\s+:\s+(ok=.*)$", stdout, re.MULTILINE):
        out[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
    return out


def _exec_start(unit: Path) -> list[str]:
    (line,) = [ln for ln in unit.read_text().splitlines() if ln.startswith("ExecStart=")]
    return shlex.split(line.removeprefix("ExecStart="))


@pytest.fixture(scope="module")
def applied(rollout: dict[str, object], progress: Callable[[str], None]) -> dict[str, object]:
    t0 = time.monotonic()
    first = _recap(_playbook(rollout, progress, "site.yml, first run"))
    t1 = time.monotonic()
    second_out = _playbook(rollout, progress, "site.yml, second run")
    second = _recap(second_out)
    return {**rollout, "first": first, "second": second, "second_out": second_out,
            "first_s": t1 - t0, "second_s": time.monotonic() - t1}


def test_first_run_changes_second_run_changes_nothing(applied, report_figure) -> None:
    first, second = applied["first"], applied["second"]
    assert set(first) == set(second) == {"head1", "gpu01"}
    assert first["head1"]["changed"] > 5 and first["gpu01"]["changed"] > 5
    for host, counts in second.items():
        assert counts["changed"] == 0, (host, counts, applied["second_out"][-4000:])
        assert counts["failed"] == 0 and counts["unreachable"] == 0
    report_figure(
        f"site.yml rollout: run 1 {applied['first_s']:.1f} s changed="
        f"{first['head1']['changed']}+{first['gpu01']['changed']}; run 2 "
        f"{applied['second_s']:.1f} s changed={second['head1']['changed']}+"
        f"{second['gpu01']['changed']} (head1+gpu01)"
    )


def test_installed_files_and_modes(applied) -> None:
    prefix = applied["prefix"]
    agent_etc, head_etc = prefix / "gpu01/etc/gpufleet", prefix / "head1/etc/gpufleet"
    assert (agent_etc / "tls/agent.key").stat().st_mode & 0o777 == 0o600
    assert (head_etc / "tls/controller.key").stat().st_mode & 0o777 == 0o600
    assert (agent_etc / "tls/ca.crt").read_bytes() == (head_etc / "tls/ca.crt").read_bytes()
    toml = (agent_etc / "agent.toml").read_text()
    assert 'node_name = "gpu01"' in toml and "[debounce]\nthermal = 5" in toml
    snippet = (prefix / "gpu01/etc/slurm/gpufleet-healthcheck.conf").read_text()
    assert f"HealthCheckProgram={prefix}/gpu01/usr/local/sbin/gpufleet-healthcheck" in snippet
    prom = prefix / "head1/etc/prometheus/gpufleet"
    assert "gpu01:9835" in (prom / "gpufleet-agents.targets.yml").read_text()
    assert (prom / "extra-alerts.yml").exists()
    # the prolog/epilog hooks are off by default: `gpufleet-agent prolog` does not exist yet
    assert not (prefix / "gpu01/etc/slurm/prolog.d").exists()


def test_bad_config_is_refused_before_it_lands(applied) -> None:
    """The agent's own loader checks agent.toml before it replaces the old file."""
    toml = applied["prefix"] / "gpu01/etc/gpufleet/agent.toml"
    before = toml.read_bytes()
    proc = _run_playbook(applied, "--limit", "gpu01", "--tags", "config",
                         "-e", json.dumps({"gpufleet_agent_extra_config": {"bogus_key": 1}}))
    assert proc.returncode != 0
    assert "unknown key(s) bogus_key" in proc.stdout, proc.stdout[-3000:]
    assert toml.read_bytes() == before


def test_installed_units_verify_clean(applied) -> None:
    units = applied["prefix"]
    paths = [units / "gpu01/etc/systemd/system/gpufleet-agent.service",
             units / "gpu01/etc/systemd/system/gpufleet.slice",
             units / "head1/etc/systemd/system/gpufleet-controller.service"]
    proc = subprocess.run(["systemd-analyze", "verify", *map(str, paths)],
                          capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout == "", proc.stderr


@pytest.fixture
def daemons(applied) -> Iterator[dict[str, object]]:
    prefix = applied["prefix"]
    procs: list[subprocess.Popen[str]] = []
    try:
        ctl_cmd = _exec_start(prefix / "head1/etc/systemd/system/gpufleet-controller.service")
        agent_cmd = _exec_start(prefix / "gpu01/etc/systemd/system/gpufleet-agent.service")
        assert Path(ctl_cmd[0]).is_relative_to(prefix) and Path(agent_cmd[0]).is_relative_to(prefix)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET")}
        env.pop("NOTIFY_SOCKET", None)
        for cmd in (ctl_cmd, agent_cmd):
            procs.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
        yield {**applied, "procs": procs}
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                _, err = p.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate()
            assert "Traceback" not in err, err


def test_rolled_out_agent_registers_with_rolled_out_controller(daemons, report_figure,
                                                               progress) -> None:
    prefix = daemons["prefix"]
    gpufleet = prefix / "head1/opt/gpufleet/venv/bin/gpufleet"
    db = prefix / "head1/var/lib/gpufleet/state.db"
    t0 = time.monotonic()
    nodes: list[dict[str, object]] = []
    progress("site.yml: waiting (up to 60 s) for the rolled-out agent to register ...")
    while time.monotonic() - t0 < 60:
        for p in daemons["procs"]:
            assert p.poll() is None, p.communicate()[1][-3000:]
        if db.exists():
            proc = subprocess.run([str(gpufleet), "nodes", "--db", str(db), "--json"],
                                  capture_output=True, text=True, check=False, timeout=30)
            if proc.returncode == 0:
                nodes = json.loads(proc.stdout)
                if nodes:
                    break
        time.sleep(0.5)
    assert [(n["name"], n["gpus"]) for n in nodes] == [("gpu01", 8)], nodes
    # the agent wrote its health cache where the unit lets it write; the Slurm health-check
    # wrapper the role installed reads it
    assert (prefix / "gpu01/var/lib/gpufleet-agent/health.json").exists()
    report_figure(f"rolled-out agent registered after {time.monotonic() - t0:.1f} s")
