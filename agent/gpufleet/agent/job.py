"""Checkpoint helper for jobs: know when to save, publish atomically, find the last good one.

Imported *inside* researchers' jobs, so it uses the standard library only: it must never import
grpc, pynvml, psutil or prometheus_client (tests check that in a clean subprocess).

    from gpufleet.agent import job

    ckpt = job.latest()                     # newest complete checkpoint, or None
    step = ckpt.step + 1 if ckpt else 0
    while step < total:
        train_one_step()
        if step % 1000 == 0 or job.checkpoint_requested():
            job.save(None, step, lambda d: torch.save(state, d / "model.pt"))
        if job.checkpoint_requested():
            sys.exit(0)                     # saved; let the controller requeue us
        step += 1

A checkpoint is a directory ``<root>/step-<step>/`` holding the job's files and
``gpufleet-manifest.json`` (step, every file's size and sha256, time, job id). The manifest is
written last and atomically, so a checkpoint without one, or with a file whose size or checksum
does not match it, is *torn* (the job died mid-save) and `latest()` skips it.

Environment (``gpufleet sbatch --gpufleet-ckpt DIR`` sets the first two; Slurm sets the rest):

    GPUFLEET_CKPT_DIR       default checkpoint root for save(None, ...) and latest()
    GPUFLEET_CKPT_SIGNAL    signal that asks for a checkpoint: USR1 (default), SIGUSR2, 12, ...
    GPUFLEET_CKPT_KEEP      keep this many newest complete checkpoints (default: all)
    GPUFLEET_AGENT_SOCKET   the node agent's job socket (default /run/gpufleet-agent/job.sock);
                            "" turns registration off
    SLURM_JOB_ID            the job a checkpoint is registered under (none outside Slurm: no
                            registration)
    SLURM_RESTART_COUNT     how often Slurm requeued the job (restart_count())
    GPUFLEET_MUNGE_SOCKET   munged socket for the registration's MUNGE credential (default:
                            munge's own, /run/munge/munge.socket.2)

Registration carries a MUNGE credential (payload "<job_id>:<step>") when `munge` is installed,
so the controller can check with its own munged which uid registered the checkpoint. Without
munge (or with munged down) the registration goes without one: a save never fails for it.

Exit code `EXIT_DO_NOT_REQUEUE` (93, as NVIDIA's NVRx uses): a job that exits with it tells
gpufleet not to requeue it (it finished, or it failed in a way a restart cannot fix).

Threads: `install()` must run in the main thread (Python only lets it set signal handlers);
after that `checkpoint_requested()` may be called from any thread. Called first from another
thread, `checkpoint_requested()` raises RuntimeError rather than silently never seeing the signal.

Multi-process jobs: one process (rank 0, after a barrier) calls save(); concurrent save() calls
for the same step from several processes are not supported.

One module (~590 lines) on purpose: training jobs import it, so it is self-contained and
stdlib-only (nothing else of gpufleet is loaded into a job).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

EXIT_DO_NOT_REQUEUE = 93
"""Exit status that means "do not requeue this job" (the NVIDIA NVRx convention)."""

ENV_CKPT_DIR = "GPUFLEET_CKPT_DIR"
ENV_CKPT_SIGNAL = "GPUFLEET_CKPT_SIGNAL"
ENV_CKPT_KEEP = "GPUFLEET_CKPT_KEEP"
ENV_AGENT_SOCKET = "GPUFLEET_AGENT_SOCKET"
DEFAULT_AGENT_SOCKET = "/run/gpufleet-agent/job.sock"
DEFAULT_SIGNAL = "SIGUSR1"
MANIFEST_NAME = "gpufleet-manifest.json"
DEFAULT_FILE_NAME = "checkpoint.bin"
MANIFEST_VERSION = 1
REGISTER_TIMEOUT_S = 0.5
ENV_MUNGE_SOCKET = "GPUFLEET_MUNGE_SOCKET"
MUNGE_TIMEOUT_S = 1.0  # a save waits at most this long for munged
# another process's staging directory younger than this may still be in use: leave it alone
STALE_STAGING_S = 3600.0

_STEP_DIR = re.compile(r"^step-(\d{1,19})$")
_CHUNK_BYTES = 1 << 20


class CheckpointError(Exception):
    """A checkpoint could not be saved, or an argument or setting is wrong; the message says."""


@dataclass(frozen=True)
class CheckpointFile:
    name: str  # relative to the checkpoint directory, "/"-separated
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class Checkpoint:
    path: Path  # the checkpoint directory, <root>/step-<step>
    step: int
    files: tuple[CheckpointFile, ...]
    time_ms: int  # when it was published (Unix epoch)
    job_id: str | None

    def file(self, name: str = DEFAULT_FILE_NAME) -> Path:
        """Path of one of the checkpoint's files (default: the one save(data=bytes) writes)."""
        if name not in {f.name for f in self.files}:
            raise CheckpointError(f"{self.path}: no file {name!r} in this checkpoint")
        return self.path / name

    def read_bytes(self, name: str = DEFAULT_FILE_NAME) -> bytes:
        return self.file(name).read_bytes()


# ---------------------------------------------------------------- environment


def job_id() -> str | None:
    return os.environ.get("SLURM_JOB_ID") or None


def restart_count() -> int:
    """How often Slurm has requeued this job (SLURM_RESTART_COUNT; 0 on the first run)."""
    raw = os.environ.get("SLURM_RESTART_COUNT", "").strip()
    if not raw:
        return 0
    try:
        return int(raw)
    except ValueError:
        raise CheckpointError(f"SLURM_RESTART_COUNT={raw!r}: not a whole number") from None


def checkpoint_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """The checkpoint root: `root` when given, else $GPUFLEET_CKPT_DIR."""
    if root is not None:
        return Path(root)
    env = os.environ.get(ENV_CKPT_DIR, "")
    if not env:
        raise CheckpointError(f"no checkpoint directory given and ${ENV_CKPT_DIR} is not set")
    return Path(env)


def signal_from_env() -> signal.Signals:
    """The signal named by $GPUFLEET_CKPT_SIGNAL (USR1, SIGUSR1 or a number; default SIGUSR1)."""
    raw = os.environ.get(ENV_CKPT_SIGNAL, "").strip() or DEFAULT_SIGNAL
    try:
        if raw.isascii() and raw.isdigit():
            return signal.Signals(int(raw))
        name = raw.upper()
        return signal.Signals[name if name.startswith("SIG") else "SIG" + name]
    except (KeyError, ValueError):
        raise CheckpointError(
            f"{ENV_CKPT_SIGNAL}={raw!r}: not a signal name or number (e.g. USR1, SIGUSR2, 10)"
        ) from None


# ---------------------------------------------------------------- signal


_requested = threading.Event()
_install_lock = threading.Lock()
_installed: signal.Signals | None = None
_previous: Any = None  # whatever signal.signal() returned: a callable, SIG_DFL, SIG_IGN or None


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _requested.set()
    # Chain to a Python handler the job (or its framework) had installed. SIG_DFL is not
    # chained on purpose: for SIGUSR1 the default action kills the process, which is exactly
    # what asking for a checkpoint must not do.
    if callable(_previous):
        _previous(signum, frame)


def install(signum: int | None = None) -> signal.Signals:
    """Install the checkpoint-request handler (idempotent); call it from the main thread.

    `signum` defaults to $GPUFLEET_CKPT_SIGNAL (SIGUSR1). Returns the signal handled.
    """
    global _installed, _previous  # noqa: PLW0603 - one handler per process, by nature of signals
    sig = signal.Signals(signum) if signum is not None else signal_from_env()
    with _install_lock:
        if _installed is not None:
            if _installed != sig:
                raise CheckpointError(
                    f"checkpoint signal already installed for {_installed.name}, not {sig.name}"
                )
            return sig
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "gpufleet.agent.job: the checkpoint signal handler can only be installed from "
                "the main thread; call gpufleet.agent.job.install() there before starting threads"
            )
        _previous = signal.signal(sig, _on_signal)
        _installed = sig
        return sig


def checkpoint_requested() -> bool:
    """True once the checkpoint signal has arrived (installs the handler on first call)."""
    if _installed is None:
        install()
    return _requested.is_set()


def clear_request() -> None:
    """Forget an arrived signal, e.g. after saving when the job means to run on."""
    _requested.clear()


# ---------------------------------------------------------------- save


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_name(name: str) -> str:
    p = Path(name)
    if not name or p.is_absolute() or ".." in p.parts or name != p.as_posix():
        raise CheckpointError(f"checkpoint file name {name!r}: must be a plain relative path")
    if p.parts[0] == MANIFEST_NAME or p.parts[0].endswith(".gpufleet-tmp"):
        raise CheckpointError(f"checkpoint file name {name!r}: reserved by gpufleet")
    return name


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _walk_files(top: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so a reader sees the old file or all of the new one, never a part."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.gpufleet-tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


Writer = Callable[[Path], object]
Data = bytes | bytearray | memoryview | Mapping[str, bytes] | Writer


def save(
    root: str | os.PathLike[str] | None,
    step: int,
    data: Data,
    *,
    keep: int | None = None,
    register: bool = True,
    socket_path: str | None = None,
) -> Checkpoint:
    """Publish checkpoint `step` under `root` (None: $GPUFLEET_CKPT_DIR) atomically.

    `data` is one of:
      - bytes: written as ``checkpoint.bin`` (read back with ``Checkpoint.read_bytes()``);
      - a mapping of relative file names to bytes;
      - a function called with an empty staging directory that writes the files itself
        (``lambda d: torch.save(state, d / "model.pt")``), which is how frameworks save.

    The files are written into a staging directory next to the final one and fsynced, the
    staging directory is renamed to ``step-<step>`` and the root fsynced, then the manifest is
    written (temp name, fsync, rename, fsync). Only then is the checkpoint complete. `keep`
    (default $GPUFLEET_CKPT_KEEP, else all) prunes older ones. Then, unless `register` is
    False, the node agent is told (never failing the save if it is not there).
    """
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2**63:
        raise CheckpointError(f"step={step!r}: must be a whole number >= 0")
    base = checkpoint_dir(root)
    keep = _keep_from_env() if keep is None else keep
    if keep is not None and keep < 1:
        raise CheckpointError(f"keep={keep}: must be >= 1")
    base.mkdir(parents=True, exist_ok=True)
    final = base / f"step-{step}"
    staging = base / f".step-{step}.{socket.gethostname()}.{os.getpid()}.gpufleet-tmp"
    if staging.exists():  # our own leftover from an earlier failed attempt
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        _fill(staging, data)
        entries = []
        for f in _walk_files(staging):
            _fsync_file(f)
            entries.append(CheckpointFile(f.relative_to(staging).as_posix(), f.stat().st_size,
                                          _sha256_file(f)))
        for d in sorted({f.parent for f in _walk_files(staging)}, reverse=True):
            _fsync_dir(d)
        _require_files(entries, step)
        _replace_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(base)
    ckpt = Checkpoint(final, step, tuple(entries), int(time.time() * 1000), job_id())
    manifest = {
        "version": MANIFEST_VERSION,
        "step": step,
        "time_ms": ckpt.time_ms,
        "job_id": ckpt.job_id,
        "restart_count": restart_count(),
        "files": [{"name": e.name, "size_bytes": e.size_bytes, "sha256": e.sha256}
                  for e in entries],
    }
    _write_atomic(final / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
    if keep is not None:
        prune(base, keep)
    if register:
        _register(ckpt, socket_path)
    return ckpt


def _keep_from_env() -> int | None:
    raw = os.environ.get(ENV_CKPT_KEEP, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise CheckpointError(f"{ENV_CKPT_KEEP}={raw!r}: not a whole number") from None


def _fill(staging: Path, data: Data) -> None:
    if isinstance(data, bytes | bytearray | memoryview):
        (staging / DEFAULT_FILE_NAME).write_bytes(data)
    elif isinstance(data, Mapping):
        for name, blob in data.items():
            target = staging / _check_name(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(blob)
    elif callable(data):
        data(staging)
        if (staging / MANIFEST_NAME).exists():
            raise CheckpointError(f"the writer wrote {MANIFEST_NAME}, a name gpufleet reserves")
    else:
        raise CheckpointError(
            f"data: expected bytes, a mapping of names to bytes or a writer function, "
            f"not {type(data).__name__}"
        )


def _require_files(entries: list[CheckpointFile], step: int) -> None:
    if not entries:
        raise CheckpointError(f"checkpoint step {step}: the writer wrote no files")


def _replace_dir(staging: Path, final: Path) -> None:
    if not final.exists():
        staging.rename(final)
        return
    # Saving a step again (a job resumed from it and saved it once more): move the old one
    # aside first, since rename() cannot replace a non-empty directory. Older checkpoints
    # stay in place meanwhile, so latest() always has one to fall back to.
    trash = final.with_name(f".{final.name}.{secrets.token_hex(4)}.gpufleet-tmp")
    final.rename(trash)
    staging.rename(final)
    shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------- find


def _read_manifest(path: Path, dir_step: int) -> Checkpoint | str:
    try:
        doc = json.loads((path / MANIFEST_NAME).read_bytes())
    except FileNotFoundError:
        return "manifest missing (killed while saving?)"
    except (OSError, ValueError) as e:
        return f"manifest unreadable: {e}"
    try:
        step = doc["step"]
        files = tuple(CheckpointFile(str(f["name"]), int(f["size_bytes"]), str(f["sha256"]))
                      for f in doc["files"])
        time_ms = int(doc["time_ms"])
        jid = doc.get("job_id")
        for f in files:  # a manifest must not point outside its checkpoint
            _check_name(f.name)
    except (KeyError, TypeError, ValueError) as e:
        return f"manifest malformed: {e!r}"
    except CheckpointError as e:
        return f"manifest malformed: {e}"
    if step != dir_step:
        return f"manifest says step {step}, directory says {dir_step}"
    return Checkpoint(path, step, files, time_ms, str(jid) if jid is not None else None)


def _check_file(path: Path, f: CheckpointFile) -> str | None:
    try:
        size = (path / f.name).stat().st_size
    except OSError:
        return f"file {f.name} missing"
    if size != f.size_bytes:
        return f"file {f.name} is {size} bytes, manifest says {f.size_bytes} (truncated?)"
    if _sha256_file(path / f.name) != f.sha256:
        return f"file {f.name}: sha256 does not match the manifest (corrupted)"
    return None


def verify(path: Path) -> Checkpoint | str:
    """Check one checkpoint directory: the Checkpoint when complete, else why it is not."""
    step_match = _STEP_DIR.match(path.name)
    if not step_match:
        return f"{path.name}: not a step-<N> directory"
    result = _read_manifest(path, int(step_match.group(1)))
    if isinstance(result, str):
        return result
    for f in result.files:
        problem = _check_file(path, f)
        if problem is not None:
            return problem
    return result


def _step_dirs(base: Path) -> list[tuple[int, Path]]:
    try:
        entries = list(base.iterdir())
    except FileNotFoundError:
        return []
    found = []
    for p in entries:
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def latest(root: str | os.PathLike[str] | None = None) -> Checkpoint | None:
    """The newest complete checkpoint under `root` (None: $GPUFLEET_CKPT_DIR), or None.

    Torn checkpoints (no manifest, a file missing, truncated or corrupted) are skipped, each
    with a warning that says why.
    """
    for _step, path in _step_dirs(checkpoint_dir(root)):
        result = verify(path)
        if isinstance(result, Checkpoint):
            return result
        log.warning("ignoring checkpoint %s: %s", path, result)
    return None


def prune(root: str | os.PathLike[str] | None, keep: int) -> list[Path]:
    """Keep the `keep` newest complete checkpoints; remove older ones and old torn ones.

    Torn checkpoints newer than the newest kept one are left alone (they may be a save in
    progress by another process), as are staging directories younger than an hour.
    Returns what was removed.
    """
    if keep < 1:
        raise CheckpointError(f"keep={keep}: must be >= 1")
    base = checkpoint_dir(root)
    removed: list[Path] = []
    kept = 0
    for _step, path in _step_dirs(base):
        complete = isinstance(verify(path), Checkpoint)
        if complete and kept < keep:
            kept += 1
            continue
        if kept == 0:  # nothing complete yet above this one: a torn dir may be in progress
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    now = time.time()
    for p in base.iterdir():
        if p.name.endswith(".gpufleet-tmp") and p.is_dir():
            with contextlib.suppress(OSError):
                if now - p.stat().st_mtime > STALE_STAGING_S:
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
    return removed


# ---------------------------------------------------------------- registration

_register_warned = False


def _register(ckpt: Checkpoint, socket_path: str | None) -> bool:
    global _register_warned  # noqa: PLW0603 - "log once per process" is process state
    try:
        return register(ckpt, socket_path)
    except (OSError, ValueError, CheckpointError) as e:
        if not _register_warned:
            log.warning("checkpoint saved, but the gpufleet agent was not told (%s); the "
                        "controller will not know this job's last step. Said once.", e)
            _register_warned = True
        return False


def munge_credential(payload: str, timeout_s: float = MUNGE_TIMEOUT_S) -> str | None:
    """`munge -s PAYLOAD` for this process's uid, or None when munge is not installed or
    does not answer (logged at debug: registration goes on without it)."""
    exe = shutil.which("munge")
    if exe is None:
        return None
    argv = [exe, "--string", payload]
    sock = os.environ.get(ENV_MUNGE_SOCKET)
    if sock:
        argv.append(f"--socket={sock}")
    try:
        p = subprocess.run(argv, capture_output=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        log.debug("no MUNGE credential for the checkpoint registration: %s", e)
        return None
    cred = p.stdout.decode("ascii", "replace").strip()
    if p.returncode != 0 or not cred.startswith("MUNGE:"):
        log.debug("no MUNGE credential for the checkpoint registration: munge exited %d: %s",
                  p.returncode, p.stderr.decode(errors="replace").strip()[:200])
        return None
    return cred


def register(
    ckpt: Checkpoint, socket_path: str | None = None, timeout_s: float = REGISTER_TIMEOUT_S
) -> bool:
    """Tell the node agent about a published checkpoint; False when there is nothing to tell.

    Sends one JSON line and waits at most `timeout_s` for the agent's one-line answer.
    Raises OSError when the agent is not there and CheckpointError when it refuses.
    """
    jid = job_id()
    path = socket_path if socket_path is not None else os.environ.get(
        ENV_AGENT_SOCKET, DEFAULT_AGENT_SOCKET)
    if not jid or not path:  # not in a Slurm job, or registration turned off
        return False
    doc: dict[str, Any] = {
        "kind": "checkpoint", "job_id": jid, "step": ckpt.step,
        "path": str(ckpt.path.resolve()), "time_ms": ckpt.time_ms,
    }
    cred = munge_credential(f"{jid}:{ckpt.step}")
    if cred is not None:
        doc["munge_credential"] = cred
    line = json.dumps(doc).encode() + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        s.connect(path)
        s.sendall(line)
        reply = b""
        while not reply.endswith(b"\n") and len(reply) < 4096:
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    try:
        answer = json.loads(reply)
    except ValueError:
        raise CheckpointError(f"agent at {path} sent no valid answer: {reply[:200]!r}") from None
    if not isinstance(answer, dict) or answer.get("ok") is not True:
        err = answer.get("error") if isinstance(answer, dict) else answer
        raise CheckpointError(f"agent at {path} refused the registration: {err}")
    return True
