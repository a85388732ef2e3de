"""The login-node role (ansible/roles/gpufleet_login) applied to a scratch directory with this
checkout's venv standing for its pip install: the `gpufleet` it puts on PATH is the fast
launcher, and the cli_filter.lua it installs runs the helper the fast way (python -I -S on
sbatch_filter.py), for plain `sbatch` too under gpufleet_login_place_all_sbatch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.rollout.test_units import ANSIBLE_DIR, needs_ansible


@needs_ansible
def test_login_role_installs_the_fast_paths(tmp_path: Path) -> None:
    venv = Path(sys.executable).parent.parent
    bin_dir, conf_dir, slurm_dir = tmp_path / "bin", tmp_path / "etc", tmp_path / "slurm"
    for d in (bin_dir, conf_dir, slurm_dir):
        d.mkdir()
    (slurm_dir / "slurm.conf").write_text("ClusterName=lab\n")
    playbook = tmp_path / "login.yml"
    playbook.write_text(json.dumps([{
        "hosts": "localhost", "gather_facts": False,
        "roles": [{"role": str(ANSIBLE_DIR / "roles" / "gpufleet_login")}],
        "vars": {"gpufleet_login_venv": str(venv), "gpufleet_login_bin_dir": str(bin_dir),
                 "gpufleet_login_config_dir": str(conf_dir),
                 "gpufleet_login_slurm_conf_dir": str(slurm_dir),
                 "gpufleet_login_controller": "head1:50051",
                 "gpufleet_login_cli_filter": True,
                 "gpufleet_login_place_all_sbatch": True}}]))
    proc = subprocess.run(["ansible-playbook", "-i", "localhost,", "-c", "local",
                           "--skip-tags", "gpufleet_login_pip", str(playbook)],
                          capture_output=True, text=True, check=False, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:]

    launcher = (bin_dir / "gpufleet").read_text()
    assert launcher.startswith("#!/bin/sh\n") and f"exec '{venv}/bin/python' -I -S" in launcher
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "sbatch").write_text('#!/bin/sh\necho "sbatch $*"\n')
    (fake / "sbatch").chmod(0o755)
    out = subprocess.run([str(bin_dir / "gpufleet"), "sbatch", "--gpufleet-no-place", "x.sh"],
                         env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"},
                         capture_output=True, text=True, check=False, timeout=60)
    assert out.stdout == "sbatch x.sh\n", out.stderr

    lua = (slurm_dir / "cli_filter.lua").read_text()
    helper = re.search(r'^local HELPER = "(.*)"$', lua, re.M)
    run_with = re.search(r'^local RUN_WITH = "(.*)"$', lua, re.M)
    assert helper and run_with and re.search(r"^local ALWAYS = true", lua, re.M)
    assert helper.group(1).endswith("/cli/sbatch_filter.py") and Path(helper.group(1)).is_file()
    assert run_with.group(1) == f"{venv}/bin/python -I -S"
    # the command the lua builds runs the helper: with no controller it adds nothing, quietly
    ran = subprocess.run([*run_with.group(1).split(), helper.group(1), "place", "0",
                          '{"nodes":"1","ignore-pbs":"unset"}'],
                         env={"GPUFLEET_CLIENT_CONFIG": str(tmp_path / "none.toml")},
                         capture_output=True, text=True, check=False, timeout=60)
    assert (ran.returncode, ran.stdout, ran.stderr) == (0, "", "")
    assert "CliFilterPlugins=cli_filter/lua" in (slurm_dir / "slurm.conf").read_text()
    assert 'controller = "head1:50051"' in (conf_dir / "client.toml").read_text()
