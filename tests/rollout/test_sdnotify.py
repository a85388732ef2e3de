"""sd_notify helpers of both sides, against a real unix datagram socket (path and abstract)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpufleet.rpc.daemon import notify


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        yield sock, str(path)


def test_ready_reaches_a_path_socket(
    path_socket: tuple[socket.socket, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sock, path = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert notify("READY=1") is True
    assert sock.recv(4096) == b"READY=1"


def test_abstract_socket_name_starting_with_at(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"gpufleet-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("STOPPING=1") is True
        assert sock.recv(4096) == b"STOPPING=1"


def test_no_socket_or_dead_socket_is_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert notify("READY=1") is False  # logged, not raised
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")
    assert notify("READY=1") is False


def test_agent_process_sends_ready_then_stopping(
    path_socket: tuple[socket.socket, str], tmp_path: Path
) -> None:
    """`gpufleet-agent run` as systemd would start it (Type=notify): READY=1, and STOPPING=1
    on SIGTERM. No controller is needed to be ready: the agent reconnects on its own."""
    sock, path = path_socket
    env = {**os.environ, "NOTIFY_SOCKET": path}
    agent = subprocess.Popen(
        [sys.executable, "-m", "gpufleet.agent", "run", "--gpu-backend", "simulated",
         "--node-name", "n1", "--state-dir", str(tmp_path / "state"),
         "--controller", "127.0.0.1:9", "--metrics-listen", ""],
        env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        sock.settimeout(30)
        assert sock.recv(4096) == b"READY=1"
        agent.terminate()
        assert sock.recv(4096) == b"STOPPING=1"
        _, err = agent.communicate(timeout=15)
        assert "Traceback" not in err, err
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
