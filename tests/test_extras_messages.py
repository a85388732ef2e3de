"""A command whose extra is missing ends with one line naming the package and the extra(s)
(the venv-per-extra check is tests/test_extras_install.py, slow)."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner
from gpufleet.rpc import extras


@pytest.mark.parametrize(("module", "wanted"), [
    ("psycopg", ["controller"]), ("psycopg.conninfo", ["controller"]),
    ("cryptography.x509", ["controller"]), ("ClusterShell.NodeSet", ["client", "controller"]),
    ("psutil", ["agent"]), ("pynvml", ["agent"]), ("prometheus_client", ["agent", "controller"]),
    ("numpy", []),
])
def test_extras_for_reads_the_installed_metadata(module: str, wanted: list[str]) -> None:
    assert extras.extras_for(module) == wanted


def _group(missing: str) -> click.Group:
    @click.group(cls=extras.ExtrasGroup)
    def cli() -> None:
        pass

    @cli.command()
    def work() -> None:
        raise ModuleNotFoundError(f"No module named '{missing}'", name=missing)

    return cli


def test_missing_extra_is_one_line_not_a_traceback() -> None:
    r = CliRunner().invoke(_group("psycopg"), ["work"], prog_name="gpufleet")
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [
        "Error: `gpufleet work` needs the Python package psycopg, which this install lacks: "
        "pip install 'gpufleet[controller]'"]


def test_a_module_no_extra_brings_is_a_real_error() -> None:
    r = CliRunner().invoke(_group("numpy"), ["work"], prog_name="gpufleet")
    assert isinstance(r.exception, ModuleNotFoundError)


def test_stand_in_command_says_the_extra_in_help_and_when_run() -> None:
    cmd = extras.unavailable("certs", ModuleNotFoundError("x", name="cryptography"),
                             "The cluster CA")
    r = CliRunner().invoke(cmd, ["init", "--ca-dir", "x"])
    assert r.exit_code == 1 and "pip install 'gpufleet[controller]'" in r.output
    assert "not installed" in (cmd.short_help or "")
