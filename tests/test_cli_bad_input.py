"""Bad input to every option of every command of both CLIs: an error, never a traceback.

Walks the whole click command tree of `gpufleet` and `gpufleet-agent` and feeds each option
(and argument) values of the wrong type, out of range, empty, huge, not a number, a binary
(non-UTF-8) file, a directory and a missing path. Each answer must be a documented exit code
(0, 1 runtime error, 2 usage error; `gpufleet-agent health` 2 = unhealthy too) with no
traceback. In-process (CliRunner), with PATH emptied so that no Slurm command or sbatch can
run, and the two daemons stopped right where they would start serving. An unreadable file
needs a user that is not root: those cases run the real commands as `nobody`.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result
from gpufleet.agent.cli import main as agent_main
from gpufleet.scheduler.cli.main import main as gpufleet_main

ROOTS = {"gpufleet": gpufleet_main, "gpufleet-agent": agent_main}
# Filled in for required parameters that are not the one under test: plausible, harmless.
REQUIRED = {"node": "n1", "reason": "test", "job_id": "12", "kind": "xid", "gpu": "0",
            "ibnetdiscover": "{empty}", "faults_path": "{tmp}/faults.json", "db": "{tmp}/none.db"}
TIMEOUT_S = 60


def _bad_values(tmp: Path) -> dict[str, str]:
    binary = tmp / "binary.bin"
    binary.write_bytes(b"\xff\xfe\x00\x80 not utf-8 \xc3\x28\n" * 8)
    (tmp / "adir").mkdir(exist_ok=True)
    return {
        "wrong-type": "not-a-value", "negative": "-1", "empty": "", "huge": "9" * 30,
        "nan": "nan", "binary-file": str(binary), "directory": str(tmp / "adir"),
        "missing-path": str(tmp / "no" / "such" / "file"),
    }


def _leaves(cmd: click.Command, path: list[str]) -> Iterator[tuple[list[str], click.Command]]:
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            yield from _leaves(sub, [*path, name])


def _cases() -> list[tuple[str, list[str], str]]:
    """(root, command path, parameter name) for every value-taking parameter."""
    out = []
    for root, cmd in ROOTS.items():
        for path, c in _leaves(cmd, []):
            for p in c.params:
                if p.name in (None, "help") or getattr(p, "is_flag", False) or \
                        getattr(p, "count", False) or p.nargs == -1:
                    continue
                out.append((root, path, p.name))
    return out


CASES = _cases()


def _argv(cmd: click.Command, path: list[str], name: str, value: str, tmp: Path,
          empty: Path) -> list[str]:
    args: list[str] = [*path]
    positional: list[str] = []
    for p in cmd.params:
        fill = REQUIRED.get(p.name or "")
        if p.name == name:
            v = value
        elif p.required and fill is not None:
            v = fill.format(tmp=tmp, empty=empty)
        else:
            continue
        if isinstance(p, click.Argument):
            positional.append(v)
        else:
            args += [p.opts[0], v]
    if path == ["run"]:
        args.append("--once")
    return [*args, "--", *positional] if positional else args


def _invoke(root: str, argv: list[str], env: dict[str, str]) -> Result:
    runner = CliRunner()
    box: dict[str, Result] = {}

    def go() -> None:
        box["r"] = runner.invoke(ROOTS[root], argv, env=env, catch_exceptions=True)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(TIMEOUT_S)
    if "r" not in box:
        pytest.fail(f"{root} {' '.join(argv)}: still running after {TIMEOUT_S} s")
    return box["r"]


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A cwd, an empty PATH, the daemons stopped before they serve."""
    from gpufleet.agent import runner
    from gpufleet.scheduler.service import server

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(server.Controller, "start", lambda self, *a, **k: 0)
    monkeypatch.setattr(server.Controller, "wait", lambda self: None)
    monkeypatch.setattr("signal.signal", lambda *a: None)  # not the main thread here
    monkeypatch.setattr(runner.Agent, "run", lambda self, *a, **k: None, raising=False)
    empty_bin = tmp_path / "empty-bin"
    empty_bin.mkdir()
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    env = {"PATH": str(empty_bin), "HOME": str(tmp_path)}
    env.update({k: "" for k in os.environ if k.startswith("GPUFLEET_")})
    return {"tmp": tmp_path, "env": env, "empty": empty}


def _check(root: str, argv: list[str], result: Result) -> None:
    out = result.output  # stdout and stderr, interleaved
    shown = f"{root} {' '.join(argv)!r}"
    assert "Traceback" not in out, f"{shown}:\n{out}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        pytest.fail(f"{shown}: raised {type(result.exception).__name__}: {result.exception}")
    assert result.exit_code in (0, 1, 2), f"{shown}: exit {result.exit_code}\n{out}"
    if result.exit_code == 2 and "Error:" in out:  # click's usage error: one line says why
        (line,) = [x for x in out.splitlines() if x.startswith("Error:")]
        assert line.strip() != "Error:", f"{shown}: empty error\n{out}"


@pytest.mark.parametrize(("root", "path", "name"), CASES,
                         ids=[f"{r}-{'-'.join(p) or 'main'}-{n}" for r, p, n in CASES])
def test_every_option_answers_bad_values_without_a_traceback(
        root: str, path: list[str], name: str, sandbox: dict[str, Any]) -> None:
    cmd: click.Command = ROOTS[root]
    for part in path:
        assert isinstance(cmd, click.Group)
        cmd = cmd.commands[part]
    for value in _bad_values(sandbox["tmp"]).values():
        argv = _argv(cmd, path, name, value, sandbox["tmp"], sandbox["empty"])
        _check(root, argv, _invoke(root, argv, sandbox["env"]))


def test_demo_profiles_are_the_simulators() -> None:
    from gpufleet.agent.nvml_sim import PROFILES
    from gpufleet.scheduler.cli.demo import DEMO_PROFILES

    assert set(DEMO_PROFILES) == set(PROFILES)


def test_the_walk_covers_both_trees() -> None:
    commands = {(r, tuple(p)) for r, p, _ in CASES}
    assert ("gpufleet", ("controller",)) in commands
    assert ("gpufleet-agent", ("sim", "inject")) in commands
    assert len(CASES) >= 100


@pytest.mark.parametrize(("setting", "message"), [
    (["controller", "--listen", "nope"], "expected HOST:PORT"),
    (["controller", "--listen", "127.0.0.1:99999"], "port must be a number from 1 to 65535"),
    (["controller", "--metrics-listen", "x:y:z"], "expected HOST:PORT"),
    (["controller", "--resume-quiet-s", "nan"], "not a finite number"),
    (["controller", "--unreachable-after-s", "inf"], "inf"),
    (["controller", "--insecure", "--db", ":memory:", "--alertmanager-url", "am:9093"],
     "'am:9093': want http(s)://HOST:PORT"),
    (["controller", "--insecure", "--db", ":memory:", "--alert-webhook-url", "ftp://x/"],
     "--alert-webhook-url"),
    (["events", "--since", "99999999999999999999d"], "goes back past 1970"),
    (["certs", "init", "--days", "99999999"], "99999999"),
])
def test_named_settings_are_refused_with_their_name(setting: list[str], message: str,
                                                    sandbox: dict[str, Any]) -> None:
    result = _invoke("gpufleet", setting, sandbox["env"])
    _check("gpufleet", setting, result)
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output


def test_toml_nan_and_inf_are_refused(sandbox: dict[str, Any]) -> None:
    conf = sandbox["tmp"] / "controller.toml"
    for line, name in (("resume_quiet_s = nan", "resume-quiet-s"),
                       ("unreachable_after_s = inf", "unreachable-after-s")):
        conf.write_text(line + "\n")
        argv = ["--config", str(conf), "controller", "--insecure", "--db", ":memory:"]
        result = _invoke("gpufleet", argv, sandbox["env"])
        _check("gpufleet", argv, result)
        assert result.exit_code == 2 and name in result.output, result.output


def test_agent_settings_are_checked(sandbox: dict[str, Any]) -> None:
    for argv, message in (
        (["run", "--gpu-backend", "simulated", "--sim-profile", "nope", "--once"],
         "sim_profile='nope': unknown"),
        (["sim", "inject", "--faults-path", str(sandbox["tmp"] / "f.json"), "--gpu",
          "99999999999999", "xid", "--xid", "79"], "--gpu"),
        (["sim", "inject", "--faults-path", str(sandbox["tmp"] / "f.json"), "--gpu", "8",
          "xid", "--xid", "79"], "dgx-h100 has GPUs 0-7"),
        (["run", "--controller", "h:0", "--once"], "port must be a number from 1"),
    ):
        result = _invoke("gpufleet-agent", argv, sandbox["env"])
        _check("gpufleet-agent", argv, result)
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (sandbox["tmp"] / "f.json").exists()  # no fault for a GPU that does not exist


@functools.cache
def _nobody_prefix() -> tuple[list[str], str]:
    """(the command prefix, "") or ([], why not): probed once per session, since the probe
    imports the whole command line as nobody."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        return [], "needs root and setpriv to run a command as nobody"
    prefix = [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]
    probe = subprocess.run([*prefix, sys.executable, "-c", "import gpufleet.scheduler.cli.main"],
                           capture_output=True, text=True, timeout=60, check=False, cwd="/")
    if probe.returncode != 0:  # a checkout under a 0700 home: nobody cannot run it at all
        return [], f"nobody cannot run {sys.executable}: {probe.stderr.strip()[-200:]}"
    return prefix, ""


def _as_nobody() -> list[str]:
    prefix, why_not = _nobody_prefix()
    if why_not:
        pytest.skip(why_not)
    return list(prefix)


@pytest.mark.parametrize("argv", [
    ["gpufleet", "--config", "{f}", "events"],
    ["gpufleet", "acct", "reconcile", "--sacct-json", "{f}"],
    ["gpufleet", "topology", "fabric", "--ibnetdiscover", "{f}"],
    ["gpufleet-agent", "run", "--config", "{f}", "--once"],
    ["gpufleet-agent", "sim", "inject", "--faults-path", "{f}", "--gpu", "0", "xid",
     "--xid", "79"],
], ids=["gpufleet-config", "sacct-json", "ibnetdiscover", "agent-config", "faults-path"])
def test_unreadable_files_as_nobody(argv: list[str]) -> None:
    prefix = _as_nobody()
    # outside pytest's 0700 tmp dirs: nobody must reach the directory, not read the file
    work = Path(tempfile.mkdtemp(prefix="gf-cli-nobody-"))
    try:
        work.chmod(0o755)
        secret = work / "secret.toml"
        secret.write_text("x = 1\n")
        secret.chmod(0o600)  # root's: nobody cannot read it
        exe = Path(sys.executable).parent / argv[0]
        cmd = [*prefix, str(exe), *(a.format(f=secret) for a in argv[1:])]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False,
                              cwd=work, env={"PATH": "/usr/bin:/bin", "HOME": str(work)})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = done.stdout + done.stderr
    assert "Traceback" not in out, out
    assert done.returncode in (1, 2), out
    assert any(w in out for w in ("ermission denied", "cannot read", "not readable")), out
