"""Shared pieces of the security tests: a cluster CA with certificates, agent messages, and
one stream driven by hand over real gRPC."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.rpc.v1 import fleet_pb2_grpc as pb_grpc
from gpufleet.scheduler.access import certs
from gpufleet.scheduler.access.tls import ServerTls


@dataclass(frozen=True)
class Pki:
    ca_dir: Path

    @property
    def ca(self) -> Path:
        return self.ca_dir / certs.CA_CERT

    def leaf(self, node: str, role: str = "agent") -> tuple[Path, Path]:
        d = self.ca_dir / "issued"
        return d / f"{node}-{role}.crt", d / f"{node}-{role}.key"

    def server_tls(self) -> ServerTls:
        cert, key = self.leaf("localhost", "controller")
        return ServerTls(self.ca, cert, key)

    def channel_credentials(self, node: str | None) -> grpc.ChannelCredentials:
        if node is None:  # TLS, but no client certificate
            return grpc.ssl_channel_credentials(root_certificates=self.ca.read_bytes())
        cert, key = self.leaf(node)
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(), private_key=key.read_bytes(),
            certificate_chain=cert.read_bytes(),
        )


def make_pki(base: Path, nodes: Iterable[str], cluster: str = "gpufleet") -> Pki:
    certs.init_ca(base, cluster)
    # the controller's certificate names 127.0.0.1: agents dial it by address in tests
    certs.issue(base, "localhost", "controller", extra_sans=("127.0.0.1",))
    for n in nodes:
        certs.issue(base, n, "agent")
    return Pki(base)


def hello(node: str, instance: str | None = None, gpus: int = 2) -> pb.AgentMessage:
    inv = pb.NodeInventory(node_name=node, hostname=node, agent_version="test",
                           nvml_backend="simulated:test")
    for i in range(gpus):
        inv.gpus.add(index=i, uuid=f"GPU-{node}-{i}", model="H100")
    return pb.AgentMessage(seq=0, agent_instance=instance or uuid.uuid4().hex,
                           hello=pb.Hello(inventory=inv))


def sample(seq: int, instance: str, ts_ms: int) -> pb.AgentMessage:
    return pb.AgentMessage(seq=seq, agent_instance=instance,
                           sample=pb.NodeSample(timestamp_ms=ts_ms))


def stream(channel: grpc.Channel, messages: list[pb.AgentMessage],
           timeout_s: float = 5.0) -> tuple[grpc.StatusCode, list[int], str]:
    """Send `messages` on one Connect stream; (final status, acked seqs, status details)."""
    stub = pb_grpc.FleetControllerStub(channel)
    acks: list[int] = []
    try:
        for reply in stub.Connect(iter(messages), timeout=timeout_s):
            acks.append(reply.ack.seq)
    except grpc.RpcError as e:
        return e.code(), acks, e.details() or ""
    return grpc.StatusCode.OK, acks, ""
