"""Client side of FleetUser: the channel to the controller (mTLS or, for a demo, plaintext),
a fresh MUNGE credential on every call, and gRPC errors turned into one clear line.

Used by RemoteUserApi (user_remote.py: `gpufleet acct|jobs show|drain|resume --controller`,
and placement). It never sends a user name: the controller learns who
is calling from the credential, which the local munged makes for this process's uid.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import click
import grpc
from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.rpc.v1 import fleet_pb2_grpc as pb_grpc
from gpufleet.scheduler.access import munge

METADATA_KEY = "gpufleet-munge-cred"  # = user_service.METADATA_KEY (the wire contract)
DEFAULT_TIMEOUT_S = 10.0
_Reply = TypeVar("_Reply")


class UserClientError(Exception):
    """A call to the controller failed; `code` is the gRPC status (None: it never left this
    host, e.g. no munge or bad TLS files). The message is for the person at the terminal."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None,
                 details: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.details = details or message  # the controller's own words, without framing


@dataclass(frozen=True)
class ClientTls:
    """The cluster CA (to verify the controller) and this host's certificate and key (the
    controller's port demands a client certificate; identity still comes from MUNGE)."""

    ca_path: Path
    cert_path: Path | None = None
    key_path: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None, what: str) -> bytes | None:
            if path is None:
                return None
            try:
                return path.read_bytes()
            except OSError as e:
                raise UserClientError(f"{path}: cannot read {what}: {e.strerror}") from e

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_path, "CA certificate"),
            private_key=read(self.key_path, "TLS key"),
            certificate_chain=read(self.cert_path, "TLS certificate"))


def tls_from_options(ca: str | None, cert: str | None, key: str | None, insecure: bool
                     ) -> ClientTls | None:
    """None = plaintext, only when asked for; a certificate needs its key and vice versa."""
    if insecure:
        if ca or cert or key:
            raise UserClientError("--insecure is set together with --tls-*: choose one")
        return None
    if not ca:
        raise UserClientError(
            "no TLS settings for the controller: give --tls-ca (GPUFLEET_TLS_CA) and this "
            "host's --tls-cert/--tls-key, or --insecure for a plaintext demo controller")
    if bool(cert) != bool(key):
        raise UserClientError("--tls-cert and --tls-key go together")
    return ClientTls(Path(ca), Path(cert) if cert else None, Path(key) if key else None)


def tls_from_env(env: Mapping[str, str] | None = None) -> ClientTls | None:
    """The same settings from GPUFLEET_TLS_CA/_CERT/_KEY and GPUFLEET_INSECURE."""
    e = os.environ if env is None else env
    insecure = e.get("GPUFLEET_INSECURE", "").strip().lower() in {"1", "true", "yes", "on"}
    return tls_from_options(e.get("GPUFLEET_TLS_CA"), e.get("GPUFLEET_TLS_CERT"),
                            e.get("GPUFLEET_TLS_KEY"), insecure)


def _describe(address: str, e: grpc.RpcError) -> UserClientError:
    code = e.code() if callable(getattr(e, "code", None)) else None
    details = (e.details() if callable(getattr(e, "details", None)) else None) or str(e)
    if code == grpc.StatusCode.UNAVAILABLE and "standby" not in details:
        msg = f"controller {address} is not reachable now ({details})"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        msg = f"controller {address} did not answer in time"
    elif code == grpc.StatusCode.PERMISSION_DENIED:
        msg = f"refused: {details}"
    elif code == grpc.StatusCode.UNAUTHENTICATED:
        msg = f"not authenticated: {details}"
    else:
        msg = f"controller {address}: {details}"
    return UserClientError(msg, code, details)


class UserClient:
    """One channel to the controller's FleetUser service; `close()` (or `with`) when done."""

    def __init__(self, address: str, tls: ClientTls | None, munge_socket: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if not address or ":" not in address:
            raise UserClientError(f"controller {address!r}: expected HOST:PORT")
        self.address = address
        self.munge_socket = munge_socket
        self.timeout_s = timeout_s
        options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        self.channel = (grpc.insecure_channel(address, options=options) if tls is None
                        else grpc.secure_channel(address, tls.credentials(), options=options))
        self.stub = pb_grpc.FleetUserStub(self.channel)

    def __enter__(self) -> UserClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def credential(self) -> str:
        try:
            return munge.encode(b"", self.munge_socket).decode("ascii")
        except munge.MungeError as e:
            raise UserClientError(f"cannot make a MUNGE credential: {e}") from e

    def call(self, method: Callable[..., _Reply], request: Any,
             timeout_s: float | None = None) -> _Reply:
        """`method` is a stub method (self.stub.Acct, ...); a new credential per call (munged
        refuses one used twice)."""
        metadata = ((METADATA_KEY, self.credential()),)
        try:
            return method(request, metadata=metadata,
                          timeout=self.timeout_s if timeout_s is None else timeout_s)
        except grpc.RpcError as e:
            raise _describe(self.address, e) from e

    def whoami(self) -> pb.WhoAmIReply:
        return cast(pb.WhoAmIReply, self.call(self.stub.WhoAmI, pb.WhoAmIRequest()))

    def acct(self, request: pb.AcctRequest) -> pb.AcctReply:
        return cast(pb.AcctReply, self.call(self.stub.Acct, request))

    def show_job(self, job_id: str) -> pb.ShowJobReply:
        return cast(pb.ShowJobReply,
                    self.call(self.stub.ShowJob, pb.ShowJobRequest(job_id=job_id)))

    def place(self, request: pb.PlaceRequest, timeout_s: float | None = None) -> pb.PlaceReply:
        return cast(pb.PlaceReply, self.call(self.stub.Place, request, timeout_s))

    def drain(self, nodes: list[str], reason: str) -> pb.NodeActionReply:
        return cast(pb.NodeActionReply, self.call(
            self.stub.Drain, pb.NodeActionRequest(nodes=nodes, reason=reason)))

    def resume(self, nodes: list[str]) -> pb.NodeActionReply:
        return cast(pb.NodeActionReply, self.call(
            self.stub.Resume, pb.NodeActionRequest(nodes=nodes)))


# ---------------------------------------------------------------- click glue

_F = TypeVar("_F", bound=Callable[..., Any])


def controller_options(f: _F) -> _F:
    """--controller and its TLS/MUNGE settings for a user command (env: GPUFLEET_*)."""
    for opt in reversed([
        click.option("--controller", envvar="GPUFLEET_CONTROLLER", metavar="HOST:PORT",
                     help="ask this controller over gRPC (MUNGE-authenticated) instead of "
                     "reading the store directly"),
        click.option("--tls-ca", envvar="GPUFLEET_TLS_CA",
                     help="cluster CA certificate (with --controller)"),
        click.option("--tls-cert", envvar="GPUFLEET_TLS_CERT",
                     help="this host's certificate (the controller's port asks for one)"),
        click.option("--tls-key", envvar="GPUFLEET_TLS_KEY", help="this host's key"),
        click.option("--insecure", is_flag=True, envvar="GPUFLEET_INSECURE",
                     help="plaintext to a demo controller started with --insecure"),
        click.option("--munge-socket", envvar="GPUFLEET_MUNGE_SOCKET",
                     help="local munged socket [default: /run/munge/munge.socket.2]"),
    ]):
        f = opt(f)
    return f


def connect(controller: str, tls_ca: str | None, tls_cert: str | None, tls_key: str | None,
            insecure: bool, munge_socket: str | None) -> UserClient:
    """A UserClient from the options above; a bad setting is a click usage error."""
    try:
        return UserClient(controller, tls_from_options(tls_ca, tls_cert, tls_key, insecure),
                          munge_socket)
    except UserClientError as e:
        raise click.UsageError(str(e)) from e


def click_error(e: UserClientError) -> click.ClickException:
    return click.ClickException(str(e))
