"""`gpufleet certs init|issue` through the click group: a CA, node certificates that a real
TLS handshake accepts both ways, 0600 keys, no key material in the output, clear refusals."""

from __future__ import annotations

import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from gpufleet.scheduler.cli.certs import certs_group


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(certs_group, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    ca = tmp_path / "ca"
    code, out = _run("init", "--ca-dir", str(ca), "--cluster-name", "lab")
    assert code == 0, out
    return ca


def test_init_makes_a_ca_with_a_private_key(ca_dir: Path) -> None:
    cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca is True
    assert cert.subject == cert.issuer
    assert _mode(ca_dir / "ca.key") == 0o600
    assert _mode(ca_dir / "ca.crt") == 0o644


@pytest.mark.parametrize("role", ["agent", "controller"])
def test_issue_puts_node_in_san_signed_by_ca(ca_dir: Path, tmp_path: Path, role: str) -> None:
    out_dir = tmp_path / "out"
    code, out = _run("issue", "gpu07.cluster.example", "--ca-dir", str(ca_dir), "--role", role,
                     "--out-dir", str(out_dir), "--san", "10.1.2.3", "--san", "gpu07")
    assert code == 0, out
    crt = out_dir / f"gpu07.cluster.example-{role}.crt"
    key = out_dir / f"gpu07.cluster.example-{role}.key"
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gpu07.cluster.example", "gpu07"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku and ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert _mode(key) == 0o600
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    assert private.public_key() == cert.public_key()


def test_key_material_is_never_printed(ca_dir: Path, tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    code, out = _run("issue", "n1", "--ca-dir", str(ca_dir))
    assert code == 0
    key_pem = (ca_dir / "issued" / "n1-agent.key").read_text()
    body = "".join(key_pem.splitlines()[1:-1])
    for text in (out, caplog.text):
        assert "PRIVATE KEY" not in text
        assert body[:40] not in text
    assert str(ca_dir / "issued" / "n1-agent.key") in out  # the path, so admins know where


def test_existing_files_are_refused_not_overwritten(ca_dir: Path) -> None:
    before = (ca_dir / "ca.key").read_bytes()
    code, out = _run("init", "--ca-dir", str(ca_dir))
    assert code == 1
    assert "already exist" in out and "ca.key" in out and "--force" in out
    assert (ca_dir / "ca.key").read_bytes() == before
    assert _run("issue", "n1", "--ca-dir", str(ca_dir))[0] == 0
    issued = (ca_dir / "issued" / "n1-agent.key").read_bytes()
    code, out = _run("issue", "n1", "--ca-dir", str(ca_dir))
    assert code == 1 and "n1-agent.crt" in out
    assert (ca_dir / "issued" / "n1-agent.key").read_bytes() == issued
    code, _ = _run("issue", "n1", "--ca-dir", str(ca_dir), "--force")
    assert code == 0
    assert (ca_dir / "issued" / "n1-agent.key").read_bytes() != issued
    assert _mode(ca_dir / "issued" / "n1-agent.key") == 0o600


@pytest.mark.parametrize("bad", ["../etc/passwd", "n1/x", "-n1", "n_1", "", "a" * 64, "n1."])
def test_bad_node_names_are_refused_with_the_name(ca_dir: Path, bad: str) -> None:
    code, out = _run("issue", "--ca-dir", str(ca_dir), "--", bad)  # "--": "-n1" is no option
    assert code == 1
    assert "not a valid host name" in out and repr(bad) in out
    assert not (ca_dir / "issued").exists()


def test_bad_extra_san_is_refused_before_writing(ca_dir: Path) -> None:
    code, out = _run("issue", "n1", "--ca-dir", str(ca_dir), "--san", "bad name")
    assert code == 1 and "extra SAN 'bad name'" in out
    assert not (ca_dir / "issued").exists()


def test_issue_without_ca_says_to_run_init(tmp_path: Path) -> None:
    code, out = _run("issue", "n1", "--ca-dir", str(tmp_path / "none"))
    assert code == 1 and "gpufleet certs init" in out


def test_wrong_ca_key_is_refused(ca_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    assert _run("init", "--ca-dir", str(other))[0] == 0
    (ca_dir / "ca.key").write_bytes((other / "ca.key").read_bytes())
    code, out = _run("issue", "n1", "--ca-dir", str(ca_dir))
    assert code == 1 and "does not belong to" in out


def test_mutual_tls_handshake_with_issued_certs(ca_dir: Path) -> None:
    """The controller's and an agent's certificates pass a real mTLS handshake that checks
    the chain and the host name both ways; a certificate from another CA fails."""
    for node, role in (("head1", "controller"), ("gpu07", "agent")):
        assert _run("issue", node, "--ca-dir", str(ca_dir), "--role", role)[0] == 0
    issued = ca_dir / "issued"

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(issued / "head1-controller.crt", issued / "head1-controller.key")
    server_ctx.load_verify_locations(ca_dir / "ca.crt")
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_cert_chain(issued / "gpu07-agent.crt", issued / "gpu07-agent.key")
    client_ctx.load_verify_locations(ca_dir / "ca.crt")

    seen: dict[str, object] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                seen["peer"] = tls.getpeercert()
                tls.sendall(b"ok")

        t = threading.Thread(target=serve)
        t.start()
        with socket.create_connection(("127.0.0.1", port)) as raw, \
                client_ctx.wrap_socket(raw, server_hostname="head1") as tls:
            assert tls.recv(2) == b"ok"
        t.join(10)
    peer = seen["peer"]
    assert isinstance(peer, dict)
    assert ("DNS", "gpu07") in peer["subjectAltName"]

    # a client trusting another CA refuses the controller
    other = ca_dir.parent / "other-ca"
    assert _run("init", "--ca-dir", str(other))[0] == 0
    wrong_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    wrong_ctx.load_verify_locations(other / "ca.crt")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve_once() -> None:
            conn, _ = listener.accept()
            with pytest.raises(ssl.SSLError):
                server_ctx.wrap_socket(conn, server_side=True).close()
            conn.close()

        t = threading.Thread(target=serve_once)
        t.start()
        with socket.create_connection(("127.0.0.1", port)) as raw, \
                pytest.raises(ssl.SSLCertVerificationError):
            wrong_ctx.wrap_socket(raw, server_hostname="head1")
        t.join(10)
