"""The cluster's own certificate authority: one CA, and a certificate per node for mTLS.

`init` makes the CA (ca.crt, ca.key); `issue` makes a key and a certificate for an agent or
the controller with the node name in the subjectAltName, signed by that CA. Keys are created
0600 from the first byte (never chmod-ed afterwards) and are never logged or printed. Nothing
existing is overwritten unless the caller asks to.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
ROLES = ("agent", "controller")
CA_VALIDITY_DAYS = 3650
LEAF_VALIDITY_DAYS = 825  # the longest lifetime common TLS clients still accept
MAX_VALIDITY_DAYS = 36500  # 100 years: far past any real use, well inside X.509's year 9999
KEY_MODE = 0o600
CERT_MODE = 0o644

# RFC 1123 host names: dot-separated labels of letters, digits and inner hyphens. Slurm
# NodeNames that are not host names cannot be in a DNS SAN; they also keep '/' and '..'
# out of the file names built from them.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")


class CertError(Exception):
    """A certificate could not be made; the message names the file or the input."""


@dataclass(frozen=True)
class Issued:
    cert_path: Path
    key_path: Path
    not_after: dt.datetime


def check_name(name: str, what: str = "node name") -> str:
    if len(name) > 253 or not _HOSTNAME_RE.match(name):
        raise CertError(
            f"{what} {name!r}: not a valid host name (letters, digits, inner '-', labels "
            "separated by '.', at most 253 characters)"
        )
    return name


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256: every TLS stack (gRPC's BoringSSL, OpenSSL, Go) takes it; keys are made in ms
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),  # daemons start unattended; the file mode protects it
    )


def _refuse_existing(paths: list[Path], force: bool) -> None:
    if force:
        return
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing:
        raise CertError(
            f"{', '.join(existing)} already exist(s); refusing to overwrite (use --force to "
            "replace, after keeping a copy)"
        )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically with the final mode from creation on: a reader never sees a partial
    file, and a key is never readable by others, not even for an instant."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except OSError as e:
        raise CertError(f"{tmp}: cannot create: {e.strerror}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CertError(f"{path}: cannot write: {e.strerror}") from e


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as e:
        raise CertError(f"{path}: cannot create directory: {e.strerror}") from e


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def init_ca(
    ca_dir: Path, cluster_name: str = "gpufleet", days: int = CA_VALIDITY_DAYS, force: bool = False
) -> Issued:
    """Make the cluster CA in ca_dir: ca.crt (0644) and ca.key (0600)."""
    check_name(cluster_name, "cluster name")
    if not 1 <= days <= MAX_VALIDITY_DAYS:
        raise CertError(f"days={days}: must be between 1 and {MAX_VALIDITY_DAYS}")
    cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    _refuse_existing([cert_path, key_path], force)
    _mkdir(ca_dir)
    key = _new_key()
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gpufleet"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"{cluster_name} gpufleet CA"),
    ])
    now = _now()
    not_after = now + dt.timedelta(days=days)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # nodes whose clocks lag a little
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    # key first: a ca.crt without its key would look like a usable CA
    _write(key_path, _key_pem(key), KEY_MODE)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), CERT_MODE)
    return Issued(cert_path, key_path, not_after)


def load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except FileNotFoundError as e:
        raise CertError(f"{cert_path}: no CA certificate; run `gpufleet certs init` first") from e
    except (OSError, ValueError) as e:
        raise CertError(f"{cert_path}: not a readable PEM certificate: {e}") from e
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError as e:
        raise CertError(f"{key_path}: CA key missing next to {cert_path}") from e
    except (OSError, ValueError, TypeError) as e:
        # the exception text never carries key bytes, only what was wrong
        raise CertError(f"{key_path}: not a readable unencrypted PEM private key") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{key_path}: expected an EC key as `gpufleet certs init` makes")
    if cert.public_key() != key.public_key():
        raise CertError(f"{key_path} does not belong to {cert_path}")
    return cert, key


def _san(node: str, extra: tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = [x509.DNSName(node)]
    for item in extra:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(item)))
        except ValueError:
            names.append(x509.DNSName(check_name(item, "extra SAN")))
    # keep order, drop repeats (the node name given again as --san)
    return x509.SubjectAlternativeName(list(dict.fromkeys(names)))


def issue(
    ca_dir: Path,
    node: str,
    role: str,
    out_dir: Path | None = None,
    extra_sans: tuple[str, ...] = (),
    days: int = LEAF_VALIDITY_DAYS,
    force: bool = False,
) -> Issued:
    """Key and certificate for `node` as `role`: <out_dir>/<node>-<role>.crt and .key.

    Agents get clientAuth (they dial the controller) and serverAuth (their /metrics endpoint);
    the controller gets serverAuth and clientAuth (it may call agents back).
    """
    check_name(node)
    if role not in ROLES:
        raise CertError(f"role {role!r}: use one of {', '.join(ROLES)}")
    if not 1 <= days <= MAX_VALIDITY_DAYS:
        raise CertError(f"days={days}: must be between 1 and {MAX_VALIDITY_DAYS}")
    out_dir = out_dir or ca_dir / "issued"
    cert_path, key_path = out_dir / f"{node}-{role}.crt", out_dir / f"{node}-{role}.key"
    san = _san(node, extra_sans)  # bad --san is reported before anything is written
    _refuse_existing([cert_path, key_path], force)
    ca_cert, ca_key = load_ca(ca_dir)
    _mkdir(out_dir)
    key = _new_key()
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gpufleet"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, node),
        ]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .add_extension(san, critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), KEY_MODE)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), CERT_MODE)
    return Issued(cert_path, key_path, not_after)
