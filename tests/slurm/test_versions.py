"""The lab on each Slurm version: the version really runs, client wrappers reach it, and the
topologies newer versions add (topology/block on 24.11+, topology.yaml on 25.05+) are accepted
by a real slurmctld and used for placement."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .fixtures import TEST_CTLD_PORT, TEST_NODE_PORT0
from .harness import SlurmLab, SlurmLabConfig, SlurmLabError
from .roots import RootMissing, find_root, requested_versions, root_argv

# ------------------------------------------------------------------ no Slurm needed


def test_root_argv_runs_inside_the_root_in_the_callers_directory() -> None:
    assert root_argv(None, ["sinfo"]) == ["sinfo"]
    assert root_argv(None, ["sbatch"], user="nobody") == ["runuser", "-u", "nobody", "--",
                                                          "sbatch"]
    argv = root_argv(Path("/r"), ["sbatch", "x y"], cwd=Path("/tmp/lab/jobs"), user="nobody")
    assert argv[:3] == ["chroot", "--userspec=nobody:nogroup", "/r"]
    # the shell changes to cwd, then runs the command with its arguments untouched
    assert argv[3:6] == ["/bin/sh", "-c", "cd /tmp/lab/jobs && exec \"$@\""]
    assert argv[6:] == ["sh", "sbatch", "x y"]


def test_version_and_topology_are_checked() -> None:
    with pytest.raises(ValueError, match=r"known are 22\.05"):
        SlurmLabConfig(version="23.02")
    with pytest.raises(ValueError, match=r"topology/block needs Slurm 23\.11"):
        SlurmLabConfig(topology="block")
    with pytest.raises(ValueError, match=r"topology.yaml needs Slurm 25.05"):
        SlurmLabConfig(topology="yaml", version="24.11")


def test_versions_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPUFLEET_SLURM_VERSIONS", raising=False)
    assert requested_versions() == ["22.05", "24.11", "26.05"]
    monkeypatch.setenv("GPUFLEET_SLURM_VERSIONS", " 26.05, 22.05 ")
    assert requested_versions() == ["26.05", "22.05"]
    monkeypatch.setenv("GPUFLEET_SLURM_VERSIONS", "24.11,25.11")
    with pytest.raises(ValueError, match=r"unknown \['25.11'\]"):
        requested_versions()
    monkeypatch.setenv("GPUFLEET_SLURM_ROOT_24_11", "/nonexistent")
    with pytest.raises(RootMissing, match="no usr/sbin/slurmctld"):
        find_root("24.11")
    assert find_root("22.05") is None


def test_newer_versions_get_their_config() -> None:
    old = SlurmLab(SlurmLabConfig(lab_dir=Path("/tmp/unused"))).slurm_conf_text()
    assert "SwitchType=switch/none" in old and "TopologyPlugin=topology/tree" in old
    new = SlurmLab(SlurmLabConfig(lab_dir=Path("/tmp/unused"), version="24.11",
                                  topology="block"))
    conf = new.slurm_conf_text()
    # the */none plugins 23.11 dropped are left out; block topology from topology.conf
    assert "switch/none" not in conf and "jobcomp/none" not in conf
    assert "accounting_storage/none" not in conf
    assert "TopologyPlugin=topology/block" in conf
    assert new.topology_conf_text().splitlines() == [
        "BlockName=block1 Nodes=n[1-4]", "BlockName=block2 Nodes=n[5-8]", "BlockSizes=4,8"]
    yaml_lab = SlurmLab(SlurmLabConfig(lab_dir=Path("/tmp/unused"), version="26.05",
                                       topology="yaml"))
    conf = yaml_lab.slurm_conf_text()
    assert "TopologyPlugin" not in conf
    assert "PartitionName=blocks Nodes=ALL MaxTime=INFINITE State=UP Topology=blocks" in conf
    text = yaml_lab.topology_yaml_text()
    assert "- topology: tree\n  cluster_default: true\n  tree:" in text
    assert "      - block: block2\n        nodes: n[5-8]" in text


# ----------------------------------------------------------------------------- real Slurm


@pytest.mark.slurm
def test_lab_runs_the_version_asked_for(clean_slurm_lab: SlurmLab, slurm_version: str) -> None:
    lab = clean_slurm_lab
    assert lab.run("scontrol", "--version").stdout.split()[1].startswith(slurm_version + ".")
    # the slurmctld that answers is that version too (not the host's)
    ping = lab.run("scontrol", "show", "config").stdout
    assert f"SLURM_VERSION           = {slurm_version}." in ping


@pytest.mark.slurm
def test_wrappers_reach_the_lab(clean_slurm_lab: SlurmLab, slurm_version: str,
                                tmp_path: Path) -> None:
    """What gpufleet's CLI client does: run `sbatch`, `squeue`, `scontrol` by name with
    lab.env() from any directory; they reach this lab's Slurm, in the right directory."""
    lab = clean_slurm_lab
    env = lab.env()

    def sh(*argv: str) -> str:
        return subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True,
                              check=True, timeout=30).stdout

    assert sh("scontrol", "--version").split()[1].startswith(slurm_version + ".")
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\necho ran on $SLURMD_NODENAME\n")
    job = sh("sbatch", "--parsable", "-N1", "--gres=gpu:1", "-o", str(tmp_path / "out"),
             str(script)).strip()
    lab.wait_job_state(int(job), "COMPLETED", timeout_s=60)
    assert (tmp_path / "out").read_text().startswith("ran on n")
    assert "JobState=COMPLETED" in sh("scontrol", "show", "job", job)


@pytest.mark.slurm
def test_gpu_job_and_drain_on_each_version(clean_slurm_lab: SlurmLab) -> None:
    lab = clean_slurm_lab
    job = lab.sbatch("-N2", "--gres=gpu:3", "--wrap", "echo $CUDA_VISIBLE_DEVICES")
    assert lab.wait_job_state(job, "COMPLETED", timeout_s=60) == "COMPLETED"
    assert (lab.jobs_dir / f"slurm-{job}.out").read_text().strip() == "0,1,2"
    reason = "gpufleet: Xid 79 on GPU 0"
    lab.run("scontrol", "update", "nodename=n6", "state=drain", f"reason={reason}")
    assert lab.node_state("n6") == "IDLE+DRAIN"
    node = lab.sinfo_nodes()["n6"]
    assert (node["state"], node["state_flags"], node["reason"]) == ("idle", ["DRAIN"], reason)


def _topology_lab(version: str, topology: str) -> Iterator[SlurmLab]:
    if os.geteuid() != 0 and os.environ.get("CI", "").lower() != "true":
        pytest.skip("real Slurm lab needs root")
    port = TEST_CTLD_PORT + 12
    lab = SlurmLab(SlurmLabConfig(
        lab_dir=Path(f"/tmp/gpufleet-slurm-lab-{topology}"), version=version, topology=topology,
        ctld_port=port, node_port0=TEST_NODE_PORT0 + 60))
    try:
        lab.start()
    except SlurmLabError:
        lab.stop()
        raise
    try:
        yield lab
    finally:
        lab.stop()


@pytest.fixture
def block_lab(slurm_version: str) -> Iterator[SlurmLab]:
    if slurm_version == "22.05":
        pytest.skip("topology/block is 23.11+")
    yield from _topology_lab(slurm_version, "block")


@pytest.fixture
def yaml_lab(slurm_version: str) -> Iterator[SlurmLab]:
    if slurm_version in ("22.05", "24.11"):
        pytest.skip("topology.yaml is 25.05+")
    yield from _topology_lab(slurm_version, "yaml")


def _fill_then_place(lab: SlurmLab, *extra: str) -> list[str]:
    """n1-n3 busy, leaving n4 free in block1: a 2-node job fits in block1 only by spilling
    into block2, so a block-aware placement puts it on two of n5-n8."""
    busy = lab.sbatch(*extra, "-w", "n[1-3]", "-N3", "-c4", "--wrap", "sleep 60")
    lab.wait_job_state(busy, "RUNNING", timeout_s=60)
    job = lab.sbatch(*extra, "-N2", "--gres=gpu:1", "--wrap", "sleep 5")
    lab.wait_job_state(job, "RUNNING", timeout_s=60)
    return lab.job_nodes(job)


@pytest.mark.slurm
def test_block_topology_accepted_and_job_in_one_block(block_lab: SlurmLab) -> None:
    lab = block_lab
    shown = lab.run("scontrol", "show", "topology").stdout.splitlines()
    assert any(line.startswith("BlockName=block1 ") and "Nodes=n[1-4]" in line
               for line in shown), shown
    assert any(line.startswith("AggregatedBlock=block[1-2] ") and "BlockSize=8" in line
               for line in shown), shown
    placed = _fill_then_place(lab)
    assert len(placed) == 2 and set(placed) <= {"n5", "n6", "n7", "n8"}, placed


@pytest.mark.slurm
def test_topology_yaml_accepted(yaml_lab: SlurmLab) -> None:
    lab = yaml_lab
    assert not (lab.etc_dir / "topology.conf").exists()
    switches = lab.switches()  # the default ("tree") topology, read from topology.yaml
    assert lab.hostnames(switches["leaf1"]["Nodes"]) == ["n1", "n2", "n3", "n4"]
    assert switches["spine"]["Switches"] == "leaf[1-2]"
    # partition "blocks" uses the block topology of the same file
    placed = _fill_then_place(lab, "-p", "blocks")
    assert len(placed) == 2 and set(placed) <= {"n5", "n6", "n7", "n8"}, placed
    log = lab.log_file("slurmctld").read_text().lower().splitlines()
    assert not [line for line in log if "error" in line and "topolog" in line]
