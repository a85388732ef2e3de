"""Controller ingest: N simulated agents against the real controller, and against a bare stream.

Prints, for the real controller (gpufleet.scheduler.server over loopback gRPC, SQLite store,
no Slurm) and for a bare gRPC bidirectional stream that only parses each report and acks it
(same proto, same messages, same driver), in the same run:

- paced: N agents, one 8-GPU sample per agent per second (like real agents), for --seconds:
  reports/s acked, server CPU-us per report, % of one core;
- saturated: the same N streams, each keeping --window reports in flight, for
  --saturate-seconds: the sustained reports/s the server keeps up with, and CPU-us per report.

The ratio controller / bare is the figure that counts (target >= 50 %), and 1e6 / CPU-us per
report is the reports/s one core can ingest (target >= 10,000, 10,000 nodes at 1 Hz).

The agents run in a SEPARATE process (so their CPU is not the server's); each server runs in
its own process too, and its CPU is read from /proc through psutil. The messages are real:
the inventory and a steady-state sample (8 GPUs, no verdict changes) from the agent's own
code over the simulated DGX H100, serialised once; each send only changes seq and timestamp.

    .venv/bin/python bench/ingest.py [--agents 2000] [--seconds 20] [--saturate-seconds 10]
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

BENCH = Path(__file__).resolve()


# ----------------------------------------------------------------------------- messages


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


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

    def report(self, seq: int, timestamp_ms: int) -> bytes:
        # field 1 seq (varint), field 2 instance, field 11 sample (+ timestamp_ms, field 1)
        ts = b"\x08" + _varint(timestamp_ms)
        return (b"\x08" + _varint(seq) + self._instance_field + self._sample_field
                + _field_bytes(11, ts))


# ----------------------------------------------------------------------------- servers


def serve_bare(ready_fd: int) -> None:
    """A bare FleetController stream: parse each report, ack its seq. No store, no logic."""
    import grpc
    from gpufleet.rpc.v1 import fleet_pb2 as pb
    from gpufleet.rpc.v1 import fleet_pb2_grpc as pb_grpc

    class Bare(pb_grpc.FleetControllerServicer):
        async def Connect(self, request_iterator: Any, context: Any) -> Any:
            first = True
            async for msg in request_iterator:
                if first:  # hello: the controller does not ack it either
                    first = False
                    continue
                yield pb.ControllerMessage(ack=pb.Ack(seq=msg.seq))

    async def main() -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 4 << 20)])
        pb_grpc.add_FleetControllerServicer_to_server(Bare(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        os.write(ready_fd, f"{port}\n".encode())
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(0.5)

    asyncio.run(main())


def serve_controller(ready_fd: int, db: str) -> None:
    """The real controller: gpufleet.scheduler.server.Controller, SQLite store, no Slurm."""
    import threading

    from gpufleet.scheduler.server import Controller
    from gpufleet.scheduler.store import SqliteStore

    store = SqliteStore(db)
    ctl = Controller(store, None, listen="127.0.0.1:0")
    port = ctl.start()
    os.write(ready_fd, f"{port}\n".encode())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    ctl.stop(0.5)
    store.close()


# ----------------------------------------------------------------------------- driver


async def drive(  # noqa: PLR0915 - one coroutine keeps the agents' shared state readable
    target: str, agents: int, mode: str, seconds: float, window: int, profile: str,
) -> dict[str, Any]:
    """The simulated agents: hello, then reports paced at 1 Hz or as fast as acks allow."""
    import grpc

    inventory, sample = real_messages(profile)
    ident = bytes
    channels: list[grpc.aio.Channel] = []
    acked = 0
    sent = 0
    measuring = False
    stop_at = 0.0
    connected = asyncio.Event()
    n_connected = 0
    go = asyncio.Event()

    async def agent(i: int) -> None:
        nonlocal acked, sent, n_connected
        maker = MessageMaker(f"b{i:05d}", inventory, sample)
        channel = grpc.aio.insecure_channel(target)
        channels.append(channel)
        call = channel.stream_stream("/gpufleet.v1.FleetController/Connect",
                                     request_serializer=ident, response_deserializer=ident)(
            wait_for_ready=True)
        await call.write(maker.hello)
        credit = asyncio.Semaphore(window)

        async def reader() -> None:
            nonlocal acked
            async for _reply in call:
                if measuring:
                    acked += 1
                credit.release()

        read_task = asyncio.create_task(reader())
        seq = 0
        # the first report is acked before the clock starts: the stream is really up then
        await credit.acquire()
        seq += 1
        await call.write(maker.report(seq, int(time.time() * 1000)))
        await credit.acquire()
        credit.release()
        n_connected += 1
        if n_connected == agents:
            connected.set()
        await go.wait()
        # spread agents over the second, as real ones are (they start at random times)
        period = 1.0
        next_t = time.monotonic() + (i / agents) * period
        while time.monotonic() < stop_at:
            if mode == "paced":
                delay = next_t - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_t += period
            await credit.acquire()
            seq += 1
            await call.write(maker.report(seq, int(time.time() * 1000)))
            if measuring:
                sent += 1
        await call.done_writing()
        await read_task

    tasks = [asyncio.create_task(agent(i)) for i in range(agents)]
    await asyncio.wait_for(connected.wait(), timeout=120 + agents / 50)
    proc = psutil.Process()
    print("ready", flush=True)
    # the parent reads the server's CPU when it sees these lines
    cpu0 = proc.cpu_times()
    t0 = time.monotonic()
    stop_at = t0 + seconds + 1.0
    measuring = True
    go.set()
    print("start", flush=True)
    await asyncio.sleep(seconds)
    measuring = False
    wall = time.monotonic() - t0
    print("stop", flush=True)
    cpu1 = proc.cpu_times()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in channels:
        await ch.close()
    return {"acked": acked, "sent": sent, "wall_s": wall,
            "driver_cpu_s": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)}


# ----------------------------------------------------------------------------- orchestration


def _cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def run_phase(kind: str, mode: str, args: argparse.Namespace, seconds: float,
              workdir: Path) -> dict[str, Any]:
    r, w = os.pipe()
    argv = [sys.executable, str(BENCH), "--role", f"serve-{kind}", "--ready-fd", str(w),
            "--db", str(workdir / f"{kind}-{mode}.db")]
    server = subprocess.Popen(argv, pass_fds=(w,))
    os.close(w)
    try:
        with os.fdopen(r) as ready:
            port = int(ready.readline().strip())
        sp = psutil.Process(server.pid)
        driver = subprocess.Popen(
            [sys.executable, str(BENCH), "--role", "drive", "--target", f"127.0.0.1:{port}",
             "--agents", str(args.agents), "--mode", mode, "--seconds", str(seconds),
             "--window", str(args.window), "--profile", args.profile],
            stdout=subprocess.PIPE, text=True,
        )
        assert driver.stdout is not None
        cpu_start = cpu_stop = 0.0
        t_start = t_stop = 0.0
        result: dict[str, Any] = {}
        for line in driver.stdout:
            word = line.strip()
            if word == "start":
                cpu_start, t_start = _cpu_s(sp), time.monotonic()
            elif word == "stop":
                cpu_stop, t_stop = _cpu_s(sp), time.monotonic()
            elif word.startswith("{"):
                result = json.loads(word)
        if driver.wait() != 0 or not result:
            raise RuntimeError(f"driver for {kind}/{mode} failed (exit {driver.returncode})")
        result["server_cpu_s"] = cpu_stop - cpu_start
        result["server_wall_s"] = t_stop - t_start
        result["server_rss_mib"] = sp.memory_info().rss / 2**20
        return result
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def summarise(res: dict[str, Any]) -> dict[str, float]:
    rate = res["acked"] / res["wall_s"]
    cpu_us = res["server_cpu_s"] * 1e6 / max(1, res["acked"])
    return {"reports_per_s": rate, "cpu_us_per_report": cpu_us,
            "core_pct": 100.0 * res["server_cpu_s"] / res["server_wall_s"],
            "driver_core_pct": 100.0 * res["driver_cpu_s"] / res["wall_s"],
            "one_core_reports_per_s": 1e6 / cpu_us if cpu_us else float("inf"),
            "rss_mib": res["server_rss_mib"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=2000, help="simulated agents (streams)")
    ap.add_argument("--seconds", type=float, default=20.0, help="paced (1 Hz) phase length")
    ap.add_argument("--saturate-seconds", type=float, default=10.0,
                    help="saturated phase length; 0 skips it")
    ap.add_argument("--window", type=int, default=4,
                    help="reports each agent keeps in flight in the saturated phase")
    ap.add_argument("--profile", default="dgx-h100", help="simulated hardware of the agents")
    ap.add_argument("--json", action="store_true", help="also print the raw figures as JSON")
    ap.add_argument("--role", default="main", help=argparse.SUPPRESS)
    ap.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="paced", help=argparse.SUPPRESS)
    args = ap.parse_args()
    # one connection per agent, like the real thing: thousands of sockets on each side
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    if args.role == "serve-bare":
        serve_bare(args.ready_fd)
        return
    if args.role == "serve-controller":
        serve_controller(args.ready_fd, args.db)
        return
    if args.role == "drive":
        window = 1 if args.mode == "paced" else args.window
        res = asyncio.run(drive(args.target, args.agents, args.mode, args.seconds, window,
                                args.profile))
        print(json.dumps(res), flush=True)
        return

    _, sample = real_messages(args.profile)
    print(f"ingest benchmark: {args.agents} simulated agents ({args.profile}, sample "
          f"{len(sample)} bytes), {os.cpu_count()} CPUs, {sys.version.split()[0]}")
    phases = [("paced", args.seconds)]
    if args.saturate_seconds > 0:
        phases.append(("saturated", args.saturate_seconds))
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="gf-bench-ingest-") as tmp:
        for mode, seconds in phases:
            for kind in ("bare", "controller"):
                figures[f"{kind}/{mode}"] = summarise(run_phase(kind, mode, args, seconds,
                                                                Path(tmp)))
    print(f"{'server/phase':<22} {'reports/s':>10} {'CPU us/rep':>10} {'% core':>7} "
          f"{'1-core cap/s':>12} {'driver %':>8} {'RSS MiB':>8}")
    for key, f in figures.items():
        print(f"{key:<22} {f['reports_per_s']:>10.0f} {f['cpu_us_per_report']:>10.1f} "
              f"{f['core_pct']:>7.1f} {f['one_core_reports_per_s']:>12.0f} "
              f"{f['driver_core_pct']:>8.1f} {f['rss_mib']:>8.1f}")
    for mode, _ in phases:
        bare, ctl = figures[f"bare/{mode}"], figures[f"controller/{mode}"]
        rate_ratio = ctl["reports_per_s"] / bare["reports_per_s"]
        cpu_ratio = bare["cpu_us_per_report"] / ctl["cpu_us_per_report"]
        print(f"{mode}: controller/bare reports/s = {100 * rate_ratio:.0f} %, "
              f"per-report CPU efficiency (bare us / controller us) = {100 * cpu_ratio:.0f} %")
    ctl_cap = figures[f"controller/{phases[-1][0]}"]["one_core_reports_per_s"]
    verdict = "yes" if ctl_cap >= 10_000 else "NO"
    print(f"10,000 nodes at 1 Hz on one core (controller ingests {ctl_cap:.0f} reports/s per "
          f"core at {phases[-1][0]} load): {verdict}")
    if args.json:
        print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
