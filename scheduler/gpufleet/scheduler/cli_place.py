"""`gpufleet place` (dry run) and `gpufleet sbatch` (sbatch with a topology-aware placement).

`gpufleet sbatch` takes sbatch's own command line, untouched: it reads only the options a
placement needs (from the command line and the script's #SBATCH lines, the command line
winning, as sbatch does), adds --nodelist (or, when nothing fits now, --switches/--exclude),
runs the real sbatch and prints what sbatch prints. When no placement comes within 2 s it
runs sbatch with the user's arguments unchanged and says so once on stderr.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click
from gpufleet.scheduler.placement import (
    GrpcPlacementSource,
    LocalPlacementSource,
    Placement,
    PlacementError,
    PlacementRequest,
    PlacementSource,
    PlacementUnavailable,
    parse_time_min,
)

__all__ = ["CKPT_CONTRACT", "SbatchArgs", "parse_sbatch_args", "place_cmd", "sbatch_cmd"]

PLACE_TIMEOUT_S = 2.0
DEFAULT_DB = "/var/lib/gpufleet/state.db"


@dataclass(frozen=True)
class CkptContract:
    """What `--gpufleet-ckpt DIR` adds, shared with the job-side checkpoint helper: keep these
    names in step with it."""

    dir_env: str = "GPUFLEET_CKPT_DIR"  # where the job writes its checkpoints
    signal_env: str = "GPUFLEET_CKPT_SIGNAL"  # the signal that means "checkpoint now"
    signal: str = "USR1"
    signal_before_end_s: int = 300  # --signal=B:USR1@300: 5 min before the time limit


CKPT_CONTRACT = CkptContract()

# sbatch 22.05 options that take a value in the next argument (from `sbatch --help`); long
# options with an optional value (--export, --nice, --propagate, --exclusive) take it only
# after '='.
_SHORT_WITH_VALUE = set("aAbcdDeFGiJLMmnNopqSt" "wxCB")
_LONG_WITH_VALUE = {
    "array", "account", "bb", "bbf", "begin", "comment", "cpu-freq", "cpus-per-task",
    "dependency", "deadline", "delay-boot", "chdir", "error", "export-file", "gid", "gres",
    "gres-flags", "input", "job-name", "licenses", "clusters", "cluster", "distribution",
    "mail-type", "mail-user", "mcs-label", "ntasks", "ntasks-per-node", "nodes", "output",
    "partition", "power", "priority", "profile", "qos", "core-spec", "signal", "switches",
    "thread-spec", "time", "time-min", "uid", "wckey", "wrap", "cluster-constraint",
    "constraint", "nodefile", "mem", "mincpus", "reservation", "tmp", "nodelist", "exclude",
    "mem-per-cpu", "sockets-per-node", "cores-per-socket", "threads-per-core",
    "ntasks-per-core", "ntasks-per-socket", "cpus-per-gpu", "gpus", "gpu-bind", "gpu-freq",
    "gpus-per-node", "gpus-per-socket", "gpus-per-task", "mem-per-gpu", "extra-node-info",
    "hint", "acctg-freq", "open-mode", "mem-bind", "network", "container", "tres-per-task",
    "kill-on-invalid-dep", "batch", "het-group", "ntasks-per-gpu", "prefer", "nodes-file",
}
_SHORT_TO_LONG = {"N": "nodes", "p": "partition", "C": "constraint", "t": "time",
                  "G": "gpus", "w": "nodelist", "x": "exclude", "D": "chdir"}


@dataclass
class SbatchArgs:
    """sbatch's command line split at the script: options (as given) and what we read."""

    options: list[str]
    script: str | None  # None: script on stdin, or --wrap
    script_args: list[str]
    values: dict[str, str] = field(default_factory=dict)  # long name -> last value given
    flags: set[str] = field(default_factory=set)  # valueless long options given

    def has(self, name: str) -> bool:
        return name in self.values or name in self.flags


def _scan(argv: Sequence[str], out: SbatchArgs, stop_at_script: bool) -> int:  # noqa: PLR0912 - one branch per getopt form
    """Read options from argv into out; return the index of the script (len(argv) if none)."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return i + 1
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            if not eq and name in _LONG_WITH_VALUE:
                if i + 1 >= len(argv):
                    raise click.UsageError(f"sbatch option --{name} needs a value")
                value = argv[i + 1]
                i += 1
            if eq or name in _LONG_WITH_VALUE:
                out.values[name] = value
            else:
                out.flags.add(name)
        elif arg.startswith("-") and len(arg) > 1:
            letter = arg[1]
            if letter in _SHORT_WITH_VALUE:
                value = arg[2:]
                if not value:
                    if i + 1 >= len(argv):
                        raise click.UsageError(f"sbatch option -{letter} needs a value")
                    value = argv[i + 1]
                    i += 1
                out.values[_SHORT_TO_LONG.get(letter, letter)] = value.removeprefix("=")
            else:
                for flag in arg[1:]:  # -Hv: bundled valueless flags
                    out.flags.add(flag)
        elif stop_at_script:
            return i
        i += 1
    return i


def parse_sbatch_args(argv: Sequence[str], script_text: str | None = None) -> SbatchArgs:
    """Split argv like sbatch: options, then the script and its arguments. #SBATCH lines of
    the script fill in what the command line does not give (sbatch's own precedence)."""
    out = SbatchArgs(options=[], script=None, script_args=[])
    at = _scan(argv, out, stop_at_script=True)
    out.options = list(argv[:at])
    if at < len(argv):
        out.script, out.script_args = argv[at], list(argv[at + 1:])
    if script_text is not None:
        directives: list[str] = []
        for line in script_text.splitlines()[1:] if script_text.startswith("#!") else \
                script_text.splitlines():
            stripped = line.strip()
            if not stripped:
                continue
            if not stripped.startswith("#"):
                break  # sbatch stops reading directives at the first command
            if stripped.startswith("#SBATCH"):
                directives.extend(shlex.split(stripped[len("#SBATCH"):], comments=True))
        from_script = SbatchArgs(options=[], script=None, script_args=[])
        _scan(directives, from_script, stop_at_script=False)
        out.values = {**from_script.values, **out.values}
        out.flags |= from_script.flags
    return out


def _int(value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError as e:
        raise PlacementError(f"{what}: {value!r} is not a number") from e


def request_from_args(args: SbatchArgs) -> PlacementRequest | None:  # noqa: PLR0912 - one branch per sbatch option
    """The placement request the sbatch options mean; None when gpufleet must not place
    (the user chose nodes, asked for a node range, or for an option placement cannot honour)."""
    v = args.values
    if "nodelist" in v or "nodefile" in v:
        return None
    nodes = None
    if "nodes" in v:
        if "-" in v["nodes"] or ":" in v["nodes"]:
            return None  # a min-max range: Slurm's choice of size
        nodes = _int(v["nodes"], "--nodes")
    gpus_per_node = total = None
    if "gpus-per-node" in v:
        gpus_per_node = _int(v["gpus-per-node"].rsplit(":", 1)[-1], "--gpus-per-node")
    if "gres" in v:
        for item in v["gres"].split(","):
            parts = item.split(":")
            if parts[0] == "gpu":
                gpus_per_node = _int(parts[-1], "--gres") if len(parts) > 1 else 1
    if "gpus" in v:
        total = _int(v["gpus"].rsplit(":", 1)[-1], "--gpus")
        if gpus_per_node is not None:
            raise PlacementError("--gpus with --gres=gpu/--gpus-per-node: give one of them")
    if "gpus-per-task" in v or "gpus-per-socket" in v:
        return None  # per-task shapes: leave to Slurm
    constraints: tuple[str, ...] = ()
    if "constraint" in v:
        text = v["constraint"]
        if any(c in text for c in "|[]*"):
            return None  # OR / counts / brackets: Slurm's own matching
        constraints = tuple(f for f in text.split("&") if f)
    exclude: frozenset[str] = frozenset()
    if "exclude" in v:
        from ClusterShell.NodeSet import NodeSet

        exclude = frozenset(NodeSet(v["exclude"]))
    return PlacementRequest(
        nodes=nodes, gpus_per_node=gpus_per_node, total_gpus=total,
        partition=v.get("partition"), constraints=constraints,
        time_limit_min=parse_time_min(v["time"]) if "time" in v else None, exclude=exclude,
    )


def placement_flags(args: SbatchArgs, placement: Placement) -> list[str]:
    """The flags to add to the user's: only the placement itself, never a second GPU request
    (sbatch rejects --gres=gpu next to --gpus-per-node)."""
    add = []
    for flag in placement.flags:
        name = flag[2:].split("=", 1)[0]
        if name in {"gres", "partition"}:
            continue  # the user's own request already says it
        if name == "nodes" and args.has("nodes"):
            continue
        if name == "switches" and args.has("switches"):
            continue
        add.append(flag)
    return add


def ckpt_flags(args: SbatchArgs, ckpt_dir: Path) -> tuple[list[str], dict[str, str]]:
    """--requeue, --signal=B:USR1@N and the environment the job-side helper reads."""
    c = CKPT_CONTRACT
    env = {c.dir_env: str(ckpt_dir), c.signal_env: c.signal}
    flags = []
    if not args.has("requeue") and not args.has("no-requeue"):
        flags.append("--requeue")
    if "signal" not in args.values:
        flags.append(f"--signal=B:{c.signal}@{c.signal_before_end_s}")
    # the marker the controller's recovery looks for (scheduler/recovery.py): a job is
    # signalled and requeued on a fault only if it says it checkpoints; ours comes after the
    # user's options, so keep their comment in it
    comment = (args.values.get("comment") or "").strip()
    if "gpufleet-ckpt" not in comment:
        flags.append(f"--comment={comment + ' ' if comment else ''}gpufleet-ckpt")
    export = args.values.get("export")
    if export is not None and export.upper() != "ALL":
        # a user's --export list would drop our variables: add them to it
        flags.append("--export=" + ",".join([export, *(f"{k}={v}" for k, v in env.items())]))
    return flags, env


def _source(db: str, topology: Path | None, controller: str | None,
            env: Mapping[str, str]) -> PlacementSource:
    if controller:
        return GrpcPlacementSource(controller, timeout_s=PLACE_TIMEOUT_S)
    store = None if db.strip().lower() in {"", "none"} else db  # none: Slurm's view only
    return LocalPlacementSource(store, topology_conf=topology, env=env, timeout_s=PLACE_TIMEOUT_S)


_common = [
    click.option("--gpufleet-db", "db", envvar="GPUFLEET_DB", default=DEFAULT_DB,
                 show_default=True,
                 help="The controller's state store (health, GPU topology); 'none': "
                      "Slurm's view only."),
    click.option("--gpufleet-topology", "topology", envvar="GPUFLEET_TOPOLOGY_CONF",
                 type=click.Path(path_type=Path), default=None,
                 help="A Slurm topology.conf to use instead of `scontrol show topology`."),
    click.option("--gpufleet-controller", "controller", envvar="GPUFLEET_CONTROLLER",
                 default=None, help="Ask this controller (HOST:PORT) instead of computing here."),
]


def _with_common(f: click.decorators.FC) -> click.decorators.FC:
    for opt in reversed(_common):
        f = opt(f)
    return f


@click.command(
    "place",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    short_help="Show where `gpufleet sbatch` would place a job (dry run).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_with_common
@click.argument("sbatch_args", nargs=-1, type=click.UNPROCESSED)
def place_cmd(as_json: bool, db: str, topology: Path | None, controller: str | None,
              sbatch_args: tuple[str, ...]) -> None:
    """Dry run: the nodes, GPUs, sbatch flags, score and reasons for a job given by sbatch
    options, e.g. `gpufleet place -N 4 --gpus-per-node 8 -p main`. Submits nothing."""
    script_text = _read_script_text(list(sbatch_args))
    args = parse_sbatch_args(list(sbatch_args), script_text)
    try:
        req = request_from_args(args)
        if req is None:
            raise click.ClickException(
                "these options leave the placement to Slurm (--nodelist, a node range, "
                "--gpus-per-task or a constraint expression): nothing to place")
        result = _source(db, topology, controller, os.environ).place(req)
    except PlacementUnavailable as e:
        raise click.ClickException(f"no placement: {e}") from e
    except PlacementError as e:
        raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    click.echo(("placement" if result.ok else "no placement now; fallback")
               + f" (score {result.score}): {' '.join(result.flags)}")
    for line in result.explanation:
        click.echo(f"  {line}")


def _read_script_text(argv: list[str]) -> str | None:
    probe = parse_sbatch_args(argv)
    if probe.script is None:
        return None
    try:
        return Path(probe.script).read_text(errors="replace")
    except OSError:
        return None  # sbatch itself will say the script is missing


def run_sbatch(argv: Sequence[str], env: Mapping[str, str], stdin_text: str | None) -> int:
    """The real sbatch; its stdout and stderr are echoed as they are."""
    from gpufleet.scheduler.slurm import SlurmError
    from gpufleet.scheduler.slurm.cli import run_sbatch as exec_sbatch

    try:
        p = exec_sbatch(argv, env, stdin_text)
    except SlurmError as e:
        raise click.ClickException(str(e)) from e
    if p.stdout:
        click.echo(p.stdout, nl=False)
    if p.stderr:
        click.echo(p.stderr, nl=False, err=True)
    return p.returncode


@click.command(
    "sbatch",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                      "help_option_names": ["--help"]},
    short_help="sbatch, with a healthy, topology-aware placement.",
    epilog="Every other option, the script and its arguments go to sbatch unchanged "
           "(`sbatch --help` lists them).",
)
@click.option("--gpufleet-ckpt", "ckpt_dir", type=click.Path(path_type=Path), default=None,
              help=f"Fault tolerance: add --requeue, --signal=B:{CKPT_CONTRACT.signal}@"
                   f"{CKPT_CONTRACT.signal_before_end_s} and {CKPT_CONTRACT.dir_env}=DIR for "
                   "the job's checkpoint helper.")
@click.option("--gpufleet-no-place", "no_place", is_flag=True,
              help="Submit without a placement (plain sbatch).")
@click.option("--gpufleet-verbose", "verbose", is_flag=True,
              help="Print the placement and why on stderr.")
@_with_common
@click.argument("sbatch_args", nargs=-1, type=click.UNPROCESSED)
def sbatch_cmd(ckpt_dir: Path | None, no_place: bool, verbose: bool, db: str,
               topology: Path | None, controller: str | None,
               sbatch_args: tuple[str, ...]) -> None:
    """Submit a batch job exactly like sbatch, on the best healthy nodes and GPUs.

    gpufleet adds `--nodelist` with the nodes it chose (fewest leaf switches, healthy GPUs in
    one NVLink island, partly used switches filled first). When nothing fits now it adds
    `--switches=N@10` and `--exclude` of unhealthy nodes and lets Slurm queue the job. When
    the controller does not answer in 2 s the job is submitted unchanged, with one warning.
    """
    argv = list(sbatch_args)
    env = dict(os.environ)
    probe = parse_sbatch_args(argv)
    stdin_text = None
    if probe.script is None and "wrap" not in probe.values:
        stdin_text = sys.stdin.read()  # sbatch reads the script from stdin: so do we
        script_text: str | None = stdin_text
    else:
        script_text = _read_script_text(argv)
    args = parse_sbatch_args(argv, script_text)
    extra: list[str] = []
    if ckpt_dir is not None:
        flags, ckpt_env = ckpt_flags(args, ckpt_dir.absolute())
        extra.extend(flags)
        env.update(ckpt_env)
    if not no_place:
        extra.extend(_placement_or_warn(args, db, topology, controller, env, verbose))
    cut = len(args.options)
    final = [*argv[:cut], *extra, *argv[cut:]]
    if verbose:
        click.echo(f"gpufleet: sbatch {shlex.join(final)}", err=True)
    sys.exit(run_sbatch(final, env, stdin_text))


def _placement_or_warn(args: SbatchArgs, db: str, topology: Path | None,
                       controller: str | None, env: dict[str, str], verbose: bool) -> list[str]:
    try:
        req = request_from_args(args)
    except PlacementError as e:
        click.echo(f"gpufleet: warning: {e}; submitting without a placement", err=True)
        return []
    if req is None:
        return []  # the user placed the job: respect it
    try:
        result = _source(db, topology, controller, env).place(req)
    except (PlacementUnavailable, PlacementError) as e:
        click.echo(f"gpufleet: warning: no placement ({e}); submitting as plain sbatch",
                   err=True)
        return []
    if verbose:
        for line in result.explanation:
            click.echo(f"gpufleet: {line}", err=True)
    env.update(result.env)
    return placement_flags(args, result)
