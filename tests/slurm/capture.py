"""Capture what a real Slurm prints, as fixtures for the readers of each version's output.

Starts a lab (with slurmdbd, so sacct has jobs) for one version, makes a completed, a failed
and a running job and a drained node, and writes the raw output of each client command to
tests/slurm/captured/<version>/ (see README.md there). Needs root; run it under the lab lock:

    flock /tmp/gpufleet-slurm.lock .venv/bin/python -m tests.slurm.capture 24.11 [--restd]

--restd also starts slurmrestd (JWT) and saves its OpenAPI document's paths.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import socket
import sys
from pathlib import Path

from .harness import SlurmLab, SlurmLabConfig, SlurmLabError
from .roots import VERSIONS, RootMissing

CAPTURED = Path(__file__).resolve().parent / "captured"
DRAINED = "n8"
DRAIN_REASON = "gpufleet: Xid 79 (GPU fell off the bus) on GPU 0"
PORT = 6947  # beside the test labs' 6917/6922
HTTP_METHODS = frozenset({"get", "put", "post", "delete", "patch", "head", "options"})


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over slurmrestd's unix socket."""

    def __init__(self, sock_path: Path) -> None:
        super().__init__("localhost", timeout=30)
        self._sock_path = sock_path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(self._sock_path))


def _http_get_unix(sock_path: Path, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    conn = _UnixHTTPConnection(sock_path)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def capture(version: str, out: Path, *, restd: bool) -> list[Path]:
    """Run the lab, write every capture into `out`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    lab = SlurmLab(SlurmLabConfig(
        lab_dir=Path(f"/tmp/gpufleet-capture-{version}"), version=version, nodes=8, leaves=2,
        ctld_port=PORT, node_port0=PORT + 10183, accounting=True))

    def save(name: str, *argv: str, check: bool = True) -> str:
        proc = lab.run(*argv, check=check)
        text = proc.stdout if proc.returncode == 0 else proc.stdout + proc.stderr
        (out / name).write_text(text)
        written.append(out / name)
        return text

    lab.start(timeout_s=180)
    try:
        save("version.txt", "scontrol", "--version")
        done = lab.sbatch("-N1", "--gres=gpu:1", "-J", "done", "--wrap", "true")
        failed = lab.sbatch("-N1", "--gres=gpu:1", "-J", "failed", "--wrap", "exit 3")
        lab.wait_job_state(done, "COMPLETED", 60)
        lab.wait_job_state(failed, "FAILED", 60)
        running = lab.sbatch("-N2", "--gres=gpu:2", "-J", "running", "--wrap", "sleep 600")
        lab.wait_job_state(running, "RUNNING", 60)
        lab.run("scontrol", "update", f"nodename={DRAINED}", "state=drain",
                f"reason={DRAIN_REASON}")
        json_ok = version != "22.05"  # 22.05's scontrol has no --json
        save("sinfo.json", "sinfo", "--json")
        save("squeue.json", "squeue", "--json")
        save("scontrol-show-nodes.txt", "scontrol", "-o", "show", "nodes")
        save("node-drained.txt", "scontrol", "-o", "show", "node", DRAINED)
        save("job-running.txt", "scontrol", "-o", "show", "job", str(running))
        save("job-completed.txt", "scontrol", "-o", "show", "job", str(done))
        save("job-failed.txt", "scontrol", "-o", "show", "job", str(failed))
        if json_ok:
            save("scontrol-show-nodes.json", "scontrol", "show", "nodes", "--json")
            save("node-drained.json", "scontrol", "show", "node", DRAINED, "--json")
            save("job-running.json", "scontrol", "show", "job", str(running), "--json")
            save("job-completed.json", "scontrol", "show", "job", str(done), "--json")
            save("job-failed.json", "scontrol", "show", "job", str(failed), "--json")
        lab.wait_sacct_ended(done, failed, timeout_s=60)
        save("sacct-finished.json", "sacct", "--json", "-j", f"{done},{failed}")
        save("sacct-finished.txt", "sacct", "-n", "-P", "-j", f"{done},{failed}", "--format",
             "JobID,JobName,State,ExitCode,Start,End,NodeList,AllocTRES")
        if restd:
            lab.start_restd(timeout_s=60)
            token = lab.jwt_token()
            status, body = _http_get_unix(
                lab.rest_socket, "/openapi/v3",
                {"X-SLURM-USER-NAME": "root", "X-SLURM-USER-TOKEN": token})
            if status != 200:
                raise SlurmLabError(f"slurmrestd /openapi/v3 answered {status}: {body[:300]!r}")
            doc = json.loads(body)
            info = doc.get("info", {})
            lines = [f"# openapi {doc.get('openapi')}; info.version {info.get('version')}; "
                     f"info.title {info.get('title')}"]
            for path, ops in sorted(doc.get("paths", {}).items()):
                methods = sorted(k.upper() for k in ops if k in HTTP_METHODS)
                lines.append(f"{' '.join(methods)} {path}")
            (out / "openapi-paths.txt").write_text("\n".join(lines) + "\n")
            written.append(out / "openapi-paths.txt")
    finally:
        lab.stop()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("version", choices=VERSIONS)
    parser.add_argument("--restd", action="store_true", help="also slurmrestd's OpenAPI paths")
    parser.add_argument("--out", type=Path, default=None, help="default captured/<version>")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[capture %(relativeCreated)6.0fms] %(message)s")
    try:
        files = capture(args.version, args.out or CAPTURED / args.version, restd=args.restd)
    except (SlurmLabError, RootMissing) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in files:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
