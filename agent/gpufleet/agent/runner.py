"""The agent's loops: inventory once, a sample every interval, XID events the moment they come.

Each collector failure is logged with its name and the loop goes on; only a failure of the
GPU library as a whole stops the agent.

One module (~470 lines): the loops share one clock and one shutdown; they are easier to
reason about together.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
from gpufleet.agent import __version__, wire
from gpufleet.agent.accounting import Accountant
from gpufleet.agent.client import Heartbeats, StreamClient
from gpufleet.agent.config import AgentConfig
from gpufleet.agent.health import HealthState, Severity, Verdict
from gpufleet.agent.infiniband import IbSysfs
from gpufleet.agent.jobsocket import JobSocketServer, Registration
from gpufleet.agent.kmsg import KmsgReader, to_xid_events
from gpufleet.agent.metrics import AgentCollector, Snapshot, start_exporter
from gpufleet.agent.outbox import Outbox
from gpufleet.agent.telemetry import (
    DiskUsage,
    GpuBackend,
    GpuInfo,
    GpuSample,
    HostSample,
    XidEvent,
)
from gpufleet.agent.xid_catalog import variant_dependent
from gpufleet.rpc.v1 import fleet_pb2 as pb

log = logging.getLogger(__name__)


def _now_ms() -> int:
    return int(time.time() * 1000)

XID_STATE_FILE = "xid_verdicts.json"  # STATE_DIR/...: sticky XID verdicts of this boot


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
        self.health = HealthState(cfg.health_config())
        self.ib = IbSysfs(Path(cfg.sysfs_root))
        self.metrics = AgentCollector()
        self._gpu_infos: tuple[GpuInfo, ...] = ()
        self._kmsg: KmsgReader | None = None
        self._recent_xids: dict[tuple[int | None, int, bool, bool], int] = {}
        self._missing_disks: set[str] = set()
        # a fresh instance every start; reports an earlier process spooled keep theirs and
        # are sent first (gpufleet.agent.outbox explains why the instance is not reused)
        self.outbox = Outbox(
            agent_instance=uuid.uuid4().hex,
            spool_dir=cfg.resolved_spool_dir(),
            max_bytes=cfg.spool_max_bytes,
            sync_interval_s=cfg.spool_sync_interval_s,
            disk_retry_s=cfg.spool_disk_retry_s,
            dead_letter_path=cfg.dead_letter_path(),
        )
        self.metrics.spool_stats = self.outbox.stats
        # unsequenced, never spooled: sent only while the stream is up (client.py)
        self.heartbeats = Heartbeats(self.outbox.wake)
        self.stop = threading.Event()
        self.cycles = 0
        self._bus_ids: dict[int, str] = {}
        self._inventory: pb.NodeInventory | None = None
        self._health_lock = threading.Lock()
        self._last_cached: tuple[int, str] | None = None
        self._cache_written_ms = 0
        # the /proc safety net asks the backend which processes use each GPU
        self.accounting = Accountant(cfg.state_dir, self.node_name,
                                     processes=backend.compute_pids)
        # XID verdicts are sticky for the life of the boot, not of this process: a restarted
        # agent (crash, upgrade, rollout) must not report a node healthy that an Xid took
        # out, or the controller would resume it after its quiet period. Restored verdicts
        # go out with the first sample (not as new events: those were stored already).
        self._xid_state_path = Path(cfg.state_dir) / XID_STATE_FILE
        self._restored_verdicts = self._load_xid_verdicts()
        self._last_report_mono: float | None = None  # last sample or heartbeat queued

    # ------------------------------------------------------------ collection

    def inventory(self) -> pb.NodeInventory:
        gpus = self.backend.inventory()
        self._gpu_infos = tuple(gpus)
        self._bus_ids = {g.index: g.pci_bus_id for g in gpus}
        self.accounting.set_inventory({g.uuid: g.index for g in gpus})
        vm = psutil.virtual_memory()
        inv = wire.node_inventory(
            node_name=self.node_name,
            hostname=socket.gethostname(),
            agent_version=__version__,
            driver_version=self.backend.driver_version(),
            cuda_driver_version=self.backend.cuda_driver_version(),
            gpus=gpus,
            links=self.backend.links(),
            nic_affinities=self.backend.nic_affinity(),
            ib_ports=self.ib.ports(),
            cpu_count=psutil.cpu_count() or 0,
            memory_total_bytes=vm.total,
            boot_id=_boot_id(),
            nvml_backend=self.backend.name,
        )
        self._inventory = inv
        return inv

    def hello(self) -> pb.Hello:
        inv = self._inventory if self._inventory is not None else self.inventory()
        return wire.hello(inv, self.outbox.acked_seq)

    def host(self) -> HostSample:
        vm = psutil.virtual_memory()
        disks = []
        for path in self.cfg.disk_paths:
            try:
                du = psutil.disk_usage(path)
            except OSError as e:
                if path not in self._missing_disks:  # say it once, not every second
                    log.warning("disk path %s: %s", path, e)
                    self._missing_disks.add(path)
                continue
            disks.append(DiskUsage(path, du.used, du.total))
        return HostSample(
            cpu_pct=psutil.cpu_percent(interval=None),
            memory_used_bytes=vm.total - vm.available,
            memory_total_bytes=vm.total,
            load_1m=os.getloadavg()[0],
            disks=tuple(disks),
        )

    def sample(self) -> pb.NodeSample:
        t0 = time.perf_counter()
        # the clock before the job spool: an end the poll misses is then stamped after `now`,
        # never integrated past (Accountant.on_sample)
        now = _now_ms()
        job_change = self._poll_jobs()
        gpus = self.backend.sample()
        self._account(gpus, now, job_change)
        ib_ports = self.ib.sample()
        host = self.host()
        with self._health_lock:
            changed = self.health.evaluate(gpus, now, ib_ports, host)
            if self._restored_verdicts:
                changed = [*self._restored_verdicts, *changed]
                self._restored_verdicts = []
            current = tuple(self.health.current.values())
        msg = wire.node_sample(now, gpus, ib_ports, host, changed)
        # rewritten on change, and every 30 s as a heartbeat so `health` can tell a
        # stopped agent from a healthy one
        if changed or now - self._cache_written_ms > 30_000:
            self._write_health_cache(force=True)
        self.metrics.update(Snapshot(
            node_name=self.node_name, timestamp_ms=now, gpus=self._gpu_infos,
            gpu_samples=tuple(gpus), ib_ports=tuple(ib_ports), host=host, verdicts=current,
            cycle_seconds=time.perf_counter() - t0,
        ))
        return msg

    def _poll_jobs(self) -> bool:
        """New prolog/epilog records? Then this sample reads the energy counters afresh."""
        try:
            changed = self.accounting.poll_spool()
        except OSError as e:
            log.error("job spool %s unreadable: %s", self.accounting.spool, e)
            return False
        if changed:
            self.backend.expire_counters()
        return changed

    def _account(self, gpus: list[GpuSample], now_ms: int, job_change: bool) -> None:
        try:
            rows = self.accounting.on_sample(gpus, now_ms, self.outbox.acked_seq)
            if rows:
                seq = self.outbox.put_usage(wire.usage_report(self.node_name, rows))
                self.accounting.queued(rows, seq)
        except Exception:  # accounting must never stop health sampling
            log.exception("job accounting failed for this sample (job change: %s)", job_change)

    def on_xid(self, event: XidEvent) -> pb.HealthEvent:
        with self._health_lock:
            verdict = self.health.on_xid(event, self._bus_ids)
        log.warning("%s: %s", self.node_name, verdict.evidence)
        ev = wire.xid_event(event, verdict)
        self._save_xid_verdicts()
        self._write_health_cache()
        return ev

    def _save_xid_verdicts(self) -> None:
        with self._health_lock:
            xids = [dataclasses.asdict(v) for k, v in self.health.current.items()
                    if k[0] == "xid"]
        doc = {"boot_id": _boot_id(), "verdicts": xids}
        tmp = self._xid_state_path.with_suffix(".tmp")
        try:
            self._xid_state_path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, self._xid_state_path)
        except OSError as e:  # the verdict still goes out now; only a restart would forget it
            log.error("cannot save XID verdicts to %s: %s", self._xid_state_path, e)

    def _load_xid_verdicts(self) -> list[Verdict]:
        """The XID verdicts an earlier agent process of this boot saved; [] after a reboot
        (a rebooted GPU starts clean) or when there are none or the file is unreadable."""
        try:
            doc = json.loads(self._xid_state_path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            log.error("ignoring unreadable XID state %s: %s", self._xid_state_path, e)
            return []
        if not isinstance(doc, dict) or doc.get("boot_id") != _boot_id():
            return []  # a reboot clears XIDs, as it clears the GPU
        restored = []
        for d in doc.get("verdicts") or []:
            try:
                v = Verdict(**{**d, "severity": Severity(d["severity"])})
            except (TypeError, KeyError, ValueError) as e:
                log.error("ignoring a bad XID verdict in %s: %s", self._xid_state_path, e)
                continue
            self.health.current[("xid", v.gpu_index)] = v
            restored.append(v)
        if restored:
            log.warning("%s: keeping %d XID verdict(s) from before this agent restarted "
                        "(same boot): %s", self.node_name, len(restored),
                        "; ".join(v.evidence for v in restored))
        return restored

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

    def on_checkpoint(self, reg: Registration) -> pb.CheckpointRegistered:
        """A job registered a checkpoint on the job socket: queue it for the controller."""
        msg = wire.checkpoint_registered(reg, self.node_name)  # with its MUNGE credential
        self.outbox.put_checkpoint(msg)
        log.info("job %s checkpoint step %d at %s", reg.job_id, reg.step, reg.path)
        return msg

    def _start_job_socket(self) -> JobSocketServer | None:
        path = self.cfg.resolved_job_socket_path()
        if not path:
            return None
        server = JobSocketServer(path, self.on_checkpoint)
        try:
            server.start()
        except OSError as e:
            # jobs still save their checkpoints without it; only registration is lost
            log.error("job socket not started on %s: %s; jobs' checkpoints will not be "
                      "registered with the controller", path, e)
            return None
        return server

    # ------------------------------------------------------------ loops

    def _xid_is_new(self, event: XidEvent) -> bool:
        """NVML and the kernel log report the same XID: keep the first within 10 s. Where the
        kernel line's text decides the variant (NVLink5), NVML's bare event does not hide it."""
        detail = variant_dependent(event.xid) and bool(event.message)
        key = (event.gpu_index, event.xid, event.lost, detail)
        if event.lost:  # the driver's "fallen off the bus" words beside its Xid 79: one event
            x79 = self._recent_xids.get((event.gpu_index, 79, False, False))
            if x79 is not None and event.timestamp_ms - x79 <= 10_000:
                return False
        last = self._recent_xids.get(key)
        self._recent_xids[key] = event.timestamp_ms
        return last is None or event.timestamp_ms - last > 10_000

    def _open_kmsg(self) -> None:
        path = self.cfg.resolved_kmsg_path()
        if path is None:
            return
        try:
            self._kmsg = KmsgReader(path)
        except OSError as e:
            log.warning("not reading XIDs from %s (%s); NVML events still are. The agent "
                        "needs CAP_SYSLOG to read the kernel log.", path, e)

    def _event_loop(self) -> None:
        self._open_kmsg()
        while not self.stop.is_set():
            events: list[XidEvent] = []
            try:
                event = self.backend.wait_xid(500)
                if event is not None:
                    events.append(event)
                if self._kmsg is not None:
                    bus_to_index = {bus: i for i, bus in self._bus_ids.items()}
                    events += to_xid_events(self._kmsg.read_new(), bus_to_index, _now_ms())
            except Exception:
                log.exception("XID event watch failed; retrying in 1 s")
                self.stop.wait(1.0)
                continue
            for ev in events:
                if self._xid_is_new(ev):
                    self.outbox.put_event(self.on_xid(ev))
        if self._kmsg is not None:
            self._kmsg.close()

    def report(self, sample: pb.NodeSample) -> str:
        """Queue what the controller needs of this cycle's sample: the sample itself when a
        verdict changed (and the first one, which carries every verdict), a heartbeat when
        heartbeat_interval_s passed without one (not queued: handed to the stream, dropped
        if none is up), else nothing. Returns what went out."""
        hb = self.cfg.heartbeat_interval_s
        now = time.monotonic()
        if hb <= 0 or sample.verdicts or self._last_report_mono is None:
            self.outbox.put_sample(sample)
            self._last_report_mono = now
            return "sample"
        # half a cycle of slack: the loop's pacing jitters by a few ms
        if now - self._last_report_mono >= hb - self.cfg.interval_s / 2:
            self.heartbeats.put(wire.heartbeat(sample.timestamp_ms))
            self._last_report_mono = now
            return "heartbeat"
        return ""

    def _sample_loop(self, once: bool) -> None:
        next_t = time.monotonic()
        while not self.stop.is_set():
            try:
                self.report(self.sample())
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
        server = self._start_metrics() if not once else None
        job_socket = self._start_job_socket() if not once else None
        psutil.cpu_percent(interval=None)  # prime: the first call always returns 0
        commands = self._command_runner()
        commands.start()
        client = StreamClient(self.cfg.controller, self.outbox, self.hello,
                              tls=self.cfg.client_tls(),
                              on_command=wire.on_command(commands.submit),
                              heartbeats=self.heartbeats)
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
            commands.stop()
            for t in threads:
                t.join(timeout=2.0)
            if server is not None:
                server.shutdown()
            if job_socket is not None:
                job_socket.stop()
            self.outbox.close()
            self.backend.close()

    # ------------------------------------------------------------ repair commands

    def _command_runner(self) -> Any:
        from gpufleet.agent.remedy import CommandResult, CommandRunner

        sim = (Path(self.cfg.resolved_faults_path())
               if self.cfg.gpu_backend == "simulated" else None)

        def send(result: CommandResult) -> int:
            return self.outbox.put_command_result(wire.command_result(result))

        return CommandRunner(self.backend, send, self.run_diag, self.clear_xids,
                             sim_faults_path=sim)

    def run_diag(self, level: int) -> Any:
        """The diagnostic the controller asks for before it resumes this node."""
        from gpufleet.agent import diag

        dcgmi = diag.find_dcgmi()
        if dcgmi is not None and self.cfg.gpu_backend == "nvml":
            return diag.run_dcgmi(level, dcgmi)
        expect = diag.Expectations(gpu_count=self.cfg.expected_gpu_count,
                                   ib_rate_gbps=self.cfg.expected_ib_rate_gbps,
                                   ib_hcas=self.cfg.ib_hcas)
        # its own sysfs reader: the sampling thread's keeps per-port state
        return diag.run_own(self.backend, level, expect,
                            ib_sample=IbSysfs(Path(self.cfg.sysfs_root)).sample,
                            retired_pending=self.backend.retired_pages_pending)

    def clear_xids(self, gpus: Sequence[int]) -> None:
        """A GPU reset cleared these GPUs: drop their sticky XID verdicts and tell the
        controller (an OK verdict for each), as a reboot would by starting clean."""
        now = _now_ms()
        with self._health_lock:
            cleared = [i for i in gpus if self.health.current.pop(("xid", i), None)]
        for i in cleared:
            ok = Verdict("xid", Severity.OK, "ok", f"GPU {i} reset: XID verdict cleared", now, i)
            self.outbox.put_event(wire.verdict_changed(now, i, ok))
        if cleared:
            self._save_xid_verdicts()
            self._write_health_cache(force=True)

    def _start_metrics(self) -> Any:
        if not self.cfg.metrics_listen:
            return None
        host, _, port = self.cfg.metrics_listen.rpartition(":")
        try:
            _registry, server = start_exporter(self.metrics, host or "0.0.0.0", int(port))  # noqa: S104
        except (OSError, ValueError) as e:
            # metrics are worth less than the health loop: run on without them
            log.error("Prometheus exporter not started on %s: %s", self.cfg.metrics_listen, e)
            return None
        return server
