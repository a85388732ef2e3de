"""Layout promises: one `gpufleet` namespace, no bare agent/scheduler/proto package, and the
agent and the controller share only the wire contract."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )
    (whl,) = out.glob("gpufleet-*.whl")
    return whl


def test_wheel_installs_one_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"gpufleet"}, top
    assert "gpufleet/__init__.py" not in names  # PEP 420 namespace shared by three roots
    for must in ("gpufleet/agent/__init__.py", "gpufleet/scheduler/__init__.py",
                 "gpufleet/rpc/v1/fleet_pb2.py", "gpufleet/rpc/v1/fleet_pb2_grpc.pyi",
                 "gpufleet/agent/py.typed"):
        assert must in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry).decode()
    assert "gpufleet-agent = gpufleet.agent.cli:main" in text
    assert "gpufleet = gpufleet.scheduler.cli.entry:main" in text  # execs sbatch, else cli.py
    assert "gpufleet-sbatch-filter = gpufleet.scheduler.cli.sbatch_filter:main" in text
    assert "gpufleet/scheduler/data/cli_filter.lua" in names


def test_agent_extra_has_no_db_or_slurm_client(wheel: Path) -> None:
    meta = next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith("METADATA"))
    lines = zipfile.ZipFile(wheel).read(meta).decode().splitlines()
    agent_reqs = [ln for ln in lines if ln.startswith("Requires-Dist") and "extra == 'agent'" in ln]
    assert agent_reqs
    for forbidden in ("psycopg", "pyslurm", "ClusterShell", "sqlalchemy", "alembic"):
        assert not any(forbidden.lower() in ln.lower() for ln in agent_reqs)


def _imports(root: Path) -> dict[Path, set[str]]:
    out: dict[Path, set[str]] = {}
    for path in root.rglob("*.py"):
        mods: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                mods.add(node.module)
        out[path] = mods
    return out


@pytest.mark.parametrize(
    ("tree", "forbidden"),
    [
        ("agent", ("gpufleet.scheduler", "sqlite3", "ClusterShell", "psycopg", "pyslurm")),
        ("scheduler", ("gpufleet.agent", "pynvml")),
    ],
)
def test_agent_and_scheduler_share_only_the_wire_contract(tree: str, forbidden: tuple) -> None:
    bad = [
        f"{path.relative_to(REPO)} imports {mod}"
        for path, mods in _imports(REPO / tree).items()
        for mod in mods
        if mod.startswith(forbidden)
    ]
    assert bad == []


def test_only_one_module_imports_pynvml() -> None:
    users = [p.name for p, mods in _imports(REPO / "agent").items() if "pynvml" in mods]
    assert users == ["nvml.py"]
