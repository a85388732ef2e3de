"""Reports waiting for the controller's ack, in sequence order.

Every report gets the next sequence number when it is queued; it stays here until the
controller acks it (or a later one), so a reconnect resends exactly what was not stored.
Bounded: when the controller is away for long, the oldest *samples* are dropped first;
health events and job usage are kept because a fault or a GPU-second must never be lost.
Checkpoint registrations get their own bound (any local user can write to the job socket):
past it the oldest pending registration goes, since a job's newer one makes older ones moot.
"""

from __future__ import annotations

import threading
from collections import deque

from gpufleet.rpc.v1 import fleet_pb2 as pb


class Outbox:
    max_pending_checkpoints = 256

    def __init__(self, agent_instance: str, max_pending: int = 3600) -> None:
        self.agent_instance = agent_instance
        self.max_pending = max_pending
        self._cond = threading.Condition()
        self._pending: deque[pb.AgentMessage] = deque()
        self._next_seq = 1
        self.acked_seq = 0
        self.dropped = 0

    def put_sample(self, sample: pb.NodeSample) -> int:
        return self._put(pb.AgentMessage(sample=sample))

    def put_event(self, event: pb.HealthEvent) -> int:
        return self._put(pb.AgentMessage(event=event))

    def put_checkpoint(self, ckpt: pb.CheckpointRegistered) -> int:
        with self._cond:
            waiting = [i for i, m in enumerate(self._pending)
                       if m.WhichOneof("body") == "checkpoint"]
            if len(waiting) >= self.max_pending_checkpoints:
                del self._pending[waiting[0]]
                self.dropped += 1
        return self._put(pb.AgentMessage(checkpoint=ckpt))

    def put_usage(self, report: pb.JobUsageReport) -> int:
        # never dropped for space (only samples are): usage is cumulative and few per minute
        return self._put(pb.AgentMessage(usage=report))

    def _put(self, msg: pb.AgentMessage) -> int:
        with self._cond:
            msg.seq = self._next_seq
            msg.agent_instance = self.agent_instance
            self._next_seq += 1
            self._pending.append(msg)
            if len(self._pending) > self.max_pending:
                self._drop_oldest_sample()
            self._cond.notify_all()
            return msg.seq

    def _drop_oldest_sample(self) -> None:
        for i, m in enumerate(self._pending):
            if m.WhichOneof("body") == "sample":
                del self._pending[i]
                self.dropped += 1
                return

    def ack(self, seq: int) -> None:
        with self._cond:
            self.acked_seq = max(self.acked_seq, seq)
            while self._pending and self._pending[0].seq <= seq:
                self._pending.popleft()
            self._cond.notify_all()

    def next_after(self, seq: int, timeout_s: float) -> pb.AgentMessage | None:
        """The first pending message with a sequence number above `seq`, waiting for one."""
        with self._cond:
            msg = self._first_after(seq)
            if msg is None:
                self._cond.wait(timeout_s)
                msg = self._first_after(seq)
            return msg

    def _first_after(self, seq: int) -> pb.AgentMessage | None:
        for m in self._pending:
            if m.seq > seq:
                return m
        return None

    def wait_empty(self, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending, timeout_s)

    def __len__(self) -> int:
        with self._cond:
            return len(self._pending)
