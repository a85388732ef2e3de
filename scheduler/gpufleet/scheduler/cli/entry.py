"""The `gpufleet` command's entry point: `gpufleet sbatch ...` becomes the real sbatch at once
(no CLI framework, no store, no gRPC imported: it costs a Python start and an exec); every
other command goes to cli.py. `launcher()` is the `gpufleet` the login-node role installs: a
shell script that is plain sbatch when placement is off and otherwise starts this module in
Python without site (a bare Python start and an exec).

It must never import anything at module level but os and sys (loaded by every Python start).
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing and collections.abc cost 6-30 ms to import; mypy reads the name
if TYPE_CHECKING:
    from collections.abc import MutableMapping, Sequence

USAGE = """\
usage: gpufleet sbatch [--gpufleet-ckpt DIR] [--gpufleet-no-place] [--gpufleet-verbose]
                       [--gpufleet-controller HOST:PORT] SBATCH-ARGS...
Runs sbatch with SBATCH-ARGS unchanged; gpufleet's placement is added inside sbatch by
Slurm's cli_filter/lua plugin (docs/placement.md). The gpufleet options come first.
  --gpufleet-ckpt DIR        --requeue, checkpoint signal, GPUFLEET_CKPT_DIR=DIR for the job
  --gpufleet-no-place        no placement (plain sbatch)
  --gpufleet-verbose         print the placement and why on stderr
  --gpufleet-controller A    ask this controller (default: /etc/gpufleet/client.toml)
"""


# = sbatch_filter.CLIENT_CONFIG (not imported: that module is the helper's, not the wrapper's)
CLIENT_CONFIG = "/etc/gpufleet/client.toml"


# launcher()'s script. Its checks are sbatch_argv's and controller_configured's for these two
# cases; anything else (a checkpoint, another gpufleet option, no sbatch on PATH: Python's
# one-line error) goes to Python.
_LAUNCHER = """#!/bin/sh
# gpufleet (gpufleet.scheduler.cli.entry.launcher): placement off is sbatch
# from the shell; everything else is gpufleet's entry in Python without site
if [ "$1" = sbatch ] && [ -z "$GPUFLEET_CKPT_DIR" ] && command -v sbatch >/dev/null; then
  if [ "$2" = --gpufleet-no-place ]; then
    case "$3" in --gpufleet-*) ;; *) shift 2; GPUFLEET_PLACE=0 exec sbatch "$@" ;; esac
  elif [ -z "$GPUFLEET_CONTROLLER" ] && [ ! -e "${GPUFLEET_CLIENT_CONFIG:-@CONFIG@}" ]; then
    case "$2" in --gpufleet-*) ;; *) shift; GPUFLEET_PLACE=0 exec sbatch "$@" ;; esac
  fi
fi
exec @PYTHON@ -I -S -c @CODE@ "$@"
"""


class UsageError(Exception):
    pass


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"  # shlex.quote without importing re


def filter_command() -> str:
    """How cli_filter.lua runs the placement helper of this installation: this Python with
    -I -S on sbatch_filter.py's file. The helper needs only the standard library and its own
    package (it finds that from its file), and skipping site (the venv's .pth files) and
    the console script's imports is 15-30 ms less on every submission (bench/README.md)."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sbatch_filter.py")
    if os.path.isfile(script) and sys.executable:
        return f"{_sh_quote(sys.executable)} -I -S {_sh_quote(script)}"
    here = os.path.join(os.path.dirname(os.path.abspath(sys.argv[0])), "gpufleet-sbatch-filter")
    if os.access(here, os.X_OK):
        return here
    for d in os.environ.get("PATH", "").split(os.pathsep):
        found = os.path.join(d, "gpufleet-sbatch-filter")
        if d and os.access(found, os.X_OK):
            return found
    return f"{sys.executable} -m gpufleet.scheduler.cli.sbatch_filter"


def controller_configured(env: MutableMapping[str, str]) -> bool:
    """Whether the helper could find a controller: GPUFLEET_CONTROLLER, or a client config
    file there (what it says is the helper's to read). With neither, cli_filter.lua need not
    start the helper at all: placement is off, as the helper would find."""
    if env.get("GPUFLEET_CONTROLLER"):
        return True
    return os.path.exists(env.get("GPUFLEET_CLIENT_CONFIG") or CLIENT_CONFIG)


def launcher(python: str | None = None) -> str:
    """The text of the `gpufleet` command the login-node role installs (gpufleet_login), a
    POSIX shell script. With placement off (no controller configured, or
    `--gpufleet-no-place` as the only gpufleet option) `gpufleet sbatch` is sbatch exec'd by
    the shell: no Python starts, so it costs what plain sbatch costs. Everything else runs
    this module's main() in `python` (this one by default) with -I -S: no site, no .pth
    files, this package's root first on sys.path; `gpufleet sbatch` then execs sbatch having
    imported nothing but this module, other commands load site themselves (main).
    bench/sbatch_overhead.py times it."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))  # the directory holding gpufleet/scheduler
    code = (f"import sys; sys.argv[0] = 'gpufleet'; sys.path.insert(0, {root!r}); "
            "from gpufleet.scheduler.cli.entry import main; main()")
    return (_LAUNCHER.replace("@CONFIG@", CLIENT_CONFIG)
            .replace("@PYTHON@", _sh_quote(python or sys.executable))
            .replace("@CODE@", _sh_quote(code)))


def sbatch_argv(args: Sequence[str], env: MutableMapping[str, str],
                test_only: bool = False) -> list[str]:
    """The sbatch command line (the user's arguments unchanged) and, in env, what tells
    cli_filter.lua to place. gpufleet's own options are read only before the first other
    argument, so no sbatch argument is ever taken for one."""
    rest = list(args)
    place = True
    while rest and rest[0].startswith("--gpufleet-"):
        name, eq, value = rest.pop(0).partition("=")
        if name in {"--gpufleet-ckpt", "--gpufleet-controller"} and not eq:
            if not rest:
                raise UsageError(f"{name} needs a value")
            value = rest.pop(0)
        if name == "--gpufleet-ckpt":
            env["GPUFLEET_CKPT_DIR"] = os.path.abspath(value)
            env["GPUFLEET_CKPT_SIGNAL"] = "USR1"  # = sbatch_filter.CKPT_SIGNAL
        elif name == "--gpufleet-controller":
            env["GPUFLEET_CONTROLLER"] = value
        elif name == "--gpufleet-no-place" and not eq:
            place = False
        elif name == "--gpufleet-verbose" and not eq:
            env["GPUFLEET_FILTER_VERBOSE"] = "1"
        elif name == "--gpufleet-help" and not eq:
            raise UsageError("")
        else:
            raise UsageError(f"unknown gpufleet option {name} (sbatch options follow them)")
    env["GPUFLEET_PLACE"] = "1" if place and controller_configured(env) else "0"
    env.setdefault("GPUFLEET_FILTER", filter_command())
    return ["sbatch", *(["--test-only"] if test_only else []), *rest]


def exec_sbatch(args: Sequence[str], test_only: bool = False) -> int:
    env = dict(os.environ)
    try:
        argv = sbatch_argv(args, env, test_only)
    except UsageError as e:
        print(f"gpufleet sbatch: {e}\n{USAGE}" if str(e) else USAGE, file=sys.stderr)
        return 2 if str(e) else 0
    try:
        os.execvpe("sbatch", argv, env)  # noqa: S606 - the user's own sbatch, no shell
    except OSError as e:
        print(f"gpufleet sbatch: cannot run sbatch: {e.strerror} (is the Slurm client "
              "installed and on PATH?)", file=sys.stderr)
        return 127
    return 0  # not reached


def main() -> None:
    if sys.argv[1:2] == ["sbatch"]:
        sys.exit(exec_sbatch(sys.argv[2:]))
    if sys.argv[1:2] == ["place"]:
        os.environ["GPUFLEET_FILTER_VERBOSE"] = "1"
        sys.exit(exec_sbatch(sys.argv[2:], test_only=True))
    if sys.flags.no_site:  # started by launcher(): the other commands need site-packages
        import site

        site.main()
    from gpufleet.scheduler.cli.main import main as cli_main

    cli_main()
