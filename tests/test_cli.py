"""Both programs behave like real CLIs: help, exit codes, errors on stderr, no tracebacks.

`run` starts the real program (a process: its entry point, imports, exit status); `invoke`
runs the same click command in this process (CliRunner) for the cases whose subject is what a
command answers, not the process around it: a process costs ~1 s of CPU to import the
package, and the fast set has to stay fast. An exception that escapes `invoke` fails the test,
as a traceback on the real stderr would.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
from click.testing import CliRunner
from gpufleet.agent.cli import main as agent_main
from gpufleet.scheduler.cli.main import main as gpufleet_main
from gpufleet.scheduler.store import SqliteStore


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    module = "gpufleet.agent" if argv[0] == "gpufleet-agent" else "gpufleet.scheduler"
    return subprocess.run([sys.executable, "-m", module, *argv[1:]], capture_output=True,
                          text=True, timeout=60, env=env, check=False)


@dataclass(frozen=True)
class Answer:
    returncode: int
    stdout: str
    stderr: str


def invoke(*argv: str, env: dict[str, str] | None = None) -> Answer:
    """The command `argv` in-process, answered as `run` answers it; `env` is added to the
    environment for the call."""
    root = agent_main if argv[0] == "gpufleet-agent" else gpufleet_main
    r = CliRunner().invoke(root, list(argv[1:]), env=env, prog_name=argv[0],
                           catch_exceptions=True)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        pytest.fail(f"{' '.join(argv)}: raised {type(r.exception).__name__}: {r.exception}")
    return Answer(r.exit_code, r.stdout, r.stderr)


@pytest.mark.parametrize("prog", ["gpufleet", "gpufleet-agent"])
def test_help_and_version(prog: str) -> None:
    h = run(prog, "--help")
    assert h.returncode == 0 and "Usage:" in h.stdout and h.stderr == ""
    v = run(prog, "--version")
    assert v.returncode == 0 and "0.1.0" in v.stdout


def test_nodes_without_store_is_a_clear_error(tmp_path) -> None:
    missing = tmp_path / "nope.db"
    r = run("gpufleet", "nodes", "--json", "--db", str(missing))
    assert r.returncode == 1
    assert r.stdout == ""
    assert f"no gpufleet store at {missing}" in r.stderr and "Traceback" not in r.stderr
    assert not missing.exists()  # reading never creates a store


def test_nodes_json(tmp_path) -> None:
    db = tmp_path / "state.db"
    s = SqliteStore(db)
    s.upsert_node("n2", "host2", 8, b"", "a", 1000)
    s.upsert_node("n1", "host1", 4, b"", "b", 1000)
    s.close()
    r = invoke("gpufleet", "nodes", "--json", "--db", str(db))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [(n["name"], n["gpus"], n["health"]) for n in doc] == [("n1", 4, "ok"), ("n2", 8, "ok")]
    assert doc[0]["last_seen_age_s"] > 0
    table = invoke("gpufleet", "nodes", "--db", str(db))
    assert table.stdout.splitlines()[0].split()[:3] == ["NODE", "GPUS", "HEALTH"]


def test_db_from_environment(tmp_path) -> None:
    db = tmp_path / "state.db"
    SqliteStore(db).close()
    r = invoke("gpufleet", "nodes", "--json", env={"GPUFLEET_DB": str(db)})
    assert r.returncode == 0 and json.loads(r.stdout) == []


def test_bad_config_file_names_the_file_and_key(tmp_path) -> None:
    cfg = tmp_path / "controller.toml"
    cfg.write_text('lisen = "0.0.0.0:1"\n')
    r = invoke("gpufleet", "--config", str(cfg), "nodes")
    assert r.returncode == 2 and "unknown key(s) lisen" in r.stderr
    cfg.write_text("listen = \n")
    r = invoke("gpufleet", "--config", str(cfg), "nodes")
    assert r.returncode == 2 and "not valid TOML" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--interval-s", "0"], "interval_s=0.0: must be between"),
        (["run", "--controller", "nocolon"], "expected HOST:PORT"),
        (["run", "--gpu-backend", "cuda"], "'cuda' is not one of"),
    ],
)
def test_agent_bad_input(tmp_path, args: list[str], message: str) -> None:
    r = invoke("gpufleet-agent", *args, "--state-dir", str(tmp_path))
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow  # ~5-11 s: keeps the fast set under 3 minutes; CI runs it
def test_agent_once_without_controller_fails_cleanly(tmp_path) -> None:
    r = run("gpufleet-agent", "run", "--once", "--gpu-backend", "simulated",
            "--controller", "127.0.0.1:9", "--state-dir", str(tmp_path))
    assert r.returncode == 2
    assert "did not acknowledge" in r.stderr and "Traceback" not in r.stderr


def test_agent_collect_and_health_shim(tmp_path) -> None:
    r = run("gpufleet-agent", "collect", "--json", "--gpu-backend", "simulated",
            "--sim-profile", "hgx-a100", "--state-dir", str(tmp_path), "--node-name", "gpu01")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["inventory"]["node_name"] == "gpu01"
    assert len(doc["sample"]["gpus"]) == 8
    # read once and print: no health cache, spool or job records left in the state dir
    assert list(tmp_path.iterdir()) == []
    h = run("gpufleet-agent", "health", "--state-dir", str(tmp_path))
    assert h.returncode == 2 and "health.json missing" in h.stderr  # unknown: no agent ran
    none = run("gpufleet-agent", "health", "--state-dir", str(tmp_path / "missing"))
    assert none.returncode == 2 and "is gpufleet-agent running" in none.stderr


@pytest.mark.parametrize(("severity", "age_s", "code"), [
    ("ok", 0, 0), ("warn", 0, 0), ("degraded", 0, 0), ("fatal", 0, 1), ("ok", 3600, 2)])
def test_agent_health_exit_codes(tmp_path, severity: str, age_s: int, code: int) -> None:
    """README: exit 0 ok/warn/degraded, 1 fatal, 2 unknown (missing or stale cache)."""
    (tmp_path / "health.json").write_text(json.dumps({
        "severity": severity, "reason_code": "xid79" if severity == "fatal" else "",
        "evidence": "", "updated_ms": int((time.time() - age_s) * 1000)}))
    h = invoke("gpufleet-agent", "health", "--state-dir", str(tmp_path))
    assert h.returncode == code, h.stdout + h.stderr


def test_demo_without_slurm_shows_the_loop() -> None:
    r = run("gpufleet", "demo", "--nodes", "2", "--fault-node", "n2", "--slurm", "none")
    assert r.returncode == 0, r.stderr
    assert "2 simulated nodes (dgx-h100) reporting" in r.stdout
    assert "drain n2 -> shadow" in r.stdout
    # Xid 79 is a GPU fallen off the bus: the agent may find the GPU gone from NVML before the
    # XID is read (gpu_lost), as tests/faults/test_slurmctld_restart.py accepts too
    assert ("n2        8  fatal    xid79" in r.stdout
            or "n2        8  fatal    gpu_lost: GPU 3" in r.stdout), r.stdout


def test_demo_rejects_an_unknown_fault_node() -> None:
    r = run("gpufleet", "demo", "--nodes", "2", "--fault-node", "n9", "--slurm", "none")
    assert r.returncode == 2 and "'n9' is not one of n1..n2" in r.stderr


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[debounce]\nthermall = 5\n", "debounce.thermall: unknown check"),
        ("[debounce]\nthermal = 0\n", "debounce.thermal=0: must be a whole number >= 1"),
        ('disk_paths = "/"\n', "disk_paths must be a list of strings"),
        ("expected_gpu_count = 8\ninterval = 1\n", "unknown key(s) interval"),
    ],
)
def test_agent_config_file_errors_name_the_key(tmp_path, toml: str, message: str) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(toml)
    r = invoke("gpufleet-agent", "collect", "--config", str(cfg), "--gpu-backend", "simulated",
               "--state-dir", str(tmp_path))
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_flag_beats_environment_beats_file(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('node_name = "from-file"\ngpu_backend = "simulated"\n')
    monkeypatch.delenv("GPUFLEET_AGENT_NODE_NAME", raising=False)
    env = {"GPUFLEET_AGENT_NODE_NAME": "from-env"}
    base = ["gpufleet-agent", "collect", "--json", "--config", str(cfg), "--state-dir",
            str(tmp_path)]
    by_file = json.loads(invoke(*base).stdout)["inventory"]["node_name"]
    by_env = json.loads(invoke(*base, env=env).stdout)["inventory"]["node_name"]
    by_flag = json.loads(invoke(*base, "--node-name", "from-flag", env=env).stdout)
    assert (by_file, by_env, by_flag["inventory"]["node_name"]) == (
        "from-file", "from-env", "from-flag")
