"""Which `pip install 'gpufleet[EXTRA]'` a command needs, said in one line, not a traceback.

Each machine installs only its extra (`agent`: compute node, `client`: login node, `controller`:
head node). Commands import what their extra brings when they run, so `--help` works on every
install; a command run without its extra's packages ends with one line naming the package and
the extra(s) that bring it. Shared by `gpufleet-agent` and `gpufleet` (like
gpufleet.rpc.settings: the agent and the controller never import each other).
"""

from __future__ import annotations

import re
from importlib import metadata
from typing import Any, NoReturn

import click

# import name -> distribution on PyPI
DISTRIBUTIONS = {
    "psycopg": "psycopg", "cryptography": "cryptography", "ClusterShell": "ClusterShell",
    "grpc_health": "grpcio-health-checking", "grpc_reflection": "grpcio-reflection",
    "prometheus_client": "prometheus-client", "psutil": "psutil", "pynvml": "nvidia-ml-py",
    "yaml": "pyyaml",
}
# used when gpufleet's own metadata cannot be read (a source tree on sys.path)
_FALLBACK = {
    "psycopg": ["controller"], "cryptography": ["controller"], "grpc_health": ["controller"],
    "grpc_reflection": ["controller"], "ClusterShell": ["client", "controller"],
    "prometheus_client": ["agent", "controller"], "psutil": ["agent"], "pynvml": ["agent"],
}
_REQ = re.compile(r"^\s*([A-Za-z0-9._-]+)(?:\[[^\]]*\])?[^;]*;.*extra\s*==\s*['\"]([^'\"]+)['\"]")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def extras_for(module: str) -> list[str]:
    """The gpufleet extras (dev left out) whose requirements bring `module`'s distribution."""
    top = module.split(".", maxsplit=1)[0]
    dist = DISTRIBUTIONS.get(top)
    if dist is None:
        return []
    try:
        requires = metadata.requires("gpufleet") or []
    except metadata.PackageNotFoundError:
        return _FALLBACK.get(top, [])
    found = sorted({m.group(2) for r in requires if (m := _REQ.match(r))
                    and _norm(m.group(1)) == _norm(dist) and m.group(2) != "dev"})
    return found or _FALLBACK.get(top, [])


def missing_message(command: str, err: ModuleNotFoundError) -> str | None:
    """One line for a missing optional package, or None when it is not one of ours."""
    module = err.name or ""
    extras = extras_for(module)
    if not extras:
        return None
    how = " or ".join(f"pip install 'gpufleet[{e}]'" for e in extras)
    return (f"`{command}` needs the Python package {DISTRIBUTIONS[module.split('.')[0]]}, "
            f"which this install lacks: {how}")


class ExtrasGroup(click.Group):
    """A click group whose commands end with one line, not a traceback, without their extra."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ModuleNotFoundError as e:
            msg = missing_message(_command_path(ctx), e)
            if msg is None:
                raise
            raise click.ClickException(msg) from None


def _command_path(ctx: click.Context) -> str:
    sub = ctx.invoked_subcommand
    return f"{ctx.command_path} {sub}" if sub else ctx.command_path


def unavailable(name: str, err: ModuleNotFoundError, what: str) -> click.Command:
    """A stand-in for a command whose module cannot be imported on this install."""
    msg = missing_message(f"gpufleet {name}", err)
    if msg is None:
        raise err

    def fail(**_kwargs: Any) -> NoReturn:
        raise click.ClickException(msg)

    return click.Command(
        name, callback=fail, help=f"{what} ({msg.split(': ', 1)[1]})",
        short_help=f"{what} [not installed]",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
