"""Turn the agent's typed values into wire-contract messages (gpufleet.rpc.v1)."""

from __future__ import annotations

import dataclasses

from gpufleet.agent.health import Verdict
from gpufleet.agent.telemetry import (
    GpuInfo,
    GpuLinkInfo,
    GpuSample,
    HostSample,
    IbPortInfo,
    IbPortSample,
    PcieRelation,
)
from gpufleet.rpc.v1 import fleet_pb2 as pb

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
