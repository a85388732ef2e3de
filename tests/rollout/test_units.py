"""The unit files in systemd/: what the roles render with their defaults, `systemd-analyze
verify` clean, hardening as promised, exposure scores measured; ansible-lint clean."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

UNITS = REPO / "systemd"
ANSIBLE_DIR = REPO / "ansible"
SERVICES = ("gpufleet-agent.service", "gpufleet-controller.service")
needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze missing (.ci/setup installs systemd)")
needs_ansible = pytest.mark.skipif(shutil.which("ansible-playbook") is None,
                                   reason="ansible missing (.ci/setup installs it)")


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


@needs_systemd
def test_units_verify_clean(tmp_path: Path) -> None:
    """Offline verify: ExecStart must name an existing executable, so the venv path is pointed
    at a stand-in; everything else is checked as shipped. Warnings count as failures."""
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    for exe in ("gpufleet", "gpufleet-agent"):
        (venv_bin / exe).write_text("#!/bin/sh\n")
        (venv_bin / exe).chmod(0o755)
    paths = []
    for unit in (*SERVICES, "gpufleet.slice"):
        text = (UNITS / unit).read_text().replace("/opt/gpufleet/venv", str(tmp_path / "venv"))
        (tmp_path / unit).write_text(text)
        paths.append(str(tmp_path / unit))
    proc = subprocess.run(["systemd-analyze", "verify", *paths], capture_output=True,
                          text=True, check=False, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


@needs_systemd
def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a typo in a directive and a missing binary are reported."""
    unit = tmp_path / "gpufleet-agent.service"
    unit.write_text((UNITS / "gpufleet-agent.service").read_text()
                    .replace("NoNewPrivileges=yes", "NoNewPrivilege=yes"))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, check=False, timeout=60)
    assert "Unknown key 'NoNewPrivilege'" in proc.stderr
    assert "is not executable" in proc.stderr


def test_hardening_directives() -> None:
    for name in SERVICES:
        d = _directives((UNITS / name).read_text())
        for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                           ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
                           ("Restart", "on-failure"), ("Type", "notify")):
            assert d[key] == [value], (name, key)
        assert d["User"] != ["root"]
        assert "CapabilityBoundingSet" in d
    agent = _directives((UNITS / "gpufleet-agent.service").read_text())
    assert agent["CapabilityBoundingSet"] == ["CAP_SYSLOG"]  # /dev/kmsg under dmesg_restrict
    assert agent["Slice"] == ["gpufleet.slice"]
    assert agent["StateDirectory"] == ["gpufleet-agent"]
    ctl = _directives((UNITS / "gpufleet-controller.service").read_text())
    assert ctl["CapabilityBoundingSet"] == [""] and ctl["StateDirectory"] == ["gpufleet"]
    slice_ = _directives((UNITS / "gpufleet.slice").read_text())
    assert slice_["CPUQuota"] == ["25%"] and slice_["MemoryMax"] == ["256M"]


@needs_systemd
@pytest.mark.parametrize("unit", SERVICES)
def test_security_exposure(unit: str, report_figure) -> None:
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(UNITS / unit)],
                          capture_output=True, text=True, check=False, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    exposure = float(m.group(1))
    report_figure(f"systemd-analyze security --offline=yes {unit}: {exposure} {m.group(2)}")
    assert exposure <= 2.5  # "OK" band is below 4.0; these units sit well inside it


@needs_ansible
def test_roles_render_the_shipped_units(tmp_path: Path) -> None:
    """systemd/ holds what the roles install with their defaults: the two never drift."""
    playbook = tmp_path / "render.yml"
    tasks = []
    for role, templates in (("gpufleet_agent", ("gpufleet-agent.service", "gpufleet.slice")),
                            ("gpufleet_controller", ("gpufleet-controller.service",))):
        tasks.append({"name": f"Load {role} defaults", "ansible.builtin.include_vars":
                      str(ANSIBLE_DIR / "roles" / role / "defaults" / "main.yml")})
        tasks.extend({"name": f"Render {t}", "ansible.builtin.template": {
            "src": str(ANSIBLE_DIR / "roles" / role / "templates" / f"{t}.j2"),
            "dest": str(tmp_path / t), "mode": "0644"}} for t in templates)
    playbook.write_text(json.dumps([{"name": "Render", "hosts": "localhost",
                                     "gather_facts": False, "tasks": tasks}]))
    proc = subprocess.run(["ansible-playbook", "-i", "localhost,", "-c", "local",
                           str(playbook)], capture_output=True, text=True, check=False,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    for unit in (*SERVICES, "gpufleet.slice"):
        assert (tmp_path / unit).read_text() == (UNITS / unit).read_text(), unit


@needs_ansible
@pytest.mark.slow  # ~5-11 s: keeps the fast set under 3 minutes; CI runs it
def test_ansible_lint_production_profile() -> None:
    # explicit paths: ansible-lint only discovers files git tracks
    proc = subprocess.run(
        ["ansible-lint", "--offline", "--nocolor", "--profile", "production",
         "site.yml", "roles/gpufleet_agent", "roles/gpufleet_controller",
         "roles/gpufleet_login"],
        cwd=ANSIBLE_DIR, capture_output=True, text=True, check=False, timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Passed with production profile" in proc.stdout + proc.stderr
