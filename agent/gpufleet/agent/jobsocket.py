"""The agent's local job socket: jobs on this node register their checkpoints here.

Protocol: a client connects, sends one JSON object on one line, and gets one JSON line back,
``{"ok": true}`` or ``{"ok": false, "error": "..."}``. The only request today:

    {"kind": "checkpoint", "job_id": "1234", "step": 500, "path": "/scratch/ck/step-500",
     "time_ms": 1700000000000, "munge_credential": "MUNGE:..."}

`munge_credential` (optional): the job's own `munge -s "<job_id>:<step>"`. The agent cannot
check it (it may have no munged of its own to spare) and passes it on verbatim; the
controller verifies it with its munged, so a registration proves end to end which uid made it.

Who may connect: every local user. The socket is made mode 0666 on purpose, because jobs run
as their researchers' own uids. So nothing a client says is trusted beyond its shape: the
peer's uid (SO_PEERCRED, from the kernel, not the client) travels with the registration so the
controller can check that uid owns the job, and where the agent can read the peer's cgroup a
pid inside another job's cgroup is refused here. A registration only ever records "job J has a
checkpoint at P"; it never makes the agent or controller read, run or delete anything.

It must never block the agent: one thread, a short per-connection timeout, a size limit. It
hands on a `Registration`; `gpufleet.agent.wire` makes the message the controller receives.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import socketserver
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4096
MAX_PATH_CHARS = 1024
MAX_CREDENTIAL_CHARS = 1024  # `munge -s "<job>:<step>"` is ~180 characters
_CREDENTIAL = re.compile(r"^MUNGE:[A-Za-z0-9+/=]+:$")
CONNECTION_TIMEOUT_S = 1.0
SOCKET_MODE = 0o666  # every local user: jobs run under their owners' uids (see above)
_JOB_ID = re.compile(r"^[0-9]{1,20}$")
_CGROUP_JOB = re.compile(r"/job_([0-9]+)(?:/|$)")
# Slurm steps only ever talk about times near now; anything outside ~1990..2100 is a bug
_TIME_MS_MIN = 631_152_000_000
_TIME_MS_MAX = 4_102_444_800_000


class JobSocketError(ValueError):
    """A request on the job socket is malformed; the message names the field and the problem."""


@dataclass(frozen=True)
class Registration:
    job_id: str
    step: int
    path: str
    time_ms: int
    uid: int | None  # of the connecting process, from the kernel
    pid: int | None
    received_ms: int
    munge_credential: bytes = b""  # the job's own, verbatim; b"": none (no munge there)


def parse_request(line: bytes, uid: int | None = None, pid: int | None = None,
                  received_ms: int | None = None) -> Registration:
    """Validate one request line into a Registration, or raise JobSocketError saying why."""
    if len(line) > MAX_REQUEST_BYTES:
        raise JobSocketError(f"request longer than {MAX_REQUEST_BYTES} bytes")
    try:
        doc: Any = json.loads(line)
    except ValueError as e:
        raise JobSocketError(f"request is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise JobSocketError("request must be a JSON object")
    if doc.get("kind") != "checkpoint":
        raise JobSocketError(f"kind={doc.get('kind')!r}: only 'checkpoint' is known")
    job_id = doc.get("job_id")
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
        raise JobSocketError(f"job_id={job_id!r}: must be a Slurm job id (digits)")
    step = doc.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2**63:
        raise JobSocketError(f"step={step!r}: must be a whole number >= 0")
    path = doc.get("path")
    if (not isinstance(path, str) or not path.startswith("/") or len(path) > MAX_PATH_CHARS
            or any(c in path for c in "\0\n\r")):
        raise JobSocketError(
            f"path={str(path)[:80]!r}: must be an absolute path of at most {MAX_PATH_CHARS} "
            "characters")
    time_ms = doc.get("time_ms")
    if (isinstance(time_ms, bool) or not isinstance(time_ms, int)
            or not _TIME_MS_MIN <= time_ms <= _TIME_MS_MAX):
        raise JobSocketError(f"time_ms={time_ms!r}: must be Unix epoch milliseconds")
    cred = doc.get("munge_credential", "")
    if not isinstance(cred, str) or len(cred) > MAX_CREDENTIAL_CHARS or (
            cred and not _CREDENTIAL.match(cred)):
        raise JobSocketError(f"munge_credential={str(cred)[:40]!r}: must be what `munge` "
                             f"prints (MUNGE:...:, at most {MAX_CREDENTIAL_CHARS} characters)")
    return Registration(job_id, step, path, time_ms, uid, pid,
                        received_ms if received_ms is not None else int(time.time() * 1000),
                        cred.encode("ascii"))


def cgroup_job_id(pid: int, proc_root: Path = Path("/proc")) -> str | None:
    """The Slurm job whose cgroup holds `pid` (".../job_<id>/..."), or None if unknown.

    None also when /proc/PID is hidden from the agent (systemd ProtectProc=invisible).
    """
    try:
        text = (proc_root / str(pid) / "cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        m = _CGROUP_JOB.search(line.partition(":")[2].partition(":")[2])
        if m:
            return m.group(1)
    return None


def _peer_credentials(sock: socket.socket) -> tuple[int | None, int | None]:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):  # not Linux
        return None, None
    pid, uid, _gid = struct.unpack("3i", raw)
    return pid, uid


class _Handler(socketserver.StreamRequestHandler):
    timeout = CONNECTION_TIMEOUT_S
    server: _Server

    def handle(self) -> None:
        try:
            line = self.rfile.readline(MAX_REQUEST_BYTES + 1)
        except OSError:  # slow or vanished client: its problem, not the agent's
            return
        pid, uid = _peer_credentials(self.request)
        try:
            reg = parse_request(line, uid=uid, pid=pid)
            self.server.check_cgroup(reg)
            self.server.on_registration(reg)
        except JobSocketError as e:
            self.server.rejected += 1
            log.info("job socket: refused a request from pid %s uid %s: %s", pid, uid, e)
            self._reply({"ok": False, "error": str(e)})
            return
        except Exception as e:  # the callback failed: tell the job, keep serving
            self.server.rejected += 1
            log.exception("job socket: handling a registration failed")
            self._reply({"ok": False, "error": f"agent error: {type(e).__name__}"})
            return
        self.server.accepted += 1
        self._reply({"ok": True})

    def _reply(self, doc: dict[str, Any]) -> None:
        # the client may have given up waiting; the registration itself is already handled
        with contextlib.suppress(OSError):
            self.wfile.write(json.dumps(doc).encode() + b"\n")


class _Server(socketserver.UnixStreamServer):
    def __init__(self, path: str, on_registration: Callable[[Registration], object],
                 proc_root: Path) -> None:
        self.on_registration = on_registration
        self.proc_root = proc_root
        self.accepted = 0
        self.rejected = 0
        super().__init__(path, _Handler, bind_and_activate=False)

    def check_cgroup(self, reg: Registration) -> None:
        if reg.pid is None:
            return
        actual = cgroup_job_id(reg.pid, self.proc_root)
        if actual is not None and actual != reg.job_id:
            raise JobSocketError(
                f"job_id={reg.job_id}: the registering process {reg.pid} runs in job {actual}")


class JobSocketServer:
    """Serve the job socket in a daemon thread; hand each valid registration to a callback."""

    def __init__(self, path: str | os.PathLike[str],
                 on_registration: Callable[[Registration], object],
                 proc_root: Path = Path("/proc")) -> None:
        self.path = Path(path)
        self._server = _Server(str(self.path), on_registration, proc_root)
        self._thread: threading.Thread | None = None
        self._inode: int | None = None

    @property
    def accepted(self) -> int:
        return self._server.accepted

    @property
    def rejected(self) -> int:
        return self._server.rejected

    def start(self) -> None:
        """Bind (replacing a stale socket left by a dead agent) and serve; OSError if not."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale()
        try:
            self._server.server_bind()
            os.chmod(self.path, SOCKET_MODE)
            self._inode = self.path.lstat().st_ino
            self._server.server_activate()
        except OSError:
            self._server.server_close()
            raise
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={
            "poll_interval": 0.2}, name="job-socket", daemon=True)
        self._thread.start()

    def _remove_stale(self) -> None:
        try:
            mode = self.path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise FileExistsError(f"{self.path} exists and is not a socket; not replacing it")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(CONNECTION_TIMEOUT_S)
            try:
                probe.connect(str(self.path))
            except OSError:
                self.path.unlink()  # nobody listens: left behind by an agent that died
                return
        raise FileExistsError(f"{self.path}: another process is serving it (a second agent?)")

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=2.0)
            self._thread = None
        self._server.server_close()
        # only our own socket: a newer agent may have bound the path since
        with contextlib.suppress(OSError):
            if self._inode is not None and self.path.lstat().st_ino == self._inode:
                self.path.unlink()
