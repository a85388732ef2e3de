"""mTLS for the controller's gRPC port: server credentials that demand a client certificate
signed by the cluster CA, and the node names such a certificate vouches for.

The TLS handshake (gRPC core) proves the peer holds a key the cluster CA certified; this
module only says *which* node that is. The controller then refuses a hello for any other
node. It never logs or returns key bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization


class TlsConfigError(Exception):
    """A TLS file is missing or unreadable; the message names the file and the problem."""


@dataclass(frozen=True)
class ServerTls:
    """The controller's certificate and key, and the CA its clients must be signed by."""

    ca_path: Path
    cert_path: Path
    key_path: Path

    def credentials(self) -> grpc.ServerCredentials:
        ca = _read_pem(self.ca_path, "CA certificate")
        cert = _read_pem(self.cert_path, "controller certificate")
        key = _read_pem(self.key_path, "controller key")
        _check_cert(self.ca_path, ca)
        _check_cert(self.cert_path, cert)
        try:
            serialization.load_pem_private_key(key, password=None)
        except (ValueError, TypeError) as e:
            # the message never carries the key bytes, only what is wrong
            raise TlsConfigError(f"{self.key_path}: not an unencrypted PEM private key") from e
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=True,
        )


def from_options(ca: str | None, cert: str | None, key: str | None,
                 insecure: bool) -> ServerTls | None:
    """The controller's TLS settings from its options; None means plaintext (only when
    `insecure` is set explicitly)."""
    given = {"tls_ca": ca, "tls_cert": cert, "tls_key": key}
    if insecure:
        if any(given.values()):
            set_ = ", ".join(k for k, v in given.items() if v)
            raise TlsConfigError(f"insecure is set together with {set_}: choose one")
        return None
    if ca and cert and key:
        return ServerTls(Path(ca), Path(cert), Path(key))
    missing = [k for k, v in given.items() if not v]
    raise TlsConfigError(
        f"mTLS needs tls_ca, tls_cert and tls_key ({', '.join(missing)} missing); "
        "make them with `gpufleet certs init` / `gpufleet certs issue HEAD --role "
        "controller`, or pass --insecure to serve plaintext (demo only: any client can "
        "then claim any node)"
    )


def _read_pem(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise TlsConfigError(f"{path}: {what} file does not exist") from e
    except OSError as e:
        raise TlsConfigError(f"{path}: cannot read {what}: {e.strerror}") from e
    if b"-----BEGIN" not in data:
        raise TlsConfigError(f"{path}: {what} is not PEM (no -----BEGIN line)")
    return data


def _check_cert(path: Path, data: bytes) -> None:
    try:
        x509.load_pem_x509_certificate(data)
    except ValueError as e:
        raise TlsConfigError(f"{path}: not a PEM certificate: {e}") from e


def peer_node_names(auth_context: Mapping[str, Iterable[bytes]]) -> frozenset[str] | None:
    """The DNS names in the verified client certificate's subjectAltName; None when the
    connection is not TLS (an insecure controller). An empty set: TLS, but no DNS SAN."""
    if b"ssl" not in list(auth_context.get("transport_security_type", [])):
        return None
    pems = list(auth_context.get("x509_pem_cert", []))
    if not pems:
        return frozenset()
    try:
        cert = x509.load_pem_x509_certificate(pems[0])
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return frozenset()
    return frozenset(san.get_values_for_type(x509.DNSName))
