"""Checks of settings (flags, environment, TOML), shared by the agent and the controller.

The only code both sides share besides the wire contract: each setting is checked where it
is read, with an error that names the setting and the value. Plain functions for config
files, and click parameter types built on them for flags.
"""

from __future__ import annotations

import math
from typing import Any

import click

MAX_PORT = 65535


class SettingError(ValueError):
    """A setting's value is wrong; the message names the setting and the value."""


def finite(name: str, value: Any, lo: float | None = None, hi: float | None = None) -> float:
    """A finite number (not nan, not inf, not a bool) within [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SettingError(f"{name}={value!r}: must be a number")
    try:
        f = float(value)
    except OverflowError:  # an int too large for a float
        f = math.inf
    if not math.isfinite(f):
        raise SettingError(f"{name}={value!r}: must be a finite number")
    _in_range(name, value, f, lo, hi)
    return f


def whole(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """A whole number (not a bool, not a float) within [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingError(f"{name}={value!r}: must be a whole number")
    _in_range(name, value, value, lo, hi)
    return value


def _in_range(name: str, shown: Any, v: float, lo: float | None, hi: float | None) -> None:
    if lo is not None and hi is not None and not lo <= v <= hi:
        raise SettingError(f"{name}={shown!r}: must be between {lo:g} and {hi:g}")
    if lo is not None and v < lo:
        raise SettingError(f"{name}={shown!r}: must be >= {lo:g}")
    if hi is not None and v > hi:
        raise SettingError(f"{name}={shown!r}: must be <= {hi:g}")


def host_port(name: str, value: Any, *, port_zero: bool = False) -> tuple[str, int]:
    """HOST:PORT (or [IPv6]:PORT); the port 1-65535 (0 too with port_zero: any free port)."""
    if not isinstance(value, str):
        raise SettingError(f"{name}={value!r}: expected HOST:PORT")
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        inner = host[1:-1]
        ok_host = bool(inner) and all(c in "0123456789abcdefABCDEF:." for c in inner)
    else:
        ok_host = bool(host) and ":" not in host and not any(c.isspace() for c in host) \
            and all(c.isalnum() or c in "._-" for c in host)
    if not sep or not ok_host:
        raise SettingError(f"{name}={value!r}: expected HOST:PORT (e.g. 0.0.0.0:9836, "
                           "[::1]:50051)")
    if not port.isascii() or not port.isdigit() or len(port) > 5 \
            or not (0 if port_zero else 1) <= int(port) <= MAX_PORT:
        raise SettingError(f"{name}={value!r}: the port must be a number from "
                           f"{0 if port_zero else 1} to {MAX_PORT}")
    return host, int(port)


def one_of(name: str, value: Any, known: Any) -> str:
    """A name out of a known set (profiles, backends); the error lists them."""
    if value not in known:
        raise SettingError(f"{name}={value!r}: unknown; known: {', '.join(sorted(known))}")
    return str(value)


class FiniteRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (FloatRange lets nan through)."""

    name = "finite float range"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


class HostPort(click.ParamType):  # type: ignore[type-arg]  # generic only from click 8.2
    """HOST:PORT, the port 1-65535; '' where allow_empty (a listener turned off)."""

    name = "host:port"

    def __init__(self, allow_empty: bool = False) -> None:
        self.allow_empty = allow_empty

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if value == "" and self.allow_empty:
            return value
        try:
            host_port(param.name if param is not None and param.name else "value", value)
        except SettingError as e:
            self.fail(str(e), param, ctx)
        return value
