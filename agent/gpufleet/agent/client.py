"""The agent's side of the `Connect` stream: send reports, take acks, reconnect with backoff.

Quiet by design: a controller that is away is logged once when it goes and once when it
comes back, not every retry.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Iterator

import grpc
from gpufleet.agent.outbox import Outbox
from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.rpc.v1 import fleet_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class StreamClient:
    def __init__(
        self,
        target: str,
        outbox: Outbox,
        hello: Callable[[], pb.Hello],
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 30.0,
    ) -> None:
        self.target = target
        self.outbox = outbox
        self.hello = hello
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.connected = threading.Event()
        self.connects = 0

    def run(self, stop: threading.Event) -> None:
        backoff = self.backoff_initial_s
        was_down = False
        while not stop.is_set():
            channel = grpc.insecure_channel(
                self.target,
                options=[
                    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                    ("grpc.keepalive_time_ms", 20_000),
                    ("grpc.keepalive_timeout_ms", 10_000),
                ],
            )
            try:
                stub = pb_grpc.FleetControllerStub(channel)
                call = stub.Connect(self._requests(stop))
                for reply in call:
                    if not self.connected.is_set():
                        self.connected.set()
                        self.connects += 1
                        if was_down:
                            log.info("controller %s is back", self.target)
                            was_down = False
                        backoff = self.backoff_initial_s
                    if reply.HasField("ack"):
                        self.outbox.ack(reply.ack.seq)
                    if stop.is_set():
                        call.cancel()
                        break
            except grpc.RpcError as e:
                if not stop.is_set() and not was_down:
                    code = e.code() if hasattr(e, "code") else "?"
                    log.warning("controller %s unreachable (%s); retrying", self.target, code)
                    was_down = True
            finally:
                self.connected.clear()
                channel.close()
            # full jitter keeps a whole cluster from reconnecting in lock step
            stop.wait(random.uniform(0, backoff))  # noqa: S311 - not crypto
            backoff = min(backoff * 2, self.backoff_max_s)

    def _requests(self, stop: threading.Event) -> Iterator[pb.AgentMessage]:
        # Hello first; then everything not yet acked, in order, then new reports as they come.
        yield pb.AgentMessage(seq=0, agent_instance=self.outbox.agent_instance, hello=self.hello())
        cursor = self.outbox.acked_seq
        while not stop.is_set():
            msg = self.outbox.next_after(cursor, timeout_s=0.5)
            if msg is not None:
                cursor = msg.seq
                yield msg
