"""`gpufleet demo`: the whole loop on one machine, on the embedded defaults.

A controller (SQLite in a temporary folder) and N simulated agents as real processes talking
gRPC over loopback; Xid 79 is injected on one node through the agent's own `sim inject`
command, and the controller drains it in Slurm when a local Slurm knows the node names
(otherwise it records what it would have done). The controller never imports the agent:
agents are started as the `gpufleet-agent` program.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import click
from gpufleet.scheduler.cli.simfleet import SimFleet, agent_argv
from gpufleet.scheduler.service.server import Controller
from gpufleet.scheduler.slurm import CliSlurmClient, SlurmClient, SlurmError
from gpufleet.scheduler.store import ActionRow, SqliteStore, StateStore

# the agent simulator's profiles (gpufleet.agent.nvml_sim.PROFILES; the controller does not
# import the agent: tests/test_cli_bad_input.py checks the two agree)
DEMO_PROFILES = ("dgx-h100", "hgx-a100", "l40s-pcie", "a100-pcie-bridged")


def _pick_slurm(mode: str, names: list[str]) -> tuple[SlurmClient | None, str]:
    if mode == "none":
        return None, "no Slurm (--slurm none): actions are recorded, not applied"
    client = CliSlurmClient(timeout_s=5.0)
    if not client.ping():
        if mode == "cli":
            raise click.ClickException("--slurm cli: slurmctld does not answer `scontrol ping`")
        return None, "no Slurm answering here: actions are recorded, not applied"
    try:
        known = client.nodes()
    except SlurmError as e:
        if mode == "cli":
            raise click.ClickException(str(e)) from e
        return None, f"Slurm answered but sinfo failed ({e}): actions recorded, not applied"
    missing = [n for n in names if n not in known]
    if missing:
        if mode == "cli":
            raise click.ClickException(f"Slurm does not know node(s) {', '.join(missing)}")
        return None, (f"Slurm is up but has no node(s) {', '.join(missing)}: actions are "
                      "recorded, not applied")
    return client, "real Slurm: the controller drains with scontrol"


def _wait(cond: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def run_demo(
    node_count: int, profile: str, fault_node: str, slurm_mode: str, keep_drained: bool
) -> int:
    names = [f"n{i}" for i in range(1, node_count + 1)]
    if fault_node not in names:
        raise click.UsageError(f"--fault-node {fault_node!r} is not one of n1..n{node_count}")
    slurm, how = _pick_slurm(slurm_mode, names)
    work = Path(tempfile.mkdtemp(prefix="gpufleet-demo-"))
    ctl = Controller(SqliteStore(work / "state.db"), slurm, listen="127.0.0.1:0")
    try:
        with SimFleet(ctl, names, work, agent_args=lambda _: ("--sim-profile", profile)) as fleet:
            store = fleet.store
            click.echo(f"controller: 127.0.0.1:{ctl.port}, store {work / 'state.db'}")
            click.echo(f"slurm: {how}")
            if not _wait(fleet.registered, 30):
                click.echo(f"error: only {len(store.nodes())} of {node_count} agents registered",
                           err=True)
                return 1
            time.sleep(1.2)  # let every agent send a sample
            click.echo(f"\n{node_count} simulated nodes ({profile}) reporting:")
            _print_nodes(store)
            return _fault_and_drain(store, slurm, fault_node, fleet.faults_path(fault_node),
                                    keep_drained)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fault_and_drain(
    store: StateStore, slurm: SlurmClient | None, node: str, faults_path: Path, keep_drained: bool
) -> int:
    say = click.echo
    if slurm is not None:
        state = slurm.node(node)
        say(f"\nslurm before: {node} State={state.state} Reason={state.reason!r}")
        if state.drained:
            say(f"note: {node} is already drained; gpufleet will leave it as it is")
    say(f"\ninjecting Xid 79 (GPU fallen off the bus) on {node} GPU 3 ...")
    t_fault = time.time()
    subprocess.run(
        [*agent_argv(), "sim", "inject", "--faults-path", str(faults_path),
         "--gpu", "3", "xid", "--xid", "79"],
        check=True, capture_output=True,
    )

    def drain_action() -> ActionRow | None:
        acts = [a for a in store.actions(node) if a.action == "drain"]
        finished = acts and acts[-1].status in ("done", "shadow", "skipped", "failed")
        return acts[-1] if finished else None

    if not _wait(lambda: drain_action() is not None, 15):
        say("error: the controller did not act within 15 s", err=True)
        return 1
    t_done = time.time()
    act = drain_action()
    assert act is not None  # noqa: S101 - just waited for it
    say(f"controller: drain {node} -> {act.status} {act.detail} (reason {act.reason!r})")
    if act.done_ms is not None and act.fault_ms is not None:
        outcome = "drain" if act.status == "done" else act.status
        say(f"fault -> {outcome}: {act.done_ms - act.fault_ms} ms from the agent's Xid event "
            f"to scontrol done ({(t_done - t_fault) * 1000:.0f} ms wall, including starting "
            "the inject command)")
    if slurm is not None:
        state = slurm.node(node)
        say(f"slurm after:  {node} State={state.state} Reason={state.reason!r}")
    say("")
    _print_nodes(store)
    if slurm is not None and act.status == "done" and not keep_drained:
        slurm.resume(node)
        say(f"\n(resumed {node} again so the demo can be re-run; --keep-drained leaves it "
            "drained)")
    return 0


def _print_nodes(store: StateStore) -> None:
    click.echo(f"  {'NODE':<6} {'GPUS':>4}  {'HEALTH':<8} REASON")
    for n in store.nodes():
        reason = f"{n.health_reason}: {n.health_evidence}" if n.health_reason else ""
        click.echo(f"  {n.name:<6} {n.gpu_count:>4}  {n.health:<8} {reason}")


@click.command()
@click.option(
    "--nodes",
    "node_count",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="simulated GPU nodes to start (named n1..nN)",
)
@click.option("--profile", type=click.Choice(DEMO_PROFILES), default="dgx-h100",
              show_default=True, help="simulated hardware")
@click.option("--fault-node", default="n3", show_default=True, help="node that gets Xid 79")
@click.option(
    "--slurm",
    type=click.Choice(["auto", "cli", "none"]),
    default="auto",
    show_default=True,
    help="auto: act on the local Slurm if it answers and knows the nodes",
)
@click.option("--keep-drained", is_flag=True, help="leave the faulty node drained at the end")
def demo(node_count: int, profile: str, fault_node: str, slurm: str, keep_drained: bool) -> None:
    """A controller plus simulated agents on this machine: nodes, a fault, the drain."""
    import importlib.util

    from gpufleet.scheduler.cli.demo import run_demo

    lacking = [m for m in ("psutil", "prometheus_client") if importlib.util.find_spec(m) is None]
    if lacking:  # the agents it starts would each die on the import
        raise click.ClickException(
            f"`gpufleet demo` runs simulated agents here too, and they need {', '.join(lacking)}: "
            "pip install 'gpufleet[agent,controller]'")

    sys.exit(run_demo(node_count, profile, fault_node, slurm, keep_drained))
