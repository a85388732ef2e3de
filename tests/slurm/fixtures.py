"""pytest fixtures for the real Slurm lab of harness.py.

Every lab fixture runs once per Slurm version: `slurm_version` (session) is parametrized over
$GPUFLEET_SLURM_VERSIONS (comma-separated, e.g. "24.11,26.05"; default every known version:
22.05 on the host, 24.11 and 26.05 from the roots of .ci/slurm-root.sh). A version whose root
is not built is skipped with the reason (under CI=true: fails). Test ids carry the version
([22.05]); `-k 26.05` picks one. Only one version's labs run at a time (pytest tears a
session fixture's instance down before it makes the next).

`slurm_lab` (session) starts one lab for the whole session and stops it at the end.
`clean_slurm_lab` (function) is the same lab, reset first: daemons restarted if a test killed
them, all jobs cancelled, drained/down nodes resumed, every node idle.

Skips when not root unless CI=true; under CI=true a lab that cannot start FAILS the tests, so a
CI job cannot go green by silently skipping every Slurm test.

The lab lives in a fixed dir ($GPUFLEET_SLURM_TEST_LAB or /tmp/gpufleet-slurm-lab-pytest) so a
run killed with SIGKILL is cleaned up by the next one, and on ports 6917/17101.. so it can run
beside a lab started by hand with `harness.py up` (6817/17001..).

`slurm_acct_lab` (module) is a second, smaller lab with accounting: its own slurmdbd on its
own MariaDB, and Prolog/Epilog running `gpufleet-agent prolog|epilog` into one agent state
dir per node (LAB/agents/nX). It lives in $GPUFLEET_SLURM_TEST_LAB-acct on the test port + 5
(slurmdbd +7, MariaDB +8) and slurmd ports from TEST_NODE_PORT0 + 20, so it can run in the
same session as `slurm_lab`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.ci import IN_CI, unavailable

from .harness import SlurmLab, SlurmLabConfig, SlurmLabError, write_gpufleet_hooks
from .roots import HOST_VERSION, HOST_VIEW, RootMissing, find_root, requested_versions

# $GPUFLEET_SLURM_TEST_PORT moves the whole lab (slurmd ports follow), so two test runs can
# share a machine when each also sets its own $GPUFLEET_SLURM_TEST_LAB.
TEST_CTLD_PORT = int(os.environ.get("GPUFLEET_SLURM_TEST_PORT", "6917"))
TEST_NODE_PORT0 = TEST_CTLD_PORT + 10183

# One lab per process even if this module's fixture is registered twice (e.g. re-exported by
# tests/slurm/conftest.py and by tests/conftest.py): both registrations share it.
_shared: dict[str, SlurmLab | BaseException] = {}


def _version_params() -> list[str]:
    try:
        return requested_versions()
    except ValueError as exc:  # a typo in GPUFLEET_SLURM_VERSIONS: one clear line
        raise pytest.UsageError(str(exc)) from None


@pytest.fixture(scope="session", params=_version_params())
def slurm_version(request: pytest.FixtureRequest) -> str:
    """The Slurm version ("22.05", "24.11", "26.05") the lab fixtures run; skips a version
    whose root is not built (fails under CI=true, where every version must run)."""
    version: str = request.param
    try:
        find_root(version)
    except RootMissing as exc:
        unavailable(f"Slurm {version} is not available: {exc}")
    return version


def slurm_test_config(version: str = "22.05") -> SlurmLabConfig:
    """The shape every Slurm test sees: 8 nodes n1..n8, gpu:8 each, leaf1=n[1-4], leaf2=n[5-8]."""
    lab_dir = Path(os.environ.get("GPUFLEET_SLURM_TEST_LAB", "/tmp/gpufleet-slurm-lab-pytest"))
    return SlurmLabConfig(lab_dir=lab_dir, ctld_port=TEST_CTLD_PORT, node_port0=TEST_NODE_PORT0,
                          version=version)


def remove_lab_dir(lab: SlurmLab) -> None:
    """Tests leave nothing in /tmp by default: once every daemon of the lab is down, remove its
    folder (MariaDB's datadir included, ~180 MB). GPUFLEET_KEEP_TEST_LABS=1 keeps it (to read
    the logs; MariaDB's datadir is then reused, a few seconds faster)."""
    if os.environ.get("GPUFLEET_KEEP_TEST_LABS") == "1" or not lab.lab_dir.exists():
        return
    alive = {d: pid for d, pid in lab.status().items() if pid is not None}
    if alive:  # never pull files from under a running daemon
        print(f"keeping {lab.lab_dir}: still running {alive}")
        return
    # never rmtree through a bind mount (a root lab's mounts live in the root, not here; this
    # keeps it so if that ever changes)
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    inside = [m for m in mounts if Path(m) == lab.lab_dir or lab.lab_dir in Path(m).parents]
    if inside:
        print(f"keeping {lab.lab_dir}: mounts under it {inside}")
        return
    shutil.rmtree(lab.lab_dir, ignore_errors=True)


def _get_lab(version: str) -> SlurmLab:
    key = f"lab-{version}"
    if key in _shared:
        cached = _shared[key]
        if isinstance(cached, BaseException):
            raise cached
        return cached
    lab = SlurmLab(slurm_test_config(version))
    try:
        lab.start()
    except SlurmLabError as exc:
        _shared[key] = exc
        raise
    _shared[key] = lab
    return lab


def _need_root() -> None:
    if os.geteuid() != 0 and not IN_CI:
        pytest.skip("real Slurm lab needs root (slurmd/slurmctld/munged); run as root or CI=true")


@contextlib.contextmanager
def running_lab(cfg: SlurmLabConfig) -> Iterator[SlurmLab]:
    """A lab of its own (a test's special slurm.conf or topology), started, then stopped and
    its folder removed; not starting is a failure under CI, a skip elsewhere."""
    _need_root()
    lab = SlurmLab(cfg)
    try:
        lab.start()
    except SlurmLabError as e:
        lab.stop()
        unavailable(f"Slurm lab did not start: {e}")
    try:
        yield lab
    finally:
        lab.stop()
        remove_lab_dir(lab)


@pytest.fixture(scope="session")
def slurm_lab(slurm_version: str) -> Iterator[SlurmLab]:
    """A running 8-node lab of `slurm_version` shared by the session; clients via lab.run(),
    or lab.env() (its PATH reaches the lab's sinfo/scontrol/... for any version)."""
    _need_root()
    try:
        lab = _get_lab(slurm_version)
    except SlurmLabError as exc:
        unavailable(f"the Slurm {slurm_version} lab could not start: {exc}")
    yield lab
    lab.stop()  # idempotent: a second registration's teardown is a no-op
    remove_lab_dir(lab)
    _shared.pop(f"lab-{slurm_version}", None)


@pytest.fixture
def clean_slurm_lab(slurm_lab: SlurmLab) -> SlurmLab:
    """slurm_lab after reset(): no jobs, every node idle, both daemons kinds running."""
    slurm_lab.reset()
    return slurm_lab


ACCT_CTLD_PORT = TEST_CTLD_PORT + 5
ACCT_NODE_PORT0 = TEST_NODE_PORT0 + 20
ACCT_NODES = 2
ACCT_GPUS = 4  # the simulated agents run the 4-GPU l40s-pcie profile to match


def slurm_acct_test_config(version: str = "22.05") -> SlurmLabConfig:
    """n1, n2 with gpu:4 each; slurmdbd + MariaDB; gpufleet Prolog/Epilog into LAB/agents/nX."""
    lab_dir = Path(str(slurm_test_config().lab_dir) + "-acct").absolute()
    # inside a root, the hook runs the host's Python and gpufleet-agent through its view of
    # the host's file system
    agent = [sys.executable, "-m", "gpufleet.agent"]
    if version != HOST_VERSION:
        agent = ["/usr/sbin/chroot", HOST_VIEW, *agent]
    prolog, epilog = write_gpufleet_hooks(lab_dir / "hooks", str(lab_dir / "agents" / "{node}"),
                                          agent)
    return SlurmLabConfig(
        lab_dir=lab_dir, nodes=ACCT_NODES, leaves=1, gpus=ACCT_GPUS, ctld_port=ACCT_CTLD_PORT,
        node_port0=ACCT_NODE_PORT0, accounting=True, prolog=str(prolog), epilog=str(epilog),
        version=version,
    )


@pytest.fixture(scope="module")
def slurm_acct_lab(slurm_version: str) -> Iterator[SlurmLab]:
    """A running 2-node lab with slurmdbd (see the module docstring); stopped after the module."""
    _need_root()
    cfg = slurm_acct_test_config(slurm_version)
    shutil.rmtree(cfg.lab_dir / "agents", ignore_errors=True)  # no hook files of a past run
    lab = SlurmLab(cfg)
    try:
        lab.start(timeout_s=180)
    except SlurmLabError as exc:
        unavailable(f"the accounting lab could not start: {exc}")
    try:
        yield lab
    finally:
        lab.stop()
        remove_lab_dir(lab)
