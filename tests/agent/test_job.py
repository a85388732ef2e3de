"""The job-side checkpoint helper: atomic publish, torn checkpoints, signals, registration."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpufleet.agent import job
from gpufleet.agent.jobsocket import JobSocketServer, Registration

from tests.conftest import REPO


def _python(code: str, env: dict[str, str] | None = None, **kw: object) -> subprocess.Popen[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-c", textwrap.dedent(code)], env=full_env, cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw,
    )


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: unix socket paths must fit in 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="gfj") as d:
        yield Path(d)


@pytest.fixture(autouse=True)
def _no_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    # keep tests from talking to a real agent on this machine, and outside a Slurm job
    monkeypatch.setenv(job.ENV_AGENT_SOCKET, "")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv(job.ENV_CKPT_DIR, raising=False)
    monkeypatch.delenv(job.ENV_CKPT_KEEP, raising=False)
    monkeypatch.setattr(job, "_register_warned", False)


# ---------------------------------------------------------------- import


def test_imports_without_heavy_dependencies() -> None:
    blocked = ["grpc", "pynvml", "psutil", "prometheus_client", "google.protobuf", "click"]
    p = _python(f"""
        import sys
        for name in {blocked!r}:
            sys.modules[name] = None   # any import of it now raises ImportError
        from gpufleet.agent import job
        assert job.EXIT_DO_NOT_REQUEUE == 93
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in
                        ("grpc", "pynvml", "psutil", "prometheus_client", "google", "click")
                        and sys.modules[m] is not None)
        print("loaded:", loaded)
    """)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert out.strip() == "loaded: []"


# ---------------------------------------------------------------- save / latest


def test_save_bytes_publishes_manifest_with_size_and_checksum(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    blob = os.urandom(100_000)
    ckpt = job.save(tmp_path, 7, blob)
    assert ckpt.path == tmp_path / "step-7"
    assert ckpt.read_bytes() == blob
    manifest = json.loads((ckpt.path / job.MANIFEST_NAME).read_text())
    import hashlib
    assert manifest["step"] == 7
    assert manifest["job_id"] == "4242"
    assert manifest["restart_count"] == 2
    assert manifest["files"] == [{"name": "checkpoint.bin", "size_bytes": 100_000,
                                  "sha256": hashlib.sha256(blob).hexdigest()}]
    assert abs(manifest["time_ms"] - time.time() * 1000) < 60_000
    # nothing left behind but the checkpoint itself
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-7"]
    assert sorted(p.name for p in ckpt.path.iterdir()) == ["checkpoint.bin", job.MANIFEST_NAME]
    assert job.latest(tmp_path) == ckpt


def test_writer_fills_a_staging_dir_like_frameworks_do(tmp_path) -> None:
    seen: list[Path] = []

    def write(staging: Path) -> None:
        seen.append(staging)
        assert staging.parent == tmp_path and staging.name != "step-3"  # not the final name
        assert list(staging.iterdir()) == []
        (staging / "model.pt").write_bytes(b"m" * 1000)
        (staging / "optim").mkdir()
        (staging / "optim" / "rank0.pt").write_bytes(b"o" * 10)

    ckpt = job.save(tmp_path, 3, write)
    assert {(f.name, f.size_bytes) for f in ckpt.files} == {("model.pt", 1000),
                                                           ("optim/rank0.pt", 10)}
    assert not seen[0].exists()
    assert job.latest(tmp_path) == ckpt
    assert ckpt.file("optim/rank0.pt").read_bytes() == b"o" * 10


def test_mapping_of_files_and_newest_wins(tmp_path) -> None:
    job.save(tmp_path, 1, {"a.bin": b"1"})
    job.save(tmp_path, 10, {"a.bin": b"10", "sub/b.bin": b"b"})
    job.save(tmp_path, 2, {"a.bin": b"2"})  # lower step saved later: step order decides
    found = job.latest(tmp_path)
    assert found is not None and found.step == 10
    assert found.read_bytes("sub/b.bin") == b"b"


def test_latest_of_empty_or_missing_dir_is_none(tmp_path) -> None:
    assert job.latest(tmp_path) is None
    assert job.latest(tmp_path / "nope") is None


def test_env_dir_is_the_default(tmp_path, monkeypatch) -> None:
    with pytest.raises(job.CheckpointError, match="GPUFLEET_CKPT_DIR"):
        job.save(None, 1, b"x")
    monkeypatch.setenv(job.ENV_CKPT_DIR, str(tmp_path / "ck"))
    job.save(None, 1, b"x")
    found = job.latest()
    assert found is not None and found.path == tmp_path / "ck" / "step-1"


def test_saving_a_step_again_replaces_it(tmp_path) -> None:
    job.save(tmp_path, 5, {"old.bin": b"old"})
    ckpt = job.save(tmp_path, 5, {"new.bin": b"new"})
    assert [f.name for f in ckpt.files] == ["new.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-5"]
    assert sorted(p.name for p in ckpt.path.iterdir()) == [job.MANIFEST_NAME, "new.bin"]


@pytest.mark.parametrize(("data", "error"), [
    ({"../evil": b"x"}, "plain relative path"),
    ({"/etc/passwd": b"x"}, "plain relative path"),
    ({job.MANIFEST_NAME: b"x"}, "reserved"),
    (lambda d: None, "wrote no files"),
    (lambda d: (d / job.MANIFEST_NAME).write_text("{}"), "reserves"),
    (42, "expected bytes"),
])
def test_bad_data_is_refused_and_leaves_nothing(tmp_path, data, error) -> None:
    job.save(tmp_path, 1, b"good")
    with pytest.raises(job.CheckpointError, match=error):
        job.save(tmp_path, 2, data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]


@pytest.mark.parametrize("step", [-1, 1.5, True, "3"])
def test_bad_step_is_refused(tmp_path, step) -> None:
    with pytest.raises(job.CheckpointError, match="step="):
        job.save(tmp_path, step, b"x")


def test_writer_exception_propagates_and_cleans_staging(tmp_path) -> None:
    def write(d: Path) -> None:
        (d / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        job.save(tmp_path, 1, write)
    assert list(tmp_path.iterdir()) == []


def _damage_truncate(ckpt: job.Checkpoint) -> None:
    f = ckpt.file("model.pt")
    f.write_bytes(f.read_bytes()[:-1])


def _damage_flip(ckpt: job.Checkpoint) -> None:
    f = ckpt.file("model.pt")
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    f.write_bytes(bytes(data))


def _damage_manifest_missing(ckpt: job.Checkpoint) -> None:
    # what a kill after the directory rename and before the manifest leaves
    (ckpt.path / job.MANIFEST_NAME).unlink()


def _damage_manifest_garbage(ckpt: job.Checkpoint) -> None:
    (ckpt.path / job.MANIFEST_NAME).write_text('{"step": 2, "fil')


def _damage_file_missing(ckpt: job.Checkpoint) -> None:
    ckpt.file("model.pt").unlink()


def _damage_manifest_escapes(ckpt: job.Checkpoint) -> None:
    path = ckpt.path / job.MANIFEST_NAME
    doc = json.loads(path.read_text())
    doc["files"][0]["name"] = "../step-1/model.pt"
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(("damage", "reason"), [
    (_damage_truncate, "truncated"),
    (_damage_flip, "sha256 does not match"),
    (_damage_manifest_missing, "manifest missing"),
    (_damage_manifest_garbage, "manifest unreadable"),
    (_damage_file_missing, "missing"),
    (_damage_manifest_escapes, "manifest malformed"),
])
def test_torn_checkpoint_is_skipped_with_reason(tmp_path, caplog, damage, reason) -> None:
    good = job.save(tmp_path, 1, {"model.pt": os.urandom(5000)})
    bad = job.save(tmp_path, 2, {"model.pt": os.urandom(5000)})
    damage(bad)
    with caplog.at_level(logging.WARNING, logger="gpufleet.agent.job"):
        assert job.latest(tmp_path) == good
    assert any(str(bad.path) in r.getMessage() and reason in r.getMessage()
               for r in caplog.records), caplog.text


def test_checkpoint_killed_mid_write_is_ignored(tmp_path) -> None:
    """A real process, SIGKILLed while it writes a large checkpoint."""
    p = _python(f"""
        import sys, time
        from pathlib import Path
        from gpufleet.agent import job
        job.save({str(tmp_path)!r}, 100, {{"model.bin": b"complete" * 1000}})

        def write(d: Path) -> None:
            with (d / "model.bin").open("wb") as f:
                for i in range(2000):          # up to 2 GB: never finishes before the kill
                    f.write(b"\\xab" * (1 << 20))
                    if i == 8:
                        f.flush()
                        print("writing", flush=True)
                    time.sleep(0.002)

        job.save({str(tmp_path)!r}, 200, write)
        print("finished", flush=True)
    """)
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.strip() == "writing", p.stderr.read() if p.stderr else ""
    time.sleep(0.1)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=10)
    assert p.returncode == -signal.SIGKILL
    leftovers = [x for x in tmp_path.iterdir() if x.name != "step-100"]
    assert leftovers and all(x.name.endswith(".gpufleet-tmp") for x in leftovers)
    assert any(f.stat().st_size >= 9 << 20 for x in leftovers for f in x.iterdir())
    found = job.latest(tmp_path)
    assert found is not None and found.step == 100
    assert found.read_bytes("model.bin") == b"complete" * 1000
    # the next save from a resumed job publishes over the wreck; a young staging dir is kept
    # (it might be another process's save in progress)
    job.save(tmp_path, 200, {"model.bin": b"again"}, keep=1)
    found = job.latest(tmp_path)
    assert found is not None and found.step == 200
    assert not (tmp_path / "step-100").exists()


def test_retention_keeps_newest_complete(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(job.ENV_CKPT_KEEP, "2")
    for step in (1, 2, 3):
        job.save(tmp_path, step, b"x")
    bad = job.save(tmp_path, 4, b"x")
    (bad.path / job.MANIFEST_NAME).unlink()  # torn, newest
    job.save(tmp_path, 5, b"x")
    # 5 and 3 kept; 4 torn and older than the newest kept: removed; 1, 2 beyond keep
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-3", "step-5"]
    with pytest.raises(job.CheckpointError, match="keep=0"):
        job.save(tmp_path, 6, b"x", keep=0)


def test_prune_leaves_a_torn_save_newer_than_everything(tmp_path) -> None:
    job.save(tmp_path, 1, b"x")
    (tmp_path / "step-9").mkdir()  # someone's save in progress, manifest not yet written
    assert job.prune(tmp_path, 1) == []
    assert (tmp_path / "step-9").exists()


# ---------------------------------------------------------------- signals


_SIGNAL_SCRIPT = """
    import os, signal, sys, time
    from gpufleet.agent import job
    chained = []
    signal.signal(signal.{sig}, lambda s, f: chained.append(s))   # the job's own handler
    job.install()
    print("ready", flush=True)
    deadline = time.monotonic() + 20
    while not job.checkpoint_requested() and time.monotonic() < deadline:
        time.sleep(0.01)
    print("requested", job.checkpoint_requested(), "chained", chained == [signal.{sig}],
          flush=True)
"""


@pytest.mark.parametrize(("env_value", "sig"), [
    (None, "SIGUSR1"), ("USR2", "SIGUSR2"), ("SIGUSR2", "SIGUSR2"), ("10", "SIGUSR1"),
])
def test_real_signal_sets_request_and_chains(env_value, sig) -> None:
    env = {job.ENV_CKPT_SIGNAL: env_value} if env_value else {}
    p = _python(_SIGNAL_SCRIPT.format(sig=sig), env=env)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    os.kill(p.pid, getattr(signal, sig))
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert out.strip() == "requested True chained True"


def test_before_the_signal_nothing_is_requested_and_default_action_not_taken() -> None:
    p = _python("""
        import os, signal
        from gpufleet.agent import job
        assert job.checkpoint_requested() is False       # installs lazily
        os.kill(os.getpid(), signal.SIGUSR1)              # SIG_DFL would kill us here
        assert job.checkpoint_requested() is True
        job.clear_request()
        assert job.checkpoint_requested() is False
        print("alive")
    """)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert out.strip() == "alive"


def test_threads_need_install_from_main_first() -> None:
    p = _python("""
        import os, signal, threading
        from gpufleet.agent import job
        errors = []
        def early():
            try:
                job.checkpoint_requested()
            except RuntimeError as e:
                errors.append(str(e))
        t = threading.Thread(target=early); t.start(); t.join()
        assert errors and "main thread" in errors[0], errors
        job.install()
        seen = []
        t = threading.Thread(target=lambda: seen.append(job.checkpoint_requested()))
        os.kill(os.getpid(), signal.SIGUSR1)
        t.start(); t.join()
        print(seen)
    """)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert out.strip() == "[True]"


def test_bad_signal_name_names_the_variable(monkeypatch) -> None:
    monkeypatch.setenv(job.ENV_CKPT_SIGNAL, "USR9")
    with pytest.raises(job.CheckpointError, match="GPUFLEET_CKPT_SIGNAL='USR9'"):
        job.signal_from_env()


def test_restart_count(monkeypatch) -> None:
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert job.restart_count() == 0
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    assert job.restart_count() == 3
    monkeypatch.setenv("SLURM_RESTART_COUNT", "x")
    with pytest.raises(job.CheckpointError, match="SLURM_RESTART_COUNT"):
        job.restart_count()


# ---------------------------------------------------------------- registration


def test_save_registers_with_a_real_socket_server(tmp_path, short_dir, monkeypatch) -> None:
    got: list[Registration] = []
    server = JobSocketServer(short_dir / "job.sock", got.append)
    server.start()
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "777")
        monkeypatch.setenv(job.ENV_AGENT_SOCKET, str(short_dir / "job.sock"))
        ckpt = job.save(tmp_path, 12, b"weights")
    finally:
        server.stop()
    assert len(got) == 1
    reg = got[0]
    assert (reg.job_id, reg.step, reg.path, reg.time_ms) == (
        "777", 12, str(ckpt.path.resolve()), ckpt.time_ms)
    assert reg.uid == os.getuid() and reg.pid == os.getpid()
    assert not (short_dir / "job.sock").exists()


def test_save_succeeds_when_the_agent_is_away_and_says_so_once(
        tmp_path, short_dir, monkeypatch, caplog) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv(job.ENV_AGENT_SOCKET, str(short_dir / "nobody.sock"))
    with caplog.at_level(logging.WARNING, logger="gpufleet.agent.job"):
        t0 = time.monotonic()
        job.save(tmp_path, 1, b"x")
        job.save(tmp_path, 2, b"x")
        elapsed_s = time.monotonic() - t0
    found = job.latest(tmp_path)
    assert found is not None and found.step == 2
    warnings = [r for r in caplog.records if "not told" in r.getMessage()]
    assert len(warnings) == 1
    assert elapsed_s < 2.0


def test_registration_refused_by_agent_raises_from_register(tmp_path, short_dir,
                                                            monkeypatch) -> None:
    def refuse(reg: Registration) -> None:
        raise RuntimeError("store down")

    server = JobSocketServer(short_dir / "job.sock", refuse)
    server.start()
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "5")
        ckpt = job.save(tmp_path, 1, b"x", register=False)
        with pytest.raises(job.CheckpointError, match=r"refused.*RuntimeError"):
            job.register(ckpt, str(short_dir / "job.sock"))
    finally:
        server.stop()


def test_no_registration_outside_slurm(tmp_path, short_dir) -> None:
    got: list[Registration] = []
    server = JobSocketServer(short_dir / "job.sock", got.append)
    server.start()
    try:
        ckpt = job.save(tmp_path, 1, b"x", socket_path=str(short_dir / "job.sock"))
        assert job.register(ckpt, str(short_dir / "job.sock")) is False
    finally:
        server.stop()
    assert got == []


# ---------------------------------------------------------------- the example job


def _example(ckpt: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "recovery_job.py"), "--ckpt-dir", str(ckpt),
         *args], env={**os.environ, job.ENV_AGENT_SOCKET: ""}, cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_example_job_resumes_from_its_last_complete_checkpoint(tmp_path) -> None:
    args = ("--steps", "400", "--step-time-s", "0.005", "--ckpt-every-s", "0.3")
    first = _example(tmp_path, *args, "--pad-bytes", str(4 << 20))
    assert first.stdout is not None
    assert first.stdout.readline().startswith("recovery-job start resumed_from_step=-1 ")
    saved = [int(first.stdout.readline().split("step=")[1].split()[0]) for _ in range(2)]
    os.kill(first.pid, signal.SIGUSR1)  # asks for a checkpoint now
    line = first.stdout.readline()
    assert line.startswith("recovery-job checkpoint"), line
    saved.append(int(line.split("step=")[1].split()[0]))
    os.kill(first.pid, signal.SIGKILL)  # the node dies
    first.wait(timeout=10)
    newest = job.latest(tmp_path)
    assert newest is not None and newest.step >= saved[-1]

    second = _example(tmp_path, *args)
    out, err = second.communicate(timeout=60)
    assert second.returncode == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"recovery-job start resumed_from_step={newest.step} ")
    w, b = (float(x.split("=")[1]) for x in lines[-1].split()[-2:])
    assert lines[-1].startswith("recovery-job done step=400")
    assert abs(w - 3.0) < 0.05 and abs(b - 2.0) < 0.05


def test_example_job_gives_up_with_do_not_requeue(tmp_path) -> None:
    p = _example(tmp_path, "--steps", "100", "--step-time-s", "0", "--give-up-at-step", "10")
    _out, err = p.communicate(timeout=30)
    assert p.returncode == job.EXIT_DO_NOT_REQUEUE == 93, err
