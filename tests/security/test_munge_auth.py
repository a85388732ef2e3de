"""gpufleet.scheduler.access.munge against a real munged (own key, socket and PID): who made a
credential, its payload, and munged's own refusals (replay, expiry, garbage, another key,
munged not running), each as a clear error."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.scheduler.access import munge
from gpufleet.scheduler.service.user_service import Authenticator

from tests.security.munge_server import (
    DAEMON_UID,
    NOBODY_UID,
    MungeServer,
    munge_installed,
    started_munged,
)

# under CI=true (which installs munge) a missing munge fails instead of skipping
pytestmark = pytest.mark.skipif(not munge_installed() and os.environ.get("CI") != "true",
                                reason="munge is not installed")


@pytest.fixture(scope="module")
def munged() -> Iterator[MungeServer]:
    with started_munged() as server:
        yield server


def test_encode_decode_roundtrip_as_root(munged: MungeServer) -> None:
    cred = munge.encode("123:40", munged.socket)
    assert cred.startswith(b"MUNGE:")
    got = munge.decode(cred, munged.socket)
    assert (got.uid, got.gid) == (0, 0)
    assert got.payload == b"123:40"
    assert got.ttl_s > 0 and abs(got.encode_time_s - time.time()) < 60


def test_decode_names_the_uid_that_made_it(munged: MungeServer) -> None:
    for uid in (NOBODY_UID, DAEMON_UID):
        got = munge.decode(munged.credential("hi", uid=uid), munged.socket)
        assert got.uid == uid and got.payload == b"hi"


def test_replayed_credential_is_rejected_by_munged(munged: MungeServer) -> None:
    cred = munged.credential(uid=NOBODY_UID)
    assert munge.decode(cred, munged.socket).uid == NOBODY_UID
    with pytest.raises(munge.CredentialRejected, match="replayed") as e:
        munge.decode(cred, munged.socket)
    assert e.value.code == munge.EMUNGE_CRED_REPLAYED


def test_expired_credential(munged: MungeServer) -> None:
    cred = munged.credential(ttl_s=1)
    time.sleep(2.2)
    with pytest.raises(munge.CredentialRejected, match="expired") as e:
        munge.decode(cred, munged.socket)
    assert e.value.code == munge.EMUNGE_CRED_EXPIRED


@pytest.mark.parametrize("garbage", [
    b"", b"   ", b"hello", b"MUNGE:", b"MUNGE:AAAA:", b"MUNGE:" + b"A" * 5000,
    "MUNGE:\u00e9\u00e9".encode(), b"MUNGE:\x00\xff:",
])
def test_garbage_is_a_rejected_credential(munged: MungeServer, garbage: bytes) -> None:
    with pytest.raises(munge.CredentialRejected):
        munge.decode(garbage, munged.socket)


def test_credential_of_another_cluster_key(munged: MungeServer) -> None:
    with started_munged("gf-munge-other-") as other:
        foreign = other.credential()
    with pytest.raises(munge.CredentialRejected, match="invalid MUNGE credential"):
        munge.decode(foreign, munged.socket)


def test_munged_not_running_names_the_socket(tmp_path: Path, munged: MungeServer) -> None:
    sock = str(tmp_path / "no-munged.socket")
    cred = munged.credential()
    with pytest.raises(munge.MungeUnavailable, match=r"no-munged\.socket") as e:
        munge.decode(cred, sock)
    assert "not running" in str(e.value)
    with pytest.raises(munge.MungeUnavailable, match=r"no-munged\.socket"):
        munge.encode("", sock)


def test_munge_binary_missing(monkeypatch: pytest.MonkeyPatch, munged: MungeServer) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(munge.MungeUnavailable, match="not installed"):
        munge.encode("", munged.socket)


def test_payload_limit(munged: MungeServer) -> None:
    with pytest.raises(munge.MungeError, match="at most"):
        munge.encode(b"x" * (munge.MAX_PAYLOAD_BYTES + 1), munged.socket)


def test_socket_default_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(munge.ENV_SOCKET, raising=False)
    assert munge.socket_path() == munge.DEFAULT_SOCKET
    monkeypatch.setenv(munge.ENV_SOCKET, "/x/y")
    assert munge.socket_path() == "/x/y"
    assert munge.socket_path("/a") == "/a"


def test_authenticator_admin_by_uid0_and_group(munged: MungeServer) -> None:
    # "daemon" (uid 1) is in group "daemon" (gid 1) on Debian: that group as the admin group
    # makes it an admin; nobody stays a plain user; root always is one
    auth = Authenticator(munged.socket, admin_group="daemon")
    daemon = auth.identify(munged.credential(uid=DAEMON_UID))
    assert (daemon.uid, daemon.user, daemon.admin) == (DAEMON_UID, "daemon", True)
    nobody = auth.identify(munged.credential(uid=NOBODY_UID))
    assert (nobody.user, nobody.admin) == ("nobody", False)
    assert auth.identify(munged.credential()).admin is True
    # a group that does not exist here: only root
    strict = Authenticator(munged.socket, admin_group="no-such-group-gf")
    assert strict.identify(munged.credential(uid=DAEMON_UID)).admin is False
    assert strict.identify(munged.credential()).admin is True
    assert Authenticator(munged.socket, admin_group=None).caller(DAEMON_UID, 1).admin is False
    # a uid without a passwd entry is shown numerically, as Slurm does
    assert Authenticator(munged.socket).caller(54321, 54321).user == "54321"


# ---------------------------------------------------------------- checkpoint registrations


def _ingestor(tmp_path: Path, munged: MungeServer) -> Any:
    from gpufleet.scheduler.health.actions import ActionQueue
    from gpufleet.scheduler.health.policy import HealthPolicy, PolicyConfig
    from gpufleet.scheduler.service.ingest import Ingestor
    from gpufleet.scheduler.store import SqliteStore

    store = SqliteStore(tmp_path / "state.db")
    policy = HealthPolicy(store, ActionQueue(store, None), PolicyConfig())
    return Ingestor(store, policy, munge_socket=munged.socket)  # as Controller passes it


def _ckpt(job: str, step: int, cred: bytes, uid: int | None) -> pb.CheckpointRegistered:
    msg = pb.CheckpointRegistered(job_id=job, step=step, path=f"/ck/{job}/step-{step}",
                                  time_ms=int(time.time() * 1000), node="n1",
                                  munge_credential=cred)
    if uid is not None:
        msg.uid = uid
    return msg


def test_checkpoint_registration_credential_end_to_end(
        tmp_path: Path, munged: MungeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """job.save -> the agent's job socket -> CheckpointRegistered -> the controller's ingest,
    which verifies the job's own credential with munged."""
    from gpufleet.agent import job
    from gpufleet.agent.jobsocket import JobSocketServer, Registration

    monkeypatch.setenv("GPUFLEET_MUNGE_SOCKET", munged.socket)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    got: list[Registration] = []
    server = JobSocketServer(tmp_path / "job.sock", got.append)
    server.start()
    try:
        job.save(tmp_path / "ck", 17, b"weights", socket_path=str(tmp_path / "job.sock"))
    finally:
        server.stop()
    assert len(got) == 1 and got[0].munge_credential.startswith(b"MUNGE:")
    msg = got[0].message("n1")
    assert msg.munge_credential == got[0].munge_credential and msg.uid == 0
    ingest = _ingestor(tmp_path, munged)
    before = dict(munge.checkpoint_credentials)
    ingest._checkpoint("n1", msg, int(time.time() * 1000))
    row = ingest.store.checkpoint("4242")
    assert row is not None and (row.step, row.uid) == (17, 0)
    assert munge.checkpoint_credentials.get("verified", 0) == before.get("verified", 0) + 1


def test_job_save_without_munge_still_registers(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from gpufleet.agent import job
    from gpufleet.agent.jobsocket import JobSocketServer, Registration

    monkeypatch.setenv("GPUFLEET_MUNGE_SOCKET", str(tmp_path / "no-munged"))  # munged down
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    got: list[Registration] = []
    server = JobSocketServer(tmp_path / "job.sock", got.append)
    server.start()
    try:
        job.save(tmp_path / "ck", 3, b"w", socket_path=str(tmp_path / "job.sock"))
    finally:
        server.stop()
    assert len(got) == 1 and got[0].munge_credential == b""
    monkeypatch.setenv("PATH", "/nonexistent")  # munge not installed at all
    assert job.munge_credential("1:2") is None


def test_checkpoint_credential_checks(tmp_path: Path, munged: MungeServer) -> None:
    from gpufleet.scheduler.accounting.ledger import UsageRow
    from gpufleet.scheduler.service.ingest import IngestError

    ingest = _ingestor(tmp_path, munged)
    now = int(time.time() * 1000)
    # nobody's own job, registered by nobody: stored
    ingest._checkpoint("n1", _ckpt("77", 5, munged.credential("77:5", NOBODY_UID), NOBODY_UID),
                       now)
    assert ingest.store.checkpoint("77").step == 5
    bad = [
        (_ckpt("77", 6, munged.credential("77:5", NOBODY_UID), NOBODY_UID), "payload"),
        (_ckpt("77", 6, munged.credential("77:6", DAEMON_UID), NOBODY_UID),
         "made by uid 1, but uid 65534 registered it"),
        (_ckpt("77", 6, b"MUNGE:garbage:", NOBODY_UID), "invalid MUNGE credential"),
    ]
    ingest.store.record_usage([UsageRow("78", "n1", 0, "daemon", "a", now - 1000, None, now,
                                        1000, 0, 0)])
    bad.append((_ckpt("78", 1, munged.credential("78:1", NOBODY_UID), NOBODY_UID),
                "the job belongs to uid 1"))
    for msg, words in bad:
        with pytest.raises(IngestError, match=words):
            ingest._checkpoint("n1", msg, now)
    assert ingest.store.checkpoint("77").step == 5  # nothing stored by a refused one
    assert ingest.store.checkpoint("78") is None
    # the job owner's own credential for job 78 is fine
    ingest._checkpoint("n1", _ckpt("78", 1, munged.credential("78:1", DAEMON_UID), DAEMON_UID),
                       now)
    assert ingest.store.checkpoint("78") is not None
    # spooled past its TTL, or resent after a reconnect: still who made it, still accepted
    stale = munged.credential("77:7", NOBODY_UID, ttl_s=1)
    time.sleep(2.2)
    before = munge.checkpoint_credentials.get("verified_stale", 0)
    ingest._checkpoint("n1", _ckpt("77", 7, stale, NOBODY_UID), now)
    ingest._checkpoint("n1", _ckpt("77", 7, stale, NOBODY_UID), now)  # replayed as well
    assert munge.checkpoint_credentials["verified_stale"] == before + 2
    assert ingest.store.checkpoint("77").step == 7
    # a node without munge: accepted on the agent's word, and counted
    absent = munge.checkpoint_credentials.get("absent", 0)
    ingest._checkpoint("n1", _ckpt("79", 1, b"", NOBODY_UID), now)
    assert ingest.store.checkpoint("79") is not None
    assert munge.checkpoint_credentials["absent"] == absent + 1
