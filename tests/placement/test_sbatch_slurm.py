"""`gpufleet sbatch` against the real Slurm 22.05 lab (leaf1 = n[1-4], leaf2 = n[5-8], gpu:8).

sbatch runs with a client slurm.conf that enables cli_filter/lua with gpufleet's
cli_filter.lua (lab_client_conf); placement comes from a real controller (FleetUser over
loopback gRPC, MUNGE with the lab's munged) whose health is a real SqliteStore written here the
way the controller writes it, and whose Slurm view is the lab's. Run with your own lab:
GPUFLEET_SLURM_TEST_LAB=/tmp/gf-lab-place GPUFLEET_SLURM_TEST_PORT=10917.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from gpufleet.scheduler.placement import parse_gres_detail

from tests.placement.sbatch_lab import GPUFLEET, PAIRS, Placed
from tests.slurm.harness import SlurmLab
from tests.slurm.labcore import ROOT_PATH

pytestmark = pytest.mark.slurm

def _gf(p: Placed, *args: str, stdin: str | None = None, cmd: str = "sbatch",
        **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GPUFLEET, cmd, *args], env=p.env(**extra), cwd=p.lab.jobs_dir,
                          capture_output=True, text=True, timeout=60, check=False,
                          input=stdin)


def _job(lab: SlurmLab, jobid: int) -> dict[str, object]:
    doc = json.loads(lab.run("squeue", "--json").stdout)
    return next(j for j in doc["jobs"] if j["job_id"] == jobid)


def _hold(lab: SlurmLab, node: str, gpus: int) -> int:
    jobid = lab.sbatch("-w", node, f"--gres=gpu:{gpus}", "--wrap", "sleep 600")
    lab.wait_job_state(jobid, "RUNNING")
    return jobid


def test_four_node_job_lands_on_one_leaf_avoiding_the_degraded_node(
    placed: Callable[..., Placed], report_figure: Callable[[str], None],
) -> None:
    p = placed(degraded=("n6",))
    lab = p.lab
    _hold(lab, "n1", 8)
    _hold(lab, "n2", 8)  # leaf1 half full
    # leaf1 has 2 free nodes, leaf2 has 3 healthy free ones: a 3-node job fits leaf2 only if
    # the degraded n6 is left out (Slurm alone, lowest names first, would take n3-n5)
    out = _gf(p, "--parsable", "-N", "3", "--gres=gpu:8", "--wrap", "sleep 600")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    jobid = int(out.stdout.strip())
    assert lab.wait_job_state(jobid, "RUNNING") == "RUNNING"
    assert lab.job_nodes(jobid) == ["n5", "n7", "n8"]
    # the same options as #SBATCH lines of a script on stdin, partition from SBATCH_PARTITION
    lab.reset()
    p = placed(degraded=("n3",))
    _hold(lab, "n1", 8)
    _hold(lab, "n2", 8)
    out = _gf(p, "--parsable", stdin="#!/bin/bash\n#SBATCH -N 4\n#SBATCH --gres=gpu:8\n"
              "sleep 600\n", SBATCH_PARTITION="main")
    assert out.returncode == 0, out.stderr
    jobid = int(out.stdout.strip())
    assert lab.wait_job_state(jobid, "RUNNING") == "RUNNING"
    nodes = lab.job_nodes(jobid)
    assert nodes == ["n5", "n6", "n7", "n8"]
    report_figure(f"placement on Slurm: 4-node job -> {','.join(nodes)} (1 leaf)")


def test_two_gpu_job_gets_two_gpus_sharing_nvlink(placed: Callable[..., Placed]) -> None:
    p = placed()
    lab = p.lab
    _hold(lab, "n1", 1)  # n1: next free GPUs would be 1,2 - two islands
    _hold(lab, "n2", 2)  # n2: next free GPUs are 2,3 - one island
    dry = _gf(p, "--gres=gpu:2", "--wrap", "true", cmd="place")
    assert dry.returncode == 0, dry.stderr
    assert "n2 on leaf1: GPUs 2,3 (one NVLink island" in dry.stderr
    out = _gf(p, "--parsable", "--gres=gpu:2", "--wrap", "sleep 600")
    jobid = int(out.stdout.strip())
    assert lab.wait_job_state(jobid, "RUNNING") == "RUNNING"
    job = _job(lab, jobid)
    assert job["nodes"] == "n2"
    got = parse_gres_detail(str(job["gres_detail"]))
    assert got == {2, 3}
    assert any(set(pair) == got for pair in PAIRS)


def test_never_pinned_where_slurm_must_judge(placed: Callable[..., Placed]) -> None:
    """An array of four 1-node jobs runs four at once; a job asking CPUs is not pinned and
    starts where Slurm finds them; a held job gets nothing added."""
    p = placed(degraded=("n8",))
    lab = p.lab
    out = _gf(p, "--parsable", "--array=0-3", "-N1", "--gres=gpu:8", "--wrap", "sleep 600")
    assert out.returncode == 0, out.stderr
    arr = out.stdout.strip()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = lab.run("squeue", "-h", "-j", arr, "-o", "%T %N").stdout.split("\n")
        if sum(1 for s in states if s.startswith("RUNNING")) == 4:
            break
        time.sleep(0.5)
    running = [s.split()[1] for s in states if s.startswith("RUNNING")]
    assert len(running) == 4 and "n8" not in running
    shown = lab.run("scontrol", "show", "job", "-o", arr).stdout
    assert "ReqNodeList=(null)" in shown and "ExcNodeList=n8" in shown
    # -c 4 on nodes with 4 CPUs: n1 has a CPU taken, so Slurm must choose; not pinned
    lab.reset()
    p = placed()
    lab.sbatch("-w", "n1", "-c", "1", "--wrap", "sleep 600")
    out = _gf(p, "--parsable", "-c", "4", "--gres=gpu:1", "--wrap", "sleep 600")
    jobid = int(out.stdout.strip())
    assert lab.wait_job_state(jobid, "RUNNING") == "RUNNING"
    assert "ReqNodeList=(null)" in lab.show_job(jobid)
    held = _gf(p, "--parsable", "-H", "--gres=gpu:1", "--wrap", "true")
    shown = lab.show_job(int(held.stdout.strip()))
    assert "ReqNodeList=(null)" in shown and "ExcNodeList=(null)" in shown


def test_pinned_job_not_started_gets_its_node_list_back(placed: Callable[..., Placed]) -> None:
    p = placed()
    lab = p.lab
    lab.run("scontrol", "update", "PartitionName=main", "State=DOWN")
    try:
        out = _gf(p, "--parsable", "--gres=gpu:1", "--wrap", "true",
                  GPUFLEET_PIN_RELEASE_S="2")
        assert out.returncode == 0, out.stderr
        jobid = int(out.stdout.strip())
        assert "ReqNodeList=(null)" not in lab.show_job(jobid)  # pinned, pending
        deadline = time.monotonic() + 20
        while "ReqNodeList=(null)" not in lab.show_job(jobid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "ReqNodeList=(null)" in lab.show_job(jobid)
    finally:
        lab.run("scontrol", "update", "PartitionName=main", "State=UP")


def test_switch_hold_waits_for_one_leaf_only_within_its_grace(
    placed: Callable[..., Placed],
) -> None:
    """With --switch-holds, a 3-node job that asks memory (so never pinned) gets
    `--switches=1@1:59`; with 2 free nodes on each leaf Slurm alone would start it across
    both at once. With a long grace the controller keeps the hold and the job starts on the
    leaf that frees first; with a short one it drops the count and the job starts across
    leaves, as plain sbatch would."""
    p = placed(switch_hold_grace_s=60)
    lab = p.lab
    blockers = {n: _hold(lab, n, 8) for n in ("n1", "n2", "n5", "n6")}
    args = ("--parsable", "-N", "3", "--gres=gpu:8", "--mem=100", "--wrap", "sleep 600")
    out = _gf(p, *args)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    jobid = int(out.stdout.strip())
    assert "Switches=1@00:01:59" in lab.show_job(jobid)
    time.sleep(3)
    assert lab.job_state(jobid) == "PENDING"  # held for one leaf, within the grace
    lab.run("scancel", str(blockers["n2"]))  # leaf1 now has 3 free nodes
    assert lab.wait_job_state(jobid, "RUNNING") == "RUNNING"
    assert lab.job_nodes(jobid) == ["n2", "n3", "n4"]
    assert p.ctl.switch_holds is not None and p.ctl.switch_holds.released == []

    lab.reset()
    p = placed(switch_hold_grace_s=2)
    for n in ("n1", "n2", "n5", "n6"):
        _hold(lab, n, 8)
    out = _gf(p, *args)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    jobid = int(out.stdout.strip())
    assert lab.wait_job_state(jobid, "RUNNING", timeout_s=30) == "RUNNING"
    assert sorted(lab.job_nodes(jobid)) in (["n3", "n4", "n7"], ["n3", "n4", "n8"],
                                            ["n3", "n7", "n8"], ["n4", "n7", "n8"])
    assert p.ctl.switch_holds is not None and p.ctl.switch_holds.released == [str(jobid)]

    # a controller without --switch-holds (the default): no count, it starts at once across
    # leaves, as plain sbatch starts it
    lab.reset()
    p = placed()
    for n in ("n1", "n2", "n5", "n6"):
        _hold(lab, n, 8)
    out = _gf(p, *args)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    jobid = int(out.stdout.strip())
    assert "Switches=1@" not in lab.show_job(jobid)
    assert lab.wait_job_state(jobid, "RUNNING", timeout_s=10) == "RUNNING"
    assert p.ctl.switch_holds is None


def test_controller_away_is_plain_sbatch_silently(
    placed: Callable[..., Placed], tmp_path: Path,
) -> None:
    p = placed()
    lab = p.lab
    p.client_toml.write_text('controller = "127.0.0.1:1"\ninsecure = true\n')
    script = tmp_path / "job.sh"
    out_file = tmp_path / "out-%j.txt"
    script.write_text("#!/bin/bash\n#SBATCH -N 1\n#SBATCH --gres=gpu:1\n"
                      "echo \"args=$*\"\necho \"ckpt=$GPUFLEET_CKPT_DIR\"\n")
    ours = _gf(p, "--gpufleet-ckpt", str(tmp_path / "ckpt"), "-J", "gf-plain",
               "--comment=passed-through", "-o", str(out_file), str(script), "one", "two")
    assert ours.returncode == 0, ours.stderr
    assert ours.stderr == ""
    assert ours.stdout.startswith("Submitted batch job ")
    jobid = int(ours.stdout.split()[-1])
    lab.wait_job_state(jobid, "COMPLETED")
    shown = lab.show_job(jobid)
    assert "JobName=gf-plain" in shown and "Comment=passed-through gpufleet-ckpt" in shown
    assert "Requeue=1" in shown
    assert "ReqNodeList=(null)" in shown  # no placement was added
    text = Path(str(out_file).replace("%j", str(jobid))).read_text()
    assert "args=one two" in text
    assert f"ckpt={tmp_path / 'ckpt'}" in text
    # and with no controller configured at all, and no client config file
    os.unlink(p.client_toml)
    again = _gf(p, "--parsable", "--gres=gpu:1", "--wrap", "true")
    assert again.returncode == 0 and again.stderr == ""
    assert "ReqNodeList=(null)" in lab.show_job(int(again.stdout.strip()))


def test_user_nodelist_is_respected(placed: Callable[..., Placed]) -> None:
    p = placed(degraded=("n4",))
    out = _gf(p, "--parsable", "-w", "n4", "--wrap", "sleep 600")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().isdigit() and out.stderr == ""
    jobid = int(out.stdout.strip())
    p.lab.wait_job_state(jobid, "RUNNING")
    assert p.lab.job_nodes(jobid) == ["n4"]  # the user's explicit choice stands


def _login_node_package(client: Path) -> Path:
    """gpufleet's package as a login node installs it, in `client`, readable by every user
    (a copy: the checkout may sit where `nobody` cannot go, e.g. under /root); the sbatch
    path needs only the standard library. Returns the directory for PYTHONPATH."""
    lib = client / "lib"
    shutil.copytree(Path(__file__).parents[2] / "scheduler" / "gpufleet", lib / "gpufleet",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for path in [lib, *lib.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return lib


def test_plain_user_places_and_unpins_through_the_controller(
    placed: Callable[..., Placed],
) -> None:
    """As `nobody` on a login-node style install (system Python, no gpufleet dependencies,
    a world-readable client config, the controller's store nowhere in reach): the pin comes
    from the controller (MUNGE as nobody) and nobody's own `scontrol update` releases it.
    On 24.11/26.05 the login node is the Slurm root itself: root chroots into it as nobody
    (nobody may not chroot, so not through the lab's wrappers), and nobody runs the root's
    own python3, sbatch, munge and scontrol."""
    import tempfile

    p = placed(degraded=("n1",))
    lab = p.lab
    # in /tmp: world-traversable, and the same path inside a root (mount_root binds it)
    client = Path(tempfile.mkdtemp(prefix="gf-login-", dir="/tmp"))
    client.chmod(0o755)
    for g in p.conf.parent.iterdir():  # the client etc dir, where nobody can read it
        target = client / g.name
        if g.is_symlink():
            target.symlink_to(g.resolve())
        else:
            target.write_text(g.read_text())
            target.chmod(0o644)
    (client / "client.toml").write_text(p.client_toml.read_text())
    (client / "client.toml").chmod(0o644)
    env = p.env(SLURM_CONF=str(client / "slurm.conf"),
                GPUFLEET_CLIENT_CONFIG=str(client / "client.toml"), GPUFLEET_PIN_RELEASE_S="2")
    # `gpufleet sbatch` picks its own helper (this install's python3 on its sbatch_filter.py)
    env.pop("GPUFLEET_FILTER", None)
    code = "from gpufleet.scheduler.cli.entry import main; main()"
    sbatch = ["sbatch", "--parsable", "-o", "/dev/null", "--gres=gpu:8", "--wrap", "true"]
    lab.run("scontrol", "update", "PartitionName=main", "State=DOWN")
    try:
        if lab.root is None:
            # a bare login node: the system Python and gpufleet's sources, nothing else
            env["PYTHONPATH"] = str(Path(__file__).parents[2] / "scheduler")
            argv = ["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c", code, *sbatch]
        else:
            env["PYTHONPATH"] = str(_login_node_package(client))
            env["PATH"] = ROOT_PATH  # the root's sbatch and scontrol
            argv = lab.argv(["/usr/bin/python3", "-c", code, *sbatch], cwd=lab.jobs_dir,
                            user="nobody")
        out = subprocess.run(argv, env=env, cwd=lab.jobs_dir, capture_output=True, text=True,
                             timeout=60, check=False)
        assert out.returncode == 0 and out.stderr == "", out.stderr
        jobid = int(out.stdout.strip())
        shown = lab.show_job(jobid)
        assert "UserId=nobody" in shown
        req = shown.split("ReqNodeList=")[1].split()[0]
        assert req not in {"(null)", "n1"}  # pinned by the controller, not on the bad node
        deadline = time.monotonic() + 20
        while "ReqNodeList=(null)" not in lab.show_job(jobid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "ReqNodeList=(null)" in lab.show_job(jobid)  # nobody's own scontrol update
    finally:
        lab.run("scontrol", "update", "PartitionName=main", "State=UP")
        shutil.rmtree(client, ignore_errors=True)
