"""MUNGE credentials, as Slurm uses them: make one for the calling user, and decode one with
the local munged to learn which uid/gid made it.

Through the real `munge` / `unmunge` commands (Debian package `munge`), each with a timeout,
so a hung munged costs a caller seconds, never a thread forever. munged itself does the
checks that matter: the MAC under the cluster's shared key, the time-to-live, and replay (a
credential decodes once; a second decode is EMUNGE_CRED_REPLAYED). This module never decides
those itself and never treats an undecodable credential as anyone.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

DEFAULT_SOCKET = "/run/munge/munge.socket.2"
ENV_SOCKET = "GPUFLEET_MUNGE_SOCKET"
DEFAULT_TIMEOUT_S = 5.0
# `munge -n` makes ~130 bytes; a payload of a job id and a step a few more. Anything far
# larger is not a credential a gpufleet client made: refused before munged sees it.
MAX_CREDENTIAL_BYTES = 4096
MAX_PAYLOAD_BYTES = 1024
_PREFIX = b"MUNGE:"

# munge.h: munge_err_t
EMUNGE_SOCKET = 6
EMUNGE_TIMEOUT = 7
EMUNGE_CRED_EXPIRED = 15
EMUNGE_CRED_REWOUND = 16
EMUNGE_CRED_REPLAYED = 17
EMUNGE_CRED_UNAUTHORIZED = 18
_BAD_CRED = {8, 9, 10, 11, 12, 13, 14}  # bad cred/version/cipher/mac/zip/realm, invalid


class MungeError(Exception):
    """A MUNGE operation failed; the message says why. `code` is munge's exit status (None:
    the command could not be run at all)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class MungeUnavailable(MungeError):
    """munge/unmunge is not installed, or munged does not answer on its socket: nobody can be
    authenticated now (the caller's fault is not established)."""


class CredentialRejected(MungeError):
    """munged decoded nothing trustworthy: bad, expired, from the future, replayed, or not for
    this decoder. The caller gets no identity."""


@dataclass(frozen=True)
class Credential:
    """What munged vouches for: who made the credential, and the payload they put in it."""

    uid: int
    gid: int
    payload: bytes
    encode_host: str = ""
    encode_time_s: int = 0
    ttl_s: int = 0
    # "" normally; "expired" / "replayed" / "rewound" when decode(accept_stale=True) let
    # through a credential whose MAC munged verified but that is past its TTL or seen before
    stale: str = ""


def socket_path(path: str | None = None) -> str:
    """The munged socket: the given one, else $GPUFLEET_MUNGE_SOCKET, else munge's default."""
    return path or os.environ.get(ENV_SOCKET) or DEFAULT_SOCKET


def _run(argv: list[str], stdin: bytes, timeout_s: float, sock: str
         ) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, check=False,
                              timeout=timeout_s)
    except FileNotFoundError as e:
        raise MungeUnavailable(
            f"{argv[0]} is not installed (Debian/Ubuntu: apt install munge; RHEL: dnf install "
            "munge)") from e
    except subprocess.TimeoutExpired as e:
        raise MungeUnavailable(
            f"`{argv[0]}` did not answer in {timeout_s:.1f} s: is munged at {sock} hung?") from e


def _stderr(p: subprocess.CompletedProcess[bytes]) -> str:
    text = p.stderr.decode(errors="replace").strip()
    # "unmunge: Error: Failed to ..." -> "Failed to ..."
    lines = [ln.split("Error: ", 1)[-1] for ln in text.splitlines() if ln.strip()]
    return "; ".join(lines)[:300]


# munge's exit status -> (error class, message); the generic ones are handled in _failure
_REJECTIONS = {
    EMUNGE_CRED_EXPIRED: "MUNGE credential expired (older than its time-to-live; a stale "
    "credential, or the clocks of the two hosts differ)",
    EMUNGE_CRED_REWOUND: "MUNGE credential is from the future (the encoding host's clock is "
    "ahead)",
    EMUNGE_CRED_REPLAYED: "MUNGE credential replayed (each one is good for one call)",
    EMUNGE_CRED_UNAUTHORIZED: "MUNGE credential is restricted to another uid/gid",
}


def _failure(tool: str, p: subprocess.CompletedProcess[bytes], sock: str) -> MungeError:
    code = p.returncode
    why = _stderr(p)
    if code == EMUNGE_SOCKET:
        return MungeUnavailable(f"munged is not running or not reachable on socket {sock} "
                                f"({why or 'cannot connect'})", code)
    if code == EMUNGE_TIMEOUT:
        return MungeUnavailable(f"munged on socket {sock} timed out", code)
    if code in _REJECTIONS:
        return CredentialRejected(_REJECTIONS[code], code)
    if code in _BAD_CRED:
        return CredentialRejected(
            f"invalid MUNGE credential ({why or 'munged rejected it'}; made with another "
            "cluster's key, or damaged)", code)
    return MungeError(f"{tool} failed with status {code}: {why or 'no message'}", code)


def encode(payload: bytes | str = b"", socket: str | None = None,
           timeout_s: float = DEFAULT_TIMEOUT_S, ttl_s: int | None = None) -> bytes:
    """A credential for the calling process's uid/gid carrying `payload` (ASCII armoured,
    no trailing newline). Raises MungeUnavailable / MungeError."""
    data = payload.encode() if isinstance(payload, str) else payload
    if len(data) > MAX_PAYLOAD_BYTES:
        raise MungeError(f"MUNGE payload of {len(data)} bytes: at most {MAX_PAYLOAD_BYTES}")
    sock = socket_path(socket)
    argv = ["munge", f"--socket={sock}"]
    if not data:
        argv.append("--no-input")  # else munge reads the payload from stdin
    if ttl_s is not None:
        argv.append(f"--ttl={int(ttl_s)}")
    p = _run(argv, data, timeout_s, sock)
    if p.returncode != 0:
        raise _failure("munge", p, sock)
    cred = p.stdout.strip()
    if not cred.startswith(_PREFIX):
        raise MungeError(f"munge printed no credential: {p.stdout[:80]!r}")
    return cred


_STALE = {EMUNGE_CRED_EXPIRED: "expired", EMUNGE_CRED_REPLAYED: "replayed",
          EMUNGE_CRED_REWOUND: "rewound"}


def decode(credential: bytes | str, socket: str | None = None,
           timeout_s: float = DEFAULT_TIMEOUT_S, accept_stale: bool = False) -> Credential:
    """Ask munged who made `credential`. munged checks the MAC, the TTL and replay; any
    failure raises CredentialRejected (or MungeUnavailable when munged is not there).

    `accept_stale`: an expired, replayed or rewound credential whose MAC munged verified
    still says who made it (munged prints its uid): returned with `stale` set. Only for
    records that are idempotent by themselves and may sit in a spool for hours (checkpoint
    registrations), never for a call that acts."""
    cred = credential.encode("ascii", "replace") if isinstance(credential, str) else credential
    cred = cred.strip()
    if not cred:
        raise CredentialRejected("empty MUNGE credential")
    if len(cred) > MAX_CREDENTIAL_BYTES:
        raise CredentialRejected(
            f"MUNGE credential of {len(cred)} bytes: longer than any gpufleet makes "
            f"({MAX_CREDENTIAL_BYTES})")
    if not cred.startswith(_PREFIX):
        raise CredentialRejected("not a MUNGE credential (no 'MUNGE:' prefix)")
    sock = socket_path(socket)
    argv = ["unmunge", f"--socket={sock}", "--numeric",
            "--keys=STATUS,UID,GID,ENCODE_HOST,ENCODE_TIME,TTL"]
    p = _run(argv, cred + b"\n", timeout_s, sock)
    if accept_stale and p.returncode in _STALE:
        try:
            got = _parse_unmunge(p.stdout)
        except MungeError:
            raise _failure("unmunge", p, sock) from None
        return Credential(got.uid, got.gid, got.payload, got.encode_host, got.encode_time_s,
                          got.ttl_s, _STALE[p.returncode])
    if p.returncode != 0:
        raise _failure("unmunge", p, sock)
    return _parse_unmunge(p.stdout)


def _parse_unmunge(out: bytes) -> Credential:
    """unmunge's output: `KEY: value` lines, a blank line, then the payload verbatim."""
    head, sep, payload = out.partition(b"\n\n")
    if not sep:
        raise MungeError(f"unmunge printed no metadata: {out[:120]!r}")
    meta: dict[str, str] = {}
    for line in head.decode(errors="replace").splitlines():
        key, colon, value = line.partition(":")
        if colon:
            meta[key.strip()] = value.strip()
    try:
        return Credential(
            uid=int(meta["UID"]), gid=int(meta["GID"]), payload=payload,
            encode_host=meta.get("ENCODE_HOST", ""),
            encode_time_s=int(meta.get("ENCODE_TIME", "0") or 0),
            ttl_s=int(meta.get("TTL", "0") or 0),
        )
    except (KeyError, ValueError) as e:
        raise MungeError(f"unmunge printed unexpected metadata {meta!r}") from e


# ---------------------------------------------------------------- checkpoint registrations

# What the controller saw on checkpoint registrations: verified, verified_stale (expired or
# replayed: sat in an agent's spool; MAC, uid and payload still checked), absent (a node
# without munge), rejected. Read by tests and logs; process-wide like the audit sink.
checkpoint_credentials: dict[str, int] = {}


def _count(what: str) -> None:
    checkpoint_credentials[what] = checkpoint_credentials.get(what, 0) + 1


def checkpoint_payload(job_id: str, step: int) -> bytes:
    """What a job puts in the credential of a checkpoint registration (the wire contract)."""
    return f"{job_id}:{step}".encode()


def verify_checkpoint(credential: bytes, job_id: str, step: int, claimed_uid: int | None,
                      owner_uid: int | None, socket: str | None = None,
                      timeout_s: float = 2.0) -> Credential:
    """Check a checkpoint registration's credential: munged verifies it (a spooled one may
    be expired or replayed: registrations are idempotent), its payload must be
    "<job_id>:<step>", and its uid must be the registering process's (SO_PEERCRED, as the
    agent saw it) and the job owner's when those are known. Raises MungeError saying which
    check failed."""
    try:
        cred = decode(credential, socket, timeout_s, accept_stale=True)
    except MungeError:
        _count("rejected")
        raise
    problems = []
    want = checkpoint_payload(job_id, step)
    if cred.payload != want:
        problems.append(f"its payload is {cred.payload[:60]!r}, not {want.decode()!r}")
    if claimed_uid is not None and cred.uid != claimed_uid:
        problems.append(f"it was made by uid {cred.uid}, but uid {claimed_uid} registered it")
    if owner_uid is not None and cred.uid != owner_uid:
        problems.append(f"it was made by uid {cred.uid}, but the job belongs to uid {owner_uid}")
    if problems:
        _count("rejected")
        raise CredentialRejected(f"MUNGE credential does not match: {'; '.join(problems)}")
    _count("verified_stale" if cred.stale else "verified")
    return cred


def count_absent_checkpoint_credential() -> None:
    _count("absent")
