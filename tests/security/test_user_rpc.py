"""FleetUser over real loopback gRPC on a real controller, authenticated by a real munged:
a plain user cannot drain a node or read another user's accounting and can read their own;
an admin (root, or a member of the admin group) can drain, resume and read everything;
no / garbage / replayed credentials are UNAUTHENTICATED; a standby answers UNAVAILABLE and
reports NOT_SERVING; every refusal and every state change is in the audit log.

Users: the tests run as root; plain users' credentials are made by `munge` run under their
uid with setpriv (nobody 65534, daemon 1); `bin` (uid 2) is an admin through the admin group.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner
from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.rpc.v1 import fleet_pb2_grpc as pb_grpc
from gpufleet.scheduler.access import audit
from gpufleet.scheduler.accounting.ledger import UsageRow
from gpufleet.scheduler.cli.main import main as gpufleet_main
from gpufleet.scheduler.placement.model import ClusterView, NodeView
from gpufleet.scheduler.service.server import Controller
from gpufleet.scheduler.service.user_service import METADATA_KEY
from gpufleet.scheduler.store import CheckpointRow, SqliteStore
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.scheduler.fakes import FakeSlurm
from tests.scheduler.pg_server import PgServer
from tests.security.helpers import make_pki
from tests.security.munge_server import (
    DAEMON_UID,
    NOBODY_UID,
    MungeServer,
    munge_as_user,
    needs_munge,
    started_munged,
)
from tests.support import wait_for

pytestmark = needs_munge

BIN_UID = 2  # "bin", gid 2: the admin group in these tests is "bin"
ADMIN_GROUP = "bin"
NODES = ["n1", "n2", "n3", "n4"]
NOW_MS = int(time.time() * 1000)


@pytest.fixture(scope="module")
def munged() -> Iterator[MungeServer]:
    with started_munged() as server:
        yield server


def _view() -> ClusterView:
    nodes = {n: NodeView(n, 8, frozenset(range(8)), partitions=frozenset({"gpu"}))
             for n in NODES}
    return ClusterView(nodes=nodes, leaf_of={"n1": "leaf1", "n2": "leaf1", "n3": "leaf2",
                                             "n4": "leaf2"},
                       parent={"leaf1": "spine", "leaf2": "spine"}, default_partition="gpu",
                       sources=["test"])


def _seed(store: SqliteStore) -> None:
    rows = []
    for job, user, account, gpus in (("100", "nobody", "physics", 2), ("101", "nobody", "bio", 1),
                                     ("200", "daemon", "physics", 4), ("300", "root", "ops", 1)):
        rows += [UsageRow(job, "n1", g, user, account, NOW_MS - 3_600_000, None, NOW_MS,
                          60_000, 30_000, 1_000_000) for g in range(gpus)]
    store.record_usage(rows)
    # a job known only by a checkpoint that nobody registered, and one whose owner is unknown
    store.record_checkpoint(CheckpointRow("400", "n2", 7, "/ck/400/step-7", NOW_MS, NOBODY_UID,
                                          NOW_MS))
    store.record_checkpoint(CheckpointRow("500", "n2", 3, "/ck/500/step-3", NOW_MS, None,
                                          NOW_MS))


@pytest.fixture
def ctl(tmp_path: Path, munged: MungeServer) -> Iterator[tuple[Controller, FakeSlurm, Path]]:
    audit_path = tmp_path / "audit.jsonl"
    audit.configure(audit_path)
    store = SqliteStore(tmp_path / "state.db")
    _seed(store)
    slurm = FakeSlurm(NODES)
    c = Controller(store, slurm, listen="127.0.0.1:0", munge_socket=munged.socket,
                   admin_group=ADMIN_GROUP, user_view_source=_view)
    c.start()
    yield c, slurm, audit_path
    c.stop(grace_s=0.2)
    store.close()
    audit.configure(None)


def _target(c: Controller) -> str:
    return f"127.0.0.1:{c.port}"


def _call(c: Controller, munged: MungeServer, method: str, request: Any,
          uid: int | None = None, cred: bytes | str | None = b"make",
          creds: grpc.ChannelCredentials | None = None) -> tuple[grpc.StatusCode, Any, str]:
    """One FleetUser call; cred b"make": a fresh credential made by `uid` (None: root)."""
    if cred == b"make":
        cred = munged.credential(uid=uid)
    metadata = [] if cred is None else [(METADATA_KEY, cred.decode() if isinstance(cred, bytes)
                                         else cred)]
    channel = (grpc.insecure_channel(_target(c)) if creds is None
               else grpc.secure_channel(_target(c), creds))
    with channel:
        stub = pb_grpc.FleetUserStub(channel)
        try:
            reply = getattr(stub, method)(request, metadata=metadata, timeout=10)
        except grpc.RpcError as e:
            return e.code(), None, e.details() or ""
    return grpc.StatusCode.OK, reply, ""


def _audit(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ---------------------------------------------------------------- who

def test_whoami_root_admin_group_and_plain_users(ctl: tuple[Controller, FakeSlurm, Path],
                                                 munged: MungeServer) -> None:
    c, _, _ = ctl
    seen = {}
    for uid in (None, BIN_UID, NOBODY_UID, DAEMON_UID):
        code, reply, details = _call(c, munged, "WhoAmI", pb.WhoAmIRequest(), uid)
        assert code == grpc.StatusCode.OK, details
        seen[reply.user] = (reply.uid, reply.admin)
    assert seen == {"root": (0, True), "bin": (BIN_UID, True), "nobody": (NOBODY_UID, False),
                    "daemon": (DAEMON_UID, False)}


@pytest.mark.parametrize(("cred", "words"), [
    (None, "no MUNGE credential"),
    ("garbage", "no 'MUNGE:' prefix"),
    ("MUNGE:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA:", "invalid MUNGE credential"),
    ("MUNGE:" + "x" * 5000, "longer than"),
])
def test_missing_or_garbage_credential_is_unauthenticated(
        ctl: tuple[Controller, FakeSlurm, Path], munged: MungeServer, cred: str | None,
        words: str) -> None:
    c, slurm, audit_path = ctl
    code, _, details = _call(c, munged, "Drain", pb.NodeActionRequest(nodes=["n1"], reason="x"),
                             cred=cred)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert words in details
    assert slurm.calls == []
    rec = _audit(audit_path)[-1]
    assert (rec["actor"], rec["action"], rec["result"], rec["code"]) == (
        "unauthenticated", "user.Drain", "refused", "UNAUTHENTICATED")
    assert rec["source"].startswith("ipv4:127.0.0.1")


def test_replayed_credential_is_unauthenticated(ctl: tuple[Controller, FakeSlurm, Path],
                                                munged: MungeServer) -> None:
    c, slurm, _ = ctl
    cred = munged.credential()  # root's: replaying an admin's credential must not work
    req = pb.NodeActionRequest(nodes=["n1"], reason="disk")
    code, _, _ = _call(c, munged, "Resume", req, cred=cred)
    assert code == grpc.StatusCode.OK
    code, _, details = _call(c, munged, "Drain", req, cred=cred)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "replayed" in details
    assert ("drain", "n1") not in slurm.calls


def test_credential_from_another_cluster_key(ctl: tuple[Controller, FakeSlurm, Path],
                                             munged: MungeServer) -> None:
    c, _, _ = ctl
    with started_munged("gf-munge-rogue-") as rogue:
        cred = rogue.credential()
    code, _, details = _call(c, munged, "WhoAmI", pb.WhoAmIRequest(), cred=cred)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "invalid MUNGE credential" in details


def test_munged_down_on_the_controller_is_unavailable(tmp_path: Path,
                                                      munged: MungeServer) -> None:
    store = SqliteStore(tmp_path / "s.db")
    c = Controller(store, None, listen="127.0.0.1:0",
                   munge_socket=str(tmp_path / "gone.socket"))
    c.start()
    try:
        code, _, details = _call(c, munged, "WhoAmI", pb.WhoAmIRequest())
    finally:
        c.stop(grace_s=0.2)
        store.close()
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "gone.socket" in details and "not running" in details


# ---------------------------------------------------------------- drain / resume

def test_plain_user_cannot_drain_or_resume(ctl: tuple[Controller, FakeSlurm, Path],
                                           munged: MungeServer) -> None:
    c, slurm, audit_path = ctl
    for method in ("Drain", "Resume"):
        code, _, details = _call(c, munged, method,
                                 pb.NodeActionRequest(nodes=["n2"], reason="mine now"),
                                 NOBODY_UID)
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "nobody" in details and "admins only" in details and "bin" in details
    assert slurm.calls == []
    assert c.store.actions("n2") == []
    refused = [r for r in _audit(audit_path) if r["result"] == "refused"]
    assert [(r["actor"], r["action"], r["target"]) for r in refused] == [
        ("nobody", "user.Drain", "n2"), ("nobody", "user.Resume", "n2")]
    assert all(r["code"] == "PERMISSION_DENIED" for r in refused)


@pytest.mark.parametrize("uid", [None, BIN_UID], ids=["root", "admin-group"])
def test_admin_drains_and_resumes(ctl: tuple[Controller, FakeSlurm, Path], munged: MungeServer,
                                  uid: int | None) -> None:
    c, slurm, audit_path = ctl
    who = "root" if uid is None else "bin"
    code, reply, details = _call(c, munged, "Drain",
                                 pb.NodeActionRequest(nodes=["n1", "n2"], reason="bad PSU"), uid)
    assert code == grpc.StatusCode.OK, details
    assert list(reply.changed) == ["n1", "n2"] and not reply.unchanged
    assert slurm.node("n1").drained and slurm.node("n1").reason == "bad PSU"
    acts = c.store.actions("n1")
    assert [(a.action, a.status, a.actor) for a in acts] == [("drain", "done", who)]
    # again: already drained, nothing done twice
    code, reply, _ = _call(c, munged, "Drain",
                           pb.NodeActionRequest(nodes=["n1"], reason="bad PSU"), uid)
    assert code == grpc.StatusCode.OK and list(reply.unchanged) == ["n1"]
    assert slurm.calls.count(("drain", "n1")) == 1
    code, reply, _ = _call(c, munged, "Resume", pb.NodeActionRequest(nodes=["n1", "n3"]), uid)
    assert code == grpc.StatusCode.OK
    assert list(reply.changed) == ["n1"] and list(reply.unchanged) == ["n3"]
    assert not slurm.node("n1").drained and slurm.node("n2").drained
    # one audit record per change (admin.py's, with the caller's address, not cli@host)
    records = [r for r in _audit(audit_path)
               if r["action"] in ("drain", "resume") or r["action"].startswith("user.")]
    recs = [(r["actor"], r["action"], r["target"], r["result"]) for r in records]
    assert recs == [(who, "drain", "n1", "done"), (who, "drain", "n2", "done"),
                    (who, "user.Drain", "n1", "unchanged"), (who, "resume", "n1", "done"),
                    (who, "user.Resume", "n3", "unchanged")]
    assert all(r["source"].startswith(("ipv4:", "ipv6:")) for r in records), records


@pytest.mark.parametrize(("nodes", "reason", "words"), [
    (["n1"], "", "reason is empty"),
    (["n1"], "gpufleet:XID79 fake", "must not start with 'gpufleet:'"),
    (["n1"], "x" * 300, "under 200"),
    (["bad name;rm"], "x", "invalid node name"),
    ([], "x", "no nodes"),
    (["n1"], "line\nbreak", "control characters"),
])
def test_drain_input_is_validated(ctl: tuple[Controller, FakeSlurm, Path], munged: MungeServer,
                                  nodes: list[str], reason: str, words: str) -> None:
    c, slurm, _ = ctl
    code, _, details = _call(c, munged, "Drain", pb.NodeActionRequest(nodes=nodes, reason=reason))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert words in details
    assert slurm.calls == []


def test_drain_of_a_node_slurm_does_not_know(ctl: tuple[Controller, FakeSlurm, Path],
                                             munged: MungeServer) -> None:
    c, slurm, audit_path = ctl
    code, _, details = _call(c, munged, "Drain",
                             pb.NodeActionRequest(nodes=["n1", "n99"], reason="x"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "n99" in details and "done before it: n1" in details
    assert slurm.node("n1").drained
    assert _audit(audit_path)[-1]["result"] == "failed"


# ---------------------------------------------------------------- accounting

def _keys(reply: pb.AcctReply) -> dict[str, int]:
    return {r.key: r.allocated_ms for r in reply.rows}


def test_plain_user_reads_only_their_own_accounting(ctl: tuple[Controller, FakeSlurm, Path],
                                                    munged: MungeServer) -> None:
    c, _, audit_path = ctl
    code, reply, _ = _call(c, munged, "Acct", pb.AcctRequest(group_by="job"), NOBODY_UID)
    assert code == grpc.StatusCode.OK
    assert _keys(reply) == {"100": 120_000, "101": 60_000}
    assert {r.user for r in reply.rows} == {"nobody"}
    code, reply, _ = _call(c, munged, "Acct", pb.AcctRequest(users=["nobody"],
                                                             group_by="account"), NOBODY_UID)
    assert code == grpc.StatusCode.OK and _keys(reply) == {"bio": 60_000, "physics": 120_000}
    # asking for everyone's totals per account still gives only their own share
    code, reply, _ = _call(c, munged, "Acct", pb.AcctRequest(group_by="user"), DAEMON_UID)
    assert code == grpc.StatusCode.OK and _keys(reply) == {"daemon": 240_000}
    code, _, details = _call(c, munged, "Acct", pb.AcctRequest(users=["nobody", "daemon"]),
                             NOBODY_UID)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "daemon" in details and "only their own" in details
    rec = _audit(audit_path)[-1]
    assert (rec["actor"], rec["action"], rec["target"], rec["result"]) == (
        "nobody", "user.Acct", "daemon", "refused")
    code, _, _ = _call(c, munged, "Acct", pb.AcctRequest(group_by="account", clip=True,
                                                         since_ms=NOW_MS - 7_200_000),
                       NOBODY_UID)
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_admin_reads_all_accounting(ctl: tuple[Controller, FakeSlurm, Path],
                                    munged: MungeServer) -> None:
    c, _, _ = ctl
    for uid in (None, BIN_UID):
        code, reply, _ = _call(c, munged, "Acct", pb.AcctRequest(group_by="user"), uid)
        assert code == grpc.StatusCode.OK
        assert _keys(reply) == {"daemon": 240_000, "nobody": 180_000, "root": 60_000}
        code, reply, _ = _call(c, munged, "Acct", pb.AcctRequest(users=["daemon"],
                                                                 group_by="job"), uid)
        assert code == grpc.StatusCode.OK and _keys(reply) == {"200": 240_000}


@pytest.mark.parametrize(("req", "words"), [
    (pb.AcctRequest(group_by="planet"), "group_by"),
    (pb.AcctRequest(users=["a b"]), "not a valid user name"),
    (pb.AcctRequest(jobs=["12x"]), "not a valid job id"),
    (pb.AcctRequest(since_ms=10, until_ms=5), "not after"),
    (pb.AcctRequest(since_ms=-1), "epoch milliseconds"),
])
def test_acct_input_is_validated(ctl: tuple[Controller, FakeSlurm, Path], munged: MungeServer,
                                 req: pb.AcctRequest, words: str) -> None:
    c, _, _ = ctl
    code, _, details = _call(c, munged, "Acct", req, NOBODY_UID)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert words in details


# ---------------------------------------------------------------- jobs

def test_show_job_owner_or_admin(ctl: tuple[Controller, FakeSlurm, Path],
                                 munged: MungeServer) -> None:
    c, _, _ = ctl
    code, reply, _ = _call(c, munged, "ShowJob", pb.ShowJobRequest(job_id="100"), NOBODY_UID)
    assert code == grpc.StatusCode.OK and reply.user == "nobody"
    code, _, details = _call(c, munged, "ShowJob", pb.ShowJobRequest(job_id="100"), DAEMON_UID)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "another user" in details
    code, reply, _ = _call(c, munged, "ShowJob", pb.ShowJobRequest(job_id="100"))
    assert code == grpc.StatusCode.OK and reply.user == "nobody"
    # owner known only from the checkpoint's uid
    code, reply, _ = _call(c, munged, "ShowJob", pb.ShowJobRequest(job_id="400"), NOBODY_UID)
    assert code == grpc.StatusCode.OK
    assert (reply.user, reply.checkpoint_step, reply.checkpoint_path) == (
        "nobody", 7, "/ck/400/step-7")
    code, _, _ = _call(c, munged, "ShowJob", pb.ShowJobRequest(job_id="400"), DAEMON_UID)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    # owner not known at all: admins only
    code, _, details = _call(c, munged, "ShowJob", pb.ShowJobRequest(job_id="500"), NOBODY_UID)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "only admins" in details
    code, reply, _ = _call(c, munged, "ShowJob", pb.ShowJobRequest(job_id="500"), BIN_UID)
    assert code == grpc.StatusCode.OK and reply.checkpoint_step == 3
    code, _, _ = _call(c, munged, "ShowJob", pb.ShowJobRequest(job_id="999"), NOBODY_UID)
    assert code == grpc.StatusCode.NOT_FOUND
    code, _, _ = _call(c, munged, "ShowJob", pb.ShowJobRequest(job_id="1; drop"), NOBODY_UID)
    assert code == grpc.StatusCode.INVALID_ARGUMENT


# ---------------------------------------------------------------- placement

def test_any_user_gets_a_placement(ctl: tuple[Controller, FakeSlurm, Path],
                                   munged: MungeServer) -> None:
    c, _, _ = ctl
    code, reply, details = _call(c, munged, "Place",
                                 pb.PlaceRequest(nodes=2, gpus_per_node=8), NOBODY_UID)
    assert code == grpc.StatusCode.OK, details
    assert reply.ok
    picked = [n.node for n in reply.nodes]
    assert len(picked) == 2 and len({n.leaf for n in reply.nodes}) == 1  # one leaf switch
    assert all(list(n.gpus) == list(range(8)) for n in reply.nodes)
    assert any(f.startswith("--nodelist=") for f in reply.flags)
    code, _, _ = _call(c, munged, "Place", pb.PlaceRequest(nodes=0), NOBODY_UID)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _, details = _call(c, munged, "Place",
                             pb.PlaceRequest(gpus_per_node=2, total_gpus=4), NOBODY_UID)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not both" in details


def test_grpc_placement_source(ctl: tuple[Controller, FakeSlurm, Path], munged: MungeServer,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    from gpufleet.scheduler.placement import PlacementRequest, PlacementUnavailable
    from gpufleet.scheduler.service.user_remote import GrpcPlacementSource

    c, _, _ = ctl
    monkeypatch.setenv("GPUFLEET_MUNGE_SOCKET", munged.socket)
    monkeypatch.setenv("GPUFLEET_INSECURE", "1")
    p = GrpcPlacementSource(_target(c)).place(PlacementRequest(nodes=1, gpus_per_node=4))
    assert p.ok and len(p.nodes) == 1 and p.nodes[0].gpus == (0, 1, 2, 3)
    assert p.request.gpus_per_node == 4
    # controller away: unavailable quickly, so sbatch falls back to plain sbatch
    t0 = time.monotonic()
    with pytest.raises(PlacementUnavailable, match="not reachable"):
        GrpcPlacementSource("127.0.0.1:1", timeout_s=1.0).place(PlacementRequest(nodes=1))
    assert time.monotonic() - t0 < 5


# ---------------------------------------------------------------- standby

def _health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as ch:
        return int(health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5).status)


def test_standby_is_not_serving_and_refuses_user_calls(pg: PgServer, munged: MungeServer) -> None:
    from gpufleet.scheduler.store import PostgresStore

    dsn = pg.create_database()
    stores = [PostgresStore(dsn), PostgresStore(dsn)]
    ctls = [Controller(s, FakeSlurm(NODES), listen="127.0.0.1:0", munge_socket=munged.socket)
            for s in stores]
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    try:
        ctls[0].start()
        wait_for(lambda: ctls[0].active, 10, "the first controller to become active")
        ctls[1].start(elect_wait_s=0.5)
        assert not ctls[1].active
        active, standby = (_target(x) for x in ctls)
        assert _health(active) == serving
        assert _health(active, "gpufleet.v1.FleetUser") == serving
        for service in ("", "gpufleet.v1.FleetController", "gpufleet.v1.FleetUser"):
            assert _health(standby, service) == not_serving
        code, _, details = _call(ctls[1], munged, "WhoAmI", pb.WhoAmIRequest())
        assert code == grpc.StatusCode.UNAVAILABLE and "standby" in details
        code, _, _ = _call(ctls[1], munged, "Drain",
                           pb.NodeActionRequest(nodes=["n1"], reason="x"))
        assert code == grpc.StatusCode.UNAVAILABLE
        code, _, _ = _call(ctls[0], munged, "WhoAmI", pb.WhoAmIRequest())
        assert code == grpc.StatusCode.OK
        # the active one goes away: the standby takes over and says so
        ctls[0].stop(grace_s=0.2)
        wait_for(lambda: ctls[1].active, 20, "the standby to take over")
        wait_for(lambda: _health(standby) == serving, 5, "health SERVING after takeover")
        code, reply, _ = _call(ctls[1], munged, "WhoAmI", pb.WhoAmIRequest())
        assert code == grpc.StatusCode.OK and reply.admin
    finally:
        for x in ctls:
            x.stop(grace_s=0.2)
        for s in stores:
            s.close()
        pg.drop_database(dsn)


# ---------------------------------------------------------------- TLS and the CLI

def _as_user(tmp_path: Path, uid: int) -> dict[str, str]:
    return munge_as_user(tmp_path / f"bin-{uid}", uid)


def test_acct_cli_through_the_controller(ctl: tuple[Controller, FakeSlurm, Path],
                                         munged: MungeServer, tmp_path: Path) -> None:
    c, _, _ = ctl
    base = ["acct", "--controller", _target(c), "--insecure", "--munge-socket", munged.socket,
            "-S", "now-7days", "--group-by", "user", "--json"]
    res = CliRunner().invoke(gpufleet_main, base)  # root: everyone
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert {r["user"]: r["alloc_gpu_s"] for r in doc["rows"]} == {
        "daemon": 240.0, "nobody": 180.0, "root": 60.0}
    assert doc["total"]["alloc_gpu_s"] == 480.0
    res = CliRunner().invoke(gpufleet_main, base, env=_as_user(tmp_path, NOBODY_UID))
    assert res.exit_code == 0, res.output
    assert [r["user"] for r in json.loads(res.output)["rows"]] == ["nobody"]
    res = CliRunner().invoke(gpufleet_main, [*base, "-u", "daemon"],
                             env=_as_user(tmp_path, NOBODY_UID))
    assert res.exit_code == 1
    assert "refused: user nobody may read only their own accounting" in res.output
    assert "daemon" in res.output
    # no munged on this host: a clear error naming the socket
    res = CliRunner().invoke(gpufleet_main, [*base[:4], "--munge-socket",
                                             str(tmp_path / "none.sock")])
    assert res.exit_code == 1 and "none.sock" in res.output


def test_whoami_cli_says_who_the_controller_takes_you_for(
        ctl: tuple[Controller, FakeSlurm, Path], munged: MungeServer, tmp_path: Path) -> None:
    c, _, _ = ctl
    base = ["whoami", "--controller", _target(c), "--insecure", "--munge-socket", munged.socket]
    res = CliRunner().invoke(gpufleet_main, base)  # root
    assert res.exit_code == 0, res.output
    assert res.output == f"root (uid 0), admin at {_target(c)}\n"
    res = CliRunner().invoke(gpufleet_main, [*base, "--json"],
                             env=_as_user(tmp_path, NOBODY_UID))
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == {"user": "nobody", "uid": NOBODY_UID, "admin": False}
    res = CliRunner().invoke(gpufleet_main, ["whoami"], env={"GPUFLEET_CONTROLLER": ""})
    assert res.exit_code == 2 and "pass --controller HOST:PORT" in res.output
    # a controller that is not there: one line naming it, no traceback
    res = CliRunner().invoke(gpufleet_main, ["whoami", "--controller", "127.0.0.1:9",
                                             "--insecure", "--munge-socket", munged.socket])
    assert res.exit_code == 1 and "127.0.0.1:9" in res.output
    assert "Traceback" not in res.output


def test_drain_resume_and_jobs_cli_over_mtls(tmp_path: Path, munged: MungeServer) -> None:
    """Over the controller's mTLS port with a login node's host certificate; the caller is
    still who MUNGE says, not what the certificate says."""
    pki = make_pki(tmp_path / "ca", ["login1"])
    cert, key = pki.leaf("login1")
    store = SqliteStore(tmp_path / "state.db")
    _seed(store)
    slurm = FakeSlurm(NODES)
    c = Controller(store, slurm, listen="127.0.0.1:0", tls=pki.server_tls(),
                   munge_socket=munged.socket, admin_group=ADMIN_GROUP)
    c.start()
    try:
        tls = ["--controller", _target(c), "--tls-ca", str(pki.ca), "--tls-cert", str(cert),
               "--tls-key", str(key), "--munge-socket", munged.socket]
        res = CliRunner().invoke(gpufleet_main, ["drain", "n[1-2]", "--reason", "rack work",
                                                 *tls])
        assert res.exit_code == 0, res.output
        assert "drain n1: done" in res.output and "drain n2: done" in res.output
        assert slurm.node("n2").drained and slurm.node("n2").reason == "rack work"
        res = CliRunner().invoke(gpufleet_main, ["resume", "n1", *tls],
                                 env=_as_user(tmp_path, NOBODY_UID))
        assert res.exit_code == 1 and "admins only" in res.output
        assert slurm.node("n1").drained
        res = CliRunner().invoke(gpufleet_main, ["resume", "n1", *tls])
        assert res.exit_code == 0 and "resume n1: done" in res.output
        res = CliRunner().invoke(gpufleet_main, ["jobs", "show", "400", "--json", *tls],
                                 env=_as_user(tmp_path, NOBODY_UID))
        assert res.exit_code == 0, res.output
        doc = json.loads(res.output)
        assert doc["user"] == "nobody" and doc["checkpoint"]["step"] == 7
        # TLS without the host certificate: the handshake itself is refused
        res = CliRunner().invoke(gpufleet_main, ["acct", *tls[:4], "--munge-socket",
                                                 munged.socket])
        assert res.exit_code == 1 and "not reachable" in res.output
    finally:
        c.stop(grace_s=0.2)
        store.close()


# ---------------------------------------------------------------- fuzzing


def fuzz(budget: int) -> settings:
    """`budget` examples: tests/conftest.py's `fuzz_budget` (quick in the fast set, full under
    `slow`)."""
    return settings(max_examples=budget, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


# a clear answer: served, or refused for a stated reason; never UNKNOWN/INTERNAL (a crash)
CLEAR = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
         grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION}
texts = st.one_of(st.text(max_size=30), st.sampled_from(["n1", "n2", "nobody", "daemon", "100",
                                                          "user", "job", "account", "node"]),
                  st.just("x" * 3000), st.just("a\x00b"))
opt_u32 = st.one_of(st.none(), st.integers(0, 2**32 - 1), st.integers(0, 10))
opt_i64 = st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.just(NOW_MS))
valid = st.sampled_from(["n1", "n2", "n3", "n4", "nobody", "daemon", "root", "physics", "100",
                         "200", "400"])
lists = st.lists(st.one_of(valid, valid, texts), max_size=4)


def _set_opt(msg: Any, **fields: Any) -> Any:
    for k, v in fields.items():
        if v is not None:
            setattr(msg, k, v)
    return msg


requests = st.one_of(
    st.tuples(st.just("WhoAmI"), st.just(pb.WhoAmIRequest())),
    st.tuples(st.just("Place"), st.builds(
        lambda n, g, t, tl, p, c, x: _set_opt(pb.PlaceRequest(partition=p, constraints=c,
                                                              exclude=x),
                                              nodes=n, gpus_per_node=g, total_gpus=t,
                                              time_limit_min=tl),
        opt_u32, opt_u32, opt_u32, opt_u32, texts, lists, lists)),
    st.tuples(st.just("Acct"), st.builds(
        lambda u, a, j, s, e, g, c: _set_opt(pb.AcctRequest(users=u, accounts=a, jobs=j,
                                                            group_by=g, clip=c),
                                             since_ms=s, until_ms=e),
        lists, lists, lists, opt_i64, opt_i64, texts, st.booleans())),
    st.tuples(st.just("ShowJob"), st.builds(lambda j: pb.ShowJobRequest(job_id=j),
                                            st.one_of(valid, texts))),
    st.tuples(st.sampled_from(["Drain", "Resume"]), st.builds(
        lambda n, r: pb.NodeActionRequest(nodes=n, reason=r), lists, texts)),
)


def test_fuzz_every_fleetuser_method(ctl: tuple[Controller, FakeSlurm, Path],
                                     munged: MungeServer,
                                     report_figure: Callable[[str], None],
                                     fuzz_budget: int) -> None:
    c, slurm, _ = ctl
    tried: dict[str, int] = {}
    codes: dict[str, int] = {}
    channel = grpc.insecure_channel(_target(c))
    stub = pb_grpc.FleetUserStub(channel)

    @fuzz(fuzz_budget)
    @given(requests, st.sampled_from([None, NOBODY_UID]))
    def one(call: tuple[str, Any], uid: int | None) -> None:
        method, req = call
        tried[method] = tried.get(method, 0) + 1
        cred = munged.credential(uid=uid).decode()
        code, details = grpc.StatusCode.OK, "ok"
        try:
            getattr(stub, method)(req, metadata=[(METADATA_KEY, cred)], timeout=15)
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
        assert code in CLEAR, f"{method}({req}) -> {code}: {details}"
        assert details, f"{method} refused without saying why"
        codes[code.name] = codes.get(code.name, 0) + 1

    try:
        one()
    finally:
        channel.close()
    # the controller still serves, and Slurm saw only admins' actions on real node names
    code, reply, _ = _call(c, munged, "WhoAmI", pb.WhoAmIRequest(), NOBODY_UID)
    assert code == grpc.StatusCode.OK and reply.user == "nobody"
    assert {n for _, n in slurm.calls} <= set(NODES)
    total = sum(tried.values())
    report_figure(f"fuzz FleetUser (root and nobody, valid credentials): {total} requests "
                  f"tried ({', '.join(f'{k} {v}' for k, v in sorted(tried.items()))}); "
                  f"answers {dict(sorted(codes.items()))}; 0 crashes")
    assert total >= min(fuzz_budget, 50)
    assert set(tried) == {"WhoAmI", "Place", "Acct", "ShowJob", "Drain", "Resume"}
