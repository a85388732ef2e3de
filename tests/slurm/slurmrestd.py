"""slurmrestd for a lab: JWT auth in slurmctld (a key, AuthAltTypes), the daemon on a unix
socket as an unprivileged user, and tokens from `scontrol token`."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

from .labconfig import SlurmLabError
from .labcore import LabCore
from .procs import log, proc_alive, read_pid, tail

# only for start_restd(): slurmrestd, and auth/jwt for slurmctld (Debian splits it out)
REST_PACKAGES = ("slurmrestd", "slurm-wlm-jwt-plugin")
# slurmrestd refuses to run as root or as SlurmUser: an unprivileged user it can be
REST_USER = "nobody"  # run with its own primary group: root's group is refused too
REST_API = "v0.0.38"  # Slurm 22.05's openapi plugin


class Restd(LabCore):
    """slurmrestd and the JWT lines of slurm.conf."""

    @property
    def jwt_key_path(self) -> Path:
        return self.etc_dir / "jwt_hs256.key"

    @property
    def rest_socket(self) -> Path:
        """slurmrestd's unix socket (every request still needs a JWT: see jwt_token())."""
        return self.lab_dir / "rest" / "slurmrestd.sock"

    def jwt_enabled(self) -> bool:
        """slurm.conf of this lab accepts JWTs (AuthAltTypes=auth/jwt)."""
        try:
            return "AuthAltTypes=auth/jwt" in self.conf_path.read_text()
        except OSError:
            return False

    def restd_alive(self) -> bool:
        return proc_alive(read_pid(self.pid_dir / "slurmrestd.pid"), "slurmrestd")

    def start_restd(self, timeout_s: float = 60) -> None:
        """Start slurmrestd (as REST_USER, unix socket, rest_auth/jwt) against this lab.

        slurmctld must accept JWTs for that: if this lab's slurm.conf does not yet, a key is
        made, the config rewritten with AuthAltTypes=auth/jwt and slurmctld restarted (its
        state is saved and recovered; munge stays the main auth). Idempotent.
        """
        if self.restd_alive():
            return
        deadline = time.monotonic() + timeout_s
        self._ensure_packages(REST_PACKAGES)
        self._jwt = True
        if not self.jwt_enabled():
            self._write_configs()  # slurm_conf_text() now adds the JWT lines
            if self.ctld_alive():
                self.stop_slurmctld()
            self.start_slurmctld(max(deadline - time.monotonic(), 1.0))
        sock_dir = self.rest_socket.parent
        sock_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(sock_dir, REST_USER)
        self.rest_socket.unlink(missing_ok=True)
        logfile = self.log_dir / "slurmrestd.log"
        env = {**self._slurm_env(), "SLURM_JWT": "daemon"}  # 22.05: use auth/jwt, not munge
        # 22.05 serves one openapi plugin by its API version; 23.02+ name theirs by daemon
        api = f"openapi/{REST_API}" if self.root is None else "openapi/slurmctld"
        argv = ["/usr/sbin/slurmrestd", "-f", str(self.conf_path), "-a", "rest_auth/jwt",
                "-s", api, f"unix:{self.rest_socket}"]
        with logfile.open("ab") as fh:
            # slurmrestd stays in the foreground: Popen's pid is the daemon's pid (chroot
            # execs it)
            if self.root is None:
                proc = subprocess.Popen(
                    argv, env=env, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                    user=REST_USER, group=pwd.getpwnam(REST_USER).pw_gid, extra_groups=[],
                    start_new_session=True,
                )
            else:
                proc = subprocess.Popen(
                    self.argv(argv, user=REST_USER), env=env, stdin=subprocess.DEVNULL,
                    stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                )
        self._restd_proc = proc  # reaped in stop_restd()
        (self.pid_dir / "slurmrestd.pid").write_text(f"{proc.pid}\n")
        while not self.rest_socket.exists():
            if proc.poll() is not None:
                raise SlurmLabError(
                    f"slurmrestd exited {proc.returncode}; read {logfile}:\n{tail(logfile)}"
                )
            if time.monotonic() > deadline:
                self.stop_restd()
                raise SlurmLabError(f"slurmrestd made no socket in time; read {logfile}")
            time.sleep(0.05)
        log.info("slurmrestd up (pid %d, %s)", proc.pid, self.rest_socket)

    def stop_restd(self, timeout_s: float = 10) -> None:
        """Stop slurmrestd by its pid file (no-op when it is not running)."""
        self._stop_pidfiles([self.pid_dir / "slurmrestd.pid"], "slurmrestd", timeout_s)
        if self._restd_proc is not None:
            self._restd_proc.wait(timeout_s)  # already dead: only reaps the zombie
            self._restd_proc = None

    def jwt_token(self, user: str = "root", lifespan_s: int = 3600) -> str:
        """A JWT for `user` from `scontrol token` (needs jwt_enabled())."""
        out = self.run("scontrol", "token", f"username={user}", f"lifespan={lifespan_s}").stdout
        token = out.strip().removeprefix("SLURM_JWT=")
        if not token:
            raise SlurmLabError(f"`scontrol token` printed no token: {out!r}")
        return token

    def _jwt_conf(self) -> str:
        """JWT as an alternative auth (for slurmrestd) once start_restd() has made the key."""
        if not self._jwt:
            return ""
        if not self.jwt_key_path.exists():
            self.jwt_key_path.write_bytes(os.urandom(32))
        shutil.chown(self.jwt_key_path, "slurm", "slurm")  # slurmctld reads it, nobody else
        self.jwt_key_path.chmod(0o600)
        return f"AuthAltTypes=auth/jwt\nAuthAltParameters=jwt_key={self.jwt_key_path}\n"
