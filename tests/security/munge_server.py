"""A real munged for tests: its own key, socket, pid, seed and log in a temporary directory,
started in the foreground (so the PID we hold is the daemon's) and stopped by that PID.

Credentials for users other than root are made by running `munge` under their uid with
setpriv (nobody = 65534, daemon = 1): munged then vouches for that uid exactly as it would
for a real user on a login node.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

NOBODY_UID = 65534
DAEMON_UID = 1


def munge_as_user(bindir: Path, uid: int) -> dict[str, str]:
    """Environment with a `munge` on PATH that makes credentials as `uid`: a client in this
    root process is then, for the controller's munged, that plain user on a login node."""
    bindir.mkdir(parents=True, exist_ok=True)
    wrapper = bindir / "munge"
    wrapper.write_text(f"#!/bin/sh\nexec setpriv --reuid={uid} --regid={uid} --clear-groups "
                       f"/usr/bin/munge \"$@\"\n")
    wrapper.chmod(0o755)
    return {"PATH": f"{bindir}:{os.environ['PATH']}"}


def munge_installed() -> bool:
    return all(shutil.which(t) for t in ("munged", "munge", "unmunge", "mungekey"))


@dataclass
class MungeServer:
    base: Path
    proc: subprocess.Popen[bytes]

    @property
    def socket(self) -> str:
        return str(self.base / "munge.socket")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def credential(self, payload: str = "", uid: int | None = None, ttl_s: int | None = None
                   ) -> bytes:
        """A credential made by `uid` (None: this process's own) through this munged."""
        argv = ["munge", f"--socket={self.socket}"]
        argv += ["--string", payload] if payload else ["--no-input"]
        if ttl_s is not None:
            argv.append(f"--ttl={ttl_s}")
        if uid is not None:
            argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]
        return subprocess.run(argv, check=True, capture_output=True, timeout=10).stdout.strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


@contextmanager
def started_munged(prefix: str = "gf-munge-") -> Iterator[MungeServer]:
    """munged on its own socket with its own key; stopped (by PID) and removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    # munged refuses a socket directory others cannot traverse (a plain user's `munge`
    # must reach it); the key stays 0600 inside
    base.chmod(0o755)
    key = base / "munge.key"
    subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, timeout=30)
    log = (base / "munged.log").open("wb")
    # -F: the PID we hold is the daemon itself; --force: munged refuses to run as root
    # otherwise (tests run as root, with their own key and socket, never the system's)
    proc = subprocess.Popen(
        ["munged", "--foreground", "--force", f"--socket={base / 'munge.socket'}",
         f"--key-file={key}", f"--pid-file={base / 'munged.pid'}",
         f"--log-file={base / 'munged.log'}", f"--seed-file={base / 'munged.seed'}",
         "--num-threads=4"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    server = MungeServer(base, proc)
    try:
        deadline = time.monotonic() + 10
        while not Path(server.socket).exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start: {(base / 'munged.log').read_text()}")
            time.sleep(0.02)
        yield server
    finally:
        server.stop()
        log.close()
        shutil.rmtree(base, ignore_errors=True)
