"""Slurm's JSON, version by version: which command prints what, and one reader per schema.

Three schemas are read, each on purpose (field by field, type by type):

- Slurm 22.05 (`sinfo --json`, `squeue --json`, slurmrestd v0.0.38): a node's `state` is a
  string ('idle') with its flags apart in `state_flags`; features a comma-separated string;
  a job's `job_state` a string, `exit_code` the raw wait status, times plain numbers.
- data_parser v0.0.39 (Slurm 23.02): a node's `state` is a list of flags (['IDLE', 'DRAIN']),
  features a list; `sinfo --json` no longer lists nodes (nodes come from `scontrol show nodes
  --json`); a job's `job_state` is still a string, `exit_code` a {set, infinite, number}
  object around the raw wait status, times plain numbers.
- data_parser v0.0.40 to v0.0.45 (Slurm 23.11 to 26.05): as v0.0.39, and a job's
  `job_state` is a list of flags, `exit_code` an object {status, return_code, signal}, its
  times {set, infinite, number} objects.

Learnt from SchedMD's data_parser sources (src/plugins/data_parser/v0.0.3x|4x/parsers.c) and
checked against documents captured from real 22.05, 24.11 and 26.05 daemons
(tests/scheduler/slurm_docs/). A document the reader does not expect (a field missing, of
another type, or a data_parser other than the one this Slurm prints) is a SlurmError naming
the command, the object and the field: never an empty cluster or a wrong answer.

One module (~400 lines): the readers of every Slurm version's JSON sit side by side, so a
field that moved between versions is seen in one place.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from gpufleet.scheduler.slurm.types import (
    SlurmError,
    SlurmJob,
    SlurmNode,
    SlurmNodeInfo,
    decode_exit_code,
    expand_hostlist,
    split_features,
)

# Slurm release -> the data_parser its CLI's --json prints (SchedMD's tree at each release).
DATA_PARSER_OF_RELEASE: dict[tuple[int, int], str] = {
    (23, 2): "v0.0.39",
    (23, 11): "v0.0.40",
    (24, 5): "v0.0.41",
    (24, 11): "v0.0.42",
    (25, 5): "v0.0.43",
    (25, 11): "v0.0.44",
    (26, 5): "v0.0.45",
}
OLDEST = (22, 5)
NEWEST = max(DATA_PARSER_OF_RELEASE)
REST_22_05 = "v0.0.38"  # slurmrestd's only API in 22.05 (read-only for nodes)
KNOWN_API_VERSIONS = (REST_22_05, *DATA_PARSER_OF_RELEASE.values())


def doc_data_parser(doc: Mapping[str, Any]) -> str | None:
    """The data_parser a document says it was written by: meta.plugin.data_parser (23.11+,
    and slurmrestd), meta.plugins.data_parser (23.02's CLI); None: 22.05 (none has one)."""
    meta = doc.get("meta")
    if not isinstance(meta, Mapping):
        return None
    for key in ("plugin", "plugins"):
        plugin = meta.get(key)
        if isinstance(plugin, Mapping) and plugin.get("data_parser"):
            return str(plugin["data_parser"])
    return None


def _schema_error(msg: str) -> SlurmError:
    # a retry gets the same document: never transient
    return SlurmError(msg, transient=False)


@dataclass(frozen=True, order=True)
class SlurmVersion:
    major: int
    minor: int
    micro: int = 0

    def __str__(self) -> str:
        return f"{self.major}.{self.minor:02d}.{self.micro}"

    @property
    def release(self) -> str:
        return f"{self.major}.{self.minor:02d}"

    @classmethod
    def parse(cls, text: str, source: str = "version") -> SlurmVersion:
        """'slurm 24.11.5', 'slurm-wlm 22.05.8', '26.05.0-0rc1', '24.11' -> SlurmVersion."""
        m = re.search(r"\b(\d{2})\.(\d{1,2})(?:\.(\d+))?", text or "")
        if not m:
            raise _schema_error(f"{source}: no Slurm version in {text.strip()[:80]!r}")
        return cls(int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))

    @property
    def data_parser(self) -> str | None:
        """The data_parser this release's --json prints; None for 22.05 (before data_parser)."""
        key = (self.major, self.minor)
        if key < OLDEST or key > NEWEST:
            raise _schema_error(
                f"Slurm {self} is not a version gpufleet reads ({OLDEST[0]}.{OLDEST[1]:02d} to "
                f"{NEWEST[0]}.{NEWEST[1]:02d}): its JSON may differ; use a gpufleet that "
                "knows it")
        if key < (23, 2):
            return None
        known = [v for k, v in sorted(DATA_PARSER_OF_RELEASE.items()) if k <= key]
        return known[-1]


def api_version_tuple(api: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in api.lstrip("v").split("."))
    except ValueError as e:
        raise _schema_error(f"invalid Slurm API version {api!r} (want vX.Y.Z)") from e


# ---------------------------------------------------------------- typed field access

T = TypeVar("T")


class _Obj:
    """One JSON object of a Slurm document, read field by field; every failure names the
    command, the object and the field, and the schema that expected it."""

    def __init__(self, obj: Any, what: str, schema: str) -> None:
        if not isinstance(obj, Mapping):
            raise _schema_error(f"{what}: expected an object, got {json.dumps(obj)[:80]} "
                                f"({schema})")
        self.obj = obj
        self.what = what
        self.schema = schema

    def _bad(self, key: str, value: Any, expected: str) -> SlurmError:
        return _schema_error(f"{self.what}: field {key!r} is {json.dumps(value)[:80]}, expected "
                             f"{expected} ({self.schema})")

    def get(self, key: str) -> Any:
        if key not in self.obj:
            raise _schema_error(f"{self.what}: field {key!r} is missing ({self.schema})")
        return self.obj[key]

    def text(self, key: str) -> str:
        v = self.get(key)
        if v is None:  # an unset string (char * NULL)
            return ""
        if not isinstance(v, str):
            raise self._bad(key, v, "a string")
        return v

    def num(self, key: str) -> int:
        v = self.get(key)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self._bad(key, v, "a number")
        return v

    def flag(self, key: str) -> bool:
        v = self.get(key)
        if not isinstance(v, bool):
            raise self._bad(key, v, "true or false")
        return v

    def strings(self, key: str) -> list[str]:
        v = self.get(key)
        if v is None:
            return []
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise self._bad(key, v, "a list of strings")
        return list(v)

    def flags(self, key: str) -> list[str]:
        v = self.get(key)
        if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
            raise self._bad(key, v, "a non-empty list of flags")
        return [x.upper() for x in v]

    def no_val(self, key: str) -> int | None:
        """A {set, infinite, number} object -> its number (None: unset or infinite)."""
        v = self.get(key)
        sub = _Obj(v, f"{self.what}: field {key!r}", self.schema) if isinstance(v, Mapping) \
            else None
        if sub is None:
            raise self._bad(key, v, "a {set, infinite, number} object")
        is_set, inf, num = sub.flag("set"), sub.flag("infinite"), sub.num("number")
        return num if is_set and not inf else None

    def sub(self, key: str) -> _Obj:
        return _Obj(self.get(key), f"{self.what}: field {key!r}", self.schema)


def _gres_used(n: _Obj) -> str:
    """`gres_used` ("gpu:5") where the document has it (22.05 to 26.05 do); "" otherwise."""
    return n.text("gres_used") if "gres_used" in n.obj else ""


def json_object(text: str, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise SlurmError(f"{what} printed no JSON: {e}", transient=False) from e
    if not isinstance(doc, dict):
        raise SlurmError(f"{what} printed JSON that is not an object: {text[:80]!r}",
                         transient=False)
    return doc


def _each(items: Any, what: str, key: str, schema: str,
          parse: Callable[[_Obj], T], name_key: str) -> list[T]:
    if not isinstance(items, list):
        raise _schema_error(f"{what}: field {key!r} is {json.dumps(items)[:80]}, expected a "
                            f"list ({schema})")
    out = []
    for i, item in enumerate(items):
        label = f"{what}: {key}[{i}]"
        if isinstance(item, Mapping) and name_key in item:
            label = f"{what}: {key[:-1] if key.endswith('s') else key} {item[name_key]}"
        out.append(parse(_Obj(item, label, schema)))
    return out


# ---------------------------------------------------------------- the readers


class Reader:
    """Reads the JSON one Slurm version prints. Subclasses: one per schema."""

    schema = ""
    data_parser: str | None = None
    nodes_argv: tuple[str, ...] = ()

    def node_argv(self, name: str) -> tuple[str, ...]:
        raise NotImplementedError

    def _check_meta(self, doc: Mapping[str, Any], what: str) -> None:
        have = doc_data_parser(doc)
        if self.data_parser is None:
            if have:
                raise _schema_error(
                    f"{what}: field 'meta.plugin.data_parser' is {have!r}: a document of a "
                    f"Slurm with data_parser, not {self.schema}")
            return
        if have is None:
            raise _schema_error(f"{what}: field 'meta.plugin.data_parser' is missing "
                                f"(expected data_parser/{self.data_parser}: {self.schema})")
        if str(have).rsplit("/", 1)[-1] != self.data_parser:
            raise _schema_error(f"{what}: field 'meta.plugin.data_parser' is {have!r}, "
                                f"expected data_parser/{self.data_parser} ({self.schema})")

    def _errors(self, doc: Mapping[str, Any], what: str) -> None:
        errors = doc.get("errors") or []
        if errors:
            msgs = [str(e.get("description") or e.get("error") or e) if isinstance(e, Mapping)
                    else str(e) for e in errors]
            raise SlurmError(f"{what}: Slurm reported errors: {'; '.join(msgs)[:300]}",
                             transient=False)

    def read_nodes(self, doc: Mapping[str, Any], what: str) -> list[SlurmNodeInfo]:
        self._errors(doc, what)
        self._check_meta(doc, what)
        if "nodes" not in doc:
            raise _schema_error(f"{what}: field 'nodes' is missing ({self.schema})")
        return _each(doc["nodes"], what, "nodes", self.schema, self._node, "name")

    def read_jobs(self, doc: Mapping[str, Any], what: str) -> list[SlurmJob]:
        self._errors(doc, what)
        self._check_meta(doc, what)
        if "jobs" not in doc:
            raise _schema_error(f"{what}: field 'jobs' is missing ({self.schema})")
        return _each(doc["jobs"], what, "jobs", self.schema, self._job, "job_id")

    def _node(self, n: _Obj) -> SlurmNodeInfo:
        raise NotImplementedError

    def _job(self, j: _Obj) -> SlurmJob:
        raise NotImplementedError

    def _job_common(self, j: _Obj, state: str, exit_status: int | None, exit_signal: int,
                    start: int, end: int) -> SlurmJob:
        nodes_expr, excluded = j.text("nodes"), j.text("excluded_nodes")
        required = j.text("required_nodes")
        return SlurmJob(
            job_id=str(j.num("job_id")),
            state=state,
            nodes=tuple(expand_hostlist(nodes_expr)) if nodes_expr else (),
            requeue=j.flag("requeue"),
            batch=j.flag("batch_flag"),
            comment=j.text("comment"),
            restart_count=j.num("restart_cnt"),
            exit_status=exit_status,
            exit_signal=exit_signal,
            excluded_nodes=tuple(expand_hostlist(excluded)) if excluded else (),
            start_time_s=start,
            state_reason=j.text("state_reason"),
            end_time_s=end,
            gres_detail=tuple(j.strings("gres_detail")),
            partitions=tuple(p for p in j.text("partition").split(",") if p),
            required_nodes=tuple(expand_hostlist(required)) if required else (),
        )


class Reader2205(Reader):
    """Slurm 22.05: `sinfo --json` nodes, `squeue --json` jobs, slurmrestd v0.0.38."""

    schema = "Slurm 22.05 JSON"
    data_parser = None
    nodes_argv = ("sinfo", "--json")

    def node_argv(self, name: str) -> tuple[str, ...]:
        # 22.05 has no `scontrol --json`: one node is read from `scontrol -o` text
        return ("scontrol", "-o", "show", "node", name)

    def _node(self, n: _Obj) -> SlurmNodeInfo:
        state = n.get("state")
        if not isinstance(state, str) or not state:
            raise n._bad("state", state, "a state string such as 'idle'")
        flags = [f.upper() for f in n.strings("state_flags")]
        node = SlurmNode(n.text("name"), "+".join([state.upper(), *flags]), n.text("reason"),
                         split_features(n.text("features")), n.num("weight"))
        return SlurmNodeInfo(node, n.text("gres"), tuple(n.strings("partitions")),
                             split_features(n.text("active_features")), n.num("cpus"),
                             n.num("alloc_cpus"), self._last_busy(n),
                             _gres_used(n))

    def _last_busy(self, n: _Obj) -> int | None:
        # a number (0: never busy). Missing is None rather than an error: placement reads
        # these nodes too, and must not fail for a field only routine diagnostics use
        return (n.num("last_busy") or None) if "last_busy" in n.obj else None

    def _job(self, j: _Obj) -> SlurmJob:
        state = j.get("job_state")
        if not isinstance(state, str) or not state:
            raise j._bad("job_state", state, "a state string such as 'RUNNING'")
        status, sig = decode_exit_code(j.num("exit_code"))
        return self._job_common(j, state.upper(), status, sig, j.num("start_time"),
                                j.num("end_time"))


class ReaderV39(Reader):
    """data_parser v0.0.39 (Slurm 23.02) and the node half of v0.0.40 to v0.0.45."""

    schema = "data_parser v0.0.39"
    data_parser = "v0.0.39"
    nodes_argv = ("scontrol", "--json", "show", "nodes")

    def node_argv(self, name: str) -> tuple[str, ...]:
        return ("scontrol", "--json", "show", "node", name)

    def _node(self, n: _Obj) -> SlurmNodeInfo:
        node = SlurmNode(n.text("name"), "+".join(n.flags("state")), n.text("reason"),
                         tuple(n.strings("features")), n.num("weight"))
        return SlurmNodeInfo(node, n.text("gres"), tuple(n.strings("partitions")),
                             tuple(n.strings("active_features")), n.num("cpus"),
                             n.num("alloc_cpus"), self._last_busy(n),
                             _gres_used(n))

    def _last_busy(self, n: _Obj) -> int | None:
        # 23.02's data_parser v0.0.39 skips the node's last_busy (add_skip in its parsers.c):
        # unknown, and whoever needs it tells idleness another way
        return None

    def _job(self, j: _Obj) -> SlurmJob:
        state = j.get("job_state")
        if not isinstance(state, str) or not state:
            raise j._bad("job_state", state, "a state string such as 'RUNNING'")
        raw = j.no_val("exit_code")
        status, sig = decode_exit_code(raw) if raw is not None else (None, 0)
        return self._job_common(j, state.upper(), status, sig, j.num("start_time"),
                                j.num("end_time"))


# Slurm's job_state_string(): a flag, when set, is the state squeue and scontrol print
_JOB_FLAG_ORDER = ("COMPLETING", "STAGE_OUT", "CONFIGURING", "RESIZING", "REQUEUED",
                   "REQUEUE_FED", "REQUEUE_HOLD", "SPECIAL_EXIT", "STOPPED", "REVOKED",
                   "RESV_DEL_HOLD", "SIGNALING")
_JOB_BASE_STATES = frozenset({"PENDING", "RUNNING", "SUSPENDED", "COMPLETED", "CANCELLED",
                              "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
                              "DEADLINE", "OUT_OF_MEMORY"})


def compact_job_state(flags: list[str], j: _Obj, key: str) -> str:
    """['COMPLETED', 'COMPLETING'] -> 'COMPLETING': the one word 22.05 and 23.02 print."""
    for f in _JOB_FLAG_ORDER:
        if f in flags:
            return f
    base = [f for f in flags if f in _JOB_BASE_STATES]
    if len(base) != 1:
        raise j._bad(key, flags, "one base job state (PENDING, RUNNING, ...) and its flags")
    return base[0]


class ReaderV40(ReaderV39):
    """data_parser v0.0.40 to v0.0.45 (Slurm 23.11 to 26.05): job state a list of flags,
    exit code an object, times {set, infinite, number} objects."""

    def __init__(self, data_parser: str) -> None:
        self.data_parser = data_parser
        self.schema = f"data_parser {data_parser}"

    def _last_busy(self, n: _Obj) -> int | None:
        # v0.0.40+: a {set, infinite, number} object (0: never busy since slurmctld started).
        # Missing is None rather than an error: placement reads these nodes too, and must not
        # fail for a field only routine diagnostics use
        if "last_busy" not in n.obj:
            return None
        return n.no_val("last_busy") or None

    def _job(self, j: _Obj) -> SlurmJob:
        state = compact_job_state(j.flags("job_state"), j, "job_state")
        ec = j.sub("exit_code")
        statuses = [s.upper() for s in ec.strings("status")]
        code = ec.no_val("return_code")
        sig = ec.sub("signal").no_val("id") or 0
        killed = "SIGNALED" in statuses or "CORE_DUMPED" in statuses
        exit_status = None if killed or "PENDING" in statuses else code
        return self._job_common(j, state, exit_status, sig, j.no_val("start_time") or 0,
                                j.no_val("end_time") or 0)


def reader_for_data_parser(data_parser: str | None) -> Reader:
    """None or v0.0.38 -> 22.05's reader; v0.0.39 -> 23.02's; v0.0.40.. -> that one."""
    if data_parser in (None, REST_22_05):
        return Reader2205()
    if data_parser == "v0.0.39":
        return ReaderV39()
    if data_parser in KNOWN_API_VERSIONS:
        return ReaderV40(data_parser)
    raise _schema_error(f"data_parser {data_parser!r} is not one gpufleet reads "
                        f"({', '.join(KNOWN_API_VERSIONS)})")


def reader_for(version: SlurmVersion) -> Reader:
    return reader_for_data_parser(version.data_parser)
