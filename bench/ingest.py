"""Controller ingest: N simulated agents against the real controller, and against a bare stream.

Prints, for the real controller (gpufleet.scheduler.service.server over loopback gRPC, SQLite store,
the default health policy acting on an in-memory Slurm) and for a bare gRPC bidirectional
stream that only parses each report and acks what the protocol acks (same proto, same
messages, same drivers), in the same run:

- steady: N agents, each sending what a real agent sends at steady state: a heartbeat every
  --heartbeat-s (the agent's default 5 s), spread over the interval, for --seconds; the
  heartbeat unsequenced (seq 0) and never acked, as gpufleet-agent sends it (fleet.proto
  Heartbeat); `--kinds bare-acked,controller-acked` run the wire before that (each heartbeat
  sequenced, acked, the agent waiting for the ack), so one run shows what the acks cost;
- samples: (--samples-seconds > 0) the old wire: one 8-GPU sample per agent per second;
- saturated: the same N streams, each keeping --window sequenced heartbeats in flight (their
  acks bound what is in flight), for --saturate-seconds: the sustained reports/s, and CPU-us
  per report.

For each: reports/s (sent at steady state, acked when saturated), server CPU-us per report,
% of one core, RSS; the per-report efficiency controller/bare (bare us / controller us:
target >= 50 %). While the steady phase runs the controller also gets --faults Xid 79
events (fault -> drain in the in-memory Slurm, p50/p99) and --silence agents stop (liveness:
silent -> marked unreachable, with --unreachable-after-s).

On a real Slurm (`--real-slurm 22.05|24.11|26.05`, root): a lab of --faults slurmd nodes (the
project's harness, tests/slurm) stands for the faulted agents; the controller's drains of
those nodes go to the lab through the `scontrol` client (every other node stays in the
in-memory Slurm), and fault -> drain is measured to `scontrol update` returned, while the
controller holds all N agents.

Every agent has its OWN TCP connection (`grpc.use_local_subchannel_pool`: gRPC otherwise puts
every channel to one target on one shared connection), and the agents are spread over
--drivers processes; the servers run in their own processes and their CPU is read from /proc.
The messages are real: the inventory and a steady-state sample (8 GPUs, no verdict changes)
from the agent's own code over the simulated DGX H100.

Several processes (`--processes 2 --store postgres`): that many controller processes on one
throw-away PostgreSQL, all started with standby_ingests; the first leads and alone acts in
Slurm, the agents are split evenly, and the faults and dead agents are all at the processes
that do not lead, so every drain and unreachable mark goes through the store. Prints each
process's CPU (% of one core, us per report, us per node per second) and RSS, PostgreSQL's
CPU, and fault -> drain p50/p99 split at the leader's queued action. Steady phase only.

    .venv/bin/python bench/ingest.py [--agents 10000] [--seconds 30] [--drivers 4]
    .venv/bin/python bench/ingest.py --agents 4000 --seconds 30 --processes 2 --store postgres
    .venv/bin/python bench/ingest.py --agents 200 --seconds 5 --saturate-seconds 3  # CI size
    .venv/bin/python bench/ingest.py --agents 10000 --saturate-seconds 0 --real-slurm 22.05
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
from gpufleet.scheduler.service.placecall import varint

BENCH = Path(__file__).resolve()
REPO = BENCH.parent.parent


# ----------------------------------------------------------------------------- messages


def _field_bytes(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def real_messages(profile: str) -> tuple[bytes, bytes]:
    """(inventory, steady-state sample) as the agent builds them, serialised."""
    from gpufleet.agent.config import AgentConfig
    from gpufleet.agent.nvml import NvmlBackend, load_library
    from gpufleet.agent.runner import Agent

    with tempfile.TemporaryDirectory() as state:
        cfg = AgentConfig(node_name="bench", gpu_backend="simulated", sim_profile=profile,
                          state_dir=state, metrics_listen="")
        agent = Agent(cfg, NvmlBackend(load_library("simulated", profile, None, "bench"), "sim"))
        inv = agent.inventory()
        agent.sample()  # the first sample carries every verdict; later ones only changes
        sample = agent.sample()
        agent.backend.close()
    return inv.SerializeToString(), sample.SerializeToString()


class MessageMaker:
    """Builds wire bytes for one agent without a protobuf object per send.

    Protobuf merges repeated occurrences of a message field, so a report is the agent
    header (seq, instance) + the serialised steady-state sample + a second, tiny `sample`
    field holding only the fresh timestamp: the server parses exactly what the agent sends.
    """

    def __init__(self, node: str, inventory: bytes, sample: bytes) -> None:
        from gpufleet.rpc.v1 import fleet_pb2 as pb

        self.pb = pb
        self.instance = uuid.uuid4().hex
        inv = pb.NodeInventory.FromString(inventory)
        inv.node_name = node
        inv.hostname = node
        self.hello = pb.AgentMessage(seq=0, agent_instance=self.instance,
                                     hello=pb.Hello(inventory=inv)).SerializeToString()
        self._instance_field = _field_bytes(2, self.instance.encode())
        self._sample_field = _field_bytes(11, sample)

    def heartbeat(self, seq: int, timestamp_ms: int) -> bytes:
        # field 15 heartbeat { field 1 timestamp_ms }; seq 0 (unsequenced) is not on the wire
        return ((b"\x08" + varint(seq) if seq else b"") + self._instance_field
                + _field_bytes(15, b"\x08" + varint(timestamp_ms)))

    def xid79(self, seq: int, timestamp_ms: int) -> bytes:
        """A fatal Xid 79 event on GPU 3, as the agent pushes it."""
        pb = self.pb
        verdict = pb.Verdict(check="xid", severity=pb.SEVERITY_FATAL, reason_code="xid79",
                             evidence="GPU 3 Xid 79 GPU has fallen off the bus (bench)",
                             since_ms=timestamp_ms, gpu_index=3)
        return pb.AgentMessage(seq=seq, agent_instance=self.instance, event=pb.HealthEvent(
            timestamp_ms=timestamp_ms, kind=pb.EVENT_KIND_XID, gpu_index=3, xid=79,
            verdict=verdict)).SerializeToString()

    def report(self, seq: int, timestamp_ms: int) -> bytes:
        # field 1 seq (varint), field 2 instance, field 11 sample (+ timestamp_ms, field 1)
        ts = b"\x08" + varint(timestamp_ms)
        return (b"\x08" + varint(seq) + self._instance_field + self._sample_field
                + _field_bytes(11, ts))


# ----------------------------------------------------------------------------- servers


def _node_name(i: int) -> str:
    return f"b{i:05d}"


def serve_bare(ready_fd: int, _args: argparse.Namespace) -> None:
    """A bare FleetController stream: parse each report and ack what the protocol acks (every
    report with a seq; an unsequenced heartbeat, seq 0, is never acked). No store, no logic."""
    import grpc
    from gpufleet.rpc.v1 import fleet_pb2 as pb
    from gpufleet.rpc.v1 import fleet_pb2_grpc as pb_grpc
    from gpufleet.scheduler.service.server import MAX_PENDING_CALLS, MAX_UNREQUESTED_S

    class Bare(pb_grpc.FleetControllerServicer):
        async def Connect(self, request_iterator: Any, context: Any) -> Any:
            first = True
            async for msg in request_iterator:
                if first:  # hello: the controller does not ack it either
                    first = False
                    continue
                if msg.seq:  # an unsequenced heartbeat (seq 0) is never acked
                    yield pb.ControllerMessage(ack=pb.Ack(seq=msg.seq))

    async def main() -> None:
        # the same gRPC server settings as the controller's (without them neither holds more
        # than ~2,000 streams connecting at once: docs/scaling.md)
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", 4 << 20),
            ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
            ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
            ("grpc.server_max_unrequested_time_in_server", MAX_UNREQUESTED_S),
        ])
        pb_grpc.add_FleetControllerServicer_to_server(Bare(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        os.write(ready_fd, f"{port}\n".encode())
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(0.5)

    asyncio.run(main())


def serve_controller(ready_fd: int, args: argparse.Namespace) -> None:  # noqa: PLR0915 - the hooks that record what the bench reads, in one place
    """The real controller: gpufleet.scheduler.service.server.Controller, SQLite store, the default
    health policy, an in-memory Slurm (tests.scheduler.fakes.FakeSlurm) that records when
    each node was drained; the store records when each node was marked unreachable."""
    import logging
    import threading

    logging.basicConfig(level=logging.ERROR)  # each drain logs a warning: not the figures
    sys.path.insert(0, str(REPO))
    from gpufleet.scheduler.health.policy import PolicyConfig
    from gpufleet.scheduler.service.server import Controller, tune_gc
    from gpufleet.scheduler.store import PostgresStore, SqliteStore

    from tests.scheduler.fakes import FakeSlurm

    if args.no_limits:  # LABELLED: measures what the rest costs without limits.check
        from gpufleet.scheduler.service import limits
        limits.check = lambda *_a, **_k: None  # type: ignore[assignment]
    drained: dict[str, float] = {}
    unreachable: dict[str, float] = {}
    # the garbage collector's time per generation (a pass over every live object in gen 2)
    gc_s = [0.0, 0.0, 0.0]
    gc_n = [0, 0, 0]
    gc_t0 = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_t0[0] = time.thread_time()  # CPU, not wall: the VM preempts us at will
        else:
            gc_s[info["generation"]] += time.thread_time() - gc_t0[0]
            gc_n[info["generation"]] += 1

    import gc
    gc.callbacks.append(on_gc)
    slurm = FakeSlurm([_node_name(i) for i in range(args.agents)])
    real_drain = slurm.drain
    # --real-slurm: these agents' nodes are the lab's slurmd nodes, drained through scontrol
    lab_nodes: dict[str, str] = json.loads(args.lab_nodes or "{}")
    lab_slurm = None
    if lab_nodes:
        from gpufleet.scheduler.slurm import CliSlurmClient
        lab_slurm = CliSlurmClient(env=json.loads(args.slurm_env))

    def drain(name: str, reason: str) -> None:
        real_drain(name, reason)
        if lab_slurm is not None and name in lab_nodes:
            lab_slurm.drain(lab_nodes[name], reason)  # returns once slurmctld has it
        drained.setdefault(name, time.time())

    slurm.drain = drain  # type: ignore[method-assign]
    # several processes on one PostgreSQL store: each ingests, the leader alone acts
    store = PostgresStore(args.db) if args.store == "postgres" else SqliteStore(args.db)
    real_set_reachable = store.set_reachable

    def set_reachable(name: str, reachable: bool, now_ms: int) -> bool:
        changed = real_set_reachable(name, reachable, now_ms)
        if changed and not reachable:
            unreachable.setdefault(name, time.time())
        return changed

    store.set_reachable = set_reachable  # type: ignore[method-assign]
    # when a non-leader stored a health change for the leader (several processes)
    published: dict[str, float] = {}
    real_set_verdict = store.set_verdict

    def set_verdict(v: Any, *, publish: bool = False) -> tuple[str, str]:
        moved = real_set_verdict(v, publish=publish)
        if publish and moved[0] != moved[1]:
            published.setdefault(v.node, time.time())
        return moved

    store.set_verdict = set_verdict  # type: ignore[method-assign]
    policy = PolicyConfig(unreachable_after_s=args.unreachable_after_s, resume_quiet_s=3600)
    ctl = Controller(store, slurm, listen="127.0.0.1:0", policy=policy,
                     standby_ingests=args.store == "postgres")
    port = ctl.start()
    tune_gc()  # what `gpufleet controller` does once started
    if ctl.leader is not None:  # the lock is taken before the process says it leads
        ctl.leader.acquired.wait(2.0)
        time.sleep(0.2)
    os.write(ready_fd, f"{port} {'leader' if ctl.active else 'ingest'}\n".encode())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    out = Path(args.times) if args.times else Path(args.db).with_suffix(".times.json")
    while not stop.wait(0.25):
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"drained": drained, "unreachable": unreachable,
                                   "gc_s": gc_s, "gc_n": gc_n, "active": ctl.active,
                                   "published": published}))
        tmp.replace(out)
    ctl.stop(0.5)
    store.close()


# ----------------------------------------------------------------------------- drivers


async def drive(args: argparse.Namespace) -> dict[str, Any]:  # noqa: PLR0915 - one coroutine keeps the agents' shared state readable
    """Agents lo..hi-1: hello, first report acked ("ready" on stdout), then, between the
    wall-clock times the parent sends on stdin, heartbeats / samples / saturating reports."""
    import grpc

    inventory, sample = real_messages(args.profile)
    ident = bytes
    lo, hi = args.lo, args.hi
    mode = args.mode
    acked = sent = 0
    errors: dict[str, int] = {}
    n_done = 0
    all_up = asyncio.Event()
    go = asyncio.Event()
    t_start = t_stop = 0.0
    faults = set(json.loads(args.faults_at or "[]"))
    silence = set(json.loads(args.silence_at or "[]"))
    fault_sent: dict[str, float] = {}
    silenced: dict[str, float] = {}
    last_report: dict[str, float] = {}  # of the silenced agents, before they died
    channels: list[grpc.aio.Channel] = []
    # write -> ack of the sequenced reports sent while the agents connect (the connect storm:
    # each agent's first report; every heartbeat too with --kinds ...-acked)
    connect_ack_s: list[float] = []

    def up() -> None:
        nonlocal n_done
        n_done += 1
        if n_done == hi - lo:
            all_up.set()

    async def agent(i: int) -> None:  # noqa: PLR0912, PLR0915 - one agent's life, in order
        nonlocal acked, sent
        maker = MessageMaker(_node_name(i), inventory, sample)
        # its own subchannel pool: its own TCP connection, like a real node
        channel = grpc.aio.insecure_channel(args.target,
                                            options=[("grpc.use_local_subchannel_pool", 1)])
        channels.append(channel)
        call = channel.stream_stream("/gpufleet.v1.FleetController/Connect",
                                     request_serializer=ident, response_deserializer=ident)(
            wait_for_ready=True)
        window = args.window if mode == "saturated" else 1
        # the agent's wire: heartbeats unsequenced (seq 0), never acked, as gpufleet-agent
        # sends them; "seq": each one sequenced and acked (agents before that change). The
        # saturated phase always sends sequenced ones: its window of acks bounds what is in
        # flight, so the server's rate is measured, not the socket buffers'
        live = args.wire == "live" and mode != "saturated"
        credit = asyncio.Semaphore(window)
        seq = 0
        counted = True
        try:
            await call.write(maker.hello)

            async def reader() -> None:
                nonlocal acked
                try:
                    async for _reply in call:
                        now = time.time()
                        if not go.is_set():  # one in flight: the ack of the last write
                            connect_ack_s.append(now - last_write)
                        if t_start <= now <= t_stop:
                            acked += 1
                        credit.release()
                except grpc.aio.AioRpcError:
                    credit.release()  # the writer's next write fails and counts the error

            read_task = asyncio.create_task(reader())
            # the first report is acked before the clock starts: the stream is really up then
            # (a real agent's first report is a sequenced sample, carrying every verdict)
            await credit.acquire()
            seq += 1
            last_write = time.time()
            await call.write(maker.report(seq, int(last_write * 1000)))
            await credit.acquire()
            credit.release()
            counted = False
            up()
            # alive while the others connect (thousands take a while): a heartbeat every
            # period, as a real agent sends, or the controller rightly marks it unreachable
            while not go.is_set():
                try:
                    await asyncio.wait_for(go.wait(), timeout=args.heartbeat_s)
                except TimeoutError:
                    if live:
                        last_write = time.time()
                        await call.write(maker.heartbeat(0, int(last_write * 1000)))
                        continue
                    await credit.acquire()
                    seq += 1
                    last_write = time.time()
                    await call.write(maker.heartbeat(seq, int(last_write * 1000)))
            period = args.heartbeat_s if mode == "steady" else 1.0
            # spread agents over the period, as real ones are (they start at random times);
            # at steady state each goes on from its own last heartbeat: starting them over at
            # a spread offset left gaps of up to two periods (a heartbeat just before the
            # phase, the next up to a period into it), and ~15 % of the nodes rightly went
            # unreachable with unreachable_after_s 8 (the "false" unreachables of earlier runs);
            # one overdue (its ack came late while the others connected) sends now, once
            next_t = (max(last_write + period, time.time()) if mode == "steady"
                      else t_start + ((i * 7919) % args.agents / args.agents) * period)
            node = _node_name(i)
            fault_t = (t_start + (0.3 + 0.4 * sorted(faults).index(i) / max(1, len(faults)))
                       * args.seconds) if i in faults else None
            silence_t = t_start + 0.1 * args.seconds if i in silence else None
            while True:
                now = time.time()
                if silence_t is not None and now >= silence_t:
                    silenced[node] = time.time()
                    last_report[node] = last_write
                    call.cancel()  # the agent dies: no more heartbeats, the socket closes
                    await channel.close()
                    return
                if now >= t_stop:
                    break
                if fault_t is not None and now >= fault_t:
                    fault_t = None
                    await credit.acquire()
                    seq += 1
                    fault_sent[node] = time.time()
                    await call.write(maker.xid79(seq, int(time.time() * 1000)))
                    continue
                if mode != "saturated":
                    wake = min(next_t, t_stop, *(t for t in (fault_t, silence_t) if t))
                    if wake > now:
                        await asyncio.sleep(wake - now)
                        continue
                    next_t += period
                if live and mode == "steady":  # unsequenced: no ack to wait for
                    last_write = time.time()
                    await call.write(maker.heartbeat(0, int(last_write * 1000)))
                    if t_start <= time.time() <= t_stop:
                        sent += 1
                    continue
                await credit.acquire()
                seq += 1
                last_write = time.time()
                stamp = int(last_write * 1000)
                await call.write(maker.report(seq, stamp) if mode == "samples"
                                 else maker.heartbeat(seq, stamp))
                if t_start <= time.time() <= t_stop:
                    sent += 1
            # the phase is over: acks still in flight are not counted, so do not wait for them
            call.cancel()
            read_task.cancel()
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as e:
            key = e.code().name if isinstance(e, grpc.aio.AioRpcError) else "cancelled"
            errors[key] = errors.get(key, 0) + 1
            if counted:
                up()

    tasks = [asyncio.create_task(agent(i)) for i in range(lo, hi)]
    loop = asyncio.get_running_loop()
    # generous: a loaded 2-core VM took minutes to take in 10,000 hellos over PostgreSQL
    await asyncio.wait_for(all_up.wait(), timeout=120 + (hi - lo) / 8)
    print(json.dumps({"ready": hi - lo, "errors": errors}), flush=True)
    line = await loop.run_in_executor(None, sys.stdin.readline)
    t_start, t_stop = (float(x) for x in line.split())
    proc = psutil.Process()
    cpu0 = proc.cpu_times()
    go.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    cpu1 = proc.cpu_times()
    for ch in channels:
        await ch.close()
    connect_ack_s.sort()
    return {"acked": acked, "sent": sent, "errors": errors, "fault_sent": fault_sent,
            "connect_ack_p99_s": _pct(connect_ack_s, 0.99),
            "connect_ack_max_s": connect_ack_s[-1] if connect_ack_s else 0.0,
            "silenced": silenced, "last_report": last_report,
            "driver_cpu_s": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)}


# ----------------------------------------------------------------------------- orchestration


def _cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# what --kinds runs: (server, the agents' heartbeat wire); "-acked": sequenced heartbeats,
# each acked (agents before heartbeats went unsequenced), to see what the acks cost
KINDS = {"bare": ("bare", "live"), "controller": ("controller", "live"),
         "bare-acked": ("bare", "seq"), "controller-acked": ("controller", "seq")}


def run_phase(kind: str, mode: str, args: argparse.Namespace, seconds: float,  # noqa: PLR0912, PLR0915 - one phase, in order
              workdir: Path) -> dict[str, Any]:
    r, w = os.pipe()
    db = workdir / f"{kind}-{mode}.db"
    server_kind, wire = KINDS[kind]
    argv = [sys.executable, str(BENCH), "--role", f"serve-{server_kind}", "--ready-fd", str(w),
            "--db", str(db), "--agents", str(args.agents),
            "--unreachable-after-s", str(args.unreachable_after_s)]
    if args.no_limits:
        argv.append("--no-limits")
    # faults and silenced agents: spread over the cluster, in the steady phase only
    step_f = max(1, args.agents // max(1, args.faults))
    faulted = list(range(0, args.agents, step_f))[:args.faults] if mode == "steady" else []
    silent = ([i + step_f // 2 for i in range(0, args.agents, step_f)][:args.silence]
              if mode == "steady" else [])
    if args.lab is not None and server_kind == "controller" and faulted:
        args.lab.reset()  # every lab node idle, no drain left by an earlier phase
        argv += ["--slurm-env", json.dumps(args.lab.env()), "--lab-nodes",
                 json.dumps({_node_name(i): f"n{j + 1}" for j, i in enumerate(faulted)})]
    server = subprocess.Popen(argv, pass_fds=(w,))
    os.close(w)
    drivers: list[subprocess.Popen[str]] = []
    try:
        with os.fdopen(r) as ready:
            port = int(ready.readline().split()[0])
        sp = psutil.Process(server.pid)
        k = args.drivers
        bounds = [(args.agents * j // k, args.agents * (j + 1) // k) for j in range(k)]
        t_connect = time.monotonic()
        for lo, hi in bounds:
            drivers.append(subprocess.Popen(
                [sys.executable, str(BENCH), "--role", "drive", "--target", f"127.0.0.1:{port}",
                 "--agents", str(args.agents), "--lo", str(lo), "--hi", str(hi),
                 "--mode", mode, "--seconds", str(seconds), "--window", str(args.window),
                 "--wire", wire,
                 "--heartbeat-s", str(args.heartbeat_s), "--profile", args.profile,
                 "--faults-at", json.dumps([i for i in faulted if lo <= i < hi]),
                 "--silence-at", json.dumps([i for i in silent if lo <= i < hi])],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        connect_errors: dict[str, int] = {}
        for d in drivers:
            assert d.stdout is not None
            line = d.stdout.readline()
            if not line:
                raise RuntimeError(f"{kind}/{mode}: a driver died while its agents connected")
            for key, n in json.loads(line)["errors"].items():
                connect_errors[key] = connect_errors.get(key, 0) + n
        connect_s = time.monotonic() - t_connect
        if connect_errors:
            raise RuntimeError(f"{kind}/{mode}: agents failed to connect: {connect_errors}")
        rss_connected = sp.memory_info().rss / 2**20
        t_start = time.time() + 1.0
        t_stop = t_start + seconds
        for d in drivers:
            assert d.stdin is not None
            d.stdin.write(f"{t_start} {t_stop}\n")
            d.stdin.flush()
        time.sleep(max(0.0, t_start - time.time()))
        cpu_start, m_start = _cpu_s(sp), time.monotonic()
        gc0 = _gc_figures(db)
        time.sleep(max(0.0, t_stop - time.time()))
        cpu_stop, m_stop = _cpu_s(sp), time.monotonic()
        gc1 = _gc_figures(db)
        rss = sp.memory_info().rss / 2**20
        result: dict[str, Any] = {"acked": 0, "sent": 0, "driver_cpu_s": 0.0, "errors": {},
                                  "fault_sent": {}, "silenced": {}, "last_report": {}}
        for d in drivers:
            out, _ = d.communicate(timeout=300)
            if d.returncode != 0:
                raise RuntimeError(f"driver for {kind}/{mode} failed (exit {d.returncode})")
            res = json.loads(out.strip().splitlines()[-1])
            for key in ("acked", "sent", "driver_cpu_s"):
                result[key] += res[key]
            for key in ("connect_ack_p99_s", "connect_ack_max_s"):  # the worst driver's
                result[key] = max(result.get(key, 0.0), res[key])
            for key in ("fault_sent", "silenced", "last_report"):
                result[key].update(res[key])
            for key, n in res["errors"].items():
                result["errors"][key] = result["errors"].get(key, 0) + n
        result.update(server_cpu_s=cpu_stop - cpu_start, server_wall_s=m_stop - m_start,
                      wall_s=seconds, server_rss_mib=rss, rss_connected_mib=rss_connected,
                      connect_s=connect_s)
        if gc0 and gc1:  # the controller's collector during the phase, per generation
            result["gc_s"] = [b - a for a, b in zip(gc0[0], gc1[0], strict=True)]
            result["gc_n"] = [b - a for a, b in zip(gc0[1], gc1[1], strict=True)]
        if server_kind == "controller" and (faulted or silent):
            result.update(_detections(db, result, args, t_start, t_stop))
        return result
    finally:
        for d in drivers:
            if d.poll() is None:
                d.kill()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def run_multi(args: argparse.Namespace, seconds: float) -> dict[str, Any]:  # noqa: PLR0912, PLR0915 - one run, in order
    """--processes P --store postgres: P controller processes on one throw-away PostgreSQL
    (the tests' own server: tests/scheduler/pg_server.py), each started with
    standby_ingests; process 0 starts first and leads (it alone acts in the in-memory
    Slurm), the others only ingest. Agents are split into P equal blocks, block j on
    process j; the faults and the silenced agents are in the non-leaders' blocks, so every
    drain and every unreachable mark goes through the store. Steady phase only."""
    sys.path.insert(0, str(REPO))
    from tests.scheduler.pg_server import started_pg_server

    n_proc = args.processes
    with started_pg_server("gf-bench-pg-") as pg:
        dsn = pg.create_database()
        workdir = Path(pg.base_dir)
        servers: list[subprocess.Popen[bytes]] = []
        drivers: list[tuple[int, subprocess.Popen[str]]] = []
        times_paths = [workdir / f"ctl{j}.times.json" for j in range(n_proc)]
        blocks = [(args.agents * j // n_proc, args.agents * (j + 1) // n_proc)
                  for j in range(n_proc)]
        # faults and silenced agents: spread over the non-leaders' agents
        others = list(range(blocks[0][1] if n_proc > 1 else 0, args.agents))
        step_f = max(1, len(others) // max(1, args.faults))
        faulted = others[::step_f][:args.faults]
        silent = [i + step_f // 2 for i in others[::step_f]][:args.silence]
        silent = [i for i in silent if i < args.agents and i not in faulted]
        try:
            ports: list[int] = []
            roles: list[str] = []
            for j in range(n_proc):  # one after the other: the first takes the lock
                r, w = os.pipe()
                servers.append(subprocess.Popen(
                    [sys.executable, str(BENCH), "--role", "serve-controller", "--ready-fd",
                     str(w), "--db", dsn, "--store", "postgres", "--times",
                     str(times_paths[j]), "--agents", str(args.agents),
                     "--unreachable-after-s", str(args.unreachable_after_s)],
                    pass_fds=(w,)))
                os.close(w)
                with os.fdopen(r) as ready:
                    port, role = ready.readline().split()
                ports.append(int(port))
                roles.append(role)
            if roles.count("leader") != 1 or roles[0] != "leader":
                raise RuntimeError(f"expected process 0 alone to lead, got {roles}")
            procs = [psutil.Process(p.pid) for p in servers]
            per_block = max(1, args.drivers // n_proc)
            t_connect = time.monotonic()
            for j, (blo, bhi) in enumerate(blocks):
                n = bhi - blo
                for k in range(per_block):
                    lo, hi = blo + n * k // per_block, blo + n * (k + 1) // per_block
                    drivers.append((j, subprocess.Popen(
                        [sys.executable, str(BENCH), "--role", "drive", "--target",
                         f"127.0.0.1:{ports[j]}", "--agents", str(args.agents), "--lo", str(lo),
                         "--hi", str(hi), "--mode", "steady", "--seconds", str(seconds),
                         "--window", "1", "--heartbeat-s", str(args.heartbeat_s),
                         "--wire", "live",
                         "--profile", args.profile,
                         "--faults-at", json.dumps([i for i in faulted if lo <= i < hi]),
                         "--silence-at", json.dumps([i for i in silent if lo <= i < hi])],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)))
            connect_errors: dict[str, int] = {}
            for _, d in drivers:
                assert d.stdout is not None
                line = d.stdout.readline()
                if not line:
                    raise RuntimeError("multi: a driver died while its agents connected")
                for key, n in json.loads(line)["errors"].items():
                    connect_errors[key] = connect_errors.get(key, 0) + n
            connect_s = time.monotonic() - t_connect
            if connect_errors:
                raise RuntimeError(f"multi: agents failed to connect: {connect_errors}")
            t_start = time.time() + 1.0
            t_stop = t_start + seconds
            for _, d in drivers:
                assert d.stdin is not None
                d.stdin.write(f"{t_start} {t_stop}\n")
                d.stdin.flush()
            time.sleep(max(0.0, t_start - time.time()))
            cpu0, m0 = [_cpu_s(p) for p in procs], time.monotonic()
            pg_procs = _pg_processes(pg.pid)
            pg_cpu0 = sum(_cpu_s(p) for p in pg_procs)
            time.sleep(max(0.0, t_stop - time.time()))
            cpu1, m1 = [_cpu_s(p) for p in procs], time.monotonic()
            pg_cpu1 = sum(_cpu_s(p) for p in _pg_processes(pg.pid, pg_procs))
            rss = [p.memory_info().rss / 2**20 for p in procs]
            acked = [0] * n_proc
            result: dict[str, Any] = {"fault_sent": {}, "silenced": {}, "last_report": {},
                                      "errors": {}}
            driver_cpu = 0.0
            for j, d in drivers:
                out, _ = d.communicate(timeout=300)
                if d.returncode != 0:
                    raise RuntimeError(f"multi: a driver failed (exit {d.returncode})")
                res = json.loads(out.strip().splitlines()[-1])
                acked[j] += res["sent"]  # heartbeats are not acked: the ones sent
                driver_cpu += res["driver_cpu_s"]
                for key in ("fault_sent", "silenced", "last_report"):
                    result[key].update(res[key])
            det = _detections(workdir / "x", result, args, t_start, t_stop, times_paths)
            # where the time goes: fault -> the leader queued its drain (ingest at the
            # non-leader, the store, the leader's poll), and queued -> Slurm drain called
            import psycopg

            with psycopg.connect(dsn, autocommit=True) as conn:
                created = {str(n): int(c) / 1000 for n, c in conn.execute(
                    "SELECT node, min(created_ms) FROM actions WHERE action = 'drain' "
                    "GROUP BY node").fetchall()}
            drained, published = {}, {}
            for p in times_paths:
                one = json.loads(p.read_text())
                drained.update(one["drained"])
                published.update(one.get("published", {}))
            det["fault_to_published_s"] = [published[n] - t for n, t in
                                           result["fault_sent"].items() if n in published]
            det["fault_to_queued_s"] = [created[n] - t for n, t in result["fault_sent"].items()
                                        if n in created]
            det["queued_to_drain_s"] = [drained[n] - created[n] for n in result["fault_sent"]
                                        if n in created and n in drained]
            wall = m1 - m0
            rows = []
            for j in range(n_proc):
                cpu = cpu1[j] - cpu0[j]
                rows.append({"role": roles[j], "agents": blocks[j][1] - blocks[j][0],
                             "reports_per_s": acked[j] / seconds,
                             "cpu_us_per_report": cpu * 1e6 / max(1, acked[j]),
                             "core_pct": 100.0 * cpu / wall, "rss_mib": rss[j]})
            return {"processes": rows, "connect_s": connect_s, "wall_s": seconds,
                    "postgres_core_pct": 100.0 * (pg_cpu1 - pg_cpu0) / wall,
                    "driver_core_pct": 100.0 * driver_cpu / seconds, **det}
        finally:
            for _, d in drivers:
                if d.poll() is None:
                    d.kill()
            for srv in servers:
                srv.send_signal(signal.SIGTERM)
            for srv in servers:
                try:
                    srv.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    srv.kill()
                    srv.wait()
            pg.drop_database(dsn)


def _pg_processes(postmaster: int | None, known: list[psutil.Process] | None = None
                  ) -> list[psutil.Process]:
    """The PostgreSQL server's processes (postmaster and backends): their CPU is the store's
    cost. Backends that ended between two readings are left out of both."""
    if postmaster is None:
        return []
    if known is not None:
        return [p for p in known if p.is_running()]
    try:
        root = psutil.Process(postmaster)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def print_multi(args: argparse.Namespace, f: dict[str, Any]) -> None:
    print(f"{'process':<10} {'role':<7} {'agents':>7} {'reports/s':>9} {'CPU us/rep':>10} "
          f"{'% core':>7} {'RSS MiB':>8}")
    for j, r in enumerate(f["processes"]):
        print(f"{j:<10} {r['role']:<7} {r['agents']:>7} {r['reports_per_s']:>9.0f} "
              f"{r['cpu_us_per_report']:>10.1f} {r['core_pct']:>7.1f} {r['rss_mib']:>8.1f}")
    print(f"PostgreSQL server (all its processes): {f['postgres_core_pct']:.1f} % of one core; "
          f"drivers {f['driver_core_pct']:.1f} %; connect {f['connect_s']:.1f} s")
    d = f["fault_to_drain_s"]
    print(f"fault -> drain, faults at a non-leader, drained by the leader through the store: "
          f"{len(d)}/{f['faults_sent']} drained, p50 {1000 * _pct(d, 0.5):.0f} ms, p99 "
          f"{1000 * _pct(d, 0.99):.0f} ms")
    q, a, pub = f["fault_to_queued_s"], f["queued_to_drain_s"], f["fault_to_published_s"]
    if pub:
        print(f"  of which fault -> stored for the leader by the non-leader: p50 "
              f"{1000 * _pct(pub, 0.5):.0f} ms, p99 {1000 * _pct(pub, 0.99):.0f} ms")
    print(f"  of which fault -> the leader queued the drain: p50 {1000 * _pct(q, 0.5):.0f} ms, "
          f"p99 {1000 * _pct(q, 0.99):.0f} ms; queued -> Slurm called: p50 "
          f"{1000 * _pct(a, 0.5):.0f} ms, p99 {1000 * _pct(a, 0.99):.0f} ms")
    v, lr = f["silent_to_unreachable_s"], f["last_report_to_unreachable_s"]
    print(f"liveness: {len(v)}/{f['silenced_n']} dead agents at a non-leader marked "
          f"unreachable by the leader, {_pct(v, 0.5):.1f} s median, "
          f"{max(v) if v else float('nan'):.1f} s max after they died "
          f"({max(lr) if lr else float('nan'):.1f} s max after their last report; "
          f"unreachable_after_s {args.unreachable_after_s:g}); {f['false_unreachable']} live "
          f"nodes wrongly marked unreachable ({f['false_unreachable_connecting']} of them "
          f"before the phase, while the agents connected)")
    hb = args.heartbeat_s
    for j, r in enumerate(f["processes"]):
        per_node = r["core_pct"] / 100 / max(1, r["agents"])
        print(f"process {j} ({r['role']}): {1e6 * per_node:.1f} us of CPU per node per second "
              f"(heartbeat {hb:g} s): one core holds ~{1 / per_node:,.0f} nodes")


def _gc_figures(db: Path) -> tuple[list[float], list[int]] | None:
    try:
        times = json.loads(db.with_suffix(".times.json").read_text())
    except (OSError, ValueError):
        return None
    return times["gc_s"], times["gc_n"]


def _detections(db: Path, result: dict[str, Any], args: argparse.Namespace,
                t_start: float, t_stop: float, times_paths: list[Path] | None = None
                ) -> dict[str, Any]:
    """Wait (up to unreachable_after_s + 15 s) for the controller to drain every faulted node
    and mark every silenced one unreachable; the times it recorded against the drivers'.
    A node not silenced marked unreachable before the phase ended is a false one (after it,
    every agent has gone). `times_paths`: several controller processes' records, merged."""
    paths = times_paths or [db.with_suffix(".times.json")]
    deadline = time.monotonic() + args.unreachable_after_s + 15
    times: dict[str, dict[str, float]] = {"drained": {}, "unreachable": {}}
    while time.monotonic() < deadline:
        if all(p.exists() for p in paths):
            times = {"drained": {}, "unreachable": {}}
            for p in paths:
                one = json.loads(p.read_text())
                times["drained"].update(one["drained"])
                times["unreachable"].update(one["unreachable"])
            if (set(result["fault_sent"]) <= set(times["drained"])
                    and set(result["silenced"]) <= set(times["unreachable"])):
                break
        time.sleep(0.25)
    drains = [times["drained"][n] - t for n, t in result["fault_sent"].items()
              if n in times["drained"]]
    lives = [times["unreachable"][n] - t for n, t in result["silenced"].items()
             if n in times["unreachable"]]
    since_last = [times["unreachable"][n] - t for n, t in result["last_report"].items()
                  if n in times["unreachable"]]
    return {"fault_to_drain_s": drains, "faults_sent": len(result["fault_sent"]),
            "silent_to_unreachable_s": lives, "last_report_to_unreachable_s": since_last,
            "silenced_n": len(result["silenced"]),
            "false_unreachable": sum(1 for n, t in times["unreachable"].items()
                                     if n not in result["silenced"] and t <= t_stop),
            # of those, how many while the agents were still connecting (the storm)
            "false_unreachable_connecting": sum(
                1 for n, t in times["unreachable"].items()
                if n not in result["silenced"] and t < t_start)}


def summarise(res: dict[str, Any], mode: str) -> dict[str, Any]:
    # reports the server took in: acked ones in the saturated phase (its window bounds what
    # is in flight); at steady state the ones sent (unsequenced heartbeats get no ack)
    n = res["acked"] if mode == "saturated" else res["sent"]
    rate = n / res["wall_s"]
    cpu_us = res["server_cpu_s"] * 1e6 / max(1, n)
    out = {"reports_per_s": rate, "cpu_us_per_report": cpu_us,
           "core_pct": 100.0 * res["server_cpu_s"] / res["server_wall_s"],
           "driver_core_pct": 100.0 * res["driver_cpu_s"] / res["wall_s"],
           "one_core_reports_per_s": 1e6 / cpu_us if cpu_us else float("inf"),
           "rss_mib": res["server_rss_mib"], "connect_s": res["connect_s"],
           "errors": res["errors"], "wall_s": res["wall_s"]}
    for key in ("fault_to_drain_s", "silent_to_unreachable_s", "faults_sent", "silenced_n",
                "false_unreachable", "last_report_to_unreachable_s", "gc_s", "gc_n",
                "false_unreachable_connecting", "connect_ack_p99_s", "connect_ack_max_s"):
        if key in res:
            out[key] = res[key]
    return out


def main() -> None:  # noqa: PLR0912, PLR0915 - argument handling and the report, in order
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=2000, help="simulated agents (connections)")
    ap.add_argument("--seconds", type=float, default=30.0, help="steady (heartbeat) phase")
    ap.add_argument("--heartbeat-s", type=float, default=5.0,
                    help="each agent's heartbeat interval at steady state (agent default 5)")
    ap.add_argument("--samples-seconds", type=float, default=0.0,
                    help="phase with a full sample per agent per second (the old wire); 0 skips")
    ap.add_argument("--saturate-seconds", type=float, default=10.0,
                    help="saturated phase length; 0 skips it")
    ap.add_argument("--window", type=int, default=0,
                    help="reports each agent keeps in flight in the saturated phase "
                         "(default: 4, fewer past 2,000 agents, at least 1)")
    ap.add_argument("--drivers", type=int, default=0,
                    help="driver processes (default: one per 2,500 agents, at least 2)")
    ap.add_argument("--faults", type=int, default=20,
                    help="Xid 79 events sent during the steady phase (fault -> drain)")
    ap.add_argument("--silence", type=int, default=10,
                    help="agents that die during the steady phase (liveness)")
    ap.add_argument("--unreachable-after-s", type=float, default=8.0,
                    help="the controller's unreachable_after_s in this run")
    ap.add_argument("--no-limits", action="store_true",
                    help="LABELLED: the controller without limits.check (what the rest costs)")
    ap.add_argument("--only", choices=("bare", "controller"),
                    help="run one server only (profiling; prints no efficiency ratio)")
    ap.add_argument("--kinds", default="bare,controller",
                    help="servers to run, in order, of " + ", ".join(KINDS) + " (-acked: "
                         "agents send each heartbeat sequenced and wait for its ack, the wire "
                         "before heartbeats went unsequenced)")
    ap.add_argument("--processes", type=int, default=1,
                    help="controller processes on one PostgreSQL store (with --store postgres): "
                         "the first leads, the others only ingest; agents split evenly")
    ap.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite",
                    help="the controller's store (postgres: a throw-away server, as the tests "
                         "start one)")
    ap.add_argument("--profile", default="dgx-h100", help="simulated hardware of the agents")
    ap.add_argument("--real-slurm", choices=("22.05", "24.11", "26.05"),
                    help="drain the faulted nodes on a real Slurm lab of --faults nodes "
                         "(root; 24.11/26.05 from their Debian roots)")
    ap.add_argument("--json", action="store_true", help="also print the raw figures as JSON")
    ap.add_argument("--role", default="main", help=argparse.SUPPRESS)
    ap.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--times", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="steady", help=argparse.SUPPRESS)
    ap.add_argument("--wire", default="live", help=argparse.SUPPRESS)
    ap.add_argument("--lo", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--hi", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--faults-at", default="", help=argparse.SUPPRESS)
    ap.add_argument("--silence-at", default="", help=argparse.SUPPRESS)
    ap.add_argument("--slurm-env", default="", help=argparse.SUPPRESS)
    ap.add_argument("--lab-nodes", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    _kinds(args)  # a bad --kinds fails here, before anything starts
    args.lab = None
    # one connection per agent, like the real thing: thousands of sockets on each side
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    if args.role == "serve-bare":
        serve_bare(args.ready_fd, args)
        return
    if args.role == "serve-controller":
        serve_controller(args.ready_fd, args)
        return
    if args.role == "drive":
        print(json.dumps(asyncio.run(drive(args))), flush=True)
        return

    if args.processes < 1:
        sys.exit(f"--processes {args.processes}: must be at least 1")
    if args.processes > 1 and args.store != "postgres":
        sys.exit(f"--processes {args.processes}: several processes share only a PostgreSQL "
                 "store (add --store postgres)")
    if args.window <= 0:
        args.window = max(1, min(4, 8000 // max(1, args.agents)))
    if args.drivers <= 0:
        args.drivers = max(2, -(-args.agents // 2500))
    if args.agents + 512 > hard:
        sys.exit(f"--agents {args.agents}: the open-file hard limit is {hard}, too low")
    _, sample = real_messages(args.profile)
    print(f"ingest benchmark: {args.agents} simulated agents ({args.profile}, sample "
          f"{len(sample)} bytes, heartbeat every {args.heartbeat_s:g} s), one TCP connection "
          f"each, {args.drivers} driver processes, {os.cpu_count()} CPUs, "
          f"{sys.version.split()[0]}" + ("; controller WITHOUT limits.check" if args.no_limits
                                         else ""))
    if args.store == "postgres":
        args.drivers = max(args.drivers, args.processes)
        print(f"{args.processes} controller process(es) on one PostgreSQL store, faults and "
              f"silenced agents at the non-leader(s); steady phase {args.seconds:g} s",
              flush=True)
        multi = run_multi(args, args.seconds)
        print_multi(args, multi)
        if args.json:
            print(json.dumps(multi, indent=1))
        return
    if args.real_slurm:
        if args.store == "postgres":
            sys.exit("--real-slurm: one controller process on SQLite only")
        sys.path.insert(0, str(REPO))
        from tests.slurm.harness import SlurmLab, SlurmLabConfig
        args.lab = SlurmLab(SlurmLabConfig(
            lab_dir=Path("/tmp/gf-lab-ingest"), ctld_port=9957, node_port0=20700,  # noqa: S108 - a lab, not a secret
            nodes=max(2, args.faults), version=args.real_slurm))
        args.lab.start()
        print(f"real Slurm {args.real_slurm} lab of {max(2, args.faults)} nodes for the "
              f"faulted agents", flush=True)
    try:
        run_single(args)
    finally:
        if args.lab is not None:
            args.lab.stop()


def _kinds(args: argparse.Namespace) -> list[str]:
    kinds = [args.only] if args.only else [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        sys.exit(f"--kinds {args.kinds!r}: each must be one of {', '.join(KINDS)}")
    return kinds


def _print_ack_cost(figures: dict[str, dict[str, Any]]) -> None:
    """With --kinds ...-acked beside the same server unacked: what acking every heartbeat
    costs that server (steady phase)."""
    for server in ("bare", "controller"):
        one, acked = figures.get(f"{server}/steady"), figures.get(f"{server}-acked/steady")
        if one and acked:
            us, us_acked = one["cpu_us_per_report"], acked["cpu_us_per_report"]
            print(f"{server}/steady: CPU us per report {us:.1f} with unacked heartbeats, "
                  f"{us_acked:.1f} with every one acked: the ack is "
                  f"{100 * (1 - us / us_acked):.0f} % of the acked cost")


def run_single(args: argparse.Namespace) -> None:  # noqa: PLR0912 - the phases and their report, in order
    kinds = _kinds(args)
    phases = [("steady", args.seconds)]
    if args.samples_seconds > 0:
        phases.append(("samples", args.samples_seconds))
    if args.saturate_seconds > 0:
        phases.append(("saturated", args.saturate_seconds))
    figures: dict[str, dict[str, Any]] = {}
    def row(key: str, f: dict[str, Any]) -> None:
        print(f"{key:<21} {f['reports_per_s']:>9.0f} {f['cpu_us_per_report']:>10.1f} "
              f"{f['core_pct']:>7.1f} {f['one_core_reports_per_s']:>12.0f} "
              f"{f['driver_core_pct']:>8.1f} {f['rss_mib']:>8.1f} {f['connect_s']:>9.1f}",
              flush=True)

    header = (f"{'server/phase':<21} {'reports/s':>9} {'CPU us/rep':>10} {'% core':>7} "
              f"{'1-core cap/s':>12} {'driver %':>8} {'RSS MiB':>8} {'connect s':>9}")
    print(header, flush=True)
    with tempfile.TemporaryDirectory(prefix="gf-bench-ingest-") as tmp:
        for mode, seconds in phases:
            for kind in kinds:
                figures[f"{kind}/{mode}"] = summarise(run_phase(kind, mode, args, seconds,
                                                                Path(tmp)), mode)
                row(f"{kind}/{mode}", figures[f"{kind}/{mode}"])
    print(header)
    for key, f in figures.items():
        row(key, f)
    for key, f in figures.items():
        if f["connect_ack_max_s"] > 0:  # only sequenced reports are acked
            print(f"{key}: report write -> ack while the agents connected: p99 "
                  f"{f['connect_ack_p99_s']:.2f} s, max {f['connect_ack_max_s']:.2f} s "
                  f"(worst driver)")
        if "gc_s" in f:
            print(f"{key}: garbage collector {100 * sum(f['gc_s']) / f.get('wall_s', 1):.1f} % "
                  f"of the phase (seconds per generation {[round(x, 2) for x in f['gc_s']]}, "
                  f"collections {f['gc_n']})")
    _print_ack_cost(figures)
    for mode, _ in phases:
        if f"bare/{mode}" not in figures or f"controller/{mode}" not in figures:
            continue
        bare, ctl = figures[f"bare/{mode}"], figures[f"controller/{mode}"]
        cpu_ratio = bare["cpu_us_per_report"] / ctl["cpu_us_per_report"]
        print(f"{mode}: per-report CPU efficiency (bare us / controller us) = "
              f"{100 * cpu_ratio:.0f} % (target >= 50 %); controller at {ctl['core_pct']:.1f} % "
              f"of one core holding {args.agents} nodes")
    steady = figures.get("controller/steady", {})
    if steady.get("faults_sent"):
        d = steady["fault_to_drain_s"]
        where = (f"real Slurm {args.real_slurm}, scontrol update returned" if args.real_slurm
                 else "in-memory Slurm")
        print(f"fault -> drain ({where}) while holding {args.agents} nodes: "
              f"{len(d)}/{steady['faults_sent']} drained, p50 {1000 * _pct(d, 0.5):.0f} ms, "
              f"p99 {1000 * _pct(d, 0.99):.0f} ms (target p99 <= 1 s)")
    if steady.get("silenced_n"):
        v = steady["silent_to_unreachable_s"]
        lr = steady["last_report_to_unreachable_s"]
        print(f"liveness: {len(v)}/{steady['silenced_n']} dead agents marked unreachable, "
              f"{_pct(v, 0.5):.1f} s median, {max(v) if v else float('nan'):.1f} s max after "
              f"they died ({max(lr) if lr else float('nan'):.1f} s max after their last "
              f"report; heartbeat {args.heartbeat_s:g} s, unreachable_after_s "
              f"{args.unreachable_after_s:g}; target <= 10 s); "
              f"{steady['false_unreachable']} live nodes wrongly marked unreachable "
              f"({steady['false_unreachable_connecting']} of them before the phase, while "
              f"the agents connected)")
    if args.json:
        print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
