"""`gpufleet-sbatch-filter`: what Slurm's cli_filter/lua plugin (cli_filter.lua) asks for each
sbatch job component, after sbatch itself merged the command line, SBATCH_* variables and
#SBATCH lines. It never parses sbatch's options: it reads the options sbatch already parsed.

    gpufleet-sbatch-filter place OFFSET JSON [het] -> lines `option=value` for the lua to set
    gpufleet-sbatch-filter release JOBID NODES -> un-pin the job if still pending (run by the
                                                  lua after the deadline, `pin_release_s`)

`place` asks the controller (FleetUser.Place, as the calling user, MUNGE) and prints only
what cannot make the job wait longer than plain sbatch would:
- always `exclude=...` (the user's exclusions plus the nodes gpufleet's health keeps jobs off);
- `nodelist=...` (a pin) only when the controller found nodes free now, no job waits for nodes
  in the partition (Slurm's backfill may hold free nodes for those), and the job
  asks nothing placement cannot judge (see PIN_OK): no array, dependency, --begin, --hold,
  CPU/memory/licence asks, ranges; released after `pin_release_s` if it is still pending;
- `switches=1@1:59` for a multi-node job not pinned that fits one leaf on an idle cluster,
  only where the controller runs switch holds (its answer says so): Slurm then starts it on
  one leaf, and the controller drops the count once the job could have started across leaves
  for its grace (placement/switch_hold.py; held the whole time, on a full lab
  `--switches=1@10` made jobs wait 23.9 s on average against plain sbatch's 20.8);
- nothing at all for jobs that start later (dependency, --begin, --hold): health then is not
  health now. No controller configured, controller away, any doubt: nothing, exit 0, so the
  job is submitted exactly as plain sbatch would submit it.
With $GPUFLEET_CKPT_DIR set (`gpufleet sbatch --gpufleet-ckpt DIR`) it also adds --requeue,
the checkpoint signal and the marker comment, as docs/checkpointing.md describes.

Imports are kept to the standard library's C modules and placecall.py: this runs inside every
sbatch, and json, tomllib, subprocess and socket each pull in re/enum/collections (15-30 ms
on the dev VM). Options and client.toml are read by small readers below that hand anything
they do not expect to json/tomllib themselves; munge is spawned with os.posix_spawnp.

One module (~410 lines) on purpose: Slurm runs it on every submission, stdlib only; one file
keeps its start-up cost to one import.
"""

from __future__ import annotations

import os
import sys
import time

TYPE_CHECKING = False  # typing's import pulls in re and collections; mypy reads the name
if TYPE_CHECKING:
    import subprocess
    from collections.abc import Mapping, Sequence

CLIENT_CONFIG = "/etc/gpufleet/client.toml"
PLACE_TIMEOUT_S = 1.0
# a pinned job still pending after this long gets its node list back: a pin is only given
# where the job starts now, so Slurm's next scheduling pass starts it (the main scheduler on
# submission; backfill within bf_interval, 30 s by default, when jobs ahead of it wait)
PIN_RELEASE_S = 10.0
SCONTROL_RETRY_S = 1.0  # the release's first wait before asking a busy slurmctld again
# `--switches=1@1:59` (minutes:seconds) on a multi-node job not pinned, from a controller with
# switch holds: Slurm starts it on one leaf; the controller drops the count once the job could
# have started across leaves for its grace (placement/switch_hold.py, which knows its hold by
# these 119 s; with no controller Slurm drops it itself after them)
SWITCH_HOLD = "1:59"
CKPT_SIGNAL = "USR1"
CKPT_SIGNAL_BEFORE_END_S = 300
CKPT_MARKER = "gpufleet-ckpt"

# sbatch options (cli_filter names) that cannot make a node unable to run the job: a job that
# gives only these (and GPU/node/partition/time/constraint asks the engine judges) may be
# pinned. Anything else (CPUs, memory, licences, tasks, reservations, ...) is Slurm's to judge.
PIN_OK = frozenset({
    "nodes", "gres", "gpus-per-node", "gpus", "partition", "time", "constraint", "exclude",
    "job-name", "output", "error", "input", "wrap", "parsable", "chdir", "comment",
    "mail-type", "mail-user", "export", "requeue", "no-requeue", "signal", "open-mode",
    "quiet", "verbose", "argv", "account", "wckey", "kill-on-invalid-dep", "propagate",
    "no-kill", "wait", "test-only", "get-user-env", "acctg-freq", "profile", "priority",
    "nice", "qos",
})
DEFERRED = ("dependency", "begin", "hold")
_TRUE = {"1", "true", "yes", "on"}


class ClientConfig:
    """/etc/gpufleet/client.toml (plain class: dataclasses cost ~10 ms to import)."""

    def __init__(self, controller: str = "", tls_ca: str = "", tls_cert: str = "",
                 tls_key: str = "", insecure: bool = False, munge_socket: str = "",
                 place_timeout_s: float = PLACE_TIMEOUT_S,
                 pin_release_s: float = PIN_RELEASE_S) -> None:
        self.controller = controller
        self.tls_ca = tls_ca
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self.insecure = insecure
        self.munge_socket = munge_socket
        self.place_timeout_s = place_timeout_s
        self.pin_release_s = pin_release_s


CLIENT_KEYS = {"controller", "tls_ca", "tls_cert", "tls_key", "insecure", "munge_socket",
               "place_timeout_s", "pin_release_s"}


class ConfigError(Exception):
    pass


def load_client_config(env: Mapping[str, str] | None = None) -> ClientConfig:
    """/etc/gpufleet/client.toml (or $GPUFLEET_CLIENT_CONFIG), then GPUFLEET_* variables.
    A missing file is an empty one; an unreadable or invalid one is a ConfigError."""
    e = os.environ if env is None else env
    path = e.get("GPUFLEET_CLIENT_CONFIG") or CLIENT_CONFIG
    data: dict[str, object] = {}
    try:
        with open(path, "rb") as f:
            data = read_toml(f.read())
    except FileNotFoundError:
        pass
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from err
    except ValueError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err
    unknown = sorted(set(data) - CLIENT_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}")

    def s(key: str) -> str:
        return str(e.get(f"GPUFLEET_{key.upper()}") or data.get(key) or "")

    try:
        return ClientConfig(
            controller=s("controller"), tls_ca=s("tls_ca"), tls_cert=s("tls_cert"),
            tls_key=s("tls_key"),
            insecure=s("insecure").lower() in _TRUE,
            munge_socket=s("munge_socket"),
            place_timeout_s=float(data.get("place_timeout_s", PLACE_TIMEOUT_S)),  # type: ignore[arg-type]
            pin_release_s=float(data.get("pin_release_s", PIN_RELEASE_S)),  # type: ignore[arg-type]
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path}: {err}") from err


_BARE_KEY = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


class _Unexpected(ValueError):
    """Not in the subset the small readers know: json/tomllib read it (or say what is wrong)."""


def _flat_toml(text: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if any(c < " " and c != "\t" for c in line):
            raise _Unexpected
        if not line or line.startswith("#"):
            continue
        key, eq, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not set(key) <= _BARE_KEY or key in out:
            raise _Unexpected
        if value.startswith('"'):
            end = value.find('"', 1)
            rest = value[end + 1:].strip()
            if end < 0 or "\\" in value[:end] or (rest and not rest.startswith("#")):
                raise _Unexpected
            out[key] = value[1:end]
            continue
        word = value.split("#", 1)[0].strip()
        if word in {"true", "false"}:
            out[key] = word == "true"
        elif word.isascii() and word.isdecimal() and (word == "0" or word[0] != "0"):
            out[key] = int(word)
        else:
            raise _Unexpected
    return out


def read_toml(data: bytes) -> dict[str, object]:
    """client.toml: flat `key = "text" | true | false | 123` lines and comments are read here,
    anything else by tomllib (same result; tomllib's import costs ~15 ms per submission)."""
    try:
        return _flat_toml(data.decode())
    except (_Unexpected, UnicodeDecodeError):
        import tomllib

        return tomllib.loads(data.decode())


_JSON_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
                 "t": "\t"}
_HEX = frozenset("0123456789abcdefABCDEF")
_DIGITS = frozenset("0123456789")


def _ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in " \t\n\r":
        i += 1
    return i


def _json_string(s: str, i: int) -> tuple[str, int]:
    parts: list[str] = []
    while True:
        j = i
        while s[j] != '"' and s[j] != "\\":
            if s[j] < " ":
                raise _Unexpected
            j += 1
        parts.append(s[i:j])
        if s[j] == '"':
            return "".join(parts), j + 1
        esc = s[j + 1]
        if esc == "u":
            h = s[j + 2:j + 6]
            if len(h) != 4 or not set(h) <= _HEX or 0xD800 <= int(h, 16) < 0xE000:
                raise _Unexpected  # surrogate pairs: json joins them
            parts.append(chr(int(h, 16)))
            i = j + 6
        elif esc in _JSON_ESCAPES:
            parts.append(_JSON_ESCAPES[esc])
            i = j + 2
        else:
            raise _Unexpected


def _json_value(s: str, i: int) -> tuple[object, int]:  # noqa: PLR0912 - one per JSON kind
    c = s[i]
    if c == '"':
        return _json_string(s, i + 1)
    if c in "{[":
        close = "}" if c == "{" else "]"
        obj: dict[str, object] = {}
        items: list[object] = []
        i = _ws(s, i + 1)
        if s[i] == close:
            return (obj if c == "{" else items), i + 1
        while True:
            if c == "{":
                if s[i] != '"':
                    raise _Unexpected
                key, i = _json_string(s, i + 1)
                i = _ws(s, i)
                if s[i] != ":":
                    raise _Unexpected
                obj[key], i = _json_value(s, _ws(s, i + 1))
            else:
                item, i = _json_value(s, i)
                items.append(item)
            i = _ws(s, i)
            if s[i] == close:
                return (obj if c == "{" else items), i + 1
            if s[i] != ",":
                raise _Unexpected
            i = _ws(s, i + 1)
    for word, value in (("null", None), ("true", True), ("false", False)):
        if s.startswith(word, i):
            return value, i + len(word)
    j = i + (c == "-")
    k = j
    while k < len(s) and s[k] in _DIGITS:
        k += 1
    if k == j or (s[j] == "0" and k > j + 1) or (k < len(s) and s[k] in ".eE"):
        raise _Unexpected  # floats and odd numbers: json's
    return int(s[i:k]), k


def read_json(text: str) -> object:
    """json.loads for what slurm.json_cli_options prints (objects, arrays, strings, integers,
    true/false/null); anything else goes to json itself (same result, or json's ValueError).
    json's import pulls in re and enum: ~15 ms on every submission."""
    try:
        value, i = _json_value(text, _ws(text, 0))
        complete = _ws(text, i) == len(text)
    except (_Unexpected, IndexError, RecursionError):
        complete = False
    if not complete:
        import json

        return json.loads(text)
    return value


def run_quiet(argv: Sequence[str], timeout_s: float) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of argv with no input: subprocess.run without importing
    subprocess (~10-25 ms). Past timeout_s the child is killed and TimeoutError raised."""
    import select

    r_out, w_out = os.pipe()
    r_err, w_err = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        pid = os.posix_spawnp(argv[0], list(argv), os.environ, file_actions=[
            (os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, w_out, 1),
            (os.POSIX_SPAWN_DUP2, w_err, 2)])
    except OSError:
        for fd in (r_out, r_err):
            os.close(fd)
        raise
    finally:
        for fd in (w_out, w_err, null):
            os.close(fd)
    got: dict[int, bytearray] = {r_out: bytearray(), r_err: bytearray()}
    done: dict[int, bytes] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while got:
            left = deadline - time.monotonic()
            ready = select.select(list(got), [], [], left)[0] if left > 0 else []
            if not ready:
                os.kill(pid, 9)
                raise TimeoutError(f"{argv[0]} gave no answer within {timeout_s:.1f} s")
            for fd in ready:
                chunk = os.read(fd, 65536)
                if chunk:
                    got[fd] += chunk
                else:
                    done[fd] = bytes(got.pop(fd))
    finally:
        for fd in (r_out, r_err):
            os.close(fd)
        status = os.waitpid(pid, 0)[1]
    return (os.waitstatus_to_exitcode(status), done[r_out].decode(errors="replace"),
            done[r_err].decode(errors="replace"))


# ---------------------------------------------------------------- options -> request

def parse_time_min(text: str) -> int | None:
    """Slurm's time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole minutes,
    rounded up; None for 0/UNLIMITED/INFINITE or anything else."""
    t = text.strip().upper()
    if t in {"", "0", "UNLIMITED", "INFINITE", "-1"}:
        return None
    days = 0
    if "-" in t:
        d, _, t = t.partition("-")
        if not d.isdecimal():
            return None
        days = int(d)
    parts = t.split(":")
    if not all(p.isdecimal() for p in parts) or len(parts) > 3:
        return None
    n = [int(p) for p in parts]
    if days:  # D-HH[:MM[:SS]]
        n += [0] * (3 - len(n))
        secs = days * 86400 + n[0] * 3600 + n[1] * 60 + n[2]
    elif len(n) == 1:
        secs = n[0] * 60
    elif len(n) == 2:
        secs = n[0] * 60 + n[1]
    else:
        secs = n[0] * 3600 + n[1] * 60 + n[2]
    return max(1, -(-secs // 60)) if secs else None


def _count(text: str) -> int | None:
    last = text.rsplit(":", 1)[-1]
    return int(last) if last.isdecimal() else None


class Plan:
    """What the filter asks of the controller, and whether the answer may pin the job."""

    def __init__(self, nodes: int | None, gpus_per_node: int | None, total_gpus: int | None,
                 partition: str, constraints: list[str], time_limit_min: int | None,
                 exclude: list[str], pin: bool, why_not_pin: str) -> None:
        self.nodes = nodes
        self.gpus_per_node = gpus_per_node
        self.total_gpus = total_gpus
        self.partition = partition
        self.constraints = constraints
        self.time_limit_min = time_limit_min
        self.exclude = exclude
        self.pin = pin
        self.why_not_pin = why_not_pin


def _script_is_het(opts: Mapping[str, object]) -> bool:
    """A hetjob script (`#SBATCH hetjob`), or a script sbatch read from stdin, which this
    process cannot see (unsure: treated as one)."""
    argv = opts.get("argv")
    script = argv[0] if isinstance(argv, list) and argv else None
    if script is None:
        return "wrap" not in opts
    try:
        with open(str(script), errors="replace") as f:
            text = f.read(1 << 20)
    except OSError:
        return True
    return any(line.split()[1:2] in (["hetjob"], ["packjob"])
               for line in text.splitlines() if line.startswith("#SBATCH"))


def plan_from_options(opts: Mapping[str, object], offset: int,  # noqa: PLR0912 - one branch per option
                      het: bool = False) -> Plan | None:
    """None: add nothing (the user chose nodes, or the job starts later)."""
    o = {k: str(v) for k, v in opts.items() if k != "argv" and v is not None}
    if "nodelist" in o or "nodefile" in o:
        return None
    for k in DEFERRED:
        if k in o and o[k] not in {"unset", ""}:
            return None
    why: list[str] = []
    others = sorted(set(o) - PIN_OK)
    if others:
        why.append("asks " + ",".join(others))
    if "array" in o:
        why.append("array")
    if offset or het or _script_is_het(opts):
        why.append("hetjob")  # pinning one component makes Slurm keep the others off it
    nodes = None
    if "nodes" in o:
        lo, _, hi = o["nodes"].partition("-")
        if not lo.isdecimal():
            return None
        nodes = int(lo)
        if hi and hi != lo:
            why.append("node range")
    gpn = total = None
    if "gres" in o:
        for raw in o["gres"].split(","):
            # 22.05 spells it gres:gpu:2, 23.02 on gres/gpu:2 (tres_per_node's new form)
            item = raw.removeprefix("gres:").removeprefix("gres/")
            if item == "gpu" or item.startswith("gpu:"):
                gpn = (_count(item) if ":" in item else 1) or 1
    if "gpus-per-node" in o:
        gpn = _count(o["gpus-per-node"])
    if "gpus" in o:
        total = _count(o["gpus"])
        if gpn is not None:
            total = None
        elif nodes is None:
            why.append("--gpus without --nodes")  # the node count is Slurm's choice
    partition = o.get("partition", "")
    if "," in partition:
        why.append("several partitions")
        partition = ""
    constraints: list[str] = []
    if "constraint" in o:
        text = o["constraint"]
        if any(c in text for c in "|[]*()"):
            why.append("constraint expression")
        else:
            constraints = [f for f in text.split("&") if f]
    exclude: list[str] = []
    if "exclude" in o:
        exclude = [x for x in o["exclude"].split(",") if x]
        if any("[" in x for x in exclude):
            why.append("exclude range")
            exclude = []
    return Plan(nodes=nodes, gpus_per_node=gpn, total_gpus=total, partition=partition,
                constraints=constraints, time_limit_min=parse_time_min(o.get("time", "")),
                exclude=exclude, pin=not why, why_not_pin="; ".join(why))


def _flag(flags: Sequence[str], name: str) -> str | None:
    for f in flags:
        if f.startswith(f"--{name}="):
            return f.split("=", 1)[1]
    return None


def decide(opts: Mapping[str, object], plan: Plan, ok: bool, flags: Sequence[str],
           leaves: int, avoid: Sequence[str], waiting: int = 0,
           switch_hold: bool = True) -> dict[str, str]:
    """The options to set, from the controller's answer (`ok`: the nodes in `flags` are free
    now, across `leaves` leaf switches; `waiting`: jobs pending for nodes in its partition).
    The exclusions always; a pin carries them too: once released (pin_release_s) the job
    must still stay off the unhealthy nodes. A pin only where the job starts now: otherwise
    it would wait for particular nodes while Slurm could start it sooner elsewhere. With jobs
    waiting ahead of it, free nodes may be held for them by Slurm's backfill (fill trace:
    pinned 1-GPU jobs waited 13-49 s where plain sbatch started some at once): not sure, so
    no pin. A switch count (SWITCH_HOLD) for a multi-node job not pinned, where the
    controller runs switch holds (`switch_hold`): it keeps the count only while it costs the
    job no more than its grace."""
    out: dict[str, str] = {}
    user_exclude = str(opts.get("exclude") or "")
    extra = [n for n in avoid if n not in set(user_exclude.split(","))]
    if extra:
        out["exclude"] = ",".join([x for x in (user_exclude,) if x] + extra)
    # a multi-node job that fits one leaf on an idle cluster (`leaves` of a fallback) or is
    # answered now waits for one leaf, but only as long as the controller's switch hold
    # allows: a few seconds past the moment it could start across leaves
    hold = (switch_hold and "switches" not in opts and "array" not in opts
            and (plan.nodes or 0) > 1 and (ok or leaves == 1))
    if ok and waiting == 0 and plan.pin:
        nodelist = _flag(flags, "nodelist")
        if nodelist:
            return {"nodelist": nodelist, **out}
    if hold:
        out["switches"] = f"1@{SWITCH_HOLD}"
    return out


def ckpt_options(opts: Mapping[str, object], ckpt_dir: str) -> dict[str, str]:
    """--requeue, the checkpoint signal and the marker comment the controller's recovery
    looks for (scheduler/recovery.py); the user's own settings win."""
    out: dict[str, str] = {}
    if "requeue" not in opts and "no-requeue" not in opts:
        # the bare flag: 26.05's --requeue[=expedite] refuses any other value ("set", "1"),
        # 22.05 and 24.11 ignore the value
        out["requeue"] = ""
    if "signal" not in opts:
        out["signal"] = f"B:{CKPT_SIGNAL}@{CKPT_SIGNAL_BEFORE_END_S}"
    comment = str(opts.get("comment") or "").strip()
    if CKPT_MARKER not in comment:
        out["comment"] = f"{comment} {CKPT_MARKER}".strip()
    export = str(opts.get("export") or "")
    if export and export.upper() != "ALL":
        out["export"] = f"{export},GPUFLEET_CKPT_DIR={ckpt_dir},GPUFLEET_CKPT_SIGNAL={CKPT_SIGNAL}"
    return out


# ---------------------------------------------------------------- the commands

def _debug(env: Mapping[str, str], msg: str) -> None:
    if env.get("GPUFLEET_FILTER_VERBOSE", "") not in {"", "0"}:
        print(f"gpufleet: {msg}", file=sys.stderr)


def _credential(cfg: ClientConfig) -> str:
    """`munge --no-input` as this user (munge.py's encode, without its imports)."""
    sock = cfg.munge_socket or os.environ.get("GPUFLEET_MUNGE_SOCKET") or \
        "/run/munge/munge.socket.2"
    rc, out, err = run_quiet(["munge", f"--socket={sock}", "--no-input"],
                             cfg.place_timeout_s)
    cred = out.strip()
    if rc != 0 or not cred.startswith("MUNGE:"):
        raise RuntimeError(f"munge failed: {err.strip()[:200]}")
    return cred


def place_options(opts: Mapping[str, object], offset: int,  # noqa: PLR0911 - each "add nothing" case
                  env: Mapping[str, str], het: bool = False) -> dict[str, str]:
    out: dict[str, str] = {}
    if env.get("GPUFLEET_CKPT_DIR"):
        out.update(ckpt_options(opts, env["GPUFLEET_CKPT_DIR"]))
    if env.get("GPUFLEET_PLACE", "1") in {"0", "no", "off"}:
        return out
    plan = plan_from_options(opts, offset, het)
    if plan is None:
        _debug(env, f"component {offset}: nodes chosen by the user or job starts later; "
                    "nothing added")
        return out
    try:
        cfg = load_client_config(env)
    except ConfigError as e:
        _debug(env, str(e))
        return out
    if not cfg.controller:
        return out  # no controller configured: plain sbatch, silently
    from gpufleet.scheduler.service import placecall

    req = placecall.PlaceRequest(
        nodes=plan.nodes, gpus_per_node=plan.gpus_per_node, total_gpus=plan.total_gpus,
        partition=plan.partition, constraints=plan.constraints,
        time_limit_min=plan.time_limit_min, exclude=plan.exclude)
    tls = None if cfg.insecure or not cfg.tls_ca else placecall.Tls(
        cfg.tls_ca, cfg.tls_cert or None, cfg.tls_key or None)
    if tls is None and not cfg.insecure:
        _debug(env, "no tls_ca and not insecure in the client config: no placement")
        return out
    try:
        reply = placecall.place(cfg.controller, req, _credential(cfg), cfg.place_timeout_s, tls)
    except Exception as e:  # noqa: BLE001 - any failure: submit as plain sbatch
        _debug(env, f"no placement ({e}); submitting as plain sbatch")
        return out
    for line in reply.explanation:
        _debug(env, line)
    if not plan.pin:
        _debug(env, f"component {offset}: not pinned ({plan.why_not_pin})")
    out.update(decide(opts, plan, reply.ok, reply.flags, int(reply.cost.get("leaves", 0)),
                      reply.avoid, int(reply.cost.get("jobs_waiting", 0)),
                      bool(reply.cost.get("switch_hold", 0))))
    if "nodelist" in out:  # when cli_filter.lua checks whether the pinned job started
        delay = float(env.get("GPUFLEET_PIN_RELEASE_S") or cfg.pin_release_s)
        out["gpufleet-release-after"] = f"{max(0, int(delay))}"
    _debug(env, f"component {offset}: adds "
                + (" ".join(f"--{k}={v}" for k, v in out.items()) or "nothing"))
    return out


def _same_nodes(a: str, b: str) -> bool:
    if sys.flags.no_site:  # started with -S (entry.py's fast path): ClusterShell is in site
        import site

        site.main()
    try:
        from ClusterShell.NodeSet import NodeSet
    except ImportError:  # a login node without ClusterShell: Slurm's own spelling, or keep
        return a == b
    return bool(NodeSet(a.replace("(null)", "")) == NodeSet(b))


def _scontrol(args: list[str], env: Mapping[str, str], tries: int = 5
              ) -> subprocess.CompletedProcess[str]:
    """scontrol, asked again (1, 2, 4, 8 s apart) while slurmctld is busy or away: a release
    that gives up on one timed-out call leaves the job waiting on its pinned nodes."""
    import subprocess

    delay_s = SCONTROL_RETRY_S
    for attempt in range(tries):
        try:
            p = subprocess.run(["scontrol", *args], capture_output=True, text=True,
                               check=False, timeout=30, env=dict(env))
        except subprocess.TimeoutExpired:
            p = subprocess.CompletedProcess(["scontrol", *args], 1, "", "timed out")
        if p.returncode == 0 or "Invalid job id" in p.stderr or attempt == tries - 1:
            return p
        time.sleep(delay_s)
        delay_s *= 2
    raise AssertionError("not reached")


def release(job: str, nodes: str, delay_s: float, env: Mapping[str, str]) -> str:
    """After delay_s: a job still PENDING with the node list gpufleet pinned gets it cleared
    (`scontrol update ReqNodeList=`), so it never waits for nodes someone else took."""
    time.sleep(delay_s)
    p = _scontrol(["show", "job", "-o", job], env)
    fields = dict(w.split("=", 1) for w in p.stdout.split() if "=" in w)
    if p.returncode != 0 or fields.get("JobState") != "PENDING":
        return f"job {job}: {fields.get('JobState', 'gone')}, kept"
    if not _same_nodes(fields.get("ReqNodeList", ""), nodes):
        return f"job {job}: node list now {fields.get('ReqNodeList')!r}, not ours: kept"
    u = _scontrol(["update", f"JobId={job}", "ReqNodeList="], env)
    return f"job {job}: released {nodes}" if u.returncode == 0 else \
        f"job {job}: release failed: {u.stderr.strip()}"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    env = os.environ
    if len(args) in (3, 4) and args[0] == "place":
        try:
            opts = read_json(args[2])
            offset = int(args[1])
        except ValueError as e:
            print(f"gpufleet-sbatch-filter: bad input: {e}", file=sys.stderr)
            return 0
        if not isinstance(opts, dict):
            print("gpufleet-sbatch-filter: bad input: options are not a JSON object",
                  file=sys.stderr)
            return 0
        het = args[3:] == ["het"]  # cli_filter.lua saw a `:` on sbatch's command line
        for k, v in place_options(opts, offset, env, het).items():
            print(f"{k}={v}")
        return 0
    if len(args) == 3 and args[0] == "release":  # cli_filter.lua waited the deadline
        print(release(args[1], args[2], 0, env), file=sys.stderr)
        return 0
    print("usage: gpufleet-sbatch-filter place OFFSET JSON | release JOBID NODES "
          "(run by cli_filter.lua)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    if not __package__:  # run as a file (`python -I -S .../sbatch_filter.py`: entry.py's way)
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))))))
    sys.exit(main())
