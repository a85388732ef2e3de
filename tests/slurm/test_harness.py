"""The lab harness itself: the cluster shape and the Slurm behaviours the controller relies on."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .harness import SlurmLab, SlurmLabConfig, write_gpufleet_hooks
from .labcore import LAB_MARK, _read_only
from .procs import procs_with_env

# ------------------------------------------------------------- config generation (no Slurm)


def test_topology_splits_nodes_evenly_over_leaves() -> None:
    lab = SlurmLab(SlurmLabConfig(lab_dir=Path("/tmp/unused"), nodes=5, leaves=2))
    assert lab.topology_conf_text().splitlines() == [
        "SwitchName=leaf1 Nodes=n[1-3]",
        "SwitchName=leaf2 Nodes=n[4-5]",
        "SwitchName=spine Switches=leaf[1-2]",
    ]
    single = SlurmLab(SlurmLabConfig(lab_dir=Path("/tmp/unused"), nodes=3, leaves=3))
    assert single.topology_conf_text().splitlines()[0] == "SwitchName=leaf1 Nodes=n1"


def test_config_defaults_and_overrides() -> None:
    cfg = SlurmLabConfig(lab_dir=Path("/tmp/x"), topology_conf="SwitchName=s Nodes=n[1-8]\n")
    lab = SlurmLab(cfg)
    assert lab.etc_dir == lab.lab_dir / "etc"
    assert lab.topology_conf_text() == "SwitchName=s Nodes=n[1-8]\n"
    conf = lab.slurm_conf_text()
    assert "Port=[17001-17008]" in conf
    assert "Gres=gpu:8" in conf
    assert "HealthCheck" not in conf
    assert "File=/tmp/x/dev/nvidia[0-7]" in lab.gres_conf_text()
    assert SlurmLabConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="leaves"):
        SlurmLabConfig(nodes=2, leaves=3)


def test_accounting_and_hooks_config(tmp_path: Path) -> None:
    plain = SlurmLab(SlurmLabConfig(lab_dir=tmp_path)).slurm_conf_text()
    assert "AccountingStorageType=accounting_storage/none" in plain
    assert "Prolog" not in plain and "slurmdbd" not in plain

    prolog, epilog = write_gpufleet_hooks(tmp_path / "hooks", "/x/agents/{node}",
                                          ["/venv/bin/python", "-m", "gpufleet.agent"])
    cfg = SlurmLabConfig(lab_dir=tmp_path, ctld_port=7222, node_port0=17420, accounting=True,
                         prolog=str(prolog), epilog=str(epilog))
    assert (cfg.dbd_port, cfg.db_port) == (7224, 7225)  # derived from the lab's port
    lab = SlurmLab(cfg)
    conf = lab.slurm_conf_text()
    for line in ("AccountingStorageType=accounting_storage/slurmdbd",
                 "AccountingStoragePort=7224", "AccountingStorageTRES=gres/gpu",
                 f"Prolog={prolog}", f"Epilog={epilog}", "PrologFlags=Alloc"):
        assert line in conf.splitlines(), line
    assert "accounting_storage/none" not in conf
    dbd = lab.slurmdbd_conf_text()
    assert "StorageType=accounting_storage/mysql" in dbd and "StoragePort=7225" in dbd
    assert "DbdPort=7224" in dbd and f"PidFile={tmp_path}/pids/slurmdbd.pid" in dbd
    script = prolog.read_text()
    assert "exec /venv/bin/python -m gpufleet.agent prolog --state-dir '/x/agents/{node}'" in script
    assert prolog.stat().st_mode & 0o111 and "epilog --state-dir" in epilog.read_text()
    assert SlurmLabConfig.from_json(cfg.to_json()) == cfg  # associations survive JSON
    with pytest.raises(ValueError, match="must all differ"):
        SlurmLabConfig(lab_dir=tmp_path, accounting=True, dbd_port=6817)
    with pytest.raises(ValueError, match="absolute path"):
        SlurmLabConfig(lab_dir=tmp_path, prolog="prolog.sh")


def test_only_reads_and_scancel_are_asked_again() -> None:
    for argv in (["sinfo", "-N"], ["squeue", "--json"], ["scontrol", "show", "nodes", "--json"],
                 ["scontrol", "--json", "show", "job", "3"], ["scancel", "-u", "0"]):
        assert _read_only(argv), argv
    for argv in (["sbatch", "--wrap", "true"], ["scontrol", "update", "nodename=n1"],
                 ["scontrol", "ping"], ["scontrol"], ["srun", "true"], []):
        assert not _read_only(argv), argv


def _orphan(env: dict[str, str], pidfile: Path) -> int:
    """A `sleep` whose parent exits at once, as cli_filter's `setsid -f` helpers are left."""
    subprocess.run([sys.executable, "-c", "import subprocess as s, sys; open(sys.argv[1], 'w')"
                    ".write(str(s.Popen(['sleep', '30'], start_new_session=True, "
                    "stdout=s.DEVNULL, stderr=s.DEVNULL).pid))", str(pidfile)],
                   env=env, check=True, timeout=10)
    return int(pidfile.read_text())


def test_leftovers_are_found_by_the_lab_mark_but_never_our_own_children(tmp_path: Path) -> None:
    """What reset() stops: a process started with lab.env() that outlived its parent, never
    one this process started itself, nor another lab's."""
    env = {**os.environ, LAB_MARK: str(tmp_path)}
    child = subprocess.Popen(["sleep", "30"], env=env)
    orphan = _orphan(env, tmp_path / "orphan.pid")
    stranger = _orphan({**os.environ, LAB_MARK: str(tmp_path / "other")}, tmp_path / "o.pid")
    try:
        found = procs_with_env(LAB_MARK, str(tmp_path))
        assert found.get(orphan) == "sleep"
        assert child.pid not in found
        assert stranger not in found
    finally:
        for pid in (orphan, stranger):
            os.kill(pid, 9)
        child.kill()
        child.wait()


# ----------------------------------------------------------------------------- real Slurm


@pytest.mark.slurm
def test_nodes_idle_with_gpus(clean_slurm_lab: SlurmLab) -> None:
    slurm_lab = clean_slurm_lab  # other files share the session lab and may leave nodes drained
    nodes = slurm_lab.sinfo_nodes()
    assert set(nodes) == {f"n{i}" for i in range(1, 9)}
    for name, node in nodes.items():
        assert (node["state"], node["state_flags"]) == ("idle", []), name
        assert node["gres"] == "gpu:8", name
        assert node["cpus"] == 4, name
        assert slurm_lab.node_state(name) == "IDLE"


@pytest.mark.slurm
def test_topology_has_leaves_and_spine(slurm_lab: SlurmLab) -> None:
    switches = slurm_lab.switches()
    assert switches["leaf1"]["Level"] == "0"
    assert slurm_lab.hostnames(switches["leaf1"]["Nodes"]) == ["n1", "n2", "n3", "n4"]
    assert slurm_lab.hostnames(switches["leaf2"]["Nodes"]) == ["n5", "n6", "n7", "n8"]
    assert switches["spine"]["Level"] == "1"
    assert switches["spine"]["Switches"] == "leaf[1-2]"


@pytest.mark.slurm
def test_drain_then_resume(clean_slurm_lab: SlurmLab) -> None:
    lab = clean_slurm_lab
    reason = "gpufleet: xid 79 on GPU 3 [test]"
    lab.run("scontrol", "update", "nodename=n3", "state=drain", f"reason={reason}")
    assert lab.node_state("n3") == "IDLE+DRAIN"
    assert lab.node_reason("n3") == reason
    node = lab.sinfo_nodes()["n3"]
    assert (node["state"], node["state_flags"], node["reason"]) == ("idle", ["DRAIN"], reason)

    lab.run("scontrol", "update", "nodename=n3", "state=resume")
    # 22.05 shows IDLE+NOT_RESPONDING until its next ping of the resumed node: wait for it.
    assert lab.wait_node_state("n3", "IDLE", timeout_s=20) == "IDLE"
    if lab.version == "24.11":
        # 24.11.5 keeps the drain reason on the resumed, IDLE node (seen here every time;
        # 22.05 and 26.05 clear it): a reason alone does not mean drained there
        assert lab.node_reason("n3") in ("", reason)
    else:
        assert lab.node_reason("n3") == ""


@pytest.mark.slurm
def test_switches_1_lands_on_one_leaf(clean_slurm_lab: SlurmLab) -> None:
    lab = clean_slurm_lab
    # Fill n1 (and n2, n3): leaf1 keeps one free node, so a topology-blind pick of the first
    # two free nodes (n4, n5) would straddle the spine; --switches=1 must use leaf2.
    busy = lab.sbatch("-w", "n[1-3]", "-N3", "-c4", "--wrap", "sleep 60")
    lab.wait_job_state(busy, "RUNNING")
    assert lab.node_state("n1") == "ALLOCATED"

    job = lab.sbatch("--switches=1", "-N2", "--wrap", "sleep 5")
    lab.wait_job_state(job, "RUNNING")
    leaves = {
        name: set(lab.hostnames(sw["Nodes"]))
        for name, sw in lab.switches().items()
        if sw["Level"] == "0"
    }
    placed = set(lab.job_nodes(job))
    assert len(placed) == 2
    assert placed <= leaves["leaf2"], (placed, leaves)
    assert "Switches=1" in lab.show_job(job)


@pytest.mark.slurm
def test_gpu_gres_sets_cuda_visible_devices(clean_slurm_lab: SlurmLab) -> None:
    out = clean_slurm_lab.run(
        "srun",
        "-N1",
        "--gres=gpu:2",
        "printenv",
        "CUDA_VISIBLE_DEVICES",
        cwd=clean_slurm_lab.jobs_dir,
    )
    assert out.stdout.strip() == "0,1"


@pytest.mark.slurm
def test_controller_outage_keeps_state(clean_slurm_lab: SlurmLab) -> None:
    lab = clean_slurm_lab
    job = lab.sbatch("--wrap", "sleep 60")
    lab.wait_job_state(job, "RUNNING")
    lab.run("scontrol", "update", "nodename=n8", "state=drain", "reason=before outage")

    lab.stop_slurmctld()
    assert not lab.ctld_alive()
    # (sinfo & co. would retry ~9 s before failing; ping answers at once)
    assert "DOWN" in lab.run("scontrol", "ping", check=False).stdout

    lab.start_slurmctld()
    assert lab.job_state(job) == "RUNNING"
    assert lab.node_state("n8") == "IDLE+DRAIN"
    assert lab.node_reason("n8") == "before outage"


@pytest.mark.slurm
def test_reset_clears_whatever_a_test_left(clean_slurm_lab: SlurmLab, tmp_path: Path) -> None:
    """Jobs of two users running, pending, held, an array throttled with %N (squeue prints
    `12_[2-3%1]`, an id scancel refuses), a hetjob, a job pinned to a node in use (backfill
    marks that node PLANNED), a drained node and a process left behind through lab.env():
    reset() gets back to no jobs and every node idle."""
    lab = clean_slurm_lab
    lab.sbatch("-w", "n1", "-N1", "--exclusive", "--wrap", "sleep 600")
    # pending for n1; backfill marks the idle n2 PLANNED for it
    lab.sbatch("-w", "n[1-2]", "-N2", "--exclusive", "--wrap", "sleep 600")
    lab.sbatch("--array=0-3%1", "--wrap", "sleep 600")
    lab.sbatch("-H", "--wrap", "true")
    lab.sbatch("-N1", "--wrap", "sleep 600", ":", "-N1", "--wrap", "sleep 600")
    lab.sbatch("--wrap", "sleep 600", user="nobody")
    lab.run("scontrol", "update", "nodename=n8", "state=drain", "reason=left by a test")
    leftover = subprocess.Popen(["setsid", "-f", "sleep", "300"], env=lab.env())
    leftover.wait(timeout=10)
    deadline = time.monotonic() + 30
    while "PENDING" not in lab.run("squeue", "-h", "-o", "%T").stdout.split():
        assert time.monotonic() < deadline, "nothing pending"
        time.sleep(0.2)
    assert procs_with_env(LAB_MARK, str(lab.lab_dir))

    lab.reset()
    assert lab.run("squeue", "-h", "-o", "%i %T").stdout == ""
    nodes = lab.sinfo_nodes()
    assert {name: (n["state"], n["state_flags"]) for name, n in nodes.items()} == {
        name: ("idle", []) for name in lab.node_names}
    assert procs_with_env(LAB_MARK, str(lab.lab_dir)) == {}
