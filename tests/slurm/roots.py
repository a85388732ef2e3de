"""Which Slurm a lab runs: the host's 22.05, or a newer one from a Debian root built by
.ci/slurm-root.sh (trixie: 24.11, sid: 26.05), run with chroot.

A root lab bind-mounts what its daemons and clients need into the root, records each mount it
made in LAB/mounts.txt, and unmounts exactly those on stop (another lab's mounts are left
alone): /proc, /dev, /sys, /run/munge (the host's munged serves every version), /tmp and the
lab dir (same paths inside as outside), /etc/hosts (the lab's host name), and the host's
root file system at ROOT/host (so a Prolog inside the root can run the host's gpufleet-agent:
`chroot /host ...`).

Versions for the tests: $GPUFLEET_SLURM_VERSIONS (e.g. "22.05,26.05"); by default every
version whose root is built. Under CI=true every known version must be available.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "HOST_VERSION",
    "SUITES",
    "VERSIONS",
    "RootMissing",
    "find_root",
    "requested_versions",
    "root_argv",
]

REPO = Path(__file__).resolve().parents[2]
ROOT_SCRIPT = REPO / ".ci" / "slurm-root.sh"
HOST_VERSION = "22.05"  # Debian bookworm's, on the host itself
SUITES = {"24.11": "trixie", "26.05": "sid"}  # version -> Debian suite of its root
VERSIONS = (HOST_VERSION, *SUITES)
HOST_VIEW = "/host"  # where the host's / is seen inside a root


class RootMissing(Exception):
    """The root for a version is not built (the message says how to build it)."""


def find_root(version: str) -> Path | None:
    """The root holding Slurm `version`; None for the host's version. Never builds one.

    $GPUFLEET_SLURM_ROOT_<MAJOR>_<MINOR> (e.g. _24_11) overrides the cache lookup.
    """
    if version == HOST_VERSION:
        return None
    if version not in SUITES:
        raise ValueError(f"Slurm version {version!r}: known are {', '.join(VERSIONS)}")
    override = os.environ.get("GPUFLEET_SLURM_ROOT_" + version.replace(".", "_"))
    if override:
        path = Path(override)
        if not (path / "usr" / "sbin" / "slurmctld").exists():
            raise RootMissing(f"GPUFLEET_SLURM_ROOT_{version.replace('.', '_')}={path}: "
                              "no usr/sbin/slurmctld there")
        return path
    proc = subprocess.run(["bash", str(ROOT_SCRIPT), "--path", SUITES[version]],
                          capture_output=True, text=True, check=False, timeout=30)
    if proc.returncode != 0:
        raise RootMissing(proc.stderr.strip() or f"no root for Slurm {version}")
    return Path(proc.stdout.strip())


def root_slurm_version(root: Path) -> str:
    """The full Slurm version the root's stamp records ('24.11.5'); '' if none."""
    try:
        for line in (root / ".gpufleet-root").read_text().splitlines():
            if line.startswith("slurm="):
                return line.split("=", 1)[1]
    except OSError:
        pass
    return ""


def available_versions() -> dict[str, str]:
    """{version: '' if available else why not} for every known version."""
    out: dict[str, str] = {}
    for version in VERSIONS:
        try:
            find_root(version)
            out[version] = ""
        except RootMissing as exc:
            out[version] = str(exc)
    return out


def requested_versions() -> list[str]:
    """$GPUFLEET_SLURM_VERSIONS (comma-separated), else every known version."""
    raw = os.environ.get("GPUFLEET_SLURM_VERSIONS", "").strip()
    if not raw:
        return list(VERSIONS)
    wanted = [v.strip() for v in raw.split(",") if v.strip()]
    unknown = [v for v in wanted if v not in VERSIONS]
    if unknown:
        raise ValueError(f"GPUFLEET_SLURM_VERSIONS={raw!r}: unknown {unknown}; "
                         f"known are {', '.join(VERSIONS)}")
    return wanted


def root_argv(root: Path | None, argv: Sequence[str], *, cwd: Path | None = None,
              user: str | None = None) -> list[str]:
    """argv to run `argv` inside `root` (as is on the host when root is None).

    chroot always changes to /, so a shell changes to `cwd` first (paths under the lab and
    /tmp are the same inside). `user`: run as that user (the root's own passwd entry).
    """
    if root is None:
        if user:
            return ["runuser", "-u", user, "--", *argv]
        return list(argv)
    head = ["chroot"]
    if user:
        head.append(f"--userspec={user}:{user if user != 'nobody' else 'nogroup'}")
    if cwd is None:
        return [*head, str(root), *argv]
    script = f"cd {shlex.quote(str(cwd))} && exec \"$@\""
    return [*head, str(root), "/bin/sh", "-c", script, "sh", *argv]


# ------------------------------------------------------------------------------------ mounts


def _mounted(target: Path) -> bool:
    text = Path("/proc/self/mounts").read_text()
    want = str(target).replace(" ", "\\040")
    return any(line.split()[1] == want for line in text.splitlines() if line.strip())


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    if proc.returncode != 0:
        raise OSError(f"`{shlex.join(argv)}` failed: {proc.stderr.strip()}")


def mount_root(root: Path, lab_dir: Path, record: Path) -> None:
    """Bind what a lab needs into `root`, appending each mount made to `record`."""
    lab_dir = lab_dir.absolute()
    plan: list[tuple[list[str], Path]] = [
        (["mount", "-t", "proc", "proc"], root / "proc"),
        (["mount", "--rbind", "/dev"], root / "dev"),
        (["mount", "--bind", "/sys"], root / "sys"),
        (["mount", "--bind", "/run/munge"], root / "run" / "munge"),
        (["mount", "--bind", "/tmp"], root / "tmp"),
        (["mount", "--bind", "/etc/hosts"], root / "etc" / "hosts"),
    ]
    if not lab_dir.is_relative_to("/tmp"):
        plan.append((["mount", "--bind", str(lab_dir)], root / lab_dir.relative_to("/")))
    # last, so none of the mounts above shows through it (the host's / is private here);
    # /tmp again inside it where /tmp is a file system of its own (hook and state dirs)
    host_view = root / HOST_VIEW.lstrip("/")
    plan.append((["mount", "--bind", "/"], host_view))
    if Path("/tmp").is_mount():
        plan.append((["mount", "--bind", "/tmp"], host_view / "tmp"))
    for argv, target in plan:
        if _mounted(target):
            continue  # another lab on this root mounted it: it unmounts it
        if target.name == "hosts":
            target.touch(exist_ok=True)
        else:
            target.mkdir(parents=True, exist_ok=True)
        _run([*argv, str(target)])
        with record.open("a") as fh:
            fh.write(f"{target}\n")


def unmount_recorded(record: Path) -> list[str]:
    """Unmount what mount_root recorded (newest first); returns the targets that stay."""
    try:
        targets = [line for line in record.read_text().splitlines() if line]
    except OSError:
        return []
    stuck = []
    for target in reversed(targets):
        if not _mounted(Path(target)):
            continue
        proc = subprocess.run(["umount", "-R", target], capture_output=True, check=False)
        if proc.returncode != 0:  # a process still has a file open there: detach it
            proc = subprocess.run(["umount", "-R", "-l", target], capture_output=True,
                                  check=False)
        if proc.returncode != 0:
            stuck.append(target)
    record.unlink(missing_ok=True)
    return stuck
