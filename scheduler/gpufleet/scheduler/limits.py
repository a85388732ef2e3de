"""Size and range limits on every agent message, checked by the servicer before ingest.

gRPC's max receive size bounds a message as a whole; this bounds each field, so a 4 MiB
evidence string or a million verdicts cannot reach the store. Walks the message generically,
so fields added to the proto later are bounded too; a few fields get tighter limits.
"""

from __future__ import annotations

import time

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

MAX_STRING_CHARS = 1024
MAX_REPEATED = 1024
# field name -> tighter (or, for paths, looser) limit
STRING_LIMITS = {"path": 4096, "reason_code": 64, "check": 64, "agent_instance": 128,
                 "node_name": 64, "job_id": 32}
REPEATED_LIMITS = {"gpus": 64, "gpu_links": 64 * 64, "verdicts": 256}
# int64 *_ms fields are wall-clock timestamps (durations are uint64); 0 means unset
MIN_TIMESTAMP_MS = 946_684_800_000  # 2000-01-01: older is a clock that was never set
MAX_FUTURE_MS = 7 * 86_400_000  # a week ahead of the controller: a clock gone wrong


class LimitError(ValueError):
    """A field is over its limit; the message names the field path."""


def check(msg: Message, now_ms: int | None = None) -> None:
    now = int(time.time() * 1000) if now_ms is None else now_ms
    _walk(msg, msg.DESCRIPTOR.name, now)


def _walk(msg: Message, where: str, now: int) -> None:
    for field, value in msg.ListFields():
        path = f"{where}.{field.name}"
        repeated = bool(field.is_repeated)
        items = list(value) if repeated else [value]
        if repeated:
            limit = REPEATED_LIMITS.get(field.name, MAX_REPEATED)
            if len(items) > limit:
                raise LimitError(f"{path}: {len(items)} entries, more than {limit}")
        for i, item in enumerate(items):
            at = f"{path}[{i}]" if repeated else path
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                _walk(item, at, now)
            elif field.type == FieldDescriptor.TYPE_STRING:
                limit = STRING_LIMITS.get(field.name, MAX_STRING_CHARS)
                if len(item) > limit:
                    raise LimitError(f"{at}: {len(item)} characters, more than {limit}")
                if "\x00" in item:
                    raise LimitError(f"{at}: contains a NUL character")
            elif (field.type == FieldDescriptor.TYPE_INT64 and field.name.endswith("_ms")
                  and item != 0 and not MIN_TIMESTAMP_MS <= item <= now + MAX_FUTURE_MS):
                raise LimitError(
                        f"{at}={item}: not a plausible wall-clock time in ms (before 2000 or "
                        "more than 7 days ahead of the controller)"
                    )
