"""mTLS between agents and the controller over real loopback gRPC with certificates from
`gpufleet certs`: a certificate vouches for one node and no other."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from gpufleet.agent.client import ClientTls, StreamClient
from gpufleet.agent.config import AgentConfig, ConfigError
from gpufleet.agent.outbox import Outbox
from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.scheduler.access import audit
from gpufleet.scheduler.access.tls import TlsConfigError, from_options
from gpufleet.scheduler.cli.main import main as gpufleet_main
from gpufleet.scheduler.service.server import Controller
from gpufleet.scheduler.store import SqliteStore

from tests.security.helpers import Pki, hello, make_pki, sample, stream


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "ca", ["n1", "n2"])


@pytest.fixture
def tls_controller(tmp_path: Path, pki: Pki) -> Iterator[tuple[Controller, Path]]:
    audit_path = tmp_path / "audit.jsonl"
    audit.configure(audit_path)
    ctl = Controller(SqliteStore(tmp_path / "state.db"), None, listen="127.0.0.1:0",
                     tls=pki.server_tls())
    ctl.start()
    yield ctl, audit_path
    ctl.stop(grace_s=0.2)
    ctl.store.close()
    audit.configure(None)


def _target(ctl: Controller) -> str:
    return f"127.0.0.1:{ctl.port}"


def _report(ctl: Controller, creds: grpc.ChannelCredentials | None,
            node: str) -> tuple[grpc.StatusCode, list[int], str]:
    instance = uuid.uuid4().hex
    msgs = [hello(node, instance), sample(1, instance, int(time.time() * 1000))]
    if creds is None:
        channel = grpc.insecure_channel(_target(ctl))
    else:
        channel = grpc.secure_channel(_target(ctl), creds)
    with channel:
        return stream(channel, msgs)


def test_valid_cert_reports_as_its_own_node(tls_controller: tuple[Controller, Path],
                                            pki: Pki) -> None:
    ctl, _ = tls_controller
    code, acks, _ = _report(ctl, pki.channel_credentials("n1"), "n1")
    assert code == grpc.StatusCode.OK
    assert acks == [1]
    assert ctl.store.node("n1") is not None


def test_cert_for_n1_cannot_report_as_n2(tls_controller: tuple[Controller, Path],
                                         pki: Pki) -> None:
    ctl, audit_path = tls_controller
    code, acks, details = _report(ctl, pki.channel_credentials("n1"), "n2")
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "n2" in details and "n1" in details
    assert acks == []
    assert ctl.store.node("n2") is None  # nothing stored for the node it claimed
    records = [json.loads(line) for line in audit_path.read_text().splitlines()]
    refused = [r for r in records if r["action"] == "agent_connect"]
    assert refused and refused[-1]["result"] == "refused"
    assert refused[-1]["actor"] == "n1" and refused[-1]["target"] == "n2"
    assert refused[-1]["source"].startswith("ipv4:127.0.0.1")


def test_cert_from_another_ca_is_refused(tls_controller: tuple[Controller, Path], pki: Pki,
                                         tmp_path: Path) -> None:
    ctl, _ = tls_controller
    rogue = make_pki(tmp_path / "rogue-ca", ["n1"], cluster="rogue")
    # trusts the real controller's CA, but presents a certificate for n1 the rogue CA signed
    cert, key = rogue.leaf("n1")
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes(),
                                         private_key=key.read_bytes(),
                                         certificate_chain=cert.read_bytes())
    code, acks, _ = _report(ctl, creds, "n1")
    assert code == grpc.StatusCode.UNAVAILABLE  # the handshake fails: no stream at all
    assert acks == []
    assert ctl.store.node("n1") is None


def test_tls_without_client_cert_is_refused(tls_controller: tuple[Controller, Path],
                                            pki: Pki) -> None:
    ctl, _ = tls_controller
    code, acks, _ = _report(ctl, pki.channel_credentials(None), "n1")
    assert code == grpc.StatusCode.UNAVAILABLE
    assert acks == [] and ctl.store.node("n1") is None


def test_plaintext_to_tls_controller_is_refused(tls_controller: tuple[Controller, Path]) -> None:
    ctl, _ = tls_controller
    code, acks, _ = _report(ctl, None, "n1")
    assert code == grpc.StatusCode.UNAVAILABLE
    assert acks == [] and ctl.store.node("n1") is None


def test_agent_stream_client_over_mtls(tls_controller: tuple[Controller, Path],
                                       pki: Pki) -> None:
    """The agent's own client, configured the way its config file does it."""
    ctl, _ = tls_controller
    cert, key = pki.leaf("n2")
    cfg = AgentConfig(node_name="n2", controller=_target(ctl), ca_path=str(pki.ca),
                      cert_path=str(cert), key_path=str(key)).validate()
    tls = cfg.client_tls()
    assert isinstance(tls, ClientTls)
    outbox = Outbox(uuid.uuid4().hex)
    seq = outbox.put_sample(pb.NodeSample(timestamp_ms=int(time.time() * 1000)))
    client = StreamClient(cfg.controller, outbox, lambda: hello("n2").hello, tls=tls)
    stop = threading.Event()
    t = threading.Thread(target=client.run, args=(stop,), daemon=True)
    t.start()
    try:
        assert outbox.wait_empty(10.0), "the controller never acked over mTLS"
        assert outbox.acked_seq == seq
        assert ctl.store.node("n2") is not None
    finally:
        stop.set()
        t.join(5)


def test_controller_cli_refuses_plaintext_without_insecure(tmp_path: Path) -> None:
    res = CliRunner().invoke(gpufleet_main, ["controller", "--db", str(tmp_path / "s.db"),
                                             "--slurm", "none", "--metrics-listen", ""])
    assert res.exit_code == 2
    assert "--insecure" in res.output and "tls_ca" in res.output
    assert not (tmp_path / "s.db").exists()  # refused before anything was opened


def test_controller_tls_options_are_validated(pki: Pki, tmp_path: Path) -> None:
    cert, key = pki.leaf("localhost", "controller")
    assert from_options(None, None, None, insecure=True) is None
    tls = from_options(str(pki.ca), str(cert), str(key), insecure=False)
    assert tls is not None
    tls.credentials()
    with pytest.raises(TlsConfigError, match="choose one"):
        from_options(str(pki.ca), str(cert), str(key), insecure=True)
    with pytest.raises(TlsConfigError, match="tls_key"):
        from_options(str(pki.ca), str(cert), None, insecure=False)
    missing = from_options(str(tmp_path / "nope.crt"), str(cert), str(key), insecure=False)
    assert missing is not None
    with pytest.raises(TlsConfigError, match=r"nope\.crt: CA certificate file does not exist"):
        missing.credentials()
    with pytest.raises(TlsConfigError, match="not an unencrypted PEM private key"):
        from_options(str(pki.ca), str(cert), str(cert), insecure=False).credentials()  # type: ignore[union-attr]


def test_agent_tls_config_validation(pki: Pki, tmp_path: Path) -> None:
    cert, key = pki.leaf("n1")
    assert AgentConfig().validate().client_tls() is None  # demo/test default: plaintext
    with pytest.raises(ConfigError, match="key_path not set"):
        AgentConfig(ca_path=str(pki.ca), cert_path=str(cert)).validate()
    with pytest.raises(ConfigError, match="choose TLS or plaintext"):
        AgentConfig(ca_path=str(pki.ca), cert_path=str(cert), key_path=str(key),
                    insecure=True).validate()
    with pytest.raises(ConfigError, match="insecure = false needs"):
        AgentConfig(insecure=False).validate()
    with pytest.raises(ConfigError, match=r"cert_path=.*no such file"):
        AgentConfig(ca_path=str(pki.ca), cert_path=str(tmp_path / "x.crt"),
                    key_path=str(key)).validate()
    with pytest.raises(ConfigError, match="HOST:PORT"):
        AgentConfig(controller="head1:50051,head2").validate()
    assert AgentConfig(controller="head1:50051, head2:50051").validate() \
        .controller_targets() == ["head1:50051", "head2:50051"]
