"""Reports waiting for the controller's ack, in sequence order, kept on disk until acked.

Every report gets the next sequence number when it is queued; it stays here until the
controller acks it (or a later one), so a reconnect resends exactly what was not stored.

Durable (`spool_dir`, see gpufleet.agent.spool): every report is appended to a segment file
before `put_*` returns, so neither a controller away for hours nor an agent restart loses
one. After a restart the reports an earlier process left are sent first, in order, each
with the `agent_instance` and sequence number it was queued with, on a stream whose hello
names that instance; only when all of them are acked does this process say hello as itself.
The controller keeps one (instance, last stored seq) per node and resets it when a new
instance says hello: since an instance's stream is never opened again once a newer one has
said hello, every (instance, seq) reaches the controller while it still holds that
instance's last seq, and a replay of one it stored is acked as a duplicate, not stored
again. (Keeping one instance across restarts would do the same for dedup, but the
controller clears a node's verdicts when a new instance says hello, which a restarted agent
relies on: its health checks start afresh.)

Bounded in bytes (`max_bytes`, the records' size on disk): past it the oldest *samples* go
first, a whole segment's samples at a time (the segment is rewritten without them, so the
disk is bounded too); health events and job usage are never dropped for space, because a
fault or a GPU-second must never be lost. Checkpoint registrations get their own bound
(any local user can write to the job socket): past it the oldest pending registration goes,
since a job's newer one makes older ones moot.

A spool disk that fails (full, quota, read-only, I/O error) never stops sampling: the
affected reports are kept in memory (still under the same byte bound), the failure is logged
once and counted, and the disk is tried again every `disk_retry_s`, first with the reports
held in memory, in order. Reports held only in memory are lost if the agent stops before
the disk or the controller takes them.

Rejected reports (the controller acks them with a reason: it will never store them) leave
the outbox like acked ones and are appended to a bounded dead-letter file, one JSON line
each, for an admin to read.

One module (~620 lines): ordering, acks, replay after restart and the disk budget are one
invariant (every report delivered once, in order); spool.py holds the file format.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from gpufleet.agent.spool import HEADER_BYTES, Segment, SpoolDir
from gpufleet.rpc.v1 import fleet_pb2 as pb

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 32 * 1024 * 1024
DEFAULT_SYNC_INTERVAL_S = 5.0
DEFAULT_DISK_RETRY_S = 10.0
DEAD_LETTER_MAX_BYTES = 1024 * 1024  # then rotated once to rejected.jsonl.1
# payloads of spooled reports also kept in memory, so a connected agent never reads its spool
_CACHE_MAX_BYTES = 4 * 1024 * 1024
# worthless once newer ones exist: written without fsync, and the first dropped for space.
# Heartbeats are no longer queued here (unsequenced, sent only on a live stream: client.py
# Heartbeats), but a spool an older agent left may still hold some
DROPPABLE_KINDS = frozenset({"sample", "heartbeat"})


@dataclass(eq=False)
class _Entry:
    seq: int
    instance: str
    rank: int  # instance order: earlier processes first
    kind: str  # sample | heartbeat | event | checkpoint | usage
    size: int  # record bytes (header + payload): what the byte bound counts
    data: bytes | None  # the payload, when in memory
    segment: Segment | None = None  # None: held in memory only
    offset: int = 0
    gone: bool = False  # acked, rejected or dropped


@dataclass(frozen=True)
class OutboxStats:
    pending_messages: int
    pending_bytes: int
    disk_bytes: int
    memory_only_messages: int
    dropped_samples: int
    dropped_checkpoints: int
    write_errors: int
    corrupt_records: int
    rejected: int


class Outbox:
    max_pending_checkpoints = 256

    def __init__(
        self,
        agent_instance: str,
        max_pending: int | None = None,
        *,
        spool_dir: Path | str | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        sync_interval_s: float = DEFAULT_SYNC_INTERVAL_S,
        disk_retry_s: float = DEFAULT_DISK_RETRY_S,
        dead_letter_path: Path | str | None = None,
        dead_letter_max_bytes: int = DEAD_LETTER_MAX_BYTES,
    ) -> None:
        self.agent_instance = agent_instance
        self.max_pending = max_pending  # a count bound as well (None: bytes only)
        self.max_bytes = max_bytes
        self.disk_retry_s = disk_retry_s
        self.dead_letter_path = Path(dead_letter_path) if dead_letter_path else None
        self.dead_letter_max_bytes = dead_letter_max_bytes
        self._cond = threading.Condition()
        self._entries: list[_Entry] = []  # sorted by (rank, seq); gone ones removed lazily
        self._head = 0  # no live entry before this index
        self._gone_in_list = 0
        self._live = 0
        self._live_bytes = 0
        self._checkpoints: deque[_Entry] = deque()
        self._memory_only: deque[_Entry] = deque()  # spool-less entries, oldest first
        self._memory_count = 0
        self._cache: deque[_Entry] = deque()
        self._cache_bytes = 0
        self._seg_entries: dict[int, list[_Entry]] = {}
        self._next_seq = 1
        self.acked_seq = 0  # of this process's instance
        self.dropped_samples = 0
        self.dropped_checkpoints = 0
        self.write_errors = 0
        self.corrupt_records = 0
        self.rejected = 0
        self._disk_down = False
        self._disk_retry_at = 0.0
        self._over_bound_logged = False
        self._ranks: dict[str, int] = {}
        # highest acked seq per instance, saved now and then (not fsync'd): a restart then
        # skips what the controller already has. Losing it only means replays it dedups.
        self._acked: dict[str, int] = {}
        self._acked_saved_at = 0.0
        self.spool: SpoolDir | None = None
        if spool_dir is not None:
            segment_bytes = min(1024 * 1024, max(16 * 1024, max_bytes // 16))
            self.spool = SpoolDir(Path(spool_dir), segment_bytes, sync_interval_s)
            self._load()
        self._own_rank = len(self._ranks)
        self._ranks[agent_instance] = self._own_rank

    @property
    def dropped(self) -> int:
        return self.dropped_samples + self.dropped_checkpoints

    # ------------------------------------------------------------ start

    def _load(self) -> None:
        assert self.spool is not None  # noqa: S101 - only called with a spool
        try:
            report = self.spool.load()
        except OSError as err:
            # no spool directory: run on in memory (logged once, counted, retried on put)
            log.error("spool %s unusable (%s): keeping reports in memory; retrying every "
                      "%g s", self.spool.path, err, self.disk_retry_s)
            self.write_errors += 1
            self._disk_down = True
            self._disk_retry_at = time.monotonic() + self.disk_retry_s
            return
        self.corrupt_records += report.corrupt_segments
        acked = self._load_acked()
        seen: set[tuple[str, int]] = set()
        for rec in report.records:
            instance = rec.msg.agent_instance
            key = (instance, rec.msg.seq)
            if key in seen or not instance or rec.msg.WhichOneof("body") in (None, "hello"):
                continue  # a record a migration wrote twice, or one that is not a report
            if rec.msg.seq <= acked.get(instance, 0):
                continue  # the controller has it
            seen.add(key)
            rank = self._ranks.setdefault(instance, len(self._ranks))
            entry = _Entry(rec.msg.seq, instance, rank, rec.msg.WhichOneof("body") or "",
                           rec.size, None, rec.segment, rec.offset)
            self._entries.append(entry)
        self._entries.sort(key=lambda e: (e.rank, e.seq))
        for e in self._entries:
            self._count_in(e)
        for seg in list(self.spool.segments.values()):
            if seg.live == 0:
                self.spool.delete(seg)
        if self._entries:
            log.info("spool %s: %d unacked reports from %d earlier run(s) to send first",
                     self.spool.path, len(self._entries), len(self._ranks))

    def _acked_path(self) -> Path:
        assert self.spool is not None  # noqa: S101 - only called with a spool
        return self.spool.path / "acked.json"

    def _load_acked(self) -> dict[str, int]:
        try:
            doc = json.loads(self._acked_path().read_text())
            return {str(k): int(v) for k, v in doc.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, AttributeError) as err:
            log.warning("spool %s unreadable (%s); everything spooled is resent (the "
                        "controller drops what it has)", self._acked_path(), err)
            return {}

    def _save_acked(self, now: float, force: bool = False) -> None:
        if self.spool is None or (not force and now - self._acked_saved_at < 1.0):
            return
        self._acked_saved_at = now
        pending = {e.instance for e in self._entries[self._head:] if not e.gone}
        pending.add(self.agent_instance)
        doc = {k: v for k, v in self._acked.items() if k in pending}
        path = self._acked_path()
        tmp = path.with_suffix(".json.tmp")
        try:
            tmp.write_text(json.dumps(doc))
            tmp.replace(path)
        except OSError:
            pass  # harmless (replays are dropped by the controller); the spool logs disk trouble

    # ------------------------------------------------------------ queueing

    def put_sample(self, sample: pb.NodeSample) -> int:
        return self._put(pb.AgentMessage(sample=sample))

    def put_event(self, event: pb.HealthEvent) -> int:
        return self._put(pb.AgentMessage(event=event))

    def put_checkpoint(self, ckpt: pb.CheckpointRegistered) -> int:
        return self._put(pb.AgentMessage(checkpoint=ckpt))

    def put_usage(self, report: pb.JobUsageReport) -> int:
        # never dropped for space (only samples are): usage is cumulative and few per minute
        return self._put(pb.AgentMessage(usage=report))

    def put_heartbeat(self, beat: pb.Heartbeat) -> int:
        """A sequenced heartbeat, for a controller that predates unsequenced ones (it sends
        no gpufleet-stream header and refuses seq 0; gpufleet.agent.client)."""
        return self._put(pb.AgentMessage(heartbeat=beat))

    def put_command_result(self, result: pb.CommandResult) -> int:
        return self._put(pb.AgentMessage(command_result=result))

    def _put(self, msg: pb.AgentMessage) -> int:
        with self._cond:
            msg.seq = self._next_seq
            msg.agent_instance = self.agent_instance
            self._next_seq += 1
            payload = msg.SerializeToString()
            entry = _Entry(msg.seq, self.agent_instance, self._own_rank,
                           msg.WhichOneof("body") or "", HEADER_BYTES + len(payload), payload)
            self._store(entry)
            self._entries.append(entry)
            self._count_in(entry)
            if entry.kind == "checkpoint" and len(self._checkpoints) > self.max_pending_checkpoints:
                self._drop_oldest_checkpoint()
            self._enforce_bounds()
            self._cond.notify_all()
            return msg.seq

    def _count_in(self, e: _Entry) -> None:
        self._live += 1
        self._live_bytes += e.size
        if e.kind == "checkpoint":
            self._checkpoints.append(e)
        if e.segment is not None:
            e.segment.live += 1
            e.segment.samples += e.kind in DROPPABLE_KINDS
            self._seg_entries.setdefault(e.segment.number, []).append(e)
        else:
            self._memory_count += 1

    # ------------------------------------------------------------ the disk

    def _store(self, e: _Entry) -> None:
        """Put `e` on disk if the spool takes writes; else keep it in memory only."""
        if self.spool is None:
            return  # an outbox without a spool (tests, tools): data stays in memory
        now = time.monotonic()
        if self._disk_down and (now < self._disk_retry_at or not self._migrate(now)):
            self._memory_only.append(e)
            return
        try:
            self._append(e, now)
        except OSError as err:
            self._disk_failed(err, now)
            self._memory_only.append(e)

    def _append(self, e: _Entry, now: float) -> None:
        assert self.spool is not None  # noqa: S101 - callers ensure it
        assert e.data is not None  # noqa: S101 - callers ensure it
        seg, offset, size = self.spool.append(e.data, durable=e.kind not in DROPPABLE_KINDS,
                                              now_s=now)
        e.segment, e.offset, e.size = seg, offset, size
        self._cache.append(e)
        self._cache_bytes += e.size
        while self._cache_bytes > min(_CACHE_MAX_BYTES, self.max_bytes) and self._cache:
            old = self._cache.popleft()
            self._cache_bytes -= old.size
            if old.segment is not None:
                old.data = None  # on disk: read back if it must be sent again

    def _migrate(self, now: float) -> bool:
        """Retry the disk: write the reports held in memory, oldest first; True when all of
        them are on disk (new reports may go there too)."""
        moved = 0
        while self._memory_only:
            e = self._memory_only[0]
            if not e.gone:
                try:
                    self._append(e, now)
                except OSError as err:
                    self._disk_failed(err, now)
                    return False
                e.segment.live += 1  # type: ignore[union-attr]
                e.segment.samples += e.kind in DROPPABLE_KINDS  # type: ignore[union-attr]
                self._seg_entries.setdefault(e.segment.number, []).append(e)  # type: ignore[union-attr]
                self._memory_count -= 1
                moved += 1
            self._memory_only.popleft()
        self._disk_down = False
        log.warning("spool %s takes writes again; %d reports moved there from memory",
                    self.spool.path if self.spool else "?", moved)
        return True

    def _disk_failed(self, err: OSError, now: float) -> None:
        self.write_errors += 1
        self._disk_retry_at = now + self.disk_retry_s
        if not self._disk_down:  # once per outage, not once per report
            log.error("cannot write the spool %s (%s): keeping reports in memory (they are "
                      "lost if the agent stops before the disk or the controller takes "
                      "them); retrying every %g s",
                      self.spool.path if self.spool else "?", err, self.disk_retry_s)
        self._disk_down = True

    # ------------------------------------------------------------ bounds

    def _enforce_bounds(self) -> None:
        while self._live_bytes > self.max_bytes or (
                self.max_pending is not None and self._live > self.max_pending):
            if not self._drop_oldest_samples():
                if not self._over_bound_logged:
                    log.warning("outbox holds %d bytes of health events, usage and checkpoints "
                                "(over spool_max_bytes=%d): kept, never dropped",
                                self._live_bytes, self.max_bytes)
                    self._over_bound_logged = True
                return
        self._over_bound_logged = False

    def _drop_oldest_samples(self) -> bool:
        """Drop the oldest pending sample; if it is on disk, every sample of its segment
        (oldest first, and the file shrinks). False when no sample is left to drop."""
        oldest = None
        for i in range(self._head, len(self._entries)):
            e = self._entries[i]
            if not e.gone and e.kind in DROPPABLE_KINDS:
                oldest = e
                break
        if oldest is None:
            return False
        seg = oldest.segment
        if seg is None:
            self._remove(oldest)
            self.dropped_samples += 1
            return True
        members = self._seg_entries.get(seg.number, [])
        for e in members:
            if not e.gone and e.kind in DROPPABLE_KINDS:
                self._remove(e, delete_segment=False)
                self.dropped_samples += 1
        self._rewrite(seg)
        return True

    def _drop_oldest_checkpoint(self) -> None:
        while self._checkpoints:
            e = self._checkpoints.popleft()
            if not e.gone:
                self._remove(e, delete_segment=False)
                self.dropped_checkpoints += 1
                if e.segment is not None:
                    self._rewrite(e.segment)
                return

    def _rewrite(self, seg: Segment) -> None:
        """Shrink `seg` to its live records (or delete it when none is left)."""
        assert self.spool is not None  # noqa: S101 - a segment implies a spool
        keep = sorted((e for e in self._seg_entries.get(seg.number, []) if not e.gone),
                      key=lambda e: e.offset)
        self._seg_entries[seg.number] = keep
        if not keep:
            if seg is self.spool.active:
                self.spool.close_active()
            else:
                self.spool.delete(seg)
            self._seg_entries.pop(seg.number, None)
            return
        try:
            offsets = self.spool.rewrite(seg, [(e.offset, e.size) for e in keep])
        except OSError as err:
            # the records stay dropped; only the disk keeps their bytes until the segment goes
            self.write_errors += 1
            log.warning("spool segment %s not compacted (%s); retried at the next drop",
                        seg.path, err)
            return
        for e, offset in zip(keep, offsets, strict=True):
            e.offset = offset

    # ------------------------------------------------------------ acks

    def _remove(self, e: _Entry, delete_segment: bool = True) -> None:
        e.gone = True
        self._live -= 1
        self._live_bytes -= e.size
        self._gone_in_list += 1
        seg = e.segment
        if seg is None:
            self._memory_count -= 1
            e.data = None
            while self._memory_only and self._memory_only[0].gone:
                self._memory_only.popleft()
            return
        seg.live -= 1
        seg.samples -= e.kind in DROPPABLE_KINDS
        if seg.live == 0 and delete_segment and self.spool is not None:
            self._seg_entries.pop(seg.number, None)
            # "drop whole segments once all acked"; the one being written goes once it has
            # grown a little, so a connected agent's spool stays a few KiB
            if seg is not self.spool.active:
                self.spool.delete(seg)
            elif seg.file_bytes >= min(64 * 1024, self.spool.segment_bytes // 4):
                self.spool.close_active()

    def ack(self, seq: int, instance: str | None = None) -> None:
        """Everything of `instance` (default: this process's) up to `seq` is stored."""
        instance = instance or self.agent_instance
        with self._cond:
            if instance == self.agent_instance:
                self.acked_seq = max(self.acked_seq, seq)
            self._acked[instance] = max(self._acked.get(instance, 0), seq)
            rank = self._ranks.get(instance)
            i = self._head
            while i < len(self._entries):
                e = self._entries[i]
                if not e.gone:
                    if e.rank != rank or e.seq > seq:
                        break
                    self._remove(e)
                i += 1
            self._advance_head()
            self._save_acked(time.monotonic())
            self._cond.notify_all()

    def reject(self, seq: int, reason: str, instance: str | None = None) -> None:
        """The controller will never store `seq`: log it, keep it in the dead-letter file
        and drop it (the ack that comes with it clears the rest)."""
        instance = instance or self.agent_instance
        with self._cond:
            e = self._find(instance, seq)
            msg = self._message(e) if e is not None else None
            self.rejected += 1
            log.warning("controller rejected report %s/%d (%s): %s", instance, seq,
                        msg.WhichOneof("body") if msg is not None else "no longer held", reason)
            self._dead_letter(instance, seq, reason, msg)
            if e is not None and not e.gone:
                self._remove(e)
            self._advance_head()
            self._cond.notify_all()

    def _dead_letter(self, instance: str, seq: int, reason: str,
                     msg: pb.AgentMessage | None) -> None:
        if self.dead_letter_path is None:
            return
        doc = {"ts_ms": int(time.time() * 1000), "agent_instance": instance, "seq": seq,
               "reason": reason,
               "message": json_format.MessageToDict(msg) if msg is not None else None}
        path = self.dead_letter_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_size >= self.dead_letter_max_bytes:
                    path.replace(path.with_name(path.name + ".1"))  # one older generation
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "a") as f:
                f.write(json.dumps(doc, sort_keys=True) + "\n")
        except OSError as err:
            log.error("cannot write the dead-letter file %s: %s", path, err)

    # ------------------------------------------------------------ sending

    def stream_instance(self) -> str:
        """The instance the next stream speaks as: an earlier process's while any of its
        reports is pending, else this process's."""
        with self._cond:
            self._advance_head()
            if self._head < len(self._entries):
                return self._entries[self._head].instance
            return self.agent_instance

    def acked_seq_for(self, instance: str) -> int:
        with self._cond:
            if instance == self.agent_instance:
                return self.acked_seq
            self._advance_head()
            first = self._entries[self._head] if self._head < len(self._entries) else None
            return first.seq - 1 if first is not None and first.instance == instance else 0

    def next_after(self, seq: int, timeout_s: float,
                   instance: str | None = None) -> pb.AgentMessage | None:
        """The first pending message of `instance` with a sequence number above `seq`,
        waiting up to `timeout_s` for one."""
        instance = instance or self.agent_instance
        with self._cond:
            msg = self._first_after(instance, seq)
            if msg is None:
                self._cond.wait(timeout_s)
                msg = self._first_after(instance, seq)
            return msg

    def _first_after(self, instance: str, seq: int) -> pb.AgentMessage | None:
        rank = self._ranks.get(instance)
        if rank is None:
            return None
        i = bisect.bisect_right(self._entries, (rank, seq), lo=self._head,
                                key=lambda e: (e.rank, e.seq))
        while i < len(self._entries):
            e = self._entries[i]
            if e.rank != rank:
                return None
            if not e.gone:
                msg = self._message(e)
                if msg is not None:
                    return msg
            i += 1
        return None

    def _find(self, instance: str, seq: int) -> _Entry | None:
        rank = self._ranks.get(instance)
        if rank is None:
            return None
        i = bisect.bisect_left(self._entries, (rank, seq), key=lambda e: (e.rank, e.seq))
        if i < len(self._entries) and (self._entries[i].rank, self._entries[i].seq) == (rank, seq):
            return self._entries[i]
        return None

    def _message(self, e: _Entry) -> pb.AgentMessage | None:
        """The entry's message, read back from the spool if need be; None (and the entry
        dropped) when its record cannot be read."""
        data = e.data
        if data is None:
            assert self.spool is not None  # noqa: S101 - no data in memory: it is on disk
            assert e.segment is not None  # noqa: S101 - same
            try:
                data = self.spool.read(e.segment, e.offset, e.size)
            except (OSError, ValueError) as err:
                log.warning("spooled report %s/%d unreadable (%s); skipped", e.instance,
                            e.seq, err)
                self.corrupt_records += 1
                self._remove(e)
                return None
        msg = pb.AgentMessage()
        try:
            msg.ParseFromString(data)
        except DecodeError:
            self.corrupt_records += 1
            self._remove(e)
            return None
        return msg

    def _advance_head(self) -> None:
        while self._head < len(self._entries) and self._entries[self._head].gone:
            self._head += 1
        # drop gone entries from the list once they are most of it (amortised O(1))
        if self._gone_in_list > 1024 and self._gone_in_list * 2 > len(self._entries):
            self._entries = [e for e in self._entries if not e.gone]
            self._head = 0
            self._gone_in_list = 0

    # ------------------------------------------------------------ state

    def wake(self) -> None:
        """Wake a next_after() waiting now: the stream has something else to send (a
        heartbeat, which never enters the outbox)."""
        with self._cond:
            self._cond.notify_all()

    def wait_empty(self, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._live == 0, timeout_s)

    def pending_messages(self) -> list[pb.AgentMessage]:
        """Every pending message, in the order they will be sent."""
        with self._cond:
            out = []
            for e in list(self._entries[self._head:]):
                if not e.gone:
                    msg = self._message(e)
                    if msg is not None:
                        out.append(msg)
            return out

    @property
    def _pending(self) -> list[pb.AgentMessage]:
        # kept for tests written against the in-memory outbox (it was a deque of messages)
        return self.pending_messages()

    def stats(self) -> OutboxStats:
        with self._cond:
            return OutboxStats(
                pending_messages=self._live, pending_bytes=self._live_bytes,
                disk_bytes=self.spool.disk_bytes() if self.spool is not None else 0,
                memory_only_messages=self._memory_count if self.spool is not None else 0,
                dropped_samples=self.dropped_samples,
                dropped_checkpoints=self.dropped_checkpoints,
                write_errors=self.write_errors, corrupt_records=self.corrupt_records,
                rejected=self.rejected,
            )

    def close(self) -> None:
        """fsync what was written (samples are synced in batches) and close the segment."""
        with self._cond:
            if self.spool is not None:
                self._save_acked(time.monotonic(), force=True)
                self.spool.close(time.monotonic())

    def __len__(self) -> int:
        with self._cond:
            return self._live
