"""`gpufleet sbatch` against the real Slurm 22.05 lab (leaf1 = n[1-4], leaf2 = n[5-8], gpu:8).

Health comes from a real SqliteStore written here the way the controller writes it. Run with
your own lab: GPUFLEET_SLURM_TEST_LAB=/tmp/gf-lab-place GPUFLEET_SLURM_TEST_PORT=10917.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from gpufleet.rpc.v1 import fleet_pb2
from gpufleet.scheduler.placement import parse_gres_detail
from gpufleet.scheduler.store import SqliteStore, VerdictRow, now_ms

from tests.slurm.harness import SlurmLab

pytestmark = pytest.mark.slurm

_SBATCH = "from gpufleet.scheduler.cli_place import sbatch_cmd; sbatch_cmd()"
_PLACE = "from gpufleet.scheduler.cli_place import place_cmd; place_cmd()"
# NVLink islands of a bridged PCIe box: pairs (0,1) (2,3) (4,5) (6,7)
_PAIRS = [(0, 1), (2, 3), (4, 5), (6, 7)]


def _inventory(node: str) -> bytes:
    inv = fleet_pb2.NodeInventory(node_name=node, hostname=node)
    for i in range(8):
        inv.gpus.add(index=i, uuid=f"GPU-{node}-{i}")
        inv.gpu_nic_affinity.add(gpu_index=i, hca=f"mlx5_{i // 2}",
                                 pcie_relation=fleet_pb2.PCIE_RELATION_PIX)
    for a in range(8):
        for b in range(a + 1, 8):
            nv = 4 if (a, b) in _PAIRS else 0
            inv.gpu_links.add(gpu_a=a, gpu_b=b, nvlink_count=nv,
                              pcie_relation=fleet_pb2.PCIE_RELATION_SYS)
    return inv.SerializeToString()


def _store(path: Path, degraded: tuple[str, ...] = ()) -> Path:
    store = SqliteStore(str(path))
    t = now_ms()
    for i in range(1, 9):
        node = f"n{i}"
        store.upsert_node(node, node, 8, _inventory(node), "inst-1", t)
        store.set_verdict(VerdictRow(node, "nvlink", None, "", "ok", "", "", t))
    for node in degraded:
        store.set_verdict(VerdictRow(node, "ib_port", None, "mlx5_0/1", "degraded",
                                     "ib_rate", "mlx5_0 port 1 at 200 Gb/s, expected 400", t))
    store.close()
    return path


def _gf(lab: SlurmLab, code: str, *args: str,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], env=lab.env(), cwd=lab.jobs_dir,
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
    clean_slurm_lab: SlurmLab, tmp_path: Path, report_figure: Callable[[str], None],
) -> None:
    lab = clean_slurm_lab
    _hold(lab, "n1", 8)
    _hold(lab, "n2", 8)  # leaf1 half full
    db = _store(tmp_path / "state.db", degraded=("n6",))
    # leaf1 has 2 free nodes, leaf2 has 3 healthy free ones: a 3-node job fits leaf2 only if
    # the degraded n6 is left out (Slurm alone, lowest names first, would take n5-n7)
    out = _gf(lab, _SBATCH, "--gpufleet-db", str(db), "--parsable", "-N", "3",
              "--gres=gpu:8", "--wrap", "sleep 600")
    assert out.returncode == 0, out.stderr
    jobid = int(out.stdout.strip())
    assert lab.wait_job_state(jobid, "RUNNING") == "RUNNING"
    assert lab.job_nodes(jobid) == ["n5", "n7", "n8"]
    # and with the degraded node in leaf1 instead, the acceptance case: 4 nodes on one leaf
    lab.reset()
    _hold(lab, "n1", 8)
    _hold(lab, "n2", 8)
    db = _store(tmp_path / "state2.db", degraded=("n3",))
    out = _gf(lab, _SBATCH, "--gpufleet-db", str(db), "--parsable", "-N", "4",
              "--gres=gpu:8", "--wrap", "sleep 600")
    jobid = int(out.stdout.strip())
    assert lab.wait_job_state(jobid, "RUNNING") == "RUNNING"
    nodes = lab.job_nodes(jobid)
    assert nodes == ["n5", "n6", "n7", "n8"]
    report_figure(f"placement on Slurm: 4-node job -> {','.join(nodes)} (1 leaf)")


def test_two_gpu_job_gets_two_gpus_sharing_nvlink(
    clean_slurm_lab: SlurmLab, tmp_path: Path,
) -> None:
    lab = clean_slurm_lab
    _hold(lab, "n1", 1)  # n1: next free GPUs would be 1,2 - two islands
    _hold(lab, "n2", 2)  # n2: next free GPUs are 2,3 - one island
    db = _store(tmp_path / "state.db")
    dry = _gf(lab, _PLACE, "--gpufleet-db", str(db), "--json", "--gres=gpu:2")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert plan["nodes"][0]["node"] == "n2" and plan["nodes"][0]["gpus"] == [2, 3]
    out = _gf(lab, _SBATCH, "--gpufleet-db", str(db), "--parsable", "--gres=gpu:2",
              "--wrap", "sleep 600")
    jobid = int(out.stdout.strip())
    assert lab.wait_job_state(jobid, "RUNNING") == "RUNNING"
    job = _job(lab, jobid)
    assert job["nodes"] == "n2"
    got = parse_gres_detail(str(job["gres_detail"]))
    assert got == {2, 3}
    assert any(set(pair) == got for pair in _PAIRS)


def test_controller_away_behaves_like_sbatch_and_warns_once(
    clean_slurm_lab: SlurmLab, tmp_path: Path,
) -> None:
    lab = clean_slurm_lab
    script = tmp_path / "job.sh"
    out_file = tmp_path / "out-%j.txt"
    script.write_text("#!/bin/bash\n#SBATCH -N 1\n#SBATCH --gres=gpu:1\n"
                      "echo \"args=$*\"\necho \"ckpt=$GPUFLEET_CKPT_DIR\"\n")
    ours = _gf(lab, _SBATCH, "--gpufleet-db", str(tmp_path / "absent.db"),
               "--gpufleet-ckpt", str(tmp_path / "ckpt"), "-J", "gf-plain",
               "--comment=passed-through", "-o", str(out_file), str(script), "one", "two")
    plain = lab.run("sbatch", "-J", "plain", "-o", str(out_file), str(script),
                    cwd=lab.jobs_dir)
    assert ours.returncode == 0, ours.stderr
    # stdout is sbatch's own line, only the id differs
    assert ours.stdout.startswith("Submitted batch job ")
    assert ours.stdout.split()[:3] == plain.stdout.split()[:3]
    warnings = [line for line in ours.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "absent.db" in warnings[0]
    jobid = int(ours.stdout.split()[-1])
    lab.wait_job_state(jobid, "COMPLETED")
    shown = lab.show_job(jobid)
    assert "JobName=gf-plain" in shown and "Comment=passed-through" in shown
    assert "Requeue=1" in shown
    assert "ReqNodeList=(null)" in shown  # no placement was added
    text = Path(str(out_file).replace("%j", str(jobid))).read_text()
    assert "args=one two" in text
    assert f"ckpt={tmp_path / 'ckpt'}" in text


def test_parsable_prints_only_the_id_and_user_nodelist_is_respected(
    clean_slurm_lab: SlurmLab, tmp_path: Path,
) -> None:
    lab = clean_slurm_lab
    db = _store(tmp_path / "state.db", degraded=("n4",))
    out = _gf(lab, _SBATCH, "--gpufleet-db", str(db), "--parsable", "-w", "n4",
              "--wrap", "sleep 600")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().isdigit()
    jobid = int(out.stdout.strip())
    lab.wait_job_state(jobid, "RUNNING")
    assert lab.job_nodes(jobid) == ["n4"]  # the user's explicit choice stands
    assert out.stderr == ""


def test_script_on_stdin_and_sbatch_errors_pass_through(
    clean_slurm_lab: SlurmLab, tmp_path: Path,
) -> None:
    lab = clean_slurm_lab
    db = _store(tmp_path / "state.db")
    out = _gf(lab, _SBATCH, "--gpufleet-db", str(db), "--parsable",
              stdin="#!/bin/bash\n#SBATCH -N 2\n#SBATCH --gres=gpu:4\nsleep 600\n")
    assert out.returncode == 0, out.stderr
    jobid = int(out.stdout.strip())
    lab.wait_job_state(jobid, "RUNNING")
    nodes = lab.job_nodes(jobid)
    assert len(nodes) == 2
    leaf1 = set(lab.hostnames(lab.switches()["leaf1"]["Nodes"]))
    assert len({n in leaf1 for n in nodes}) == 1  # both on one leaf
    bad = _gf(lab, _SBATCH, "--gpufleet-db", str(db), "--no-such-sbatch-flag", "--wrap", "true")
    plain = lab.run("sbatch", "--no-such-sbatch-flag", "--wrap", "true", check=False)
    assert bad.returncode == plain.returncode != 0
    assert "no-such-sbatch-flag" in bad.stderr
