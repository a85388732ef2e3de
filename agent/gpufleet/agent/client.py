"""The agent's side of the `Connect` stream: send reports, take acks, reconnect with backoff.

Several controllers (active and standbys, `controller = "head1:50051,head2:50051"`): on a
failed or refused stream the next address is tried at once; backoff starts only once every
address failed in a row. A standby answers UNAVAILABLE until it takes over.

mTLS (`tls`): the channel presents this node's certificate and trusts only the cluster CA;
the files are re-read at every connect, so renewed certificates need no restart.

Quiet by design: a controller that is away is logged once when it goes and once when it
comes back, not every retry.

Reports an earlier agent process left in the spool go first, on a stream whose hello names
that process's agent_instance (gpufleet.agent.outbox says why); once all of them are acked
the stream is closed and the next one speaks as this process. A report the controller
rejects (`Ack.rejected`) goes to the outbox's dead-letter file and is never resent.

Heartbeats skip the outbox (fleet.proto Heartbeat): unsequenced, sent on the stream when one
is up for this process, dropped when none is, never acked. So no ack tells this side that the
controller is gone: gRPC keepalive (below) does, and the controller allows its pings. Only a
controller whose headers say so (STREAM_ACCEPTED_KEY) gets them unsequenced: to one from
before (it refuses seq 0), or before the headers came, a heartbeat goes through the outbox,
sequenced and acked, as it always did. So agents and controllers upgrade in either order.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
from gpufleet.agent.config import ClientTls
from gpufleet.agent.outbox import Outbox
from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.rpc.v1 import fleet_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# initial metadata the controller sends once it took the hello: the stream is up, even when
# nothing is acked for a while (heartbeats are not); a refusal (trailers only) carries none.
# The same key as gpufleet.scheduler.service.server's (the two sides share only the wire).
STREAM_ACCEPTED_KEY = "gpufleet-stream"


class TlsFileError(Exception):
    """A TLS file cannot be read; the message names it."""


__all__ = ["ClientTls", "Heartbeats", "StreamClient", "TlsFileError", "credentials",
           "split_targets"]


class Heartbeats:
    """The newest heartbeat on its way to the stream: one slot, a newer one replaces one not
    yet sent, and a stream that (re)starts drops what is there (a heartbeat from before it
    says nothing about now). `wake`: tells the stream's sender to look (Outbox.wake)."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._lock = threading.Lock()
        self._beat: pb.Heartbeat | None = None

    def put(self, beat: pb.Heartbeat) -> None:
        with self._lock:
            self._beat = beat
        self._wake()

    def take(self) -> pb.Heartbeat | None:
        with self._lock:
            beat, self._beat = self._beat, None
        return beat


def credentials(tls: ClientTls) -> grpc.ChannelCredentials:
    """The channel credentials from `tls`'s files, read now; TlsFileError names a bad one."""
    def read(path: Path, what: str) -> bytes:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise TlsFileError(f"{path}: cannot read the {what}: {e.strerror}") from e
        if b"-----BEGIN" not in data:
            raise TlsFileError(f"{path}: the {what} is not PEM")
        return data

    return grpc.ssl_channel_credentials(
        root_certificates=read(tls.ca_path, "CA certificate"),
        private_key=read(tls.key_path, "agent key"),
        certificate_chain=read(tls.cert_path, "agent certificate"),
    )


def split_targets(controller: str) -> list[str]:
    """'head1:50051, head2:50051' -> ['head1:50051', 'head2:50051']."""
    return [t.strip() for t in controller.split(",") if t.strip()]


def _accepted(call: grpc.Call) -> bool:
    """Whether the controller's headers say it took the hello (STREAM_ACCEPTED_KEY)."""
    return any(key == STREAM_ACCEPTED_KEY for key, _ in call.initial_metadata() or ())


class StreamClient:
    def __init__(
        self,
        target: str,
        outbox: Outbox,
        hello: Callable[[], pb.Hello],
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 30.0,
        tls: ClientTls | None = None,
        on_command: Callable[[pb.Command], None] | None = None,
        heartbeats: Heartbeats | None = None,
    ) -> None:
        self.on_command = on_command  # the controller's commands (repair); None: ignored
        self.heartbeats = heartbeats  # sent unsequenced, outside the outbox; None: none
        self.targets = split_targets(target)
        if not self.targets:
            raise ValueError(f"controller {target!r}: no address")
        self.target = self.targets[0]  # the one in use (or tried last)
        self.tls = tls
        self.outbox = outbox
        self.hello = hello
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.connected = threading.Event()
        self.connects = 0
        # set by _requests when it closed a stream because the instance it spoke for has
        # nothing left: reconnect at once, to the same controller, as the next instance
        self._instance_done = False
        # this stream's controller takes unsequenced heartbeats (its headers said so)
        self._unsequenced_ok = False

    def _channel(self) -> grpc.Channel:
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
        ]
        if self.tls is None:
            return grpc.insecure_channel(self.target, options=options)
        return grpc.secure_channel(self.target, credentials(self.tls), options=options)

    def _tls_cause(self) -> str:
        """gRPC says UNAVAILABLE for every failed handshake: name the TLS cause, if it is one."""
        if self.tls is None:
            return ""
        from gpufleet.agent.tlscheck import diagnose

        try:
            d = diagnose(self.target, self.tls.ca_path, self.tls.cert_path, self.tls.key_path,
                         timeout_s=3.0)
        except Exception as e:  # noqa: BLE001 - a diagnosis must never stop the reconnects
            return f" (TLS check failed: {e})"
        return "" if d.ok or d.cause == "unreachable" else f": {d.message}"

    def run(self, stop: threading.Event) -> None:
        backoff = self.backoff_initial_s
        was_down = False
        index = 0
        failures_in_row = 0
        while not stop.is_set():
            self.target = self.targets[index % len(self.targets)]
            try:
                channel = self._channel()
            except TlsFileError as e:
                log.error("cannot connect to %s: %s", self.target, e)
                stop.wait(min(backoff, self.backoff_max_s))
                backoff = min(backoff * 2, self.backoff_max_s)
                continue
            instance = self.outbox.stream_instance()
            self._instance_done = False
            try:
                stub = pb_grpc.FleetControllerStub(channel)
                call = stub.Connect(self._requests(stop, instance))
                # up once the controller accepted the hello (its headers say so), or at the
                # first reply (a controller that sends no such header)
                for reply in itertools.chain([None] if self._headers_accept(call) else [], call):
                    if not self.connected.is_set():
                        self.connected.set()
                        self.connects += 1
                        if was_down:
                            log.info("controller %s is back", self.target)
                            was_down = False
                        backoff = self.backoff_initial_s
                        failures_in_row = 0
                    self._on_reply(reply, instance)
                    if stop.is_set():
                        call.cancel()
                        break
            except grpc.RpcError as e:
                code = e.code() if hasattr(e, "code") else "?"
                if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                    # no retry will fix a certificate for the wrong node; say so every time
                    log.error("controller %s refused this agent: %s", self.target,
                              e.details() if hasattr(e, "details") else e)
                elif not stop.is_set() and not was_down:
                    log.warning("controller %s unreachable (%s)%s; retrying", self.target, code,
                                self._tls_cause())
                    was_down = True
            finally:
                self.connected.clear()
                channel.close()
            if self._instance_done and not stop.is_set():
                continue  # not a failure: the same controller, now as the next instance
            index += 1
            failures_in_row += 1
            if failures_in_row < len(self.targets):
                continue  # another controller may be active: try it now, not after a backoff
            failures_in_row = 0
            # full jitter keeps a whole cluster from reconnecting in lock step
            stop.wait(random.uniform(0, backoff))  # noqa: S311 - not crypto
            backoff = min(backoff * 2, self.backoff_max_s)

    def _headers_accept(self, call: grpc.Call) -> bool:
        """Whether this stream's controller said it took the hello (and so takes unsequenced
        heartbeats); waits for its headers."""
        self._unsequenced_ok = _accepted(call)
        return self._unsequenced_ok

    def _on_reply(self, reply: pb.ControllerMessage | None, instance: str) -> None:
        if reply is None:  # the stream came up (_accepted): nothing to take
            return
        if reply.HasField("ack"):
            # rejected first: the outbox still holds them, for the dead-letter file
            for rejected in reply.ack.rejected:
                self.outbox.reject(rejected.seq, rejected.reason, instance)
            self.outbox.ack(reply.ack.seq, instance)
        elif reply.HasField("command") and self.on_command is not None:
            self.on_command(reply.command)

    def _requests(self, stop: threading.Event, instance: str) -> Iterator[pb.AgentMessage]:
        # Hello first; then everything not yet acked, in order, then new reports as they come.
        self._unsequenced_ok = False  # until this stream's headers say otherwise (run)
        hello = self.hello()
        cursor = self.outbox.acked_seq_for(instance)
        hello.last_acked_seq = cursor
        # this process's heartbeats go only on its own stream (not on an earlier process's
        # replay), and one from before this stream is stale
        beats = self.heartbeats if instance == self.outbox.agent_instance else None
        if self.heartbeats is not None:
            self.heartbeats.take()
        yield pb.AgentMessage(seq=0, agent_instance=instance, hello=hello)
        while not stop.is_set():
            beat = beats.take() if beats is not None else None
            if beat is not None and self._unsequenced_ok:
                yield pb.AgentMessage(agent_instance=instance, heartbeat=beat)  # seq 0
                continue
            if beat is not None:  # a controller from before (or its headers not in yet)
                self.outbox.put_heartbeat(beat)
            msg = self.outbox.next_after(cursor, timeout_s=0.5, instance=instance)
            if msg is not None:
                cursor = msg.seq
                yield msg
            elif instance != self.outbox.agent_instance and \
                    self.outbox.stream_instance() != instance:
                # an earlier process's reports are all acked (or rejected): end this stream
                # cleanly; the controller will not see this instance again
                self._instance_done = True
                return
