"""The agent's one door to the wire contract (gpufleet.rpc.v1): its typed values into
messages, and the controller's commands into typed values.

Every protobuf message the agent sends is built here (the transport, `outbox`, `spool` and
`client`, only carries them); the domain modules (accounting, health, remedy, jobsocket, ...)
never import protobuf, and an import-linter contract in pyproject.toml keeps it so. What goes
on the wire must not change with a refactoring here: optional fields are set exactly where
the agent always set them (an optional field set to 0 is still sent).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from gpufleet.agent.accounting import GpuUsage, JobPhase
from gpufleet.agent.diag import Check
from gpufleet.agent.health import Verdict
from gpufleet.agent.jobsocket import Registration
from gpufleet.agent.remedy import Command, CommandKind, CommandResult
from gpufleet.agent.telemetry import (
    GpuInfo,
    GpuLinkInfo,
    GpuSample,
    HostSample,
    IbPortInfo,
    IbPortSample,
    PcieRelation,
    XidEvent,
)
from gpufleet.rpc.v1 import fleet_pb2 as pb


def as_dict(msg: Message) -> dict[str, Any]:
    """A message as JSON-ready data, with the .proto's field names (`collect --json`)."""
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


# Field names are the same on both sides by design; unset (None) stays unset on the wire.
_SAMPLE_FIELDS = tuple(f.name for f in dataclasses.fields(GpuSample))
_IB_SAMPLE_FIELDS = tuple(f.name for f in dataclasses.fields(IbPortSample))


def gpu_info(g: GpuInfo) -> pb.Gpu:
    msg = pb.Gpu(
        index=g.index,
        uuid=g.uuid,
        pci_bus_id=g.pci_bus_id,
        model=g.model,
        memory_total_bytes=g.memory_total_bytes,
        serial=g.serial,
        vbios_version=g.vbios_version,
        nvlink_count=g.nvlink_count,
    )
    if g.numa_node is not None:
        msg.numa_node = g.numa_node
    return msg


def gpu_link(link: GpuLinkInfo) -> pb.GpuLink:
    return pb.GpuLink(
        gpu_a=link.gpu_a,
        gpu_b=link.gpu_b,
        nvlink_count=link.nvlink_count,
        pcie_relation=int(link.pcie_relation),  # type: ignore[arg-type]
    )


def nic_affinity(gpu: int, hca: str, rel: PcieRelation) -> pb.GpuNicAffinity:
    return pb.GpuNicAffinity(gpu_index=gpu, hca=hca, pcie_relation=int(rel))  # type: ignore[arg-type]


def gpu_sample(s: GpuSample) -> pb.GpuSample:
    msg = pb.GpuSample()
    for name in _SAMPLE_FIELDS:
        value = getattr(s, name)
        if value is not None:
            setattr(msg, name, value)
    return msg


def verdict(v: Verdict) -> pb.Verdict:
    msg = pb.Verdict(
        check=v.check,
        severity=int(v.severity),  # type: ignore[arg-type]
        reason_code=v.reason_code,
        evidence=v.evidence,
        since_ms=v.since_ms,
        subject=v.subject,
    )
    if v.gpu_index is not None:
        msg.gpu_index = v.gpu_index
    return msg


def ib_port(p: IbPortInfo) -> pb.IbPort:
    msg = pb.IbPort(hca=p.hca, port=p.port, node_guid=p.node_guid, port_guid=p.port_guid,
                    lid=p.lid, sm_lid=p.sm_lid, state=p.state, phys_state=p.phys_state,
                    rate_gbps=p.rate_gbps, link_layer=p.link_layer)
    if p.numa_node is not None:
        msg.numa_node = p.numa_node
    return msg


def ib_port_sample(p: IbPortSample) -> pb.IbPortSample:
    msg = pb.IbPortSample()
    for name in _IB_SAMPLE_FIELDS:
        value = getattr(p, name)
        if value is not None:
            setattr(msg, name, value)
    return msg


def host_sample(h: HostSample) -> pb.HostSample:
    return pb.HostSample(
        cpu_pct=h.cpu_pct, memory_used_bytes=h.memory_used_bytes,
        memory_total_bytes=h.memory_total_bytes, load_1m=h.load_1m,
        disks=[pb.DiskUsage(path=d.path, used_bytes=d.used_bytes, total_bytes=d.total_bytes)
               for d in h.disks],
    )


# ---------------------------------------------------------------- node: inventory, samples

def node_inventory(*, node_name: str, hostname: str, agent_version: str, driver_version: str,
                   cuda_driver_version: str, gpus: Sequence[GpuInfo],
                   links: Iterable[GpuLinkInfo],
                   nic_affinities: Iterable[tuple[int, str, PcieRelation]],
                   ib_ports: Iterable[IbPortInfo], cpu_count: int, memory_total_bytes: int,
                   boot_id: str, nvml_backend: str) -> pb.NodeInventory:
    return pb.NodeInventory(
        node_name=node_name,
        hostname=hostname,
        agent_version=agent_version,
        driver_version=driver_version,
        cuda_driver_version=cuda_driver_version,
        gpus=[gpu_info(g) for g in gpus],
        gpu_links=[gpu_link(lk) for lk in links],
        gpu_nic_affinity=[nic_affinity(*a) for a in nic_affinities],
        ib_ports=[ib_port(p) for p in ib_ports],
        cpu_count=cpu_count,
        memory_total_bytes=memory_total_bytes,
        numa_node_count=len({g.numa_node for g in gpus if g.numa_node is not None}),
        boot_id=boot_id,
        nvml_backend=nvml_backend,
    )


def hello(inventory: pb.NodeInventory, last_acked_seq: int) -> pb.Hello:
    return pb.Hello(inventory=inventory, last_acked_seq=last_acked_seq)


def node_sample(timestamp_ms: int, gpus: Iterable[GpuSample], ib_ports: Iterable[IbPortSample],
                host: HostSample, verdicts: Iterable[Verdict]) -> pb.NodeSample:
    return pb.NodeSample(
        timestamp_ms=timestamp_ms,
        gpus=[gpu_sample(g) for g in gpus],
        ib_ports=[ib_port_sample(p) for p in ib_ports],
        host=host_sample(host),
        verdicts=[verdict(v) for v in verdicts],
    )


def heartbeat(timestamp_ms: int) -> pb.Heartbeat:
    return pb.Heartbeat(timestamp_ms=timestamp_ms)


# ---------------------------------------------------------------- health events

def xid_event(event: XidEvent, v: Verdict) -> pb.HealthEvent:
    """An XID (or a GPU lost from the bus) and the verdict it made, pushed at once."""
    ev = pb.HealthEvent(
        timestamp_ms=event.timestamp_ms,
        kind=pb.EVENT_KIND_GPU_LOST if event.lost else pb.EVENT_KIND_XID,
        verdict=verdict(v),
    )
    if not event.lost:  # a GPU lost without an Xid has no number to send
        ev.xid = event.xid
    if event.gpu_index is not None:
        ev.gpu_index = event.gpu_index
    return ev


def verdict_changed(timestamp_ms: int, gpu_index: int, v: Verdict) -> pb.HealthEvent:
    return pb.HealthEvent(timestamp_ms=timestamp_ms, kind=pb.EVENT_KIND_VERDICT_CHANGED,
                          gpu_index=gpu_index, verdict=verdict(v))


# ---------------------------------------------------------------- jobs: checkpoints, usage

def checkpoint_registered(reg: Registration, node: str) -> pb.CheckpointRegistered:
    """A job's checkpoint registration as the controller receives it (with the job's MUNGE
    credential, verbatim, if it made one)."""
    msg = pb.CheckpointRegistered(
        job_id=reg.job_id, step=reg.step, path=reg.path, time_ms=reg.time_ms,
        node=node, received_ms=reg.received_ms, munge_credential=reg.munge_credential)
    if reg.uid is not None:
        msg.uid = reg.uid
    return msg


_JOB_PHASE: dict[JobPhase, pb.JobPhase.ValueType] = {
    JobPhase.STARTED: pb.JOB_PHASE_STARTED,
    JobPhase.RUNNING: pb.JOB_PHASE_RUNNING,
    JobPhase.ENDED: pb.JOB_PHASE_ENDED,
}


def job_gpu_usage(u: GpuUsage) -> pb.JobGpuUsage:
    # energy_mj, run and source are optional on the wire and always sent by this agent
    # (0 too): the controller tells "run 0" from "an agent before runs" by their presence
    msg = pb.JobGpuUsage(
        job_id=u.job_id, gpu_index=u.gpu_index, user=u.user, account=u.account,
        start_ms=u.start_ms, as_of_ms=u.as_of_ms, allocated_ms=u.allocated_ms,
        busy_ms=u.busy_ms, energy_mj=u.energy_mj, phase=_JOB_PHASE[u.phase], run=u.run,
        source=str(u.source),
    )
    if u.end_ms is not None:
        msg.end_ms = u.end_ms
    if u.idle_since_ms is not None:
        msg.idle_since_ms = u.idle_since_ms
    return msg


def usage_report(node: str, rows: Iterable[GpuUsage]) -> pb.JobUsageReport:
    return pb.JobUsageReport(node=node, usage=[job_gpu_usage(r) for r in rows])


# ---------------------------------------------------------------- repair commands

_COMMAND_KIND: dict[CommandKind, pb.Command.Kind.ValueType] = {
    CommandKind.RESET_GPU: pb.Command.KIND_RESET_GPU,
    CommandKind.RUN_DIAG: pb.Command.KIND_RUN_DIAG,
}
_KIND_OF_WIRE = {v: k for k, v in _COMMAND_KIND.items()}


def command(msg: pb.Command) -> Command | None:
    """The controller's command as the agent runs it; None for a kind the agent does not run."""
    kind = _KIND_OF_WIRE.get(msg.kind)
    if kind is None:
        return None
    return Command(kind=kind, request_id=msg.request_id, gpu_indices=tuple(msg.gpu_indices),
                   diag_level=msg.diag_level)


def on_command(submit: Callable[[Command], object]) -> Callable[[pb.Command], None]:
    """The stream's command handler: each command the agent runs goes to `submit`, typed."""
    def handle(msg: pb.Command) -> None:
        cmd = command(msg)
        if cmd is not None:
            submit(cmd)
    return handle


def diag_check(c: Check) -> pb.DiagCheck:
    msg = pb.DiagCheck(name=c.name, passed=c.passed, evidence=c.evidence, subject=c.subject)
    if c.gpu_index is not None:
        msg.gpu_index = c.gpu_index
    return msg


def command_result(r: CommandResult) -> pb.CommandResult:
    return pb.CommandResult(
        request_id=r.request_id,
        kind=pb.Command.KIND_UNSPECIFIED if r.kind is None else _COMMAND_KIND[r.kind], ok=r.ok,
        could_not_run=r.could_not_run, detail=r.detail, checks=[diag_check(c) for c in r.checks],
        tool=r.tool, started_ms=r.started_ms, finished_ms=r.finished_ms,
    )
