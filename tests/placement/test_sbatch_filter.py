"""The sbatch placement helper without Slurm: its hand-made protobuf and HTTP/2 call against
the real controller (loopback gRPC, real munged, plaintext and mTLS), and its rules for what
it adds to a job given the options sbatch parsed."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.scheduler.cli.sbatch_filter import (
    SWITCH_HOLD,
    ConfigError,
    ckpt_options,
    decide,
    load_client_config,
    parse_time_min,
    place_options,
    plan_from_options,
)
from gpufleet.scheduler.placement.model import ClusterView, NodeView
from gpufleet.scheduler.service import placecall
from gpufleet.scheduler.service.server import Controller
from gpufleet.scheduler.store import SqliteStore

from tests.scheduler.fakes import FakeSlurm
from tests.security.helpers import make_pki
from tests.security.munge_server import NOBODY_UID, MungeServer, needs_munge, started_munged

NODES = ["n1", "n2", "n3", "n4"]


def _view() -> ClusterView:
    nodes = {n: NodeView(n, 8, frozenset(range(8)), partitions=frozenset({"gpu"}),
                         health="degraded" if n == "n4" else "ok") for n in NODES}
    return ClusterView(nodes=nodes, leaf_of={"n1": "leaf1", "n2": "leaf1", "n3": "leaf2",
                                             "n4": "leaf2"},
                       parent={"leaf1": "spine", "leaf2": "spine"}, default_partition="gpu",
                       sources=["test"])


def test_wire_format_matches_the_generated_classes() -> None:
    req = placecall.PlaceRequest(nodes=300, gpus_per_node=8, partition="gpu",
                                 constraints=["a100", "ib"], time_limit_min=1440,
                                 exclude=["n1", "n2"])
    parsed = pb.PlaceRequest.FromString(placecall.encode_request(req))
    assert parsed.nodes == 300 and parsed.gpus_per_node == 8 and not parsed.HasField("total_gpus")
    assert list(parsed.constraints) == ["a100", "ib"] and list(parsed.exclude) == ["n1", "n2"]
    assert parsed.partition == "gpu" and parsed.time_limit_min == 1440
    reply = pb.PlaceReply(ok=True, flags=["--nodelist=n[1-2]", "--nodes=2"], score=90.5,
                          explanation=["x" * 300], avoid=["n4"])
    reply.cost.update({"leaves": 1.0, "hops": 2.0})
    reply.nodes.add(node="n1", leaf="leaf1", gpus=[0, 1])
    reply.env.update({"GPUFLEET_PLACEMENT": "n1:0,1"})
    got = placecall.decode_reply(reply.SerializeToString())
    assert got.ok and got.flags == ["--nodelist=n[1-2]", "--nodes=2"]
    assert got.cost == {"leaves": 1.0, "hops": 2.0} and got.nodes == ["n1"]
    assert got.avoid == ["n4"] and got.explanation == ["x" * 300]
    with pytest.raises(placecall.PlaceCallError):
        placecall.decode_reply(b"\x1a\x05ab")  # a string field cut short


def test_hpack_integers_over_the_prefix() -> None:
    # RFC 7541 C.1.2: 1337 with a 5-bit prefix
    assert placecall._hpack_int(1337, 5) == bytes([31, 154, 10])
    assert placecall._hpack_int(10, 7) == bytes([10])


def test_time_formats() -> None:
    assert [parse_time_min(t) for t in ("0", "UNLIMITED", "30", "90:30", "1:00:00", "2-0",
                                         "1-2:30", "1-0:0:1", "x", "1:2:3:4")] == [
        None, None, 30, 91, 60, 2880, 1590, 1441, None, None]


def test_what_may_be_pinned() -> None:
    plain = plan_from_options({"nodes": "2", "gres": "gres:gpu:8", "partition": "gpu",
                               "time": "60", "wrap": "x", "argv": []}, 0)
    assert plain is not None and plain.pin and plain.nodes == 2 and plain.gpus_per_node == 8
    assert plain.time_limit_min == 60
    # 23.02 on (24.11, 26.05 seen in their cli_filter/lua) spell it gres/gpu:N
    for gres, n in (("gres/gpu:2", 2), ("gres/gpu:h100:4", 4), ("gres/gpu", 1)):
        p = plan_from_options({"nodes": "1", "gres": gres}, 0)
        assert p is not None and p.gpus_per_node == n, gres
    for opts, why in (({"array": "0-3"}, "array"), ({"cpus-per-task": "4"}, "cpus-per-task"),
                      ({"mem": "4G"}, "mem"), ({"nodes": "1-4"}, "node range"),
                      ({"ntasks": "8"}, "ntasks"), ({"licenses": "x"}, "licenses"),
                      ({"constraint": "a|b"}, "constraint expression")):
        p = plan_from_options({"gres": "gres:gpu:1", **opts}, 0)
        assert p is not None and not p.pin and why in p.why_not_pin, opts
    het = plan_from_options({"nodes": "1"}, 1)
    assert het is not None and not het.pin
    # the user chose nodes, or the job starts later: nothing added at all
    for opts in ({"nodelist": "n1"}, {"dependency": "afterok:1"}, {"begin": "now+1hour"},
                 {"hold": "set"}):
        assert plan_from_options(opts, 0) is None, opts
    assert plan_from_options({"hold": "unset", "nodes": "1"}, 0) is not None
    gpus = plan_from_options({"gpus": "a100:16", "wrap": "x"}, 0)
    assert gpus is not None and gpus.total_gpus == 16 and gpus.gpus_per_node is None
    assert not gpus.pin  # how many nodes 16 GPUs take is Slurm's choice


def test_hetjob_scripts_and_stdin_are_not_pinned(tmp_path: Path) -> None:
    one = tmp_path / "one.sh"
    one.write_text("#!/bin/bash\n#SBATCH -N1\ntrue\n")
    het = tmp_path / "het.sh"
    het.write_text("#!/bin/bash\n#SBATCH -N1\n#SBATCH hetjob\n#SBATCH -N2\ntrue\n")
    p = plan_from_options({"nodes": "1", "argv": [str(one), "a"]}, 0)
    assert p is not None and p.pin
    for opts in ({"nodes": "1", "argv": [str(het)]}, {"nodes": "1", "argv": []},
                 {"nodes": "1", "argv": [str(tmp_path / "gone.sh")]}):
        p = plan_from_options(opts, 0)
        assert p is not None and not p.pin and "hetjob" in p.why_not_pin, opts


def test_decide_pins_only_what_may_be_pinned() -> None:
    opts = {"nodes": "2", "gres": "gres:gpu:8", "wrap": "x"}
    plan = plan_from_options(opts, 0)
    assert plan is not None
    ok_flags = ["--nodes=2", "--nodelist=n[1-2]", "--gres=gpu:8"]
    # the unhealthy node stays excluded with the pin: a released pin must not land there
    assert decide(opts, plan, True, ok_flags, 1, ["n4"]) == {"nodelist": "n[1-2]",
                                                            "exclude": "n4"}
    # free now, but jobs wait for nodes in the partition (backfill may hold these for
    # them): not sure it starts now, so no pin; the one-leaf hold the controller lifts
    hold = {"switches": f"1@{SWITCH_HOLD}"}
    assert decide(opts, plan, True, ok_flags, 1, ["n4"], waiting=1) == {"exclude": "n4",
                                                                        **hold}
    opts = {"nodes": "2", "gres": "gres:gpu:8", "mem": "1G", "exclude": "n9"}
    plan = plan_from_options(opts, 0)
    assert plan is not None
    # not pinned, starts now on one leaf: the hold (Slurm's pick may span more)
    assert decide(opts, plan, True, ok_flags, 1, ["n4", "n9"]) == {"exclude": "n9,n4", **hold}
    # ... on two leaves now: held too, the controller lifts it after its grace
    assert decide(opts, plan, True, ok_flags, 2, ["n4"]) == {"exclude": "n9,n4", **hold}
    # a controller that runs no switch holds: no count (Slurm alone would keep it to 119 s)
    assert decide(opts, plan, True, ok_flags, 2, ["n4"], switch_hold=False) == {
        "exclude": "n9,n4"}
    # the user's own switch count wins
    sopts = {**opts, "switches": "2"}
    assert decide(sopts, plan, True, ok_flags, 1, ["n4"]) == {"exclude": "n9,n4"}
    # an array: its later tasks start later, where "one leaf now" says nothing
    aopts = {"nodes": "2", "gres": "gres:gpu:8", "array": "0-3"}
    aplan = plan_from_options(aopts, 0)
    assert aplan is not None and decide(aopts, aplan, True, ok_flags, 1, []) == {}
    # not now: never a pin (the job would wait for particular nodes while Slurm could start
    # it sooner elsewhere); the hold where it fits one leaf of an idle cluster (a fallback's
    # `leaves`), none where it never can
    plan = plan_from_options({"nodes": "2"}, 0)
    assert plan is not None
    assert decide({"nodes": "2"}, plan, False, ["--switches=1@10", "--exclude=n4"], 1,
                  ["n4"]) == {"exclude": "n4", **hold}
    assert decide({"nodes": "2"}, plan, False, ["--exclude=n4"], 2, ["n4"]) == {
        "exclude": "n4"}
    plan = plan_from_options({"nodes": "2", "gres": "gres:gpu:8", "wrap": "x"}, 0)
    assert plan is not None and plan.pin
    assert decide({"nodes": "2"}, plan, False, ["--nodes=2", "--exclude=n4"], 1,
                  ["n4"]) == {"exclude": "n4", **hold}
    # one node: no switch count; the user's own --switches wins
    plan = plan_from_options({"nodes": "1", "mem": "1"}, 0)
    assert plan is not None and decide({"nodes": "1", "mem": "1"}, plan, True, [], 1, []) == {}
    plan = plan_from_options({"nodes": "2", "switches": "2"}, 0)
    assert plan is not None
    assert decide({"nodes": "2", "switches": "2"}, plan, False, ["--switches=1@10"], 0, []) == {}


def test_ckpt_options_keep_the_users_own() -> None:
    assert ckpt_options({}, "/ck") == {"requeue": "", "signal": "B:USR1@300",
                                       "comment": "gpufleet-ckpt"}
    got = ckpt_options({"no-requeue": "set", "signal": "B:USR2@60", "comment": "mine",
                        "export": "NONE"}, "/ck")
    assert got == {"comment": "mine gpufleet-ckpt",
                   "export": "NONE,GPUFLEET_CKPT_DIR=/ck,GPUFLEET_CKPT_SIGNAL=USR1"}


def test_client_config(tmp_path: Path) -> None:
    cfg = tmp_path / "client.toml"
    env = {"GPUFLEET_CLIENT_CONFIG": str(cfg)}
    assert load_client_config(env).controller == ""  # no file: no controller
    cfg.write_text('controller = "head1:50051"\ntls_ca = "/etc/gpufleet/ca.pem"\n')
    c = load_client_config(env)
    assert c.controller == "head1:50051" and c.tls_ca == "/etc/gpufleet/ca.pem"
    assert load_client_config({**env, "GPUFLEET_CONTROLLER": "h2:1"}).controller == "h2:1"
    cfg.write_text('controler = "x"\n')
    with pytest.raises(ConfigError, match="unknown key"):
        load_client_config(env)
    if os.geteuid() != 0:
        cfg.chmod(0)
        with pytest.raises(ConfigError, match="cannot read"):
            load_client_config(env)


@pytest.fixture(scope="module")
def munged() -> Iterator[MungeServer]:
    with started_munged() as server:
        yield server


@pytest.fixture
def ctl(tmp_path: Path, munged: MungeServer) -> Iterator[Controller]:
    store = SqliteStore(tmp_path / "state.db")
    c = Controller(store, FakeSlurm(NODES), listen="127.0.0.1:0", munge_socket=munged.socket,
                   user_view_source=_view)
    # _view is static: the jobs placed are never submitted, so nothing handed out is held
    # (tests/placement/test_view_source.py checks the hold)
    c.user_servicer.handed_out.hold_s = 0
    c.start()
    yield c
    c.stop(grace_s=0.2)
    store.close()


@needs_munge
def test_place_call_against_the_controller(ctl: Controller, munged: MungeServer) -> None:
    addr = f"127.0.0.1:{ctl.port}"
    cred = munged.credential(uid=NOBODY_UID).decode()
    r = placecall.place(addr, placecall.PlaceRequest(nodes=2, gpus_per_node=8), cred, 5, None)
    assert r.ok and sorted(r.nodes) == ["n1", "n2"] and r.avoid == ["n4"]
    assert "--nodelist=n[1-2]" in r.flags and r.cost["leaves"] == 1.0
    assert "switch_hold" not in r.cost  # this controller runs no switch holds
    # refused (a replayed credential; a bad request): an error, never a made-up reply
    with pytest.raises(placecall.PlaceCallError, match="refused"):
        placecall.place(addr, placecall.PlaceRequest(nodes=1), cred, 5, None)
    with pytest.raises(placecall.PlaceCallError, match="refused"):
        placecall.place(addr, placecall.PlaceRequest(nodes=0),
                        munged.credential(uid=NOBODY_UID).decode(), 5, None)
    t0 = time.monotonic()
    with pytest.raises(placecall.PlaceCallError):
        placecall.place("127.0.0.1:1", placecall.PlaceRequest(nodes=1), "x", 1, None)
    assert time.monotonic() - t0 < 2


@needs_munge
def test_place_options_end_to_end(ctl: Controller, munged: MungeServer, tmp_path: Path) -> None:
    cfg = tmp_path / "client.toml"
    cfg.write_text(f'controller = "127.0.0.1:{ctl.port}"\ninsecure = true\n'
                   f'munge_socket = "{munged.socket}"\n')
    env = {"GPUFLEET_CLIENT_CONFIG": str(cfg), "PATH": os.environ["PATH"]}
    assert place_options({"nodes": "2", "gres": "gres:gpu:8", "wrap": "x"}, 0, env) == {
        "nodelist": "n[1-2]", "exclude": "n4", "gpufleet-release-after": "10"}
    assert place_options({"nodes": "2", "gres": "gres:gpu:8", "wrap": "x"}, 0,
                         {**env, "GPUFLEET_PIN_RELEASE_S": "5"})["gpufleet-release-after"] == "5"
    # the same job as a hetjob component 0 (a `:` on sbatch's command line): not pinned;
    # a switch count only from a controller that runs switch holds (it says so in the cost)
    het = {"nodes": "2", "gres": "gres:gpu:8", "wrap": "x"}
    assert place_options(het, 0, env, het=True) == {"exclude": "n4"}
    ctl.user_servicer.switch_holds = True
    assert place_options(het, 0, env, het=True) == {"exclude": "n4",
                                                     "switches": f"1@{SWITCH_HOLD}"}
    ctl.user_servicer.switch_holds = False
    assert place_options({"nodes": "1", "mem": "1G"}, 0, env) == {"exclude": "n4"}
    assert place_options({"array": "0-1", "nodes": "3"}, 0, env) == {"exclude": "n4"}
    assert place_options({"nodes": "1", "hold": "set"}, 0, env) == {}
    # controller away, or none configured: nothing added
    cfg.write_text('controller = "127.0.0.1:1"\ninsecure = true\n')
    assert place_options({"nodes": "1"}, 0, env) == {}
    cfg.write_text("")
    assert place_options({"nodes": "1"}, 0, env) == {}


@needs_munge
def test_place_call_over_mtls(tmp_path: Path, munged: MungeServer) -> None:
    pki = make_pki(tmp_path / "ca", ["login1"])
    cert, key = pki.leaf("login1")
    store = SqliteStore(tmp_path / "state.db")
    c = Controller(store, FakeSlurm(NODES), listen="127.0.0.1:0", tls=pki.server_tls(),
                   munge_socket=munged.socket, user_view_source=_view)
    c.start()
    try:
        tls = placecall.Tls(str(pki.ca), str(cert), str(key))
        r = placecall.place(f"localhost:{c.port}", placecall.PlaceRequest(gpus_per_node=2),
                            munged.credential().decode(), 5, tls)
        assert r.ok and len(r.nodes) == 1
        with pytest.raises(placecall.PlaceCallError):  # no client certificate: refused
            placecall.place(f"localhost:{c.port}", placecall.PlaceRequest(gpus_per_node=2),
                            munged.credential().decode(), 5, placecall.Tls(str(pki.ca)))
    finally:
        c.stop(grace_s=0.2)
        store.close()


def test_unreadable_controller_config_does_not_stop_user_commands(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    """/etc/gpufleet/controller.toml is 0640 root:slurm: a user's command runs without it;
    naming it explicitly is one clear line."""
    from click.testing import CliRunner
    from gpufleet.scheduler.cli import settings
    from gpufleet.scheduler.cli.main import main

    class Unreadable(type(Path())):  # type: ignore[misc]
        def read_text(self, *_a: object, **_k: object) -> str:
            raise PermissionError(13, "Permission denied", str(self))

    conf = Unreadable(tmp_path / "controller.toml")
    conf.write_text('db = "x"\n')
    monkeypatch.setattr(settings, "DEFAULT_CONFIG", conf)
    res = CliRunner().invoke(main, ["jobs", "--help"])
    assert res.exit_code == 0, res.output
    monkeypatch.setattr(settings, "Path", Unreadable)
    res = CliRunner().invoke(main, ["--config", str(conf), "jobs", "--help"])
    assert res.exit_code == 2 and "cannot read: Permission denied" in res.output
    assert "Traceback" not in res.output




def test_only_known_unhealthy_nodes_are_avoided(tmp_path: Path) -> None:
    """A node whose agent went silent (unreachable) is not excluded from Slurm's choice: its
    health is unknown, Slurm handles dead nodes itself, and with every agent silent (agents or
    controller down a while) excluding them would refuse every job plain sbatch runs."""
    from gpufleet.scheduler.placement.model import PlacementRequest
    from gpufleet.scheduler.userapi.local import LocalUserApi
    from gpufleet.scheduler.userapi.model import Caller

    def view() -> ClusterView:
        v = _view()
        health = {"n1": "unreachable", "n2": "unreachable", "n3": "fatal", "n4": "degraded"}
        nodes = {n: NodeView(n, 8, frozenset(range(8)), partitions=frozenset({"gpu"}),
                             health=health[n]) for n in NODES}
        return ClusterView(nodes=nodes, leaf_of=v.leaf_of, parent=v.parent,
                           default_partition="gpu", sources=["test"])

    store = SqliteStore(tmp_path / "state.db")
    api = LocalUserApi(store, None, Caller(0, 0, "root", True), view_source=view)
    try:
        answer = api.place(PlacementRequest(nodes=1, gpus_per_node=8))
    finally:
        api.close()
    assert answer.avoid == ("n3", "n4")
    assert not answer.placement.ok  # nothing known healthy to pin: Slurm places it


def test_release_asks_again_while_slurmctld_is_busy(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The release helper is the only thing that un-pins a job: one scontrol that timed out
    must not leave the job waiting on its pinned nodes."""
    from gpufleet.scheduler.cli import sbatch_filter
    from gpufleet.scheduler.cli.sbatch_filter import release

    monkeypatch.setattr(sbatch_filter, "SCONTROL_RETRY_S", 0.01)

    calls = tmp_path / "calls"
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(f"""#!/bin/sh
echo "$*" >> {calls}
n=$(wc -l < {calls})
if [ "$n" -le 2 ]; then echo "Socket timed out on send/recv operation" >&2; exit 1; fi
case "$1" in
  show) echo "JobId=7 JobState=PENDING ReqNodeList=n[1-2]" ;;
  update) exit 0 ;;
esac
""")
    scontrol.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    assert release("7", "n1,n2", 0, env) == "job 7: released n1,n2"
    assert calls.read_text().splitlines() == [
        "show job -o 7", "show job -o 7", "show job -o 7", "update JobId=7 ReqNodeList="]
    # a job Slurm no longer knows is not asked about again
    calls.write_text("x\nx\n")
    (tmp_path / "scontrol").write_text(
        f'#!/bin/sh\necho "$*" >> {calls}\necho "Invalid job id specified" >&2\nexit 1\n')
    assert release("8", "n1", 0, env) == "job 8: gone, kept"
    assert len(calls.read_text().splitlines()) == 3
