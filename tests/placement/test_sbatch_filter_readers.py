"""The sbatch filter's small JSON and TOML readers (sbatch_filter.read_json / read_toml) give
what json and tomllib give, or hand the text to them: they exist only to keep json's and
tomllib's imports out of every submission."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
from gpufleet.scheduler.cli import sbatch_filter
from gpufleet.scheduler.cli.entry import filter_command
from hypothesis import given
from hypothesis import strategies as st

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(_json_values, st.booleans())
def test_read_json_equals_json(value: object, pretty: bool) -> None:
    text = json.dumps(value, indent=1 if pretty else None, ensure_ascii=pretty)
    assert sbatch_filter.read_json(text) == json.loads(text)


@pytest.mark.parametrize("text", ["", "{", '{"a":}', '{"a":1,}', "[1 2]", "01", '"\\x"', "{} x",
                                  '"a\nb"', "  "])
def test_read_json_bad_input_is_json_error(text: str) -> None:
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    with pytest.raises(json.JSONDecodeError):
        sbatch_filter.read_json(text)


def test_read_json_slurm_options() -> None:
    text = ('{"nodes":"1","gres":"gres:gpu:1","wrap":"echo \\"hi\\"\\t\\u00e9","argv":[],'
            '"spank":{},"ignore-pbs":"unset","x":null}')
    assert sbatch_filter.read_json(text) == json.loads(text)


@pytest.mark.parametrize("text", [
    'controller = "head1:50051"\ninsecure = true\n',
    '# c\ncontroller = "h:1" # after\n\npin_release_s = 60\ninsecure=false\n',
    'place_timeout_s = 1.5\n',                 # a float: tomllib's
    'controller = "a\\"b"\n',                  # an escape: tomllib's
    '[table]\nx = 1\n',                        # a table: tomllib's
    "tls_ca = '/etc/ca.pem'\n",                # a literal string: tomllib's
    'a.b = 1\n',                                # a dotted key: tomllib's
])
def test_read_toml_equals_tomllib(text: str) -> None:
    assert sbatch_filter.read_toml(text.encode()) == tomllib.loads(text)


@pytest.mark.parametrize("text", ['a = 1\na = 2\n', 'a = 007\n', 'a = "x" y\n', 'a = \n',
                                  'a = "unterminated\n', "= 1\n", 'a = "\x01"\n'])
def test_read_toml_bad_input_is_tomllib_error(text: str) -> None:
    with pytest.raises(tomllib.TOMLDecodeError):
        tomllib.loads(text)
    with pytest.raises(tomllib.TOMLDecodeError):
        sbatch_filter.read_toml(text.encode())


def test_run_quiet() -> None:
    rc, out, err = sbatch_filter.run_quiet(["sh", "-c", "echo out; echo err >&2; exit 3"], 5)
    assert (rc, out, err) == (3, "out\n", "err\n")
    with pytest.raises(TimeoutError):
        sbatch_filter.run_quiet(["sleep", "5"], 0.2)
    with pytest.raises(FileNotFoundError):
        sbatch_filter.run_quiet(["/nonexistent/munge"], 1)


def test_fast_helper_imports_no_heavy_module(tmp_path: Path) -> None:
    """The command `gpufleet sbatch` hands cli_filter.lua (python -I -S on the file) runs as
    far as the call with a controller configured, importing none of json, re, enum, typing,
    subprocess, socket, tomllib (-X importtime names every module imported)."""
    conf = tmp_path / "client.toml"
    conf.write_text('controller = "127.0.0.1:1"\ninsecure = true\n')
    argv = shlex.split(filter_command())
    assert argv[1:3] == ["-I", "-S"]
    p = subprocess.run([argv[0], "-X", "importtime", *argv[1:], "place", "0",
                        '{"nodes":"1","ignore-pbs":"unset","wrap":"true"}'],
                       capture_output=True, text=True, check=False,
                       env={"GPUFLEET_CLIENT_CONFIG": str(conf), "GPUFLEET_FILTER_VERBOSE": "1",
                            "PATH": "/usr/bin:/bin"})
    # as far as the call: the controller is not there (a host with munged), or, where no
    # munged answers (the trixie root's Python in CI), the credential just before the call
    reached = re.search(r"no placement \((controller 127\.0\.0\.1:1|.*munge)", p.stderr)
    assert reached, p.stderr[-500:]
    imported = {line.rsplit("|", 1)[1].strip() for line in p.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "gpufleet.scheduler.service.placecall" in imported
    heavy = {"json", "re", "enum", "typing", "subprocess", "socket", "tomllib", "collections"}
    assert not imported & heavy
