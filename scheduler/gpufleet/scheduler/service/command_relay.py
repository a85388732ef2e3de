"""Repair commands and their answers between ingest processes on one shared store.

With `--standby-ingests` an agent's stream may be on any controller process, but only the
leader runs the repair loop (docs/scaling.md, "Past one process"). `RelayedCommands` is the
repair loop's AgentLink there: a node whose stream is on this process gets its command
through AgentCommands as before; a node whose stream a live process elsewhere holds gets it
queued in the store (`agent_commands`, migration 12). `CommandRelay` runs in every process:
every `poll_s` it publishes the nodes whose streams it holds (`agent_streams`, with a beat
in `ingest_processes`), claims the commands queued for them (deleted in the claiming
transaction: exactly once) and hands them to its own AgentCommands; an agent's answer that
reaches a process that is not the leader is stored (`command_results`), and the leader's
CommandRelay hands it to the repair loop.

A holder that has not beaten for `live_s` is dead: its nodes count as without a stream
until their agents reconnect to a live process, and a command queued for such a node waits
for that process (up to `max_age_s`, then it is dropped, logged). What a process that dies
loses: commands it claimed but had not written to the stream yet (in memory for at most one
report interval). The repair case then meets its deadline (`reset_timeout_s` /
`diag_timeout_s`) and fails as any unanswered command does: the node stays drained and the
failure is escalated, as when the leader itself dies with a command in flight.

Nothing here speaks SQL or serves gRPC: the store and AgentCommands are the doors.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable

from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.scheduler.poll_loop import PollLoop
from gpufleet.scheduler.repair.engine import AgentCommand, CommandResult
from gpufleet.scheduler.service.repair_link import AgentCommands, result_from_wire
from gpufleet.scheduler.store import (
    AgentCommandRow,
    CommandResultRow,
    RelayStore,
    StoreError,
    now_ms,
)

log = logging.getLogger(__name__)


def holder_id() -> str:
    """This process's name in the store: readable (host, pid) and unique across restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class RelayedCommands:
    """The repair loop's AgentLink when agents' streams are spread over processes.

    `live_s`: a process that has not beaten for this long holds no stream. `snapshot_s`:
    `has_stream` (asked for many nodes by a routine scan) reads every live holder at most
    this often; `send` asks the store about its node at once."""

    def __init__(self, local: AgentCommands, store: RelayStore, holder: str | None = None,
                 live_s: float = 10.0, snapshot_s: float = 1.0,
                 clock: Callable[[], int] = now_ms) -> None:
        if live_s <= 0 or snapshot_s < 0:
            raise ValueError(f"live_s={live_s}, snapshot_s={snapshot_s}: must be > 0 and >= 0")
        self.local = local
        self.store = store
        self.holder = holder if holder is not None else holder_id()
        self.live_ms = int(live_s * 1000)
        self.snapshot_ms = int(snapshot_s * 1000)
        self.clock = clock
        self.queued = 0  # commands queued for another process (tests, metrics)
        self._lock = threading.Lock()
        self._remote: dict[str, str] = {}
        self._read_ms: int | None = None

    def has_stream(self, node: str) -> bool:
        if self.local.has_stream(node):
            return True
        now = self.clock()
        with self._lock:
            if self._read_ms is None or now - self._read_ms >= self.snapshot_ms:
                try:
                    self._remote = self.store.stream_holders(now - self.live_ms)
                except StoreError as e:
                    log.warning("reading which process holds which agent stream failed: %s", e)
                    return False
                self._read_ms = now
            holder = self._remote.get(node)
        return holder is not None and holder != self.holder

    def send(self, cmd: AgentCommand) -> bool:
        if self.local.send(cmd):
            return True
        now = self.clock()
        try:
            holder = self.store.stream_holders(now - self.live_ms, cmd.node).get(cmd.node)
            if holder is None or holder == self.holder:
                return False  # no stream anywhere (ours just closed): tried again next tick
            self.store.queue_command(AgentCommandRow(0, cmd.node, cmd.kind, cmd.request_id,
                                                     tuple(cmd.gpus), cmd.level, now))
        except StoreError as e:
            log.warning("queueing %s for %s on another process failed: %s", cmd.kind,
                        cmd.node, e)
            return False
        self.queued += 1
        log.info("%s for %s queued for process %s (holds its stream)", cmd.kind, cmd.node,
                 holder)
        return True

    def boot_id(self, node: str) -> str | None:
        return self.local.boot_id(node)


class CommandRelay:
    """In every process on a shared store: publish the streams held here, take the commands
    queued for them, and (on the leader, `acting()`) hand stored answers to `deliver` (the
    repair loop's `on_result`). `on_result` is the Ingestor's `on_command_result`."""

    def __init__(self, link: RelayedCommands, store: RelayStore,
                 deliver: Callable[[CommandResult], None], acting: Callable[[], bool],
                 poll_s: float = 0.2, beat_s: float = 1.0, max_age_s: float = 60.0,
                 prune_s: float = 60.0, batch: int = 1000) -> None:
        if min(poll_s, beat_s, max_age_s, prune_s) <= 0:
            raise ValueError(f"poll_s={poll_s}, beat_s={beat_s}, max_age_s={max_age_s}, "
                             f"prune_s={prune_s}: each must be > 0")
        self.link = link
        self.store = store
        self.deliver = deliver
        self.acting = acting
        self.poll_s = poll_s
        self.beat_ms = int(beat_s * 1000)
        self.max_age_ms = int(max_age_s * 1000)
        self.prune_ms = int(prune_s * 1000)
        self.batch = batch
        # counters (tests, metrics): commands handed to local streams, answers stored for the
        # leader, stored answers handed to the repair loop, commands dropped unclaimed
        self.handed = 0
        self.results_stored = 0
        self.results_delivered = 0
        self.expired = 0
        self._published: frozenset[str] = frozenset()
        self._beat_at: int | None = None
        self._prune_at = 0
        self._loop = PollLoop("command-relay", self.poll_once, poll_s, log,
                              "relaying repair commands through the store",
                              expected=(StoreError,))

    @property
    def holder(self) -> str:
        return self.link.holder

    # ------------------------------------------------------------ the Ingestor's side

    def on_result(self, node: str, r: pb.CommandResult) -> None:
        """An agent answered: to the repair loop here when this process leads, else to the
        store for the leader. A StoreError reaches the servicer, which ends the stream: the
        agent sends the answer again (its outbox keeps it until acked)."""
        res = result_from_wire(node, r)
        if self.acting():
            self.deliver(res)
            return
        self.store.add_command_result(CommandResultRow(
            0, res.node, res.request_id, res.kind, res.ok, res.could_not_run, res.detail,
            res.failed_checks, res.evidence, now_ms()))
        self.results_stored += 1

    # ------------------------------------------------------------ the poll

    def poll_once(self) -> int:
        """One round; -> commands handed to local streams plus answers delivered."""
        now = self.link.clock()
        self._publish(now)
        done = self._take_commands(now)
        if self.acting():
            done += self._deliver_results()
        if now >= self._prune_at:
            self._prune_at = now + self.prune_ms
            dead, stale = self.store.prune_relay(now - 10 * self.link.live_ms,
                                                 now - self.max_age_ms)
            if stale:
                self.expired += stale
                log.warning("dropped %d repair command(s) no process claimed within %g s "
                            "(their nodes' agents are not connected)", stale,
                            self.max_age_ms / 1000)
            if dead:
                log.info("forgot %d controller process(es) that stopped beating", dead)
        return done

    def _publish(self, now: int) -> None:
        held = self.link.local.nodes()
        up, down = held - self._published, self._published - held
        if up or down or self._beat_at is None or now - self._beat_at >= self.beat_ms:
            self.store.publish_streams(self.holder, sorted(up), sorted(down), now)
            self._published, self._beat_at = held, now

    def _take_commands(self, now: int) -> int:
        handed = 0
        for row in self.store.claim_commands(self.holder):
            if now - row.created_ms > self.max_age_ms:
                self.expired += 1
                log.warning("dropped %s for %s: queued %d s ago, past max_age", row.kind,
                            row.node, (now - row.created_ms) // 1000)
                continue
            cmd = AgentCommand(row.node, row.kind, row.request_id, row.gpus, row.level)
            if self.link.local.send(cmd):
                handed += 1
                log.info("%s for %s from the leader handed to its stream", row.kind, row.node)
            else:  # the stream closed since it was published: back for whoever holds it next
                self.store.queue_command(row)
        self.handed += handed
        return handed

    def _deliver_results(self) -> int:
        rows = self.store.command_results(self.batch)
        done: list[int] = []
        try:
            for r in rows:
                self.deliver(CommandResult(r.node, r.request_id, r.kind, r.ok, r.could_not_run,
                                           r.detail, r.failed_checks, r.evidence))
                done.append(r.id)
        finally:
            self.store.delete_command_results(done)
        self.results_delivered += len(done)
        return len(done)

    # ------------------------------------------------------------ thread

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        """Stop polling and say in the store that this process holds no stream any more."""
        self._loop.stop()
        try:
            self.store.forget_streams(self.holder)
        except StoreError as e:  # its beat goes stale: the others stop counting on it
            log.warning("could not withdraw this process's agent streams: %s", e)
