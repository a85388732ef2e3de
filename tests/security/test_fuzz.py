"""Hypothesis fuzzing: random agent message sequences over a real loopback stream, and random
config files. The controller never crashes, answers with a clear status, and what it stored
stays consistent; config parsing fails only with the parser's own error.

Fixed budget per target (GPUFLEET_FUZZ_EXAMPLES overrides) under `slow`, a quick one in the
fast set (tests/conftest.py's `fuzz_budget`); each prints how many inputs it tried.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from gpufleet.agent.config import AgentConfig, ConfigError, load_file
from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.rpc.v1 import fleet_pb2_grpc as pb_grpc
from gpufleet.scheduler.cli.main import main as gpufleet_main
from gpufleet.scheduler.service import limits
from gpufleet.scheduler.service.server import Controller
from gpufleet.scheduler.store import SqliteStore
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def fuzz(budget: int) -> settings:
    return settings(max_examples=budget, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


# a clear answer: served (bad reports rejected in their acks), or the stream refused as bad
# input; never UNKNOWN/INTERNAL (a crash)
CLEAR = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}

NOW_MS = int(time.time() * 1000)
names = st.one_of(st.sampled_from(["n1", "n2", "gpu-07", ""]),
                  st.text(max_size=80), st.just("x" * 5000))
texts = st.one_of(st.text(max_size=40), st.just("e" * 3000), st.just("a\x00b"))
times_ms = st.one_of(st.just(NOW_MS), st.integers(-(2**63), 2**63 - 1), st.just(0))
# mostly the hello's instance, so reports get past the stream checks to validation
instances = st.sampled_from(["i1", "i1", "i1", "i1", "i1", "i2", ""])
seqs = st.integers(0, 2**64 - 1) | st.integers(0, 5)


@st.composite
def verdicts(draw: st.DrawFn) -> pb.Verdict:
    v = pb.Verdict(check=draw(texts), severity=draw(st.integers(0, 6)),
                   reason_code=draw(texts), evidence=draw(texts), since_ms=draw(times_ms),
                   subject=draw(texts))
    if draw(st.booleans()):
        v.gpu_index = draw(st.integers(0, 2**32 - 1))
    return v


@st.composite
def agent_messages(draw: st.DrawFn) -> pb.AgentMessage:
    msg = pb.AgentMessage(seq=draw(seqs), agent_instance=draw(instances))
    body = draw(st.sampled_from(["hello", "sample", "event", "checkpoint", "none"]))
    if body == "hello":
        inv = msg.hello.inventory
        inv.node_name = draw(names)
        inv.hostname = draw(texts)
        for i in range(draw(st.sampled_from([0, 2, 8, 65, 300]))):
            inv.gpus.add(index=i, uuid=f"GPU-{i}")
    elif body == "sample":
        msg.sample.timestamp_ms = draw(times_ms)
        msg.sample.verdicts.extend(draw(st.lists(verdicts(), max_size=3)))
        if draw(st.booleans()):
            msg.sample.verdicts.extend([pb.Verdict(check="x")] * 300)
    elif body == "event":
        msg.event.timestamp_ms = draw(times_ms)
        msg.event.kind = draw(st.integers(0, 9))
        msg.event.verdict.CopyFrom(draw(verdicts()))
        if draw(st.booleans()):
            msg.event.xid = draw(st.integers(0, 2**32 - 1))
    elif body == "checkpoint":
        c = msg.checkpoint
        c.job_id = draw(st.one_of(st.sampled_from(["1234", "12_3"]), texts))
        c.path = draw(st.one_of(st.just("/ckpt/step1"), texts, st.just("/" + "p" * 5000)))
        c.step = draw(st.integers(0, 2**64 - 1))
        c.time_ms = draw(times_ms)
    return msg


@st.composite
def sessions(draw: st.DrawFn) -> list[pb.AgentMessage]:
    first = draw(agent_messages())
    if draw(st.integers(0, 3)) > 0:  # mostly a valid hello, so later messages get through
        first = pb.AgentMessage(seq=0, agent_instance="i1")
        first.hello.inventory.node_name = draw(st.sampled_from(["n1", "n2", "n3"]))
        first.hello.inventory.gpus.add(index=0, uuid="GPU-0")
    return [first, *draw(st.lists(agent_messages(), max_size=6))]


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Controller]:
    store = SqliteStore(tmp_path_factory.mktemp("fuzz") / "state.db")
    ctl = Controller(store, None, listen="127.0.0.1:0")
    ctl.start()
    yield ctl
    ctl.stop(grace_s=0.2)
    store.close()


def _stream_acks(channel: grpc.Channel, messages: list[pb.AgentMessage],
                 timeout_s: float) -> tuple[grpc.StatusCode, list[pb.Ack], str]:
    stub = pb_grpc.FleetControllerStub(channel)
    acks: list[pb.Ack] = []
    try:
        for reply in stub.Connect(iter(messages), timeout=timeout_s):
            acks.append(reply.ack)
    except grpc.RpcError as e:
        return e.code(), acks, e.details() or ""
    return grpc.StatusCode.OK, acks, ""


def _ends_the_stream(msg: pb.AgentMessage, hello: pb.AgentMessage) -> bool:
    """A stream-level violation: the only kind of bad report that may still end a stream."""
    body = msg.WhichOneof("body")
    claimed = msg.checkpoint.node if body == "checkpoint" else ""
    return (body == "hello" or msg.agent_instance != hello.agent_instance
            or bool(claimed and claimed != hello.hello.inventory.node_name))


def _good_hello(msg: pb.AgentMessage) -> bool:
    name = msg.hello.inventory.node_name
    return (msg.WhichOneof("body") == "hello" and bool(msg.agent_instance)
            and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name) is not None
            and len(msg.hello.inventory.gpus) <= 64 and not _fails_limits(msg))


def _fails_limits(msg: pb.AgentMessage) -> bool:
    try:
        limits.check(msg)
    except limits.LimitError:
        return True
    return False


def test_fuzz_servicer_streams(controller: Controller, report_figure: Callable[[str], None],
                               fuzz_budget: int) -> None:
    tried = {"n": 0, "refused": 0, "rejected": 0, "valid_hello": 0}
    channel = grpc.insecure_channel(f"127.0.0.1:{controller.port}")
    event_kinds = set(pb.EventKind.keys())

    @fuzz(fuzz_budget)
    @given(sessions())
    def one(messages: list[pb.AgentMessage]) -> None:
        tried["n"] += 1
        hello = messages[0]
        code, acks, details = _stream_acks(channel, messages, timeout_s=10)
        assert code in CLEAR, f"{code}: {details}"
        if code != grpc.StatusCode.OK:
            tried["refused"] += 1
            assert details, "a refusal must say why"
        # every ack answers the message in its position (hello is not acked)
        assert [a.seq for a in acks] == [m.seq for m in messages[1:len(acks) + 1]]
        if code != grpc.StatusCode.OK and (acks or _good_hello(hello)):
            tried["valid_hello"] += 1
            # a bad report is rejected, not the stream: a refusal after a good hello is the
            # report right after the last ack breaking the stream itself
            assert len(acks) + 1 < len(messages), details
            assert _ends_the_stream(messages[len(acks) + 1], hello), (
                f"stream ended on a per-report error: {details}")
        for msg, ack in zip(messages[1:], acks, strict=False):
            # a report that breaks a limit is never stored: it comes back rejected, with why
            if _fails_limits(msg):
                assert [r.seq for r in ack.rejected] == [msg.seq], (msg, ack)
            for r in ack.rejected:
                tried["rejected"] += 1
                assert r.seq == msg.seq and r.reason
        # the store still reads back, and holds nothing the limits forbid
        for node in controller.store.nodes():
            assert 0 < len(node.name) <= 64
            assert node.gpu_count <= 64
        for ev in controller.store.events(limit=100_000):
            assert ev.kind in event_kinds and ev.severity in ("ok", "warn", "degraded", "fatal")
        assert controller._thread is not None and controller._thread.is_alive()

    try:
        one()
    finally:
        channel.close()
    report_figure(f"fuzz servicer Connect: {tried['n']} message sequences tried, "
                  f"{tried['rejected']} reports rejected (acked with a reason, stream kept), "
                  f"{tried['refused']} streams refused with INVALID_ARGUMENT, 0 crashes")
    assert tried["n"] >= min(fuzz_budget, 50)
    assert tried["rejected"] > 0, "the fuzzer never produced a rejected report"


KNOWN_AGENT_KEYS = ["controller", "interval_s", "insecure", "ca_path", "debounce",
                    "disk_paths", "expected_gpu_count", "node_name", "metrics_listen",
                    "job_socket_path", "debounce_cycles", "bogus_key"]
toml_values = st.one_of(
    st.integers(-(2**63), 2**63 - 1).map(str), st.floats(allow_nan=True).map(
        lambda f: repr(f).replace("inf", "inf").replace("nan", "nan")),
    st.text(max_size=20).map(lambda s: '"' + s.replace("\\", "").replace('"', "") + '"'),
    st.sampled_from(["true", "false", "[]", '["/", 3]', "{a = 1}", '"a:1,b:2"', "[1, 2",
                     '"127.0.0.1:1"']),
)


@st.composite
def toml_docs(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 4)) == 0:
        return draw(st.text(max_size=200))
    lines = [f"{draw(st.sampled_from(KNOWN_AGENT_KEYS))} = {draw(toml_values)}"
             for _ in range(draw(st.integers(0, 6)))]
    if draw(st.booleans()):
        lines.append(f"[debounce]\n{draw(st.sampled_from(['thermal', 'xid', 'nope']))} = "
                     f"{draw(toml_values)}")
    return "\n".join(lines)


def test_fuzz_agent_config_file(tmp_path: Path, report_figure: Callable[[str], None],
                                fuzz_budget: int) -> None:
    tried = {"n": 0, "ok": 0}
    path = tmp_path / "agent.toml"

    @fuzz(fuzz_budget)
    @given(toml_docs())
    def one(doc: str) -> None:
        tried["n"] += 1
        path.write_text(doc, encoding="utf-8", errors="surrogatepass")
        error = ""
        try:
            data = load_file(path)
            AgentConfig(**data).validate()
        except ConfigError as e:
            error = str(e)
        except TypeError:
            return  # a value of the wrong type: the CLI reports it as a usage error
        if error:
            # a clear error names the file or the setting that is wrong
            assert str(path) in error or any(f.name in error for f in fields(AgentConfig)), error
            return
        tried["ok"] += 1

    one()
    report_figure(f"fuzz agent config.load_file+validate: {tried['n']} files tried, "
                  f"{tried['ok']} accepted, the rest refused with ConfigError/TypeError")


def test_fuzz_controller_toml(tmp_path: Path, report_figure: Callable[[str], None],
                              fuzz_budget: int) -> None:
    tried = {"n": 0}
    path = tmp_path / "controller.toml"
    runner = CliRunner()
    keys = ["listen", "db", "slurm", "shadow", "insecure", "tls_ca", "metrics_listen", "nope"]

    @fuzz(fuzz_budget)
    @given(st.one_of(
        st.text(max_size=200),
        st.lists(st.tuples(st.sampled_from(keys), toml_values), max_size=5).map(
            lambda kv: "\n".join(f"{k} = {v}" for k, v in kv)),
    ))
    def one(doc: str) -> None:
        tried["n"] += 1
        path.write_text(doc, encoding="utf-8", errors="surrogatepass")
        # `events` reads the file and opens the store: a missing store is a clean error
        res = runner.invoke(gpufleet_main, ["--config", str(path), "events", "--db",
                                            str(tmp_path / "absent.db")])
        assert res.exit_code in (1, 2), res.output
        assert isinstance(res.exception, SystemExit), repr(res.exception)

    one()
    report_figure(f"fuzz controller.toml (--config): {tried['n']} files tried, 0 crashes")
