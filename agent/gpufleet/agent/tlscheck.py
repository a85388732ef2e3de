"""Why a TLS connection to the controller fails, in one line (`gpufleet-agent check-connection`
and the agent's "unreachable" log line).

gRPC reports every handshake failure as UNAVAILABLE. This module dials the controller once with
Python's own TLS, the same files and the same name, and names the cause: the controller's
certificate is not from our CA (unknown CA), does not carry the name we dialled (with the names
it does carry), has expired or is not valid yet; or the controller refused OUR certificate
(its alert: unknown CA, expired, ...). Standard library only: it runs on every agent install.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"

# OpenSSL X509_V_ERR_* codes (ssl.SSLCertVerificationError.verify_code)
_UNKNOWN_CA = {2, 18, 19, 20, 21, 27}  # issuer unknown, self-signed, untrusted
_EXPIRED, _NOT_YET_VALID, _HOSTNAME_MISMATCH, _IP_MISMATCH = 10, 9, 62, 64


@dataclass(frozen=True)
class Diagnosis:
    ok: bool
    cause: str  # "unknown-ca", "name-mismatch", "expired", "not-yet-valid", "refused-by-peer",
    #             "unreachable", "files", "tls", or "ok"
    message: str


def split_host_port(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    if not host or not (port.isascii() and port.isdigit()):
        raise ValueError(f"controller {target!r}: not HOST:PORT")
    return host.strip("[]"), int(port)


def _context(ca: Path, cert: Path, key: Path, check_hostname: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = check_hostname
    ctx.load_verify_locations(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    ctx.set_alpn_protocols(["h2"])
    return ctx


def _names(cert: Mapping[str, Any]) -> str:
    sans = cert.get("subjectAltName") or ()
    return ", ".join(f"{kind}:{value}" for kind, value in sans) or "none"


def _peer_names(target: tuple[str, int], ca: Path, cert: Path, key: Path,
                timeout_s: float) -> str:
    """The names in the controller's certificate (verified against our CA, name not checked)."""
    try:
        with socket.create_connection(target, timeout=timeout_s) as raw, \
                _context(ca, cert, key, False).wrap_socket(raw) as s:
            peer = s.getpeercert()
            return _names(peer) if peer else "unknown"
    except (OSError, ssl.SSLError):
        return "unknown"


def diagnose(  # noqa: PLR0911 - one return per cause, in the order they can happen
        target: str, ca: Path, cert: Path, key: Path, timeout_s: float = 5.0) -> Diagnosis:
    """One TLS handshake with `target` (HOST:PORT) as the agent makes it; the cause if it fails."""
    try:
        host, port = split_host_port(target)
    except ValueError as e:
        return Diagnosis(False, "files", str(e))
    try:
        ctx = _context(ca, cert, key, True)
    except (OSError, ssl.SSLError) as e:
        return Diagnosis(False, "files", f"cannot load the TLS files (ca {ca}, certificate "
                                         f"{cert}, key {key}): {e}")
    try:
        raw = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as e:
        return Diagnosis(False, "unreachable", f"cannot reach {host}:{port}: "
                                               f"{e.strerror or e} (not a TLS problem)")
    try:
        with raw, ctx.wrap_socket(raw, server_hostname=host) as s:
            peer = s.getpeercert() or {}
            # TLS 1.3: the controller checks OUR certificate after the handshake; its verdict
            # (an alert, or its HTTP/2 settings) comes with the first bytes it sends
            s.settimeout(min(timeout_s, 2.0))
            # a controller that refused us may have closed already (seen with Debian trixie's
            # Python 3.13 and OpenSSL 3.5: EPIPE here); its alert, if still readable, says why
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.sendall(H2_PREFACE)
            first = b"-"  # nothing within the timeout: a controller that waits is fine
            try:
                first = s.recv(9)
            except TimeoutError:
                pass
            except (ssl.SSLEOFError, BrokenPipeError, ConnectionResetError):
                first = b""  # closed (or reset) right after the handshake, no alert read
            if not first:  # closed right after the handshake, without an alert
                return Diagnosis(False, "refused-by-peer",
                                 f"{host}:{port} closed the connection right after the handshake: "
                                 f"it refused this agent's certificate {cert} (not signed by "
                                 "its CA, or expired; its log says which)")
    except ssl.SSLCertVerificationError as e:
        return _verify_failure(e, host, port, ca, cert, key, timeout_s)
    except ssl.SSLError as e:
        return _alert(e, host, port, cert)
    except OSError as e:
        return Diagnosis(False, "tls", f"TLS with {host}:{port} failed: {e}")
    return Diagnosis(True, "ok", f"TLS with {host}:{port} ok: the controller's certificate "
                                 f"names {_names(peer)}, valid until {peer.get('notAfter')}; "
                                 "it accepted this agent's certificate")


def _verify_failure(e: ssl.SSLCertVerificationError, host: str, port: int, ca: Path,
                    cert: Path, key: Path, timeout_s: float) -> Diagnosis:
    code, why = e.verify_code, e.verify_message
    where = f"{host}:{port}"
    if code in (_HOSTNAME_MISMATCH, _IP_MISMATCH):
        names = _peer_names((host, port), ca, cert, key, timeout_s)
        return Diagnosis(False, "name-mismatch",
                         f"name mismatch: dialled {host!r}, but the certificate of {where} "
                         f"names {names} (reissue it with `gpufleet certs issue ... --san "
                         f"{host}`, or dial one of those names)")
    if code == _EXPIRED:
        return Diagnosis(False, "expired", f"the certificate of {where} has expired ({why}): "
                                           "reissue it with `gpufleet certs issue`")
    if code == _NOT_YET_VALID:
        return Diagnosis(False, "not-yet-valid", f"the certificate of {where} is not valid yet "
                                                 f"({why}): is this node's clock behind?")
    if code in _UNKNOWN_CA:
        return Diagnosis(False, "unknown-ca",
                         f"unknown CA: the certificate of {where} is not signed by the CA in "
                         f"{ca} ({why}); copy the cluster's ca.crt here or reissue it")
    return Diagnosis(False, "tls", f"the certificate of {where} is refused: {why} (code {code})")


def _alert(e: ssl.SSLError, host: str, port: int, cert: Path) -> Diagnosis:
    reason = (e.reason or str(e)).upper()
    where = f"{host}:{port}"
    if "ALERT" in reason:
        if "EXPIRED" in reason:
            return Diagnosis(False, "refused-by-peer",
                             f"{where} refused this agent's certificate {cert}: expired "
                             f"(alert {e.reason}); reissue it with `gpufleet certs issue`")
        if "UNKNOWN_CA" in reason:
            return Diagnosis(False, "refused-by-peer",
                             f"{where} refused this agent's certificate {cert}: unknown CA (it "
                             f"is not signed by the controller's CA; alert {e.reason})")
        return Diagnosis(False, "refused-by-peer",
                         f"{where} refused this agent's certificate {cert} (alert {e.reason})")
    return Diagnosis(False, "tls", f"TLS with {where} failed: {e.reason or e}")
