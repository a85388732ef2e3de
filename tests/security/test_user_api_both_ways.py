"""Each user command answers the same on the head node (LocalUserApi: the store and Slurm)
and through a real controller over loopback gRPC (RemoteUserApi: FleetUser, a real munged):
the same output and the same exit status for `acct`, `jobs show`, `drain` and `resume`, and
the same placement (`gpufleet place` is sbatch --test-only, whose placement is this call).

Two identical clusters are built, one per way in, so a drain on one is mirrored on the other
and the two transcripts must match line for line. As root both ways are an admin; a plain
user's answers (and refusals) are compared at the API, LocalUserApi for that caller against
the controller asked with that user's MUNGE credential.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.scheduler.accounting.ledger import UsageQuery, UsageRow
from gpufleet.scheduler.cli import nodes as nodes_cli
from gpufleet.scheduler.cli.main import main as gpufleet_main
from gpufleet.scheduler.placement.model import ClusterView, NodeView, PlacementRequest
from gpufleet.scheduler.service.convert import stored_inventories
from gpufleet.scheduler.service.server import Controller
from gpufleet.scheduler.service.user_client import UserClient
from gpufleet.scheduler.service.user_remote import RemoteUserApi
from gpufleet.scheduler.store import CheckpointRow, RecoveryRow, SqliteStore, VerdictRow
from gpufleet.scheduler.userapi import Caller, UserApi, UserApiError
from gpufleet.scheduler.userapi.local import LocalUserApi

from tests.scheduler.fakes import FakeSlurm
from tests.security.munge_server import (
    NOBODY_UID,
    MungeServer,
    munge_as_user,
    munge_installed,
    started_munged,
)

pytestmark = pytest.mark.skipif(not munge_installed() and os.environ.get("CI") != "true",
                                reason="munge is not installed")

NODES = ["n1", "n2", "n3", "n4"]
NOW_MS = int(time.time() * 1000)
ADMIN_GROUP = "bin"
START = "2000-01-01"  # an absolute window: both runs print the same since_ms


def _inventory(node: str) -> bytes:
    """8 GPUs in two NVLink islands of 4, each half nearer its own NIC."""
    inv = pb.NodeInventory(node_name=node, hostname=node,
                           gpus=[pb.Gpu(index=i) for i in range(8)])
    for a in range(8):
        for b in range(a + 1, 8):
            inv.gpu_links.add(gpu_a=a, gpu_b=b, nvlink_count=4 if a // 4 == b // 4 else 0,
                              pcie_relation=pb.PCIE_RELATION_SYS)
    for g in range(8):
        for hca in ("mlx5_0", "mlx5_1"):
            near = (hca == "mlx5_0") == (g < 4)
            inv.gpu_nic_affinity.add(gpu_index=g, hca=hca, pcie_relation=(
                pb.PCIE_RELATION_PIX if near else pb.PCIE_RELATION_SYS))
    return inv.SerializeToString()


def _seed(store: SqliteStore) -> None:
    for n in NODES:
        store.upsert_node(n, n, 8, _inventory(n), "agent-1", NOW_MS)
    store.set_verdict(VerdictRow("n4", "xid", 2, "", "fatal", "xid79", "GPU 2 fell off", NOW_MS))
    rows = []
    for job, user, account, gpus in (("100", "nobody", "physics", 2), ("101", "nobody", "bio", 1),
                                     ("200", "daemon", "physics", 4), ("300", "root", "ops", 1)):
        rows += [UsageRow(job, "n1", g, user, account, NOW_MS - 3_600_000, None, NOW_MS,
                          60_000, 30_000, 1_000_000) for g in range(gpus)]
    store.record_usage(rows)
    store.record_checkpoint(CheckpointRow("400", "n2", 7, "/ck/400/step-7", NOW_MS - 5_000,
                                          NOBODY_UID, NOW_MS))
    store.record_checkpoint(CheckpointRow("500", "n2", 3, "/ck/500/step-3", NOW_MS, None,
                                          NOW_MS))
    store.save_recovery(RecoveryRow(0, "400", "n2", "running_again", "", 1, NOW_MS - 4_000,
                                   NOW_MS - 3_900, NOW_MS - 3_800, NOW_MS - 3_000,
                                   NOW_MS - 1_000, 7, NOW_MS - 5_000, 1_000, NOW_MS - 3_950))


def _view() -> ClusterView:
    nodes = {n: NodeView(n, 8, frozenset(range(8)), partitions=frozenset({"gpu"}))
             for n in NODES}
    return ClusterView(nodes=nodes, leaf_of={"n1": "leaf1", "n2": "leaf1", "n3": "leaf2",
                                             "n4": "leaf2"},
                       parent={"leaf1": "spine", "leaf2": "spine"}, default_partition="gpu",
                       sources=["test"])


@dataclass
class Side:
    """One cluster: its store, its Slurm, and the options that reach it."""

    store: SqliteStore
    slurm: FakeSlurm
    options: list[str]


@pytest.fixture(scope="module")
def munged() -> Iterator[MungeServer]:
    with started_munged() as server:
        yield server


@pytest.fixture
def sides(tmp_path: Path, munged: MungeServer,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Side, Side, Controller]]:
    local_store, remote_store = (SqliteStore(tmp_path / f"{w}.db") for w in ("local", "remote"))
    _seed(local_store)
    _seed(remote_store)
    local = Side(local_store, FakeSlurm(NODES), ["--db", str(tmp_path / "local.db")])
    remote = Side(remote_store, FakeSlurm(NODES), [])
    # the head-node commands' Slurm is this fake one (the real CLI client needs slurmctld)
    monkeypatch.setattr(nodes_cli, "_slurm_for_admin", lambda _kind: lambda: local.slurm)
    ctl = Controller(remote_store, remote.slurm, listen="127.0.0.1:0",
                     munge_socket=munged.socket, admin_group=ADMIN_GROUP, user_view_source=_view)
    ctl.start()
    remote.options = ["--controller", f"127.0.0.1:{ctl.port}", "--insecure", "--munge-socket",
                      munged.socket]
    try:
        yield local, remote, ctl
    finally:
        ctl.stop(grace_s=0.2)
        local_store.close()
        remote_store.close()


def _both(local: Side, remote: Side, *args: str) -> tuple[int, str]:
    """Run one command both ways; they must agree. Returns (exit status, output)."""
    outs = []
    for side in (local, remote):
        argv = [*args[:2], *side.options, *args[2:]] if args[0] == "jobs" else \
            [args[0], *side.options, *args[1:]]
        r = CliRunner().invoke(gpufleet_main, argv)
        assert "Traceback" not in r.output, r.output
        outs.append((r.exit_code, r.output))
    assert outs[0] == outs[1], f"{args}: local {outs[0]!r} != through the controller {outs[1]!r}"
    return outs[0]


def test_acct_answers_the_same_both_ways(sides: tuple[Side, Side, Controller]) -> None:
    local, remote, _ = sides
    code, out = _both(local, remote, "acct", "-S", START, "--group-by", "user", "--json")
    assert code == 0 and '"alloc_gpu_s": 480.0' in out  # the total of 8 GPUs x 60 s
    for fmt in ([], ["--csv"]):
        for group_by in ("job", "account", "node"):
            code, out = _both(local, remote, "acct", "-S", START, "--group-by", group_by, *fmt)
            assert code == 0 and "TOTAL" in out
    code, out = _both(local, remote, "acct", "-S", START, "-u", "daemon", "-A", "physics")
    assert code == 0 and "200" in out and "nobody" not in out
    code, out = _both(local, remote, "acct", "-S", START, "--group-by", "user", "--clip",
                      "--json")
    assert code == 0 and '"nobody"' in out
    code, out = _both(local, remote, "acct", "-S", "1960-01-01", "--group-by", "user")
    assert code == 1 and "since_ms=-" in out and "epoch milliseconds" in out
    code, out = _both(local, remote, "acct", "-u", "a b")
    assert code == 2 and "not a user name" in out


def test_jobs_show_answers_the_same_both_ways(sides: tuple[Side, Side, Controller]) -> None:
    local, remote, _ = sides
    code, out = _both(local, remote, "jobs", "show", "400")
    assert code == 0 and "job 400 (user nobody)" in out
    assert "step 7" in out and " on n2 " in out and "recovery 1: node n2" in out
    code, out = _both(local, remote, "jobs", "show", "400", "--json")
    assert code == 0 and '"lost_work_ms": 1000' in out
    # known from the ledger alone: shown, with its owner, both ways
    code, out = _both(local, remote, "jobs", "show", "100")
    assert (code, out.splitlines()[0]) == (0, "job 100 (user nobody)")
    code, out = _both(local, remote, "jobs", "show", "500", "--json")
    assert code == 0 and '"user": null' in out
    # nothing recorded: exit 1 with one line, both ways
    code, out = _both(local, remote, "jobs", "show", "999")
    assert code == 1 and out.count("\n") == 1 and "job 999: no recovery" in out
    code, out = _both(local, remote, "jobs", "show", "12x")
    assert code == 2 and "JOBID" in out


def test_drain_and_resume_answer_the_same_both_ways(
        sides: tuple[Side, Side, Controller]) -> None:
    local, remote, _ = sides
    code, out = _both(local, remote, "drain", "n[1-2]", "--reason", "rack work")
    assert (code, out) == (0, "drain n1: done\ndrain n2: done\n")
    code, out = _both(local, remote, "drain", "n1", "--reason", "rack work")
    assert (code, out) == (0, "drain n1: unchanged (already drained for that reason)\n")
    code, out = _both(local, remote, "drain", "n1", "--reason", "PSU swap")  # a new reason
    assert (code, out) == (0, "drain n1: done\n")
    code, out = _both(local, remote, "drain", "n3", "--reason", "gpufleet:xid79 mine")
    assert code == 1 and "must not start with 'gpufleet:'" in out
    code, out = _both(local, remote, "resume", "n[1,3]")
    assert (code, out) == (0, "resume n1: done\nresume n3: unchanged (already not drained)\n")
    code, out = _both(local, remote, "resume", "n2,n9")
    assert code == 1 and "resume n9 failed" in out and "done before it: n2" in out
    for side in (local, remote):
        assert side.slurm.calls == [("drain", "n1"), ("drain", "n2"), ("drain", "n1"),
                                    ("resume", "n1"), ("resume", "n2")]
        acts = [(a.node, a.action, a.status, a.actor) for a in side.store.actions()]
        assert acts == [("n1", "drain", "done", "root"), ("n2", "drain", "done", "root"),
                        ("n1", "drain", "done", "root"), ("n1", "resume", "done", "root"),
                        ("n2", "resume", "done", "root")]
    assert local.slurm.state == remote.slurm.state


def _apis(side: Side, ctl: Controller, munged: MungeServer, caller: Caller
          ) -> tuple[LocalUserApi, RemoteUserApi]:
    local = LocalUserApi(side.store, side.slurm, caller, _view, stored_inventories(side.store),
                         admin_group=ADMIN_GROUP)
    remote = RemoteUserApi(UserClient(f"127.0.0.1:{ctl.port}", None, munged.socket))
    return local, remote


def _answer(call: Callable[[UserApi], object], api: UserApi) -> object:
    """What the API answered, or the error it raised (its kind and message)."""
    try:
        return call(api)
    except UserApiError as e:
        return type(e).__name__, str(e)


def test_placement_and_a_plain_users_answers_are_the_same_both_ways(
        sides: tuple[Side, Side, Controller], munged: MungeServer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    local_side, _, ctl = sides
    root = Caller(0, 0, "root", admin=True)
    nobody = Caller(NOBODY_UID, NOBODY_UID, "nobody", admin=False)
    for caller in (root, nobody):
        if caller is nobody:
            for k, v in munge_as_user(tmp_path / "bin", NOBODY_UID).items():
                monkeypatch.setenv(k, v)
        local, api = _apis(local_side, ctl, munged, caller)
        calls: dict[str, Callable[[UserApi], object]] = {
            "place": lambda a: a.place(PlacementRequest(nodes=1, gpus_per_node=4)),
            "place 2x8": lambda a: a.place(PlacementRequest(nodes=2, gpus_per_node=8)),
            "place both": lambda a: a.place(PlacementRequest(gpus_per_node=2, total_gpus=4)),
            "acct": lambda a: a.usage(UsageQuery(group_by="job")),
            "acct other": lambda a: a.usage(UsageQuery(users=("daemon",))),
            "acct clip": lambda a: a.usage(UsageQuery(group_by="account", since_ms=1), True),
            "job 100": lambda a: a.show_job("100"),
            "job 200": lambda a: a.show_job("200"),
            "job 500": lambda a: a.show_job("500"),
            "job 999": lambda a: a.show_job("999"),
            "drain": lambda a: a.drain(["n1"], "mine"),
        }
        answers = {name: (_answer(call, local), _answer(call, api))
                   for name, call in calls.items()}
        api.close()
        for name, (here, there) in answers.items():
            assert here == there, f"{caller.user} {name}: {here!r} != {there!r}"
        got = {name: here for name, (here, _) in answers.items()}
        placed = got["place"].placement  # type: ignore[attr-defined]
        # the NVLink layout came from the stored inventory: 4 GPUs in one island, near a NIC
        assert placed.ok and placed.nodes[0].islands == 1 and placed.nodes[0].nic_rank == 4
        assert got["place"].avoid == ("n4",)  # type: ignore[attr-defined]
        assert got["place both"][0] == "InvalidRequest"  # type: ignore[index]
        assert got["job 999"][0] == "NotFound"  # type: ignore[index]
        if caller is nobody:
            for name in ("acct other", "acct clip", "job 200", "job 500", "drain"):
                assert got[name][0] == "PermissionDenied", name  # type: ignore[index]
            assert {r.key for r in got["acct"]} == {"100", "101"}  # type: ignore[attr-defined]
        else:
            assert got["drain"].changed == ("n1",)  # type: ignore[attr-defined]
            assert len(got["acct"]) == 4  # type: ignore[arg-type]
