"""`gpufleet-agent`: the node-side command. Parses, then delegates.

Settings: flag > environment (GPUFLEET_AGENT_<FLAG>) > config file (--config, default
/etc/gpufleet/agent.toml) > built-in default.

One module (~480 lines): every `gpufleet-agent` subcommand's parsing, and nothing else; each
delegates in a line or two to the module that does the work.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click
from gpufleet.agent import __version__
from gpufleet.agent.config import AgentConfig, ConfigError, load_file
from gpufleet.agent.nvml_sim import FAULT_KINDS
from gpufleet.agent.telemetry import GpuBackendError
from gpufleet.rpc.daemon import notify as sd_notify
from gpufleet.rpc.extras import ExtrasGroup

EXIT_UNHEALTHY = 1
EXIT_ERROR = 2


def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """Feed the config file into click's default_map, so flags and env vars still win."""
    try:
        data = load_file(Path(value) if value else None)
    except ConfigError as e:
        raise click.BadParameter(str(e)) from e
    ctx.default_map = {**(ctx.default_map or {}), **data}
    ctx.meta["gpufleet_config_file"] = data  # keys with no flag (thresholds, debounce)
    return value


def _common(f: Any) -> Any:
    options = [
        click.option(
            "--config",
            type=click.Path(dir_okay=False),
            callback=_load_config,
            is_eager=True,
            expose_value=False,
            help="TOML config file [default: /etc/gpufleet/agent.toml if present]",
        ),
        click.option(
            "--node-name",
            envvar="GPUFLEET_AGENT_NODE_NAME",
            default="",
            help="Slurm NodeName [default: short host name]",
        ),
        click.option(
            "--gpu-backend",
            envvar="GPUFLEET_AGENT_GPU_BACKEND",
            type=click.Choice(["nvml", "simulated"]),
            default="nvml",
            show_default=True,
            help="real NVML or the built-in simulator",
        ),
        click.option(
            "--sim-profile",
            envvar="GPUFLEET_AGENT_SIM_PROFILE",
            default="dgx-h100",
            show_default=True,
            help="simulated hardware: dgx-h100, hgx-a100, l40s-pcie, a100-pcie-bridged",
        ),
        click.option(
            "--sim-faults-path",
            envvar="GPUFLEET_AGENT_SIM_FAULTS_PATH",
            default="",
            help="fault file the simulator watches [default: STATE_DIR/sim-faults.json]",
        ),
        click.option(
            "--state-dir",
            envvar="GPUFLEET_AGENT_STATE_DIR",
            default="/var/lib/gpufleet-agent",
            show_default=True,
            type=click.Path(file_okay=False),
        ),
        click.option("-v", "--verbose", count=True, help="more log output (-vv for debug)"),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def _make_config(**kw: Any) -> AgentConfig:
    """Flags and environment (as click resolved them) over the file over the defaults."""
    kw.pop("verbose", None)
    ctx = click.get_current_context()
    settings = dict(ctx.meta.get("gpufleet_config_file", {}))
    for name, value in kw.items():
        if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT:
            settings[name] = value
        else:
            settings.setdefault(name, value)
    try:
        return AgentConfig(**settings).validate()
    except (ConfigError, TypeError) as e:
        raise click.UsageError(str(e)) from e


def _make_backend(cfg: AgentConfig) -> Any:
    from gpufleet.agent.nvml import NvmlBackend, load_library

    lib = load_library(
        cfg.gpu_backend, cfg.sim_profile, cfg.resolved_faults_path(), cfg.resolved_node_name()
    )
    name = "nvml" if cfg.gpu_backend == "nvml" else f"simulated:{cfg.sim_profile}"
    return NvmlBackend(lib, name, counter_interval_s=cfg.nvml_counter_interval_s)


@click.group(
    cls=ExtrasGroup,
    context_settings={"help_option_names": ["-h", "--help"],
                      "auto_envvar_prefix": "GPUFLEET_AGENT"},
)
@click.version_option(__version__, prog_name="gpufleet-agent")
def main() -> None:
    """gpufleet node agent: reports this node's GPUs, fabric and health to the controller."""


@main.command()
@_common
@click.option(
    "--controller",
    envvar="GPUFLEET_AGENT_CONTROLLER",
    default="localhost:50051",
    show_default=True,
    help="controller address HOST:PORT; several (active, standbys) separated by commas",
)
@click.option("--ca-path", envvar="GPUFLEET_AGENT_CA_PATH", default="",
              help="cluster CA certificate (mTLS; with --cert-path and --key-path)")
@click.option("--cert-path", envvar="GPUFLEET_AGENT_CERT_PATH", default="",
              help="this node's certificate from `gpufleet certs issue NODE`")
@click.option("--key-path", envvar="GPUFLEET_AGENT_KEY_PATH", default="",
              help="this node's key (mode 0600)")
@click.option("--insecure/--no-insecure", envvar="GPUFLEET_AGENT_INSECURE", default=None,
              help="plaintext to a controller run with --insecure (demo); --no-insecure "
              "insists on TLS [default: TLS when the three paths are set]")
@click.option(
    "--interval-s",
    envvar="GPUFLEET_AGENT_INTERVAL_S",
    type=float,
    default=1.0,
    show_default=True,
    help="seconds between samples",
)
@click.option(
    "--expected-gpu-count",
    envvar="GPUFLEET_AGENT_EXPECTED_GPU_COUNT",
    type=click.IntRange(min=0),
    default=None,
    help="GPUs this node must have; fewer is a fatal verdict",
)
@click.option(
    "--metrics-listen",
    envvar="GPUFLEET_AGENT_METRICS_LISTEN",
    default="0.0.0.0:9835",
    show_default=True,
    help="Prometheus /metrics address; '' turns it off",
)
@click.option("--once", is_flag=True, help="send inventory and one sample, wait for the ack, exit")
def run(once: bool, verbose: int, **kw: Any) -> None:
    """Run the agent (the systemd service runs this)."""
    from gpufleet.agent.runner import Agent

    _setup_logging(verbose)
    cfg = _make_config(**kw)
    try:
        agent = Agent(cfg, _make_backend(cfg))
    except GpuBackendError as e:
        raise click.ClickException(str(e)) from e

    def _stop(signum: int, _frame: Any) -> None:
        agent.stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    # Type=notify: the config is valid and the GPU library answered, so the agent is up;
    # the controller may still be away (the agent reconnects on its own, that is normal)
    sd_notify("READY=1")
    try:
        ok = agent.run(once=once)
    except GpuBackendError as e:
        raise click.ClickException(str(e)) from e
    finally:
        sd_notify("STOPPING=1")
    if once and not ok:
        click.echo(
            f"error: controller {cfg.controller} did not acknowledge the report within 10 s",
            err=True,
        )
        sys.exit(EXIT_ERROR)


@main.command("check-connection")
@click.option("--controller", envvar="GPUFLEET_AGENT_CONTROLLER", default="localhost:50051",
              show_default=True, help="HOST:PORT as `run` dials it; several: each is checked")
@click.option("--ca-path", envvar="GPUFLEET_AGENT_CA_PATH", required=True,
              type=click.Path(dir_okay=False), help="cluster CA certificate")
@click.option("--cert-path", envvar="GPUFLEET_AGENT_CERT_PATH", required=True,
              type=click.Path(dir_okay=False), help="this node's certificate")
@click.option("--key-path", envvar="GPUFLEET_AGENT_KEY_PATH", required=True,
              type=click.Path(dir_okay=False), help="this node's key")
@click.option("--timeout-s", type=float, default=5.0, show_default=True)
def check_connection(controller: str, ca_path: str, cert_path: str, key_path: str,
                     timeout_s: float) -> None:
    """One TLS handshake with the controller, as `run` makes it; says why it fails.

    Names the cause: unknown CA, a name mismatch (the name dialled and the names in the
    controller's certificate), an expired or not yet valid certificate, or the controller
    refusing this node's certificate. Exit 0 when every address accepts, 1 otherwise.
    """
    from gpufleet.agent.client import split_targets
    from gpufleet.agent.tlscheck import diagnose

    failed = False
    for target in split_targets(controller) or [controller]:
        d = diagnose(target, Path(ca_path), Path(cert_path), Path(key_path), timeout_s)
        click.echo(f"{target}: {'ok' if d.ok else d.cause}: {d.message}", err=not d.ok)
        failed |= not d.ok
    sys.exit(1 if failed else 0)


@main.command()
@_common
@click.option("--json", "as_json", is_flag=True, help="print JSON (the wire messages)")
def collect(as_json: bool, verbose: int, **kw: Any) -> None:
    """Read the inventory and one sample locally and print them; no controller needed.

    Writes nothing under the state directory (no health cache, no spool, no job records): the
    agent's files go to a temporary folder removed on exit, so a running agent is undisturbed.
    """
    import dataclasses
    import tempfile

    from gpufleet.agent import wire
    from gpufleet.agent.runner import Agent

    _setup_logging(verbose)
    cfg = _make_config(**kw)
    with tempfile.TemporaryDirectory(prefix="gpufleet-agent-collect-") as scratch:
        backend = _make_backend(cfg)  # a simulated node's faults: the running agent's file
        scratch_cfg = dataclasses.replace(cfg, state_dir=scratch, spool_dir="",
                                          sim_faults_path=str(cfg.resolved_faults_path()))
        try:
            agent = Agent(scratch_cfg, backend)
            t0 = time.perf_counter()
            inv = agent.inventory()
            t1 = time.perf_counter()
            sample = agent.sample()
            t2 = time.perf_counter()
        except GpuBackendError as e:
            raise click.ClickException(str(e)) from e
        agent.outbox.close()
    doc = {
        "inventory": wire.as_dict(inv),
        "sample": wire.as_dict(sample),
        "timing_ms": {
            "inventory": round((t1 - t0) * 1000, 3),
            "sample": round((t2 - t1) * 1000, 3),
        },
    }
    agent.backend.close()
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(
        f"node {inv.node_name}: {len(inv.gpus)} GPU(s), driver {inv.driver_version}, "
        f"backend {inv.nvml_backend}"
    )
    for g, s in zip(inv.gpus, sample.gpus, strict=False):
        if s.lost:
            click.echo(f"  GPU {g.index} {g.pci_bus_id} {g.model}: LOST")
            continue
        temp = f"{s.temperature_c:.0f}C" if s.HasField("temperature_c") else "-"
        power = f"{s.power_w:.0f}W" if s.HasField("power_w") else "-"
        util = f"{s.utilization_gpu_pct:.0f}%" if s.HasField("utilization_gpu_pct") else "-"
        click.echo(
            f"  GPU {g.index} {g.pci_bus_id} {g.model} {temp} {power} util {util} "
            f"nvlink {s.nvlink_up_count} up/{s.nvlink_down_count} down"
        )


@main.command()
@_common
@click.option("--level", type=click.IntRange(1, 3), default=1, show_default=True,
              help="1 quick checks; 2 and 3 add a watch of clocks, power and throttling "
              "(2 s, 10 s); with DCGM: dcgmi diag -r LEVEL")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--dcgm/--no-dcgm", default=None,
              help="use dcgmi (--dcgm) or gpufleet's own checks (--no-dcgm) "
              "[default: dcgmi when installed and the backend is real NVML]")
def diag(level: int, as_json: bool, dcgm: bool | None, verbose: int, **kw: Any) -> None:
    """Diagnose this node before it returns to service; exit 0 pass, 1 fail, 2 could not run."""
    from gpufleet.agent import diag as d
    from gpufleet.agent.infiniband import IbSysfs

    _setup_logging(verbose)
    cfg = _make_config(**kw)
    dcgmi = d.find_dcgmi()
    if dcgm is None:
        dcgm = dcgmi is not None and cfg.gpu_backend == "nvml"
    if dcgm:
        report = (d.run_dcgmi(level, dcgmi) if dcgmi is not None else
                  d.DiagReport(level, "dcgmi", error="dcgmi not found on PATH (install DCGM "
                               "or run with --no-dcgm)"))
    else:
        expect = d.Expectations(
            gpu_count=cfg.expected_gpu_count, ib_rate_gbps=cfg.expected_ib_rate_gbps,
            ib_hcas=cfg.ib_hcas)
        try:
            backend = _make_backend(cfg)
        except GpuBackendError as e:
            report = d.DiagReport(level, "gpufleet", error=str(e))
        else:
            ib = IbSysfs(Path(cfg.sysfs_root))
            report = d.run_own(backend, level, expect, ib_sample=ib.sample,
                               retired_pending=backend.retired_pages_pending)
            backend.close()
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else d.format_text(report))
    sys.exit(report.exit_code)


@main.command()
@click.option(
    "--state-dir",
    envvar="GPUFLEET_AGENT_STATE_DIR",
    default="/var/lib/gpufleet-agent",
    show_default=True,
    type=click.Path(file_okay=False),
)
@click.option(
    "--max-age-s",
    type=float,
    default=120.0,
    show_default=True,
    help="older cached state counts as unknown (agent not running)",
)
def health(state_dir: str, max_age_s: float) -> None:
    """Print the node's cached verdict; exit 0 ok, 1 fatal, 2 unknown (for HealthCheckProgram).

    0: ok, warn or degraded; 1: fatal; 2: no cache, or one older than --max-age-s (is the
    agent running?), or an unreadable one.
    """
    path = Path(state_dir) / "health.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        click.echo(f"unknown: {path} missing (is gpufleet-agent running?)", err=True)
        sys.exit(EXIT_ERROR)
    except (OSError, ValueError) as e:
        click.echo(f"unknown: cannot read {path}: {e}", err=True)
        sys.exit(EXIT_ERROR)
    age_s = time.time() - doc.get("updated_ms", 0) / 1000.0
    if age_s > max_age_s:
        click.echo(f"unknown: {path} is {age_s:.0f} s old (is gpufleet-agent running?)", err=True)
        sys.exit(EXIT_ERROR)
    line = f"{doc.get('severity', '?')}: {doc.get('reason_code', '?')} {doc.get('evidence', '')}"
    click.echo(line.strip())
    if doc.get("severity") == "fatal":
        sys.exit(EXIT_UNHEALTHY)


# The hook's shell wrapper stamps the time before Python starts: interpreter start-up and
# imports take 0.2 s on an idle node and over 1 s on a busy one, too much for "to the second".
HOOK_TIME_ENV = "GPUFLEET_HOOK_TIME_MS"
HOOK_TIME_MAX_AGE_MS = 60_000  # an older stamp is not this hook's: use the clock


def _hook_time_ms(stamp: str | None) -> int:
    now = int(time.time() * 1000)
    if stamp and stamp.isdecimal() and 0 <= now - int(stamp) <= HOOK_TIME_MAX_AGE_MS:
        return int(stamp)
    return now


def _job_hook(kind: str, state_dir: str) -> None:
    """Record a job's start/end for the agent. Exits 0 whatever happens: Slurm drains a node
    whose Prolog fails and fails the job whose Epilog does, and accounting is not worth that."""
    import os

    from gpufleet.agent.accounting import AccountingError, job_from_env, write_hook_file

    node = os.environ.get("SLURMD_NODENAME", "")
    state_dir = state_dir.replace("{node}", node)  # several slurmd on one host (test labs)
    try:
        job = job_from_env(os.environ)
        write_hook_file(state_dir, kind, job, _hook_time_ms(os.environ.get(HOOK_TIME_ENV)))
    except (AccountingError, OSError) as e:
        click.echo(f"gpufleet-agent {'prolog' if kind == 'start' else 'epilog'}: job not "
                   f"accounted: {e}", err=True)


_HOOK_STATE_DIR = click.option(
    "--state-dir",
    envvar="GPUFLEET_AGENT_STATE_DIR",
    default="/var/lib/gpufleet-agent",
    show_default=True,
    help="the agent's state dir ('{node}' becomes SLURMD_NODENAME)",
)


@main.command()
@_HOOK_STATE_DIR
def prolog(state_dir: str) -> None:
    """Slurm Prolog: record that SLURM_JOB_ID holds SLURM_JOB_GPUS from now (always exits 0)."""
    _job_hook("start", state_dir)


@main.command()
@_HOOK_STATE_DIR
def epilog(state_dir: str) -> None:
    """Slurm Epilog: record that SLURM_JOB_ID released its GPUs now (always exits 0)."""
    _job_hook("end", state_dir)


@main.group()
def sim() -> None:
    """Drive the GPU simulator of a running simulated agent (tests and demos)."""


@sim.command()
@click.option(
    "--faults-path",
    required=True,
    type=click.Path(dir_okay=False),
    help="the fault file the simulated agent watches",
)
@click.option("--gpu", type=click.IntRange(0, 63), required=True,
              help="GPU index (one the profile has)")
@click.option("--sim-profile", envvar="GPUFLEET_AGENT_SIM_PROFILE", default="dgx-h100",
              show_default=True, help="the simulated agent's profile: its GPUs are the ones "
              "that exist")
@click.argument("kind", type=click.Choice(FAULT_KINDS))
@click.option("--xid", type=click.IntRange(min=1), help="XID number (kind xid)")
@click.option("--link", type=click.IntRange(min=0, max=17), default=0, help="NVLink (nvlink_down)")
@click.option("--temperature-c", type=float, default=95.0, help="for kind overheat")
def inject(
    faults_path: str, gpu: int, sim_profile: str, kind: str, xid: int | None, link: int,
    temperature_c: float,
) -> None:
    """Inject a fault into a running simulated agent."""
    from gpufleet.agent.nvml_sim import PROFILES, append_fault

    profile = PROFILES.get(sim_profile)
    if profile is None:
        raise click.BadParameter(f"{sim_profile!r}: unknown; known: {', '.join(PROFILES)}",
                                 param_hint="--sim-profile")
    if gpu >= len(profile.gpus):
        raise click.BadParameter(f"{gpu}: {sim_profile} has GPUs 0-{len(profile.gpus) - 1}",
                                 param_hint="--gpu")

    fault: dict[str, Any] = {"kind": kind, "gpu": gpu}
    if kind == "xid":
        if xid is None:
            raise click.UsageError("kind xid needs --xid N")
        fault["xid"] = xid
    elif kind == "nvlink_down":
        fault["link"] = link
    elif kind == "overheat":
        fault["temperature_c"] = temperature_c
    click.echo(json.dumps(append_fault(faults_path, fault)))


if __name__ == "__main__":
    main()
