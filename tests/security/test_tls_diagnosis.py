"""Mismatched certificates name their cause: `gpufleet-agent check-connection` and the agent's
"unreachable" log line against the real controller over loopback gRPC, with certificates from
the project's own CA (`gpufleet certs`): unknown CA, a name mismatch (the name dialled and the
names in the certificate), expired, and the controller refusing the agent's certificate."""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from gpufleet.agent.cli import main as agent_main
from gpufleet.agent.client import ClientTls, StreamClient
from gpufleet.agent.outbox import Outbox
from gpufleet.agent.tlscheck import diagnose
from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.scheduler.access import certs
from gpufleet.scheduler.access.tls import ServerTls
from gpufleet.scheduler.service.server import Controller
from gpufleet.scheduler.store import SqliteStore

from tests.security.helpers import Pki, make_pki

Serve = Callable[[Path, Path], str]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "ca", ["n1"])


@pytest.fixture
def serve(tmp_path: Path, pki: Pki) -> Iterator[Serve]:
    """Start the controller with a given certificate and key; returns 'localhost:PORT'."""
    started: list[Controller] = []

    def start(cert: Path, key: Path) -> str:
        ctl = Controller(SqliteStore(tmp_path / f"state{len(started)}.db"), None,
                         listen="127.0.0.1:0", tls=ServerTls(pki.ca, cert, key))
        ctl.start()
        started.append(ctl)
        return f"localhost:{ctl.port}"

    yield start
    for ctl in started:
        ctl.stop(grace_s=0.1)
        ctl.store.close()


def _expired_controller_cert(pki: Pki, out: Path) -> tuple[Path, Path]:
    ca_cert, ca_key = certs.load_ca(pki.ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=30))
            .not_valid_after(now - dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .sign(ca_key, hashes.SHA256()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "old.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "old.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return out / "old.crt", out / "old.key"


def _check(target: str, ca: Path, cert: Path, key: Path) -> tuple[int, str]:
    r = CliRunner().invoke(agent_main, ["check-connection", "--controller", target,
                                        "--ca-path", str(ca), "--cert-path", str(cert),
                                        "--key-path", str(key)])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    return r.exit_code, r.output


def test_good_certificates_pass(pki: Pki, serve: Serve) -> None:
    target = serve(*pki.leaf("localhost", "controller"))
    code, out = _check(target, pki.ca, *pki.leaf("n1"))
    assert code == 0 and f"{target}: ok:" in out and "DNS:localhost" in out, out


def test_name_mismatch_names_the_dialled_name_and_the_certificates(pki: Pki,
                                                                  serve: Serve) -> None:
    certs.issue(pki.ca_dir, "head1", "controller", extra_sans=("10.0.0.1",))
    target = serve(*pki.leaf("head1", "controller"))
    code, out = _check(target, pki.ca, *pki.leaf("n1"))
    assert code == 1 and "name-mismatch" in out, out
    assert "dialled 'localhost'" in out and "DNS:head1" in out and "10.0.0.1" in out, out


def test_unknown_ca_on_the_agent_side(pki: Pki, serve: Serve, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other", ["n1"])  # the agent trusts another cluster's CA
    target = serve(*pki.leaf("localhost", "controller"))
    code, out = _check(target, other.ca, *pki.leaf("n1"))
    assert code == 1 and "unknown-ca" in out and "not signed by the CA in" in out, out


def test_expired_controller_certificate(pki: Pki, serve: Serve, tmp_path: Path) -> None:
    target = serve(*_expired_controller_cert(pki, tmp_path / "old"))
    code, out = _check(target, pki.ca, *pki.leaf("n1"))
    assert code == 1 and "expired" in out and "has expired" in out, out


def test_controller_refuses_an_agent_certificate_of_another_ca(
        pki: Pki, serve: Serve, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other", ["n1"])
    target = serve(*pki.leaf("localhost", "controller"))
    code, out = _check(target, pki.ca, *other.leaf("n1"))
    assert code == 1 and "refused this agent's certificate" in out, out
    assert "not signed by" in out or "unknown CA" in out, out


def test_unreachable_is_not_called_a_tls_problem(pki: Pki) -> None:
    d = diagnose("localhost:9", pki.ca, *pki.leaf("n1"), timeout_s=2)
    assert (d.ok, d.cause) == (False, "unreachable") and "not a TLS problem" in d.message


def test_agent_log_names_the_mismatch(pki: Pki, serve: Serve, tmp_path: Path,
                                      caplog: pytest.LogCaptureFixture) -> None:
    certs.issue(pki.ca_dir, "head1", "controller")
    target = serve(*pki.leaf("head1", "controller"))
    cert, key = pki.leaf("n1")
    outbox = Outbox(agent_instance="i", spool_dir=tmp_path / "spool")
    client = StreamClient(target, outbox, pb.Hello, tls=ClientTls(pki.ca, cert, key),
                          backoff_initial_s=0.05, backoff_max_s=0.1)
    stop = threading.Event()
    caplog.set_level(logging.WARNING, logger="gpufleet.agent.client")
    t = threading.Thread(target=client.run, args=(stop,), daemon=True)
    t.start()
    try:
        for _ in range(100):
            if any("unreachable" in r.getMessage() for r in caplog.records):
                break
            stop.wait(0.1)
    finally:
        stop.set()
        t.join(10)
        outbox.close()
    (line,) = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert "name mismatch: dialled 'localhost'" in line and "DNS:head1" in line, line


def test_controller_log_names_the_cause_of_a_refused_agent(pki: Pki, tmp_path: Path) -> None:
    """The other side: the controller's own log (gRPC's handshake line on its stderr) says why
    it refused an agent: a certificate of another CA, or an expired one."""
    other = make_pki(tmp_path / "other", ["n1"])
    old_cert, old_key = _expired_controller_cert(pki, tmp_path / "old")  # expired, our CA
    cert, key = pki.leaf("localhost", "controller")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err_path = tmp_path / "controller.err"
    with err_path.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpufleet.scheduler", "controller", "--listen",
             f"127.0.0.1:{port}", "--db", str(tmp_path / "c.db"), "--slurm", "none",
             "--tls-ca", str(pki.ca), "--tls-cert", str(cert), "--tls-key", str(key)],
            stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "GRPC_VERBOSITY": "INFO"})
    try:
        target = f"localhost:{port}"
        for _ in range(100):
            if "listening" in err_path.read_text() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert diagnose(target, pki.ca, *other.leaf("n1")).cause == "refused-by-peer"
        assert diagnose(target, pki.ca, old_cert, old_key).cause == "refused-by-peer"
        time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(10)
    log = err_path.read_text()
    assert "Handshake failed" in log and "unable to get local issuer certificate" in log, log
    assert "certificate has expired" in log, log
