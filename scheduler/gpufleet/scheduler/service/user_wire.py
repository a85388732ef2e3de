"""FleetUser's messages <-> the user API's domain types, both ways: the servicer
(user_service.py) reads requests and writes replies with these, the client side
(user_remote.py) writes requests and reads replies. Only shape and wire bounds are checked
here; what a request may ask is checked once, in userapi/local.py.
"""

from __future__ import annotations

import re

from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.scheduler.accounting.ledger import UsageQuery, UsageTotal
from gpufleet.scheduler.placement.model import (
    NodeChoice,
    Placement,
    PlacementError,
    PlacementRequest,
)
from gpufleet.scheduler.slurm import SlurmError, check_node_name
from gpufleet.scheduler.userapi.local import names
from gpufleet.scheduler.userapi.model import (
    NAME,
    JobCheckpoint,
    JobRecovery,
    JobReport,
    NodeActionResult,
    PlaceAnswer,
)

MAX_NODES = 100_000
MAX_GPUS = 1_000_000
MAX_TIME_LIMIT_MIN = 366 * 24 * 60
_FEATURE = re.compile(r"^[A-Za-z0-9_.|&:-]{1,64}$")
_STEPS = ("fault_ms", "drain_ms", "signal_ms", "requeue_ms", "running_ms", "checkpoint_step",
          "checkpoint_ms", "lost_work_ms")

# ---------------------------------------------------------------- accounting


def acct_request(q: UsageQuery, clip: bool) -> pb.AcctRequest:
    req = pb.AcctRequest(users=q.users, accounts=q.accounts, jobs=q.jobs, group_by=q.group_by,
                         clip=clip)
    if q.since_ms is not None:
        req.since_ms = q.since_ms
    if q.until_ms is not None:
        req.until_ms = q.until_ms
    return req


def usage_query(r: pb.AcctRequest) -> tuple[UsageQuery, bool]:
    return UsageQuery(users=tuple(r.users), accounts=tuple(r.accounts), jobs=tuple(r.jobs),
                      since_ms=r.since_ms if r.HasField("since_ms") else None,
                      until_ms=r.until_ms if r.HasField("until_ms") else None,
                      group_by=r.group_by or "job"), r.clip


def acct_row(t: UsageTotal) -> pb.AcctRow:
    row = pb.AcctRow(key=t.key, jobs=t.jobs, gpus=t.gpus, allocated_ms=t.allocated_ms,
                     busy_ms=t.busy_ms, energy_mj=t.energy_mj, lost_ms=t.lost_ms,
                     user=t.user, account=t.account, runs=t.runs)
    if t.start_ms is not None:
        row.start_ms = t.start_ms
    if t.end_ms is not None:
        row.end_ms = t.end_ms
    return row


def usage_total(r: pb.AcctRow) -> UsageTotal:
    return UsageTotal(r.key, r.jobs, r.gpus, r.allocated_ms, r.busy_ms, r.energy_mj, r.lost_ms,
                      r.start_ms if r.HasField("start_ms") else None,
                      r.end_ms if r.HasField("end_ms") else None, r.user, r.account, r.runs)


# ---------------------------------------------------------------- jobs


def show_job_reply(j: JobReport) -> pb.ShowJobReply:
    reply = pb.ShowJobReply(job_id=j.job_id, user=j.user or "")
    if j.checkpoint is not None:
        reply.checkpoint_step = j.checkpoint.step
        reply.checkpoint_path = j.checkpoint.path
        reply.checkpoint_ms = j.checkpoint.time_ms
        reply.checkpoint_node = j.checkpoint.node
    for r in j.recoveries:
        jr = reply.recoveries.add(node=r.node, status=r.status, detail=r.detail,
                                  restart=r.restart, created_ms=r.created_ms)
        for name in _STEPS:
            value = getattr(r, name)
            if value is not None:
                setattr(jr, name, value)
    return reply


def job_report(reply: pb.ShowJobReply) -> JobReport:
    ckpt = None
    if reply.HasField("checkpoint_step"):
        ckpt = JobCheckpoint(reply.checkpoint_step, reply.checkpoint_path,
                             reply.checkpoint_ms if reply.HasField("checkpoint_ms") else 0,
                             reply.checkpoint_node)
    def opt(r: pb.JobRecovery, name: str) -> int | None:
        return int(getattr(r, name)) if r.HasField(name) else None  # type: ignore[arg-type]

    recs = tuple(
        JobRecovery(r.node, r.status, r.detail, r.restart, opt(r, "fault_ms"),
                    opt(r, "drain_ms"), opt(r, "signal_ms"), opt(r, "requeue_ms"),
                    opt(r, "running_ms"), opt(r, "checkpoint_step"), opt(r, "checkpoint_ms"),
                    opt(r, "lost_work_ms"), r.created_ms)
        for r in reply.recoveries)
    return JobReport(reply.job_id, reply.user or None, ckpt, recs)


# ---------------------------------------------------------------- placement


def place_request(request: PlacementRequest) -> pb.PlaceRequest:
    msg = pb.PlaceRequest(partition=request.partition or "",
                          constraints=list(request.constraints),
                          exclude=sorted(request.exclude))
    for name in ("nodes", "gpus_per_node", "total_gpus", "time_limit_min"):
        value = getattr(request, name)
        if value is not None:
            setattr(msg, name, value)
    return msg


def _bounded(r: pb.PlaceRequest, field: str, top: int) -> int | None:
    if not r.HasField(field):  # type: ignore[arg-type]  # one of the optional counts
        return None
    value = int(getattr(r, field))
    if not 1 <= value <= top:
        raise PlacementError(f"request: {field} must be in 1..{top}, got {value}")
    return value


def placement_request(r: pb.PlaceRequest) -> PlacementRequest:
    """The request, or PlacementError naming the field that is out of bounds."""
    if r.partition and not NAME.match(r.partition):
        raise PlacementError(f"request: partition {r.partition[:40]!r} is not a valid name")
    try:
        constraints = names(r.constraints, "feature", _FEATURE)
        exclude = [check_node_name(n) for n in names(r.exclude, "node name", NAME)]
    except (ValueError, SlurmError) as e:
        raise PlacementError(f"request: {e}") from e
    req = PlacementRequest(
        nodes=_bounded(r, "nodes", MAX_NODES),
        gpus_per_node=_bounded(r, "gpus_per_node", 1024),
        total_gpus=_bounded(r, "total_gpus", MAX_GPUS),
        partition=r.partition or None, constraints=constraints,
        time_limit_min=_bounded(r, "time_limit_min", MAX_TIME_LIMIT_MIN),
        exclude=frozenset(exclude),
    )
    req.check()
    return req


def place_reply(a: PlaceAnswer) -> pb.PlaceReply:
    p = a.placement
    reply = pb.PlaceReply(ok=p.ok, flags=p.flags, score=p.score, explanation=p.explanation,
                          avoid=a.avoid)
    reply.cost.update({k: float(v) for k, v in p.cost.items()})
    reply.env.update(p.env)
    for c in p.nodes:
        reply.nodes.add(node=c.node, leaf=c.leaf, gpus=c.gpus, nvlink_islands=c.islands,
                        nic_rank=c.nic_rank, free_gpus_left=c.free_gpus_left)
    return reply


def place_answer(reply: pb.PlaceReply, request: PlacementRequest) -> PlaceAnswer:
    return PlaceAnswer(Placement(
        ok=reply.ok, request=request,
        nodes=[NodeChoice(n.node, n.leaf, tuple(n.gpus), n.nvlink_islands, n.nic_rank,
                          n.free_gpus_left) for n in reply.nodes],
        flags=list(reply.flags), score=reply.score, cost=dict(reply.cost),
        explanation=list(reply.explanation), env=dict(reply.env)), tuple(reply.avoid))


# ---------------------------------------------------------------- drain / resume


def node_action_reply(r: NodeActionResult) -> pb.NodeActionReply:
    return pb.NodeActionReply(changed=r.changed, unchanged=r.unchanged)


def node_action_result(reply: pb.NodeActionReply) -> NodeActionResult:
    return NodeActionResult(tuple(reply.changed), tuple(reply.unchanged))
