"""Size and range limits on every agent message, checked by the servicer before ingest.

gRPC's max receive size bounds a message as a whole; this bounds each field, so a 4 MiB
evidence string or a million verdicts cannot reach the store, and every number fits the
column that will hold it (SQLite INTEGER and PostgreSQL BIGINT are signed 64-bit, a
PostgreSQL INTEGER signed 32-bit): a uint64 of 2^63 or more is refused here with a reason,
never met as an OverflowError half-way through a store transaction. Doubles must be finite.

The checks are planned once per message type, from its descriptor (so fields added to the
proto later are bounded too), and a check only walks the fields that are set: on the ingest
hot path (every report of every node) it costs microseconds, not a generic walk. A few
fields get tighter limits, by name.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

MAX_STRING_CHARS = 1024
MAX_BYTES = 8192
MAX_REPEATED = 1024
# field name -> tighter (or, for paths, looser) limit
STRING_LIMITS = {"path": 4096, "reason_code": 64, "check": 64, "agent_instance": 128,
                 "node_name": 64, "job_id": 32}
REPEATED_LIMITS = {"gpus": 64, "gpu_links": 64 * 64, "verdicts": 256}
# int64 *_ms fields are wall-clock timestamps (durations are uint64); 0 means unset
MIN_TIMESTAMP_MS = 946_684_800_000  # 2000-01-01: older is a clock that was never set
MAX_FUTURE_MS = 7 * 86_400_000  # a week ahead of the controller: a clock gone wrong
# What the store's integer columns hold: BIGINT (and SQLite INTEGER) for 64-bit fields,
# PostgreSQL INTEGER for the 32-bit ones (GPU indexes, Xids, runs, ...) but uid (BIGINT).
STORE_INT64_MAX = 2**63 - 1
STORE_INT32_MAX = 2**31 - 1
WIDE_UINT32 = frozenset({"uid"})
# field name -> largest value (GPU indexes: a node has at most 64 GPUs)
UINT_LIMITS = {"gpu_index": 63}
# Telemetry the controller neither stores nor reads field by field (it stores a sample's
# verdicts and its time, nothing of its GPU, port and host readings): bounded by count and by
# the message size only. Walking each of the ~230 readings of an 8-GPU sample is most of
# what a generic check cost (ListFields alone ~55 us per sample).
NOT_READ = frozenset({"gpufleet.v1.GpuSample", "gpufleet.v1.IbPortSample",
                      "gpufleet.v1.HostSample"})

_UINT64 = (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64)
_UINT32 = (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32)
_INT64 = (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64)
_FLOAT = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)


class LimitError(ValueError):
    """A field is over its limit; the message names the field path."""


class _Bad(Exception):
    """A check failed below some path: each message level adds its part on the way out."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(path, problem)
        self.path = path
        self.problem = problem


# a value check: (value, now_ms) -> None, raising _Bad("", problem) (the caller knows the path)
_Check = Callable[[Any, int], None]
# the plan of one message type: field -> (name, repeated limit or None, check of one value)
_Plan = dict[FieldDescriptor, tuple[str, "int | None", _Check]]
_WALKERS: dict[Any, _Check] = {}  # Descriptor -> its check


def check(msg: Message, now_ms: int | None = None) -> None:
    """Raise LimitError naming the first field over its limit, or return."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    name = msg.DESCRIPTOR.name
    try:
        _walker(msg.DESCRIPTOR)(msg, now)
    except _Bad as e:
        raise LimitError(f"{name}{e.path}{e.problem}") from None
    if name == "AgentMessage" and msg.seq == 0:  # type: ignore[attr-defined]
        body = msg.WhichOneof("body")
        # hello, and a heartbeat (unsequenced: fleet.proto Heartbeat), carry none
        if body is not None and body not in ("hello", "heartbeat"):
            raise LimitError(f"{name}.seq=0: a report's sequence number starts at 1")


def _walker(desc: Any) -> _Check:  # Descriptor (upb's or the pure-Python one)
    """The check of one message type, planned on first use and kept."""
    walk = _WALKERS.get(desc)
    if walk is None:
        plan: _Plan = {}
        # kept before its plan is filled: a message type that contains itself finds it
        walk = _WALKERS[desc] = _message(plan)
        for field in desc.fields:
            limit = REPEATED_LIMITS.get(field.name, MAX_REPEATED) if _repeated(field) else None
            plan[field] = (field.name, limit, _value_check(field))
    return walk


def _repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _message(plan: _Plan) -> _Check:
    def walk(msg: Any, now: int) -> None:
        for field, value in msg.ListFields():
            name, limit, one = plan[field]
            if limit is None:
                try:
                    one(value, now)
                except _Bad as e:
                    raise _Bad(f".{name}{e.path}", e.problem) from None
                continue
            if len(value) > limit:
                raise _Bad(f".{name}", f": {len(value)} entries, more than {limit}")
            for i, item in enumerate(value):
                try:
                    one(item, now)
                except _Bad as e:
                    raise _Bad(f".{name}[{i}]{e.path}", e.problem) from None
    return walk


def _value_check(field: FieldDescriptor) -> _Check:  # noqa: PLR0911 - one return per wire type
    t = field.type
    name = field.name
    if t == FieldDescriptor.TYPE_MESSAGE:
        sub: Any = field.message_type
        if sub.GetOptions().map_entry:
            return _map_check(sub)
        if sub.full_name in NOT_READ:
            return _no_check
        return _walker(sub)
    if t == FieldDescriptor.TYPE_STRING:
        return _string_check(STRING_LIMITS.get(name, MAX_STRING_CHARS))
    if t == FieldDescriptor.TYPE_BYTES:
        return _bytes_check(MAX_BYTES)
    if t in _UINT64:
        return _uint_check(min(UINT_LIMITS.get(name, STORE_INT64_MAX), STORE_INT64_MAX))
    if t in _UINT32:
        wide = STORE_INT64_MAX if name in WIDE_UINT32 else STORE_INT32_MAX
        return _uint_check(min(UINT_LIMITS.get(name, wide), wide))
    if t in _INT64 and name.endswith("_ms"):
        return _timestamp_check
    if t in _FLOAT:
        return _finite_check
    return _no_check  # int32, bool, enum: every value fits (enums are checked by ingest)


def _map_check(entry: Any) -> _Check:
    key = _value_check(entry.fields_by_name["key"])
    value = _value_check(entry.fields_by_name["value"])

    def check_map(mapping: Any, now: int) -> None:
        if len(mapping) > MAX_REPEATED:
            raise _Bad("", f": {len(mapping)} entries, more than {MAX_REPEATED}")
        for k, v in mapping.items():
            key(k, now)
            try:
                value(v, now)
            except _Bad as e:
                raise _Bad(f"[{str(k)[:64]!r}]{e.path}", e.problem) from None
    return check_map


def _string_check(limit: int) -> _Check:
    def check_string(s: str, _now: int) -> None:
        if len(s) > limit:
            raise _Bad("", f": {len(s)} characters, more than {limit}")
        if "\x00" in s:
            raise _Bad("", ": contains a NUL character")
    return check_string


def _bytes_check(limit: int) -> _Check:
    def check_bytes(b: bytes, _now: int) -> None:
        if len(b) > limit:
            raise _Bad("", f": {len(b)} bytes, more than {limit}")
    return check_bytes


def _uint_check(limit: int) -> _Check:
    def check_uint(v: int, _now: int) -> None:
        if v > limit:
            held = ("what the store's integer columns hold" if limit in
                    (STORE_INT64_MAX, STORE_INT32_MAX) else "the largest allowed")
            raise _Bad("", f"={v}: more than {limit}, {held}")
    return check_uint


def _timestamp_check(v: int, now: int) -> None:
    if v != 0 and not MIN_TIMESTAMP_MS <= v <= now + MAX_FUTURE_MS:
        raise _Bad("", f"={v}: not a plausible wall-clock time in ms (before 2000 or more "
                       "than 7 days ahead of the controller)")


def _finite_check(v: float, _now: int) -> None:
    if not math.isfinite(v):
        raise _Bad("", f"={v}: not a finite number")


def _no_check(_v: Any, _now: int) -> None:
    return None
