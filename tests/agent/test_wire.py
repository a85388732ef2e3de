"""The agent's one door to the wire (gpufleet.agent.wire): its domain values become exactly the
messages the agent always sent, and the import contract that keeps protobuf out of the
domain modules sees every agent module."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from gpufleet.agent import wire
from gpufleet.agent.accounting import GpuUsage, JobPhase, UsageSource
from gpufleet.agent.diag import Check
from gpufleet.agent.jobsocket import Registration
from gpufleet.agent.remedy import Command, CommandKind, CommandResult
from gpufleet.rpc.v1 import fleet_pb2 as pb

REPO = Path(__file__).resolve().parents[2]
CONTRACT = "the agent's domain modules know neither gRPC nor protobuf"


def _usage(**kw: Any) -> GpuUsage:
    base = GpuUsage(job_id="77", gpu_index=1, user="alice", account="phys", start_ms=1_000,
                    as_of_ms=61_000, allocated_ms=60_000, busy_ms=0, energy_mj=0,
                    phase=JobPhase.RUNNING, run=0, source=UsageSource.HOOK)
    return dataclasses.replace(base, **kw)


def test_usage_row_sends_run_energy_and_source_even_at_zero() -> None:
    msg = wire.job_gpu_usage(_usage())
    # run 0 and energy 0 are facts ("first run", "no energy"), not "an agent before runs"
    assert msg.HasField("run") and msg.HasField("energy_mj") and msg.source == "hook"
    assert not msg.HasField("end_ms") and not msg.HasField("idle_since_ms")
    assert msg.phase == pb.JOB_PHASE_RUNNING


def test_usage_row_end_and_idle_only_when_set() -> None:
    ended = wire.job_gpu_usage(_usage(phase=JobPhase.ENDED, end_ms=61_000, run=2,
                                      source=UsageSource.PROC))
    assert (ended.phase, ended.end_ms, ended.run, ended.source) == (
        pb.JOB_PHASE_ENDED, 61_000, 2, "proc")
    assert not ended.HasField("idle_since_ms")
    idle = wire.job_gpu_usage(_usage(phase=JobPhase.STARTED, idle_since_ms=5_000))
    assert (idle.phase, idle.idle_since_ms, idle.HasField("end_ms")) == (
        pb.JOB_PHASE_STARTED, 5_000, False)
    report = wire.usage_report("n1", [_usage(), _usage(gpu_index=2)])
    assert report.node == "n1" and [u.gpu_index for u in report.usage] == [1, 2]


def test_checkpoint_uid_only_when_the_kernel_told() -> None:
    reg = Registration("77", 5, "/ck/5", 10, 1000, 42, 11, b"MUNGE:x:")
    msg = wire.checkpoint_registered(reg, "n1")
    assert (msg.node, msg.uid, msg.step, msg.munge_credential) == ("n1", 1000, 5, b"MUNGE:x:")
    anon = wire.checkpoint_registered(Registration("77", 5, "/ck/5", 10, None, None, 11), "n1")
    assert not anon.HasField("uid")


def test_commands_the_agent_runs_and_those_it_does_not() -> None:
    reset = pb.Command(kind=pb.Command.KIND_RESET_GPU, request_id="r1", gpu_indices=[2, 3])
    assert wire.command(reset) == Command(CommandKind.RESET_GPU, "r1", (2, 3), 0)
    diag = pb.Command(kind=pb.Command.KIND_RUN_DIAG, request_id="r2", diag_level=2)
    assert wire.command(diag) == Command(CommandKind.RUN_DIAG, "r2", (), 2)
    # a kind this agent does not run (an older or newer controller's, here a bare 1)
    resend = pb.Command(kind=pb.Command.Kind.ValueType(1), request_id="r3")
    assert wire.command(resend) is None
    assert wire.command(pb.Command(request_id="r4")) is None  # kind unset
    got: list[Command] = []
    handle = wire.on_command(got.append)
    for msg in (reset, resend, diag):
        handle(msg)
    assert [c.request_id for c in got] == ["r1", "r2"]


def test_command_result_with_its_checks() -> None:
    res = CommandResult(ok=False, detail="failed: pcie", tool="gpufleet", request_id="r2",
                        kind=CommandKind.RUN_DIAG, started_ms=5, finished_ms=9,
                        checks=(Check("pcie", False, "x4", 3), Check("ib_port", True, "up",
                                                                     subject="mlx5_0/1")))
    msg = wire.command_result(res)
    assert (msg.request_id, msg.kind, msg.ok, msg.detail, msg.tool) == (
        "r2", pb.Command.KIND_RUN_DIAG, False, "failed: pcie", "gpufleet")
    assert (msg.started_ms, msg.finished_ms) == (5, 9)
    pcie, ib = msg.checks
    assert (pcie.name, pcie.passed, pcie.gpu_index, pcie.evidence) == ("pcie", False, 3, "x4")
    assert not ib.HasField("gpu_index") and ib.subject == "mlx5_0/1"
    unsent = wire.command_result(CommandResult(ok=True, detail="reset GPU(s) [0]"))
    assert unsent.kind == pb.Command.KIND_UNSPECIFIED


def test_the_import_contract_sees_every_agent_module() -> None:
    """Each agent module is either domain (the contract's source) or the edge (forbidden to
    the domain): a new module must be put in one list, so none slips past the contract."""
    doc = tomllib.loads((REPO / "pyproject.toml").read_text())
    (contract,) = [c for c in doc["tool"]["importlinter"]["contracts"] if c["name"] == CONTRACT]
    domain = {m.removeprefix("gpufleet.agent.") for m in contract["source_modules"]}
    edge = {m.removeprefix("gpufleet.agent.") for m in contract["forbidden_modules"]
            if m.startswith("gpufleet.agent.")}
    modules = {p.stem for p in (REPO / "agent/gpufleet/agent").glob("*.py")} - {"__init__",
                                                                                "__main__"}
    assert not domain & edge
    assert modules == domain | edge, (
        f"not in the contract: {sorted(modules - domain - edge)}; "
        f"gone: {sorted((domain | edge) - modules)}")
    assert {"wire", "client", "outbox", "spool"} <= edge
    assert {"accounting", "remedy", "jobsocket", "health"} <= domain


def test_the_job_hooks_never_load_protobuf() -> None:
    """`gpufleet-agent prolog|epilog` runs in every job's Prolog and Epilog: importing the
    command line must not pull in protobuf (only `collect` and `run` reach the wire)."""
    code = ("import sys, gpufleet.agent.cli, gpufleet.agent.accounting; "
            "print(sorted(m for m in sys.modules if m.startswith(('google', 'grpc'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
