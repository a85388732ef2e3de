"""The agent's loops: inventory once, a sample every interval, XID events the moment they come.

Each collector failure is logged with its name and the loop goes on; only a failure of the
GPU library as a whole stops the agent.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import psutil
from gpufleet.agent import __version__, wire
from gpufleet.agent.client import StreamClient
from gpufleet.agent.config import AgentConfig
from gpufleet.agent.health import HealthState, Severity, Verdict
from gpufleet.agent.outbox import Outbox
from gpufleet.agent.telemetry import GpuBackend, XidEvent
from gpufleet.rpc.v1 import fleet_pb2 as pb

log = logging.getLogger(__name__)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class Agent:
    def __init__(self, cfg: AgentConfig, backend: GpuBackend) -> None:
        self.cfg = cfg
        self.backend = backend
        self.node_name = cfg.resolved_node_name()
        self.health = HealthState(expected_gpu_count=cfg.expected_gpu_count)
        self.outbox = Outbox(agent_instance=uuid.uuid4().hex)
        self.stop = threading.Event()
        self.cycles = 0
        self._bus_ids: dict[int, str] = {}
        self._inventory: pb.NodeInventory | None = None
        self._health_lock = threading.Lock()
        self._last_cached: tuple[int, str] | None = None
        self._cache_written_ms = 0

    # ------------------------------------------------------------ collection

    def inventory(self) -> pb.NodeInventory:
        gpus = self.backend.inventory()
        self._bus_ids = {g.index: g.pci_bus_id for g in gpus}
        vm = psutil.virtual_memory()
        inv = pb.NodeInventory(
            node_name=self.node_name,
            hostname=socket.gethostname(),
            agent_version=__version__,
            driver_version=self.backend.driver_version(),
            cuda_driver_version=self.backend.cuda_driver_version(),
            gpus=[wire.gpu_info(g) for g in gpus],
            gpu_links=[wire.gpu_link(lk) for lk in self.backend.links()],
            gpu_nic_affinity=[wire.nic_affinity(*a) for a in self.backend.nic_affinity()],
            cpu_count=psutil.cpu_count() or 0,
            memory_total_bytes=vm.total,
            numa_node_count=len({g.numa_node for g in gpus if g.numa_node is not None}),
            boot_id=_boot_id(),
            nvml_backend=self.backend.name,
        )
        self._inventory = inv
        return inv

    def hello(self) -> pb.Hello:
        inv = self._inventory if self._inventory is not None else self.inventory()
        return pb.Hello(inventory=inv, last_acked_seq=self.outbox.acked_seq)

    def sample(self) -> pb.NodeSample:
        now = _now_ms()
        gpus = self.backend.sample()
        with self._health_lock:
            changed = self.health.evaluate(gpus, now)
        msg = pb.NodeSample(timestamp_ms=now, gpus=[wire.gpu_sample(g) for g in gpus])
        msg.verdicts.extend(wire.verdict(v) for v in changed)
        vm = psutil.virtual_memory()
        msg.host.cpu_pct = psutil.cpu_percent(interval=None)
        msg.host.memory_used_bytes = vm.total - vm.available
        msg.host.memory_total_bytes = vm.total
        msg.host.load_1m = os.getloadavg()[0]
        # rewritten on change, and every 30 s as a heartbeat so `health` can tell a
        # stopped agent from a healthy one
        if changed or now - self._cache_written_ms > 30_000:
            self._write_health_cache(force=True)
        return msg

    def on_xid(self, event: XidEvent) -> pb.HealthEvent:
        with self._health_lock:
            verdict = self.health.on_xid(event, self._bus_ids)
        log.warning("%s: %s", self.node_name, verdict.evidence)
        ev = pb.HealthEvent(
            timestamp_ms=event.timestamp_ms,
            kind=pb.EVENT_KIND_XID,
            xid=event.xid,
            verdict=wire.verdict(verdict),
        )
        if event.gpu_index is not None:
            ev.gpu_index = event.gpu_index
        self._write_health_cache()
        return ev

    def _write_health_cache(self, force: bool = False) -> None:
        """The node's worst verdict, for `gpufleet-agent health` (Slurm's HealthCheckProgram)."""
        with self._health_lock:
            worst: Verdict | None = self.health.worst()
        key = (int(worst.severity), worst.reason_code) if worst else (int(Severity.OK), "ok")
        if key == self._last_cached and not force:
            return
        doc = {
            "node": self.node_name,
            "severity": Severity(key[0]).name.lower(),
            "reason_code": key[1],
            "evidence": worst.evidence if worst else "",
            "updated_ms": _now_ms(),
        }
        path = Path(self.cfg.state_dir) / "health.json"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc))
            tmp.replace(path)
            self._last_cached = key
            self._cache_written_ms = doc["updated_ms"]  # type: ignore[assignment]
        except OSError as e:
            log.warning("cannot write health cache %s: %s", path, e)

    # ------------------------------------------------------------ loops

    def _event_loop(self) -> None:
        while not self.stop.is_set():
            try:
                event = self.backend.wait_xid(500)
            except Exception:
                log.exception("XID event watch failed; retrying in 1 s")
                self.stop.wait(1.0)
                continue
            if event is not None:
                self.outbox.put_event(self.on_xid(event))

    def _sample_loop(self, once: bool) -> None:
        next_t = time.monotonic()
        while not self.stop.is_set():
            try:
                self.outbox.put_sample(self.sample())
                self.cycles += 1
            except Exception:
                log.exception("sample cycle failed; the loop goes on")
            if once:
                return
            next_t += self.cfg.interval_s
            delay = next_t - time.monotonic()
            if delay < 0:  # fell behind (suspend, overload): don't burst to catch up
                next_t = time.monotonic()
                delay = 0
            self.stop.wait(delay)

    def run(self, once: bool = False, once_timeout_s: float = 10.0) -> bool:
        """Run until stopped; with once=True send one sample and return whether it was acked."""
        self.inventory()
        self._write_health_cache()
        psutil.cpu_percent(interval=None)  # prime: the first call always returns 0
        client = StreamClient(self.cfg.controller, self.outbox, self.hello)
        threads = [threading.Thread(target=client.run, args=(self.stop,), name="stream",
                                    daemon=True)]
        if not once:
            threads.append(threading.Thread(target=self._event_loop, name="xid", daemon=True))
        for t in threads:
            t.start()
        try:
            self._sample_loop(once)
            if once:
                return self.outbox.wait_empty(once_timeout_s)
            return True
        finally:
            self.stop.set()
            for t in threads:
                t.join(timeout=2.0)
            self.backend.close()
