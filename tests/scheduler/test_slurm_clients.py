"""The Slurm clients (CLI, slurmrestd, pyslurm) against the real Slurm 22.05 lab.

One contract, every client: read nodes, drain/resume, weight and features, unknown nodes are
permanent errors, a stopped slurmctld is a transient error that comes back quickly (never a
hang). The pyslurm client runs only where pyslurm imports (PyPI ships only 25.11, which
cannot build against this Slurm 22.05): skipped otherwise, with that reason.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpufleet.scheduler.slurm import (
    CliSlurmClient,
    SlurmClient,
    SlurmError,
    SwitchRequest,
    check_features,
    check_weight,
    make_slurm_client,
)
from gpufleet.scheduler.slurm.rest import RestSlurmClient

from tests.slurm.harness import SlurmLab

BAD_TOKEN = "not-a-jwt"  # noqa: S105 - deliberately invalid

# ------------------------------------------------------------------ no Slurm needed


def test_bad_input_is_refused_before_slurm_is_asked() -> None:
    c = CliSlurmClient(env={"PATH": "/nonexistent"})  # would fail loudly if it ran anything
    for call in (lambda: c.set_weight("n1", 0), lambda: c.set_weight("n1", 2**32),
                 lambda: c.set_features("n1", ("ok", "a,b")),
                 lambda: c.set_features("n1", ("has space",)),
                 lambda: c.drain("n1;rm -rf /", "x")):
        with pytest.raises(SlurmError) as err:
            call()
        assert err.value.transient is False
    assert check_features("n1", ("a", "b", "a")) == ("a", "b")
    assert check_weight("n1", 1000) == 1000


def test_factory_kinds() -> None:
    assert make_slurm_client("none") is None
    assert isinstance(make_slurm_client("cli", timeout_s=3), CliSlurmClient)
    rest = make_slurm_client("rest", socket_path="/nonexistent.sock", token=BAD_TOKEN)
    assert isinstance(rest, RestSlurmClient)
    with pytest.raises(SlurmError, match="unknown Slurm client kind 'slurmdb'"):
        make_slurm_client("slurmdb")
    with pytest.raises(SlurmError, match="exactly one of socket_path or url"):
        make_slurm_client("rest")


def test_pyslurm_missing_or_mismatched_is_a_clear_error() -> None:
    try:
        import pyslurm  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        with pytest.raises(SlurmError, match="pyslurm is not installed") as err:
            make_slurm_client("pyslurm")
        assert err.value.transient is False
    else:
        with pytest.raises(SlurmError, match=r"does not match Slurm 1\.2"):
            make_slurm_client("pyslurm", slurm_version="1.2.3")


def test_rest_client_with_no_slurmrestd_is_transient_and_names_the_socket(tmp_path) -> None:
    c = RestSlurmClient(socket_path=tmp_path / "none.sock", token=BAD_TOKEN, timeout_s=2)
    with pytest.raises(SlurmError, match=r"unix:.*none\.sock.*for node n1") as err:
        c.node("n1")
    assert err.value.transient is True
    assert c.ping() is False


def test_rest_client_times_out_on_a_silent_server(tmp_path) -> None:
    """A slurmrestd that accepts and never answers: the call returns after its timeout."""
    import socket

    path = tmp_path / "silent.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    try:
        c = RestSlurmClient(socket_path=path, token=BAD_TOKEN, timeout_s=0.5)
        t0 = time.monotonic()
        with pytest.raises(SlurmError, match=r"timed out after 0\.5 s") as err:
            c.nodes()
        assert err.value.transient is True
        assert time.monotonic() - t0 < 3
    finally:
        srv.close()


# ------------------------------------------------------------------ real Slurm

CLIENT_KINDS = ["cli", "rest", "pyslurm"]


@pytest.fixture(scope="module")
def rest_lab(slurm_lab: SlurmLab) -> Iterator[SlurmLab]:
    # Weights and features a test before set with scontrol (a degraded node: Weight=1000,
    # gf_degraded) outlive reset(); slurmctld forgets them when it starts again, so the
    # nodes read below are as slurm.conf says
    slurm_lab.stop_slurmctld()
    slurm_lab.reset()
    slurm_lab.start_restd()
    yield slurm_lab
    slurm_lab.stop_restd()


def _client(kind: str, lab: SlurmLab, monkeypatch: pytest.MonkeyPatch,
            timeout_s: float = 10.0) -> SlurmClient:
    if kind == "cli":
        return CliSlurmClient(env=lab.env(), timeout_s=timeout_s)
    if kind == "rest":
        return RestSlurmClient(socket_path=lab.rest_socket, token=lab.jwt_token(),
                               env=lab.env(), timeout_s=timeout_s)
    try:
        import pyslurm  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        pytest.skip("pyslurm is not importable here: PyPI ships only 25.11, which cannot "
                    "build against Slurm 22.05; these contract tests run where it is")
    monkeypatch.setenv("SLURM_CONF", str(lab.conf_path))
    client = make_slurm_client("pyslurm", timeout_s=timeout_s)
    assert client is not None
    return client


@pytest.fixture(params=CLIENT_KINDS)
def client(request: pytest.FixtureRequest, rest_lab: SlurmLab,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[SlurmClient]:
    rest_lab.reset()
    c = _client(request.param, rest_lab, monkeypatch)
    yield c
    # reset() does not restore weights and features: put back what slurm.conf says
    for n in rest_lab.node_names:
        rest_lab.run("scontrol", "update", f"nodename={n}", "weight=1",
                     "availablefeatures=", "activefeatures=", check=False)


@pytest.mark.slurm
def test_reads_nodes_as_slurm_shows_them(client: SlurmClient, rest_lab: SlurmLab) -> None:
    nodes = client.nodes()
    assert sorted(nodes) == sorted(rest_lab.node_names)
    n3 = client.node("n3")
    assert n3 == nodes["n3"]
    assert (n3.state, n3.features, n3.weight, n3.drained) == ("IDLE", (), 1, False)
    # 24.11 keeps a resumed node's last drain reason (22.05 and 26.05 clear it): as Slurm shows
    assert n3.reason == rest_lab.node_reason("n3")
    assert client.ping() is True


@pytest.mark.slurm
def test_drain_and_resume(client: SlurmClient, rest_lab: SlurmLab) -> None:
    reason = "gpufleet:xid79 GPU 3 (0000:5d:00.0)\nfell off the bus"
    client.drain("n2", reason)
    assert rest_lab.node_state("n2") == "IDLE+DRAIN"
    assert rest_lab.node_reason("n2") == "gpufleet:xid79 GPU 3 (0000:5d:00.0) fell off the bus"
    n2 = client.node("n2")
    assert n2.drained and n2.reason == "gpufleet:xid79 GPU 3 (0000:5d:00.0) fell off the bus"
    assert client.nodes()["n2"].drained
    client.resume("n2")
    assert not client.node("n2").drained
    rest_lab.wait_node_state("n2", "IDLE")


@pytest.mark.slurm
def test_weight_and_features(client: SlurmClient, rest_lab: SlurmLab) -> None:
    client.set_weight("n4", 1000)
    client.set_features("n4", ("nvlink", "gf_degraded"))
    n4 = client.node("n4")
    assert (n4.weight, n4.features) == (1000, ("nvlink", "gf_degraded"))
    shown = rest_lab.show_node("n4")
    assert "Weight=1000" in shown
    assert "AvailableFeatures=nvlink,gf_degraded" in shown
    assert "ActiveFeatures=nvlink,gf_degraded" in shown
    # Slurm's scheduler sees the feature: a job constrained to it lands on n4
    job = rest_lab.sbatch("--constraint=gf_degraded", "-N1", "--wrap", "sleep 30")
    rest_lab.wait_job_state(job, "RUNNING")
    assert rest_lab.job_nodes(job) == ["n4"]
    # undo, as recovery does
    client.set_weight("n4", 1)
    client.set_features("n4", ("nvlink",))
    assert (client.node("n4").weight, client.node("n4").features) == (1, ("nvlink",))
    client.set_features("n4", ())
    assert client.nodes()["n4"].features == ()


@pytest.mark.slurm
def test_unknown_node_is_a_permanent_error_naming_it(client: SlurmClient) -> None:
    for call in (lambda: client.node("n99"), lambda: client.drain("n99", "x"),
                 lambda: client.set_weight("n99", 5)):
        with pytest.raises(SlurmError, match="n99") as err:
            call()
        assert err.value.transient is False, str(err.value)


@pytest.mark.slurm
@pytest.mark.parametrize("kind", ["cli", "rest"])
def test_stopped_slurmctld_is_transient_and_does_not_hang(
    kind: str, rest_lab: SlurmLab, monkeypatch: pytest.MonkeyPatch
) -> None:
    rest_lab.reset()
    c = _client(kind, rest_lab, monkeypatch, timeout_s=4.0)
    rest_lab.stop_slurmctld()
    try:
        for what, call in (("node", lambda: c.node("n1")), ("drain", lambda: c.drain("n1", "x")),
                           ("nodes", c.nodes)):
            t0 = time.monotonic()
            with pytest.raises(SlurmError) as err:
                call()
            elapsed_s = time.monotonic() - t0
            assert err.value.transient is True, f"{what}: {err.value}"
            assert elapsed_s < 4.0 + 2.0, f"{what} took {elapsed_s:.1f} s"
            if what != "nodes":
                assert "n1" in str(err.value)
        assert c.ping() is False
    finally:
        rest_lab.start_slurmctld()
    # back: the same client works again without being rebuilt
    c.drain("n1", "gpufleet:test after outage")
    assert c.node("n1").drained


@pytest.mark.slurm
def test_rest_rejects_a_bad_token_without_retry_hope(rest_lab: SlurmLab) -> None:
    c = RestSlurmClient(socket_path=rest_lab.rest_socket, token=BAD_TOKEN, timeout_s=5)
    with pytest.raises(SlurmError, match=r"slurmrestd GET /slurm/v0\.0\.\d+/node/n1") as err:
        c.node("n1")
    assert "n1" in str(err.value)
    assert c.ping() is False


@pytest.mark.slurm
def test_rest_token_file_is_reread(rest_lab: SlurmLab, tmp_path) -> None:
    token_file = tmp_path / "jwt"
    token_file.write_text("SLURM_JWT=not-a-jwt\n")
    c = RestSlurmClient(socket_path=rest_lab.rest_socket, token_file=token_file, timeout_s=5)
    assert c.ping() is False
    token_file.write_text(f"SLURM_JWT={rest_lab.jwt_token()}\n")  # rotated on disk
    assert c.ping() is True


@pytest.mark.slurm
def test_rest_job_reads_agree_with_squeue(rest_lab: SlurmLab) -> None:
    """Recovery works with --slurm rest too: its job reads (GET jobs / job/{id}) describe a
    running job exactly as the CLI client's `squeue --json` does."""
    rest_lab.reset()
    cli = CliSlurmClient(env=rest_lab.env())
    rest = RestSlurmClient(socket_path=rest_lab.rest_socket, token=rest_lab.jwt_token(),
                           env=rest_lab.env())
    jobid = rest_lab.sbatch("-w", "n3", "--requeue", "--comment=gpufleet-ckpt:grace_s=3",
                            "--wrap", "sleep 60")
    try:
        rest_lab.wait_job_state(jobid, "RUNNING")
        by_rest = rest.job(str(jobid))
        assert by_rest is not None
        assert by_rest == cli.job(str(jobid))
        assert (by_rest.state, by_rest.nodes, by_rest.requeue, by_rest.comment) == (
            "RUNNING", ("n3",), True, "gpufleet-ckpt:grace_s=3")
        # earlier tests' jobs may still be held (MinJobAge): compare with squeue, not with []
        on_n3 = rest.jobs_on_node("n3")
        assert on_n3 == cli.jobs_on_node("n3")
        assert [j.job_id for j in on_n3 if j.state == "RUNNING"] == [str(jobid)]
        assert str(jobid) not in {j.job_id for j in rest.jobs_on_node("n4")}
        assert rest.job("999999") is None
        # actions go through scancel/scontrol (22.05 REST cannot requeue)
        rest.requeue(str(jobid))
        assert rest_lab.wait_job_state(jobid, ("PENDING", "REQUEUED", "CONFIGURING", "RUNNING"))
    finally:
        rest_lab.run("scancel", str(jobid), check=False)


@pytest.mark.slurm
def test_routine_diag_reads_agree_with_squeue(rest_lab: SlurmLab) -> None:
    """What routine diagnostics read, from the real Slurm of each version, the same through
    the CLI and slurmrestd: each node's LastBusyTime and partitions, and the pending jobs
    with their partitions, reasons, required and excluded nodes."""
    from gpufleet.scheduler.repair.engine import could_start_on

    rest_lab.reset()
    cli = CliSlurmClient(env=rest_lab.env())
    rest = RestSlurmClient(socket_path=rest_lab.rest_socket, token=rest_lab.jwt_token(),
                           env=rest_lab.env())
    held = rest_lab.sbatch("--hold", "-w", "n2", "--wrap", "sleep 1")
    later = rest_lab.sbatch("--begin=now+1hour", "-x", "n3", "--wrap", "sleep 1")
    try:
        pending = {j.job_id: j for j in cli.pending_jobs()}
        assert pending == {j.job_id: j for j in rest.pending_jobs()}
        h, b = pending[str(held)], pending[str(later)]
        assert (h.state, h.state_reason, h.required_nodes, h.partitions) == (
            "PENDING", "JobHeldUser", ("n2",), ("main",))
        assert (b.state_reason, b.excluded_nodes, b.partitions) == ("BeginTime", ("n3",),
                                                                    ("main",))
        assert not could_start_on(h, "n2", ("main",))  # held: waits for a person, not a node
        assert not could_start_on(b, "n3", ("main",)) and could_start_on(b, "n4", ("main",))
        infos, by_rest = cli.node_infos(), rest.node_infos()
        assert {n: i.last_busy_s for n, i in infos.items()} == \
            {n: i.last_busy_s for n, i in by_rest.items()}
        assert all(i.last_busy_s is not None and i.last_busy_s > 1_700_000_000
                   and "main" in i.partitions for i in infos.values())
    finally:
        rest_lab.run("scancel", str(held), str(later), check=False)


def test_switch_requests_read_squeue_format_lines(tmp_path: Path) -> None:
    """`squeue -O JobID,ReqSwitch,Wait4Switch,NumNodes,tres-per-node` as 22.05 and 26.05 print
    it (seen on the real labs), with what the switch holds must survive: an array and a
    hetjob component, a job with no count, a node range, a wait it cannot read."""
    squeue = tmp_path / "squeue"
    squeue.write_text("#!/bin/sh\ncat <<'OUT'\n"
                      "5|1|1:59|3|gres:gpu:8\n"         # 22.05
                      "6|1|2:00|2|gres/gpu:8\n"         # 26.05, a user's own wait
                      "7|0|0:00|2|gres/gpu:8\n"         # no count asked
                      "8_[1-3]|1|1:59|2|gres/gpu:8\n"   # an array
                      "9+1|1|1:59|2|gres/gpu:8\n"       # a hetjob component
                      "10|1|1:59|2-4|gres/gpu:8\n"      # a node range
                      "11|1|soon|2|\n"
                      "\n"
                      "OUT\n")
    squeue.chmod(0o755)
    got = CliSlurmClient(env={"PATH": f"{tmp_path}:/usr/bin:/bin"}).switch_requests()
    assert got == [SwitchRequest("5", 1, 119, 3, "gres:gpu:8"),
                   SwitchRequest("6", 1, 120, 2, "gres/gpu:8"),
                   SwitchRequest("10", 1, 119, 0, "gres/gpu:8"),
                   SwitchRequest("11", 1, 0, 2, "")]
    squeue.write_text("#!/bin/sh\necho '5|1|1:59'\n")
    with pytest.raises(SlurmError, match="expected 5 fields"):
        CliSlurmClient(env={"PATH": f"{tmp_path}:/usr/bin:/bin"}).switch_requests()
