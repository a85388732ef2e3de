"""Mapping GPU processes to Slurm jobs through /proc: a fake /proc tree with real-looking files.

The cgroup files are as slurmstepd leaves them: cgroup v1 (task/cgroup + proctrack/cgroup, one
line per hierarchy), cgroup v2 (Slurm >= 22.05 cgroup/v2 plugin, one line), and both with
multiple-slurmd's node-named variants.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from gpufleet.agent.procmap import (
    ProcJob,
    job_from_cgroup,
    job_from_environ,
    job_of_pid,
    jobs_of_pids,
    user_name,
)

CGROUP_V1 = """\
12:memory:/slurm/uid_1000/job_4242/step_0/task_0
11:devices:/slurm/uid_1000/job_4242/step_0/task_0
10:freezer:/slurm/uid_1000/job_4242/step_0
9:cpuset:/slurm/uid_1000/job_4242/step_0
8:pids:/system.slice/slurmd.service
7:blkio:/system.slice/slurmd.service
6:cpu,cpuacct:/slurm/uid_1000/job_4242/step_0/task_0
5:net_cls,net_prio:/
4:perf_event:/
3:hugetlb:/
2:rdma:/
1:name=systemd:/system.slice/slurmd.service
0::/system.slice/slurmd.service
"""
CGROUP_V1_MULTI = "4:devices:/slurm_n17/uid_1001/job_18/step_extern/task_0\n1:name=systemd:/\n"
CGROUP_V2 = "0::/system.slice/slurmstepd.scope/job_4243/step_batch/user/task_0\n"
CGROUP_V2_MULTI = "0::/system.slice/n17_slurmstepd.scope/job_19/step_0/user/task_1\n"
CGROUP_STEPD = "0::/system.slice/slurmstepd.scope/system\n"  # slurmstepd itself: no job
CGROUP_LOGIN = "0::/user.slice/user-1000.slice/session-3.scope\n"
CGROUP_DOCKER = "0::/system.slice/docker-3f2a9c.scope\n"


def _env(**kw: str) -> bytes:
    base = {"PATH": "/usr/bin", "HOME": "/home/alice", "SLURM_JOB_NAME": "train"}
    return b"\0".join(f"{k}={v}".encode() for k, v in {**base, **kw}.items()) + b"\0"


def _proc(root: Path, pid: int, cgroup: str, environ: bytes | None = None, uid: int = 1000,
          environ_mode: int = 0o400) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "cgroup").write_text(cgroup)
    (d / "status").write_text(f"Name:\tpython\nState:\tR (running)\nPid:\t{pid}\n"
                              f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t100\t100\t100\t100\n")
    if environ is not None:
        (d / "environ").write_bytes(environ)
        (d / "environ").chmod(environ_mode)


@pytest.mark.parametrize(("text", "want"), [
    (CGROUP_V1, ("4242", 1000)),
    (CGROUP_V1_MULTI, ("18", 1001)),
    (CGROUP_V2, ("4243", None)),
    (CGROUP_V2_MULTI, ("19", None)),
    (CGROUP_STEPD, None),
    (CGROUP_LOGIN, None),
    (CGROUP_DOCKER, None),
    ("0::/user.slice/myslurm/job_5\n", None),  # a job_ part outside Slurm's tree
    ("4:devices:/slurm/uid_1000/job_42x/step_0\n", None),  # not a whole path part
    ("", None),
    ("garbage without colons\n", None),
])
def test_cgroup_forms(text: str, want: tuple[str, int | None] | None) -> None:
    assert job_from_cgroup(text) == want


def test_environ_parsing() -> None:
    assert job_from_environ(_env(SLURM_JOB_ID="77")) == "77"
    assert job_from_environ(_env(SLURM_JOB_ID_X="77")) is None
    assert job_from_environ(_env(MY_SLURM_JOB_ID="77")) is None
    assert job_from_environ(_env(SLURM_JOB_ID="7;rm")) is None
    assert job_from_environ(b"SLURM_JOB_ID=5") == "5"  # the first and only entry
    assert job_from_environ(b"") is None


def test_fake_proc_tree_maps_each_kind_of_process(tmp_path: Path) -> None:
    _proc(tmp_path, 101, CGROUP_V1)
    _proc(tmp_path, 102, CGROUP_V2, uid=1002)
    _proc(tmp_path, 103, CGROUP_V2_MULTI, uid=1003)
    _proc(tmp_path, 104, CGROUP_LOGIN, _env())  # a login-shell process on the GPU: no job
    _proc(tmp_path, 105, CGROUP_LOGIN, _env(SLURM_JOB_ID="555"), uid=1005)  # proctrack/linuxproc
    # the cgroup decides over the environment (a process may set any environment it likes)
    _proc(tmp_path, 106, CGROUP_V2, _env(SLURM_JOB_ID="999"), uid=1002)
    got = jobs_of_pids([101, 102, 103, 104, 105, 106, 107], str(tmp_path))  # 107: vanished
    assert got == {
        101: ProcJob(101, "4242", 1000, "cgroup"),
        102: ProcJob(102, "4243", 1002, "cgroup"),  # v2 names no uid: the process's real uid
        103: ProcJob(103, "19", 1003, "cgroup"),
        104: None,
        105: ProcJob(105, "555", 1005, "environ"),
        106: ProcJob(106, "4243", 1002, "cgroup"),
        107: None,
    }


def test_process_that_vanishes_midway_is_no_job(tmp_path: Path) -> None:
    _proc(tmp_path, 201, CGROUP_LOGIN, _env(SLURM_JOB_ID="3"))
    (tmp_path / "201" / "environ").unlink()  # gone between its cgroup and its environ
    (tmp_path / "201" / "status").unlink()
    assert job_of_pid(201, str(tmp_path)) is None
    _proc(tmp_path, 202, CGROUP_V2)
    (tmp_path / "202" / "status").unlink()  # gone before its uid was read: job still known
    assert job_of_pid(202, str(tmp_path)) == ProcJob(202, "4243", None, "cgroup")


def _as_nobody(fn_source: str) -> str:
    """Run a snippet as uid/gid 65534 in a forked child (only root may switch)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            out = repr(eval(fn_source))  # noqa: S307 - a fixed snippet of this test
            os.write(w, out.encode())
        except BaseException as e:  # noqa: BLE001 - reported to the parent, which asserts
            os.write(w, f"raised {type(e).__name__}: {e}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return text


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to test as another user")
def test_unreadable_environ_is_no_job_not_an_error() -> None:
    # a tree others may traverse (pytest's tmp_path is root-only), environ root-only as in /proc
    root = Path(tempfile.mkdtemp(prefix="fakeproc-"))
    try:
        root.chmod(0o755)
        _proc(root, 301, CGROUP_LOGIN, _env(SLURM_JOB_ID="31"), environ_mode=0o400)
        _proc(root, 302, CGROUP_V1)
        (root / "301").chmod(0o755)
        (root / "302").chmod(0o755)
        assert job_of_pid(301, str(root)) == ProcJob(301, "31", 1000, "environ")  # as root
        assert _as_nobody(f"job_of_pid(301, {str(root)!r})") == "None"
        # the cgroup is readable by anyone: an agent not running as root still finds v1/v2 jobs
        assert _as_nobody(f"job_of_pid(302, {str(root)!r})") == repr(
            ProcJob(302, "4242", 1000, "cgroup"))
    finally:
        shutil.rmtree(root)


def test_real_proc_of_this_machine() -> None:
    # this test process and a process that has exited: not Slurm jobs, no exception
    assert job_of_pid(os.getpid()) is None
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert job_of_pid(child.pid) is None


def test_user_name() -> None:
    assert user_name(0) == "root"
    assert user_name(None) == ""
    assert user_name(2_000_000_001) == "2000000001"  # no passwd entry: the number
