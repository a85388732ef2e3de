"""What the lab needs of the machine before any daemon starts: Debian packages, a host name
that resolves, fresh state/spool/log directories with fake GPU devices, and a working munged
(reused if one runs, else started and recorded so stop() can end it)."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from .labconfig import SlurmLabError
from .labcore import LabCore
from .procs import log, proc_alive, read_pid

PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client", "slurm-wlm-basic-plugins")
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN = Path("/run/munge")


def _munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10, check=False)
        if cred.returncode != 0:
            return False
        out = subprocess.run(
            ["unmunge"], input=cred.stdout, capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


class HostSetup(LabCore):
    """Packages, host name, directories and munged for the lab."""

    def _ensure_packages(self, packages: Sequence[str] = PACKAGES) -> None:
        if shutil.which("dpkg-query") is None:
            daemons = ("/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged")
            if all(Path(d).exists() for d in daemons):
                return  # not Debian, but Slurm is there: try it
            raise SlurmLabError(f"no dpkg-query and no {daemons}: install Slurm 22.05 + munge")
        missing = []
        for pkg in packages:
            proc = subprocess.run(
                ["dpkg-query", "-W", "-f=${Status}", pkg],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.stdout.strip() != "install ok installed":
                missing.append(pkg)
        if not missing:
            return
        log.info("installing %s", " ".join(missing))
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        ):
            proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                err = proc.stderr.strip()[-2000:]
                raise SlurmLabError(f"`{shlex.join(argv)}` failed ({proc.returncode}): {err}")
        if Path("/run/systemd/system").is_dir():
            # The packages start their services with the stock config; they would hold 6817.
            subprocess.run(
                ["systemctl", "stop", "slurmctld", "slurmd"], capture_output=True, check=False
            )

    def _ensure_hostname(self) -> None:
        """SlurmctldHost/NodeHostname use the short host name, which must resolve."""
        host = socket.gethostname().split(".", 1)[0]
        try:
            socket.getaddrinfo(host, None)
        except socket.gaierror:
            log.info("adding %s to /etc/hosts", host)
            with Path("/etc/hosts").open("a") as hosts:
                hosts.write(f"127.0.0.1 {host}\n")

    def _prepare_dirs(self) -> None:
        """Fresh state/spool/logs; slurmctld runs as user slurm and needs state and log."""
        for sub in ("state", "spool", "log"):
            shutil.rmtree(self.lab_dir / sub, ignore_errors=True)
        for sub in ("state", "spool", "log", "pids", "dev", "jobs"):
            (self.lab_dir / sub).mkdir(parents=True, exist_ok=True)
        self.etc_dir.mkdir(parents=True, exist_ok=True)
        self.lab_dir.chmod(0o755)
        for sub in ("spool", "log", "pids", "dev"):
            (self.lab_dir / sub).chmod(0o755)
        (self.lab_dir / "jobs").chmod(0o1777)  # jobs of non-root test users write output here
        for sub in ("state", "log"):
            shutil.chown(self.lab_dir / sub, "slurm", "slurm")
        for node in self.node_names:
            (self.lab_dir / "spool" / node).mkdir()
        (self.lab_dir / "lab.json").write_text(self.config.to_json())
        for idx in range(self.config.gpus):
            dev = self.lab_dir / "dev" / f"nvidia{idx}"
            if dev.exists():
                continue
            try:
                # Slurm 22.05 drops GPUs without File= and needs a real char device for
                # CUDA_VISIBLE_DEVICES; major 195 is what the nvidia driver uses.
                os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(195, idx))
            except OSError:
                dev.touch()  # nodes still show gpu:N; jobs just get no CUDA_VISIBLE_DEVICES

    def _ensure_munge(self) -> None:
        if not MUNGE_KEY.exists() or MUNGE_KEY.stat().st_size == 0:
            log.info("creating %s", MUNGE_KEY)
            MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
            MUNGE_KEY.write_bytes(os.urandom(1024))
        shutil.chown(MUNGE_KEY, "munge", "munge")
        MUNGE_KEY.chmod(0o400)
        MUNGE_RUN.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_RUN, "munge", "munge")
        MUNGE_RUN.chmod(0o755)
        if _munge_works():
            log.info("reusing the running munged (stop() leaves it alone)")
            return
        pidfile = MUNGE_RUN / "munged.pid"
        if proc_alive(read_pid(pidfile), "munged"):
            raise SlurmLabError(
                "munged is running but `munge -n | unmunge` fails; read /var/log/munge/munged.log"
            )
        for stale in (pidfile, MUNGE_RUN / "munge.socket.2", MUNGE_RUN / "munge.socket.2.lock"):
            stale.unlink(missing_ok=True)
        proc = subprocess.run(
            ["runuser", "-u", "munge", "--", "/usr/sbin/munged"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if proc.returncode != 0:
            raise SlurmLabError(
                f"munged failed ({proc.returncode}): {proc.stderr.strip()}; "
                "read /var/log/munge/munged.log"
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and read_pid(pidfile) is None:
            time.sleep(0.05)
        pid = read_pid(pidfile)
        if pid is None:
            raise SlurmLabError(f"munged wrote no {pidfile}; read /var/log/munge/munged.log")
        (self.pid_dir / "munged.pid").write_text(f"{pid}\n")  # marks "we started it"
        if not _munge_works():
            raise SlurmLabError("`munge -n | unmunge` fails; read /var/log/munge/munged.log")
        log.info("munged started (pid %d)", pid)
