"""The docs cannot go stale: every shell block of README.md and docs/*.md is run or checked.

The convention (docs/README.md repeats it):
- ```sh          a block of commands run here AS WRITTEN by this test, in a scratch folder with
                 .venv/bin first on PATH and GPUFLEET_CA_DIR pointing into it (nothing lands
                 in /etc); every line must exit 0.
- ```sh example  commands that need what a test cannot have (a cluster, a host named head1,
                 root, your train.sh): shown, not run. Each `gpufleet` / `gpufleet-agent` line
                 is parsed by the real command-line interface, so a renamed command or option
                 fails here; `...` and `[--optional]` are placeholders. `pytest -m EXPR` lines
                 may use only registered markers; `bash FILE` / `python3 FILE` lines name files
                 that exist.
- anything else (```text for output, ```conf, ```toml, ```json, ```python) is not shell; a
  fence without a language is refused, so a command block cannot hide untagged.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
from gpufleet.agent.cli import main as agent_cli
from gpufleet.scheduler.cli.main import main as fleet_cli

from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.M | re.S)
CLIS: dict[str, click.Command] = {"gpufleet": fleet_cli, "gpufleet-agent": agent_cli}


def _blocks() -> list[tuple[str, int, str, str]]:
    """(file, line, tag, body) of every fenced block."""
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            out.append((str(path.relative_to(REPO)), line, m.group(1).strip(), m.group(2)))
    return out


BLOCKS = _blocks()


def _commands(body: str) -> list[str]:
    """Logical command lines: continuations joined, comment-only lines dropped."""
    lines, cur = [], ""
    for raw in body.splitlines():
        cur += raw.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        if cur.strip() and not cur.lstrip().startswith("#"):
            lines.append(cur.strip())
        cur = ""
    return lines


def test_every_block_has_a_language() -> None:
    bare = [f"{f}:{n}" for f, n, tag, _ in BLOCKS if not tag]
    assert bare == [], f"fenced blocks without a language (```sh, ```sh example, ```text): {bare}"
    assert sum(tag.startswith("sh") for *_, tag, _ in BLOCKS) >= 10  # the docs were read


def _placeholders_out(argv: list[str]) -> list[str]:
    out: list[str] = []
    for tok in argv:
        if tok == "...":  # an option's value (kept as a word), or whatever else you add
            if out and out[-1].startswith("--"):
                out.append("PLACEHOLDER")
            continue
        word = tok.removeprefix("[")
        out.append(word[:-1] if word.endswith("]") and "[" not in word else word)
    return out


def _parse(prog: str, argv: list[str], where: str) -> None:
    """Parse argv with the real CLI (options, commands, choices); run nothing."""
    cmd = CLIS[prog]
    try:
        ctx = cmd.make_context(prog, list(argv))
        while isinstance(cmd, click.Group):
            rest = [*ctx._protected_args, *ctx.args]  # click keeps them there
            if not rest:
                break
            name, sub, rest = cmd.resolve_command(ctx, rest)
            assert sub is not None and name is not None, f"{where}: no command {rest[0]!r}"
            ctx = sub.make_context(name, rest, parent=ctx)
            cmd = sub
    except click.MissingParameter:
        pass  # a placeholder (`...`) stood for it
    except click.BadParameter as e:
        if not re.search(r"does not exist|No such file", str(e)):  # the reader's file
            pytest.fail(f"{where}: `{shlex.join([prog, *argv])}`: {e.format_message()}")
    except click.UsageError as e:
        pytest.fail(f"{where}: `{shlex.join([prog, *argv])}`: {e.format_message()}")


def _markers() -> set[str]:
    text = (REPO / "pyproject.toml").read_text()
    block = text.split("markers = [", 1)[1].split("]\n", 1)[0]
    return set(re.findall(r'"(\w+):', block))


@pytest.mark.parametrize(("where", "body"), [
    (f"{f}:{n}", body) for f, n, tag, body in BLOCKS if tag == "sh example"])
def test_example_commands_parse(where: str, body: str) -> None:
    markers = _markers()
    for line in _commands(body):
        argv = _placeholders_out(shlex.split(line, comments=True))
        env_free = [a for a in argv if not re.match(r"^[A-Z_]+=", a)]
        if not env_free:
            continue
        prog = Path(env_free[0]).name
        if prog in CLIS:
            _parse(prog, env_free[1:], where)
        elif prog == "pytest":
            if "-m" in env_free:
                expr = env_free[env_free.index("-m") + 1]
                used = set(re.findall(r"\w+", expr)) - {"not", "and", "or"}
                assert used <= markers, f"{where}: unknown marker(s) {used - markers}"
        elif prog in ("bash", "python3", "python") and len(env_free) > 1 \
                and not env_free[1].startswith("-"):
            assert (REPO / env_free[1]).exists(), f"{where}: {env_free[1]} does not exist"


@pytest.mark.parametrize(("where", "body"), [
    (f"{f}:{n}", body) for f, n, tag, body in BLOCKS if tag == "sh"])
def test_runnable_blocks_run_as_written(where: str, body: str, tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
           "GPUFLEET_CA_DIR": str(tmp_path / "ca"), "HOME": str(tmp_path)}
    for line in _commands(body):
        # run only in the scratch folder: a block naming system folders must be `sh example`
        assert not re.search(r"(^|\s|=)/(etc|var|opt|usr)/", line), f"{where}: `{line}`"
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", line], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == 0, f"{where}: `{line}` exited {r.returncode}:\n{r.stderr[-2000:]}"
        assert "Traceback" not in r.stdout + r.stderr, f"{where}: `{line}`"
