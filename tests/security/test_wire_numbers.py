"""Numbers on the wire the store cannot hold, and bytes that are no message at all.

A report whose uint64 is 2^63 or more (or whose seq is 0) is refused with a reason naming the
field, and every report behind it on that node is stored; no report, whatever its numbers,
ends the stream with anything but an ack (with or without a rejection); garbage bytes end
the stream with INVALID_ARGUMENT and one warning line, never a traceback.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.rpc.v1 import fleet_pb2_grpc as pb_grpc
from gpufleet.scheduler.service import limits
from gpufleet.scheduler.service.server import Controller
from gpufleet.scheduler.store import SqliteStore
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.security.helpers import hello

U64 = 2**64 - 1
NOW = int(time.time() * 1000)


def _event(seq: int, inst: str, i: int) -> pb.AgentMessage:
    return pb.AgentMessage(seq=seq, agent_instance=inst, event=pb.HealthEvent(
        timestamp_ms=NOW, kind=pb.EVENT_KIND_THERMAL, gpu_index=i % 8,
        verdict=pb.Verdict(check="thermal", severity=pb.SEVERITY_WARN, reason_code="hot",
                           evidence=f"report {i}", since_ms=NOW, gpu_index=i % 8)))


def _usage(seq: int, inst: str, **numbers: int) -> pb.AgentMessage:
    u = pb.JobGpuUsage(job_id="77", gpu_index=0, user="alice", account="phys",
                       start_ms=NOW - 60_000, as_of_ms=NOW, allocated_ms=60_000, busy_ms=1,
                       energy_mj=5, phase=pb.JOB_PHASE_RUNNING)
    for k, v in numbers.items():
        setattr(u, k, v)
    return pb.AgentMessage(seq=seq, agent_instance=inst,
                           usage=pb.JobUsageReport(node="n1", usage=[u]))


def _checkpoint(seq: int, inst: str, step: int) -> pb.AgentMessage:
    return pb.AgentMessage(seq=seq, agent_instance=inst, checkpoint=pb.CheckpointRegistered(
        job_id="77", step=step, path="/ckpt/77", time_ms=NOW, node="n1"))


# (case, bad report of instance "I" at seq 1, the field its rejection must name)
BAD: list[tuple[str, Any, str]] = [
    ("energy_mj=2^64-1", lambda i: _usage(1, i, energy_mj=U64), "energy_mj=18446744073709551615"),
    ("allocated_ms=2^63", lambda i: _usage(1, i, allocated_ms=2**63), "allocated_ms"),
    ("busy_ms=2^63", lambda i: _usage(1, i, busy_ms=2**63), "busy_ms"),
    ("step=2^63", lambda i: _checkpoint(1, i, 2**63), "checkpoint.step"),
    ("seq=2^63", lambda i: _event(2**63, i, 0), "AgentMessage.seq"),
    ("seq=2^64-1", lambda i: _event(U64, i, 0), "AgentMessage.seq"),
    ("seq=0", lambda i: _event(0, i, 0), "AgentMessage.seq=0"),
    ("gpu_index=2^32-1", lambda i: _usage(1, i, gpu_index=2**32 - 1), "gpu_index"),
]


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Controller]:
    store = SqliteStore(tmp_path_factory.mktemp("wire") / "state.db")
    ctl = Controller(store, None, listen="127.0.0.1:0")
    ctl.start()
    try:
        yield ctl
    finally:
        ctl.stop(grace_s=0.2)
        store.close()


def _connect(ctl: Controller, messages: list[pb.AgentMessage]) -> list[pb.Ack]:
    with grpc.insecure_channel(f"127.0.0.1:{ctl.port}") as channel:
        stub = pb_grpc.FleetControllerStub(channel)
        return [r.ack for r in stub.Connect(iter(messages), timeout=20)]


@pytest.mark.parametrize(("bad", "field"), [(b, f) for _, b, f in BAD],
                         ids=[c for c, _, _ in BAD])
def test_one_bad_report_then_100_good_ones_all_stored(controller: Controller, bad: Any,
                                                      field: str) -> None:
    node, inst = "n1", uuid.uuid4().hex
    store = controller.store
    before = len(store.events(node, limit=100_000))
    first = bad(inst)
    start = 1 if first.seq != 1 else 2
    good = [_event(start + i, inst, i) for i in range(100)]
    acks = _connect(controller, [hello(node, inst), first, *good])  # no RpcError: not ended
    assert len(acks) == 101
    (rej,) = acks[0].rejected
    assert rej.seq == first.seq and field in rej.reason, rej.reason
    assert all(not a.rejected for a in acks[1:])
    assert acks[-1].seq == start + 99
    assert store.last_seq(node) == (inst, start + 99)
    assert len(store.events(node, limit=100_000)) - before == 100
    # nothing of the bad one reached the store
    assert store.checkpoint("77") is None and store.usage_rows("77") == []


def test_limits_name_the_store_bound() -> None:
    with pytest.raises(limits.LimitError, match=r"usage\[0\]\.energy_mj=18446744073709551615: "
                                                 r"more than 9223372036854775807"):
        limits.check(_usage(1, "i", energy_mj=U64), NOW)
    limits.check(_usage(1, "i", energy_mj=2**63 - 1), NOW)  # the largest the store holds
    limits.check(hello("n1"), NOW)  # a hello's seq is 0
    with pytest.raises(limits.LimitError, match="not a finite number"):
        limits.check(pb.AgentMessage(seq=1, agent_instance="i", hello=pb.Hello(
            inventory=pb.NodeInventory(node_name="n", ib_ports=[pb.IbPort(
                rate_gbps=float("nan"))]))), NOW)


def _values(field: FieldDescriptor) -> st.SearchStrategy[Any]:  # noqa: PLR0911 - one per type
    t = field.type
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.one_of(st.integers(0, U64), st.sampled_from([0, 1, 2**63 - 1, 2**63, U64]))
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 63, 64, 2**31]))
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64):
        return st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(NOW - 10**9, NOW))
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_ENUM):
        return st.integers(-(2**31), 2**31 - 1)
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.text(max_size=20), st.sampled_from(["77", "1_2", "/a", "xid"]))
    return st.just(b"")  # bytes: the MUNGE credential, tried by the munge tests


@st.composite
def _messages(draw: st.DrawFn, desc: Any, depth: int = 0) -> Any:
    cls = getattr(pb, desc.name)
    msg = cls()
    for field in desc.fields:
        if not draw(st.booleans()):
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth > 3:
                continue
            sub = _messages(field.message_type, depth + 1)
            if field.is_repeated:
                for item in draw(st.lists(sub, max_size=3)):
                    getattr(msg, field.name).add().CopyFrom(item)
            else:
                getattr(msg, field.name).CopyFrom(draw(sub))
        elif field.is_repeated:
            getattr(msg, field.name).extend(draw(st.lists(_values(field), max_size=3)))
        else:
            setattr(msg, field.name, draw(_values(field)))
    return msg


@st.composite
def _reports(draw: st.DrawFn) -> tuple[int, str, Any]:
    body = draw(st.sampled_from(["sample", "event", "checkpoint", "usage"]))
    field = pb.AgentMessage.DESCRIPTOR.fields_by_name[body]
    seq = draw(st.one_of(st.integers(0, U64), st.sampled_from([0, 1, 2**63 - 1, 2**63, U64])))
    return seq, body, draw(_messages(field.message_type))


def test_no_report_ends_a_stream_but_with_an_ack(controller: Controller,
                                                 fuzz_budget: int) -> None:
    """Any report (any numbers in any field) of the stream's own agent for its own node: the
    stream goes on, and the report is acked, stored or rejected with a reason."""

    @settings(max_examples=max(1, fuzz_budget * 3 // 4), deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(_reports())
    def one(report: tuple[int, str, Any]) -> None:
        seq, body, payload = report
        inst = uuid.uuid4().hex
        msg = pb.AgentMessage(seq=seq, agent_instance=inst)
        getattr(msg, body).CopyFrom(payload)
        if body == "usage":
            msg.usage.node = "fz1"  # another node's name ends a stream, by design
        if body == "checkpoint":
            msg.checkpoint.node = "fz1"
        follow = _event(2**62, inst, 0)
        try:
            acks = _connect(controller, [hello("fz1", inst), msg, follow])
        except grpc.RpcError as e:
            pytest.fail(f"{body} report seq={seq} ended the stream: {e.code()} {e.details()}")
        assert len(acks) == 2
        for rej in acks[0].rejected:
            assert rej.seq == seq and rej.reason
        assert not acks[1].rejected and acks[1].seq == 2**62  # the one behind it: stored

    one()


def test_garbage_bytes_end_the_stream_with_one_line(controller: Controller,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{controller.port}") as channel:
        call = channel.stream_stream("/gpufleet.v1.FleetController/Connect")
        with caplog.at_level(logging.INFO), pytest.raises(grpc.RpcError) as err:
            list(call(iter([b"\xff\xff\xff\xffnot protobuf"]), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a gpufleet.v1.AgentMessage" in (err.value.details() or "")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    (line,) = [r.getMessage() for r in caplog.records if "undecodable" in r.getMessage()]
    assert "\n" not in line
