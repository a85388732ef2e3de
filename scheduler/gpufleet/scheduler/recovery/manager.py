"""Recovery of jobs on a node that turned fatal: signal, grace, requeue elsewhere, time it all.

When the health policy drains a node for a fatal fault it calls `RecoveryManager.node_fatal`.
For every job Slurm has on that node (in any state it still holds, so a job the fault already
killed counts too):

1. Did the job ask for restart? Yes when Slurm holds it requeueable (`--requeue`; Slurm's
   JobRequeue=1 default makes every batch job requeueable, so that alone says nothing) AND
   either its comment carries the marker `gpufleet-ckpt` (what `gpufleet sbatch
   --gpufleet-ckpt` adds) or it has registered a checkpoint with the controller through
   `gpufleet.agent.job` (it has shown it resumes from one). The environment
   (GPUFLEET_CKPT_DIR) cannot be used: slurmctld does not show a job's environment.
   Any other job is left to Slurm's own policy: gpufleet only drained the node.
   The marker may carry per-job settings: `gpufleet-ckpt:grace_s=30,max_restarts=5`.
2. Restart limit: a job gpufleet already requeued `max_restarts` times is not requeued again
   (status `limit`): a job that keeps failing must stop, not loop.
3. Signal (`scancel --signal=USR1 --batch`, configurable) so it can checkpoint if it still
   can, then wait the grace period, or less if the job ends first.
4. Exit 93 (`gpufleet.agent.job.EXIT_DO_NOT_REQUEUE`, NVIDIA NVRx's convention) means "do not
   requeue": squeue --json shows it as exit_code 93 << 8; such a job stays ended. A job
   that completed (exit 0), was cancelled or timed out stays ended too.
5. `scontrol requeue`, then once the job is PENDING (set while it is COMPLETING, Slurm
   overwrites it) `scontrol update StartTime=now[+backoff] ExcNodeList=<old>,<bad node>`:
   StartTime=now clears the 120 s BeginTime Slurm puts on every requeued job. Backoff: the
   first restart starts at once, restart n waits backoff_initial_s * 2^(n-2), capped.
   The killed instance's healthy nodes are excluded as well (slurmd refuses a job id it
   killed until cred_expire passes); if the job cannot start without them, the exclusion is
   narrowed to the bad nodes once that time is over.
6. Wait for it to run again; record when.

Lost time goes to the accounting ledger once the requeue went through: the work since the
last checkpoint (or since the killed run started), capped at that run's length, in wall ms,
charged to every GPU the killed run held on each of its nodes (`store.add_lost_time`; the
ledger's lost GPU-seconds are that times the GPUs). The store keys the charge by job, Slurm's
restart count of the killed run, and node, so it is made once: a retried step, a second
recovery of the same run (another of its nodes failed) or a controller restarted half-way
charge nothing more. A requeue that Slurm made but the controller died before charging is not
charged (under-counted, never double).

Every step is timed and stored (`recoveries` table; `gpufleet jobs show JOBID`) and observed in
Prometheus. All of it runs on a worker pool: never on the ingest path, never blocking it.
Shadow mode records what would be done and does nothing.

One module (~500 lines): a recovery is one timeline (signal, grace, requeue, running again)
per job, and its steps share the same clock, retries and idempotence rules.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from gpufleet.scheduler.slurm import (
    SIGNAL_SCOPES,
    SlurmError,
    SlurmJob,
    SlurmJobClient,
    check_signal,
)
from gpufleet.scheduler.store import (
    AcctStore,
    ActionRow,
    RecoveryRow,
    RecoveryStore,
    StoreError,
    now_ms,
)
from gpufleet.scheduler.store.values import ActionKind, ActionStatus

if TYPE_CHECKING:
    from gpufleet.scheduler.observability.metrics import ControllerMetrics

log = logging.getLogger(__name__)

CKPT_MARKER = "gpufleet-ckpt"
EXIT_DO_NOT_REQUEUE = 93  # = gpufleet.agent.job.EXIT_DO_NOT_REQUEUE (no import across sides)

# states of a job that was on the node when it failed, by what recovery does with them
_LIVE = frozenset({"RUNNING", "COMPLETING", "SUSPENDED", "CONFIGURING", "STOPPED"})
# ended, possibly by the fault: requeue unless exit 93
_FAULT_ENDED = frozenset({"FAILED", "NODE_FAIL", "BOOT_FAIL", "OUT_OF_MEMORY"})
# ended for reasons a restart does not undo
_FINAL_ENDED = {"COMPLETED": "finished", "CANCELLED": "cancelled", "TIMEOUT": "timed out",
                "DEADLINE": "deadline", "PREEMPTED": "preempted"}
# an ended job counts as hit by this fault only when it ended this close to it
_ENDED_SLACK_MS = 60_000
_MARKER = re.compile(rf"(?:^|\s){re.escape(CKPT_MARKER)}(?::(\S*))?(?=\s|$)")


class RecoveryConfigError(ValueError):
    """A recovery setting is out of range; the message names it."""


@dataclass(frozen=True)
class RecoveryConfig:
    signal: str = "USR1"  # what the job's helper listens for (GPUFLEET_CKPT_SIGNAL)
    signal_scope: str = "batch"  # batch shell (= sbatch --signal=B:...) | full | steps
    grace_s: float = 5.0  # default per job; the marker's grace_s= overrides it
    max_restarts: int = 3  # per job; the marker's max_restarts= overrides it
    backoff_initial_s: float = 30.0  # delay of the 2nd restart; doubles after
    backoff_max_s: float = 600.0
    settle_timeout_s: float = 60.0  # for a requeued job to leave COMPLETING
    running_timeout_s: float = 600.0  # watch this long for the job to run again
    # Slurm's AuthInfo cred_expire: the killed instance's nodes refuse the job this long
    cred_expire_s: float = 120.0
    poll_s: float = 0.25
    workers: int = 16

    def validate(self) -> RecoveryConfig:
        try:
            check_signal(self.signal)
        except SlurmError as e:
            raise RecoveryConfigError(f"recovery signal: {e}") from None
        if self.signal_scope not in SIGNAL_SCOPES:
            raise RecoveryConfigError(
                f"recovery signal_scope={self.signal_scope!r}: use one of "
                f"{', '.join(SIGNAL_SCOPES)}")
        for name in ("grace_s", "backoff_initial_s", "backoff_max_s", "settle_timeout_s",
                     "running_timeout_s", "cred_expire_s"):
            if getattr(self, name) < 0:
                raise RecoveryConfigError(f"recovery {name}={getattr(self, name)}: must be >= 0")
        if self.poll_s <= 0 or self.workers < 1 or self.max_restarts < 0:
            raise RecoveryConfigError(
                f"recovery poll_s={self.poll_s} (> 0), workers={self.workers} (>= 1), "
                f"max_restarts={self.max_restarts} (>= 0): out of range")
        return self

    def backoff_s(self, restart: int) -> int:
        """Delay before restart number `restart` (1-based) may start: none for the first."""
        if restart <= 1:
            return 0
        return int(min(self.backoff_max_s, self.backoff_initial_s * 2 ** (restart - 2)))


@dataclass(frozen=True)
class JobRequest:
    """What one job asked of recovery (from its comment marker, else the defaults)."""

    grace_s: float
    max_restarts: int
    marked: bool
    problem: str = ""  # a marker option that could not be used, said in the record


def parse_marker(comment: str, cfg: RecoveryConfig) -> JobRequest | None:
    """`gpufleet-ckpt[:grace_s=N,max_restarts=M]` in a job's comment -> JobRequest; None if
    absent. A bad option falls back to the default and is reported, never fatal: the job's
    recovery matters more than its typo."""
    m = _MARKER.search(comment)
    if m is None:
        return None
    grace, limit, problems = cfg.grace_s, cfg.max_restarts, []
    for opt in filter(None, (m.group(1) or "").split(",")):
        key, _, value = opt.partition("=")
        try:
            if key == "grace_s" and 0 <= float(value) <= 3600:
                grace = float(value)
                continue
            if key == "max_restarts" and 0 <= int(value) <= 1000:
                limit = int(value)
                continue
        except ValueError:
            pass
        problems.append(f"ignored marker option {opt!r} (grace_s=0..3600, "
                        f"max_restarts=0..1000)")
    return JobRequest(grace, limit, True, "; ".join(problems))


class RecoveryNeeds(RecoveryStore, AcctStore, Protocol):
    """What recovery reads and writes: its own rows, lost time in the ledger, and the drain
    actions that timed the fault."""

    def actions(self, node: str | None = None, since_ms: int = 0) -> list[ActionRow]: ...


class RecoveryManager:
    """Runs recoveries on its own worker pool; one recovery per job at a time."""

    def __init__(
        self,
        store: RecoveryNeeds,
        slurm: SlurmJobClient | None,
        config: RecoveryConfig | None = None,
        shadow: bool = False,
        metrics: ControllerMetrics | None = None,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self.store = store
        self.slurm = slurm
        self.config = (config or RecoveryConfig()).validate()
        self.shadow = shadow or slurm is None
        self.metrics = metrics
        self._now = clock_ms
        self._pool = ThreadPoolExecutor(self.config.workers, thread_name_prefix="recovery")
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._inflight: set[str] = set()
        self._pending = 0

    # ------------------------------------------------------------ entry (ingest path: cheap)

    def node_fatal(self, node: str, fault_ms: int | None) -> None:
        """Start recovery of the jobs on `node`; returns at once."""
        if self._stop.is_set():
            return
        with self._lock:
            self._pending += 1
        try:
            self._pool.submit(self._guarded, self._recover_node, node, fault_ms)
        except RuntimeError:  # pool shut down between the check and the submit
            self._done_one()

    def _guarded(self, fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except Exception:  # one job's recovery must not take the pool down
            log.exception("recovery %s%r failed", fn.__name__, args)
        finally:
            self._done_one()

    def _done_one(self) -> None:
        with self._lock:
            self._pending -= 1

    def idle(self) -> bool:
        with self._lock:
            return self._pending == 0

    def stop(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------ per node

    def _recover_node(self, node: str, fault_ms: int | None) -> None:
        if self.slurm is None:
            log.warning("shadow mode: would recover the jobs on %s (no Slurm client)", node)
            return
        jobs = self._retry(lambda: self.slurm.jobs_on_node(node) if self.slurm else [],
                           f"jobs on {node}")
        if jobs is None:
            return
        started = self._now()
        for job in jobs:
            if not self._hit(job, fault_ms if fault_ms is not None else started):
                continue
            with self._lock:
                if job.job_id in self._inflight:
                    log.info("job %s: recovery already running (a second node failed)",
                             job.job_id)
                    continue
                self._inflight.add(job.job_id)
                self._pending += 1
            self._pool.submit(self._guarded, self._recover_job, job, node, fault_ms)

    @staticmethod
    def _hit(job: SlurmJob, fault_ms: int) -> bool:
        """Was the job on the node when it failed (running, or ended by the fault)?"""
        if job.state in _LIVE:
            return True
        return job.end_time_s * 1000 >= fault_ms - _ENDED_SLACK_MS and job.start_time_s > 0

    def _retry(self, call: Callable[[], list[SlurmJob]], what: str) -> list[SlurmJob] | None:
        delay_s = 0.5
        for _ in range(6):  # about 30 s: a slurmctld restart; after that, give up loudly
            try:
                return call()
            except SlurmError as e:
                if not e.transient:
                    log.error("recovery: %s: %s", what, e)
                    return None
                log.warning("recovery: %s: %s; retrying", what, e)
            if self._stop.wait(delay_s):
                return None
            delay_s = min(delay_s * 2, 10.0)
        log.error("recovery: %s: Slurm did not answer; jobs there are not recovered", what)
        return None

    # ------------------------------------------------------------ per job

    def _recover_job(self, job: SlurmJob, node: str, fault_ms: int | None) -> None:
        try:
            row = RecoveryRow(0, job.job_id, node, "running", "", 0, fault_ms, None, None, None,
                              None, None, None, None, self._now())
            row = self._run_steps(job, row)
        finally:
            with self._lock:
                self._inflight.discard(job.job_id)
        if self.metrics is not None:
            self.metrics.recovery_finished(
                row.status, row.fault_ms,
                {"drain": row.drain_ms, "signal": row.signal_ms, "requeue": row.requeue_ms,
                 "running": row.running_ms},
                row.lost_work_ms)

    def _save(self, row: RecoveryRow, **changes: object) -> RecoveryRow:
        row = replace(row, **changes)  # type: ignore[arg-type]
        drain_ms = row.drain_ms if row.drain_ms is not None else self._drain_ms(row)
        row = replace(row, drain_ms=drain_ms)
        try:
            return replace(row, id=self.store.save_recovery(row))
        except StoreError as e:  # the recovery itself goes on; only its record is missing
            log.error("recovery of job %s: cannot store the timeline: %s", row.job_id, e)
            return row

    def _drain_ms(self, row: RecoveryRow) -> int | None:
        """When gpufleet's drain of the node went through (the action queue records it)."""
        since = row.created_ms - _ENDED_SLACK_MS
        try:
            drains = [a for a in self.store.actions(row.node, since_ms=since)
                      if a.action == ActionKind.DRAIN and a.status == ActionStatus.DONE
                      and a.done_ms is not None]
        except StoreError:
            return None
        return drains[-1].done_ms if drains else None

    def _run_steps(self, job: SlurmJob, row: RecoveryRow) -> RecoveryRow:
        row, req = self._admit(job, row)
        if req is None:
            return row
        notes = [req.problem] if req.problem else []
        row, current = self._signal_and_decide(job, row, req, notes)
        if current is None:
            return row
        return self._requeue(job, current, row, notes)

    def _admit(self, job: SlurmJob, row: RecoveryRow) -> tuple[RecoveryRow, JobRequest | None]:
        """Did the job ask for restart, and is it under its limit? (None: stop here.)"""
        cfg = self.config
        req = parse_marker(job.comment, cfg)
        ckpt = self.store.checkpoint(job.job_id)
        if not (job.batch and job.requeue) or (req is None and ckpt is None):
            why = ("not requeueable (submit with --requeue)" if not (job.batch and job.requeue)
                   else f"no {CKPT_MARKER} marker in its comment and no checkpoint registered")
            log.info("job %s on %s: restart not asked for (%s); left to Slurm", job.job_id,
                     row.node, why)
            return self._save(row, status="not_requested", detail=why), None
        if req is None:
            req = JobRequest(cfg.grace_s, cfg.max_restarts, False)
        done_before = sum(1 for r in self.store.recoveries(job.job_id)
                          if r.requeue_ms is not None)
        restart = done_before + 1
        if done_before >= req.max_restarts:
            msg = (f"restart limit reached: gpufleet requeued it {done_before} time(s), "
                   f"max_restarts={req.max_restarts}")
            log.warning("job %s: %s; not requeued", job.job_id, msg)
            return self._save(row, status="limit", detail="; ".join(
                filter(None, [req.problem, msg]))), None
        if self.shadow:
            return self._save(row, status="shadow", restart=restart, detail=(
                f"would signal {cfg.signal}, wait {req.grace_s:g} s, requeue without "
                f"{row.node}, start in {cfg.backoff_s(restart)} s")), None
        return self._save(row, restart=restart, detail=req.problem), req

    def _signal_and_decide(
        self, job: SlurmJob, row: RecoveryRow, req: JobRequest, notes: list[str],
    ) -> tuple[RecoveryRow, SlurmJob | None]:
        """Signal, wait the grace period; the job's state then, or None if it stays ended."""
        cfg, slurm = self.config, self.slurm
        assert slurm is not None  # noqa: S101 - _recover_node returns early without one
        current: SlurmJob | None = job
        if job.state in _LIVE:
            try:
                slurm.signal_job(job.job_id, cfg.signal, cfg.signal_scope)
                row = self._save(row, signal_ms=self._now())
            except SlurmError as e:  # it may have just ended: the requeue decides below
                notes.append(f"signal failed: {e}")
            current = self._wait_grace(job.job_id, req.grace_s)
            if current is not None and current.state == "COMPLETING":
                # its exit status (93?) is known only once it has completed
                current = self._wait_state(job.job_id, lambda j: j.state != "COMPLETING",
                                           cfg.settle_timeout_s) or current
        if current is None:
            return self._save(row, status="failed", detail="; ".join(
                [*notes, "job no longer known to Slurm"])), None
        if current.state not in _LIVE and current.exit_status == EXIT_DO_NOT_REQUEUE:
            log.warning("job %s exited %d (do not requeue): left ended", job.job_id,
                        EXIT_DO_NOT_REQUEUE)
            return self._save(row, status="do_not_requeue", detail="; ".join(
                [*notes, f"exited {EXIT_DO_NOT_REQUEUE}"])), None
        if current.state in _FINAL_ENDED:
            return self._save(row, status="finished", detail="; ".join(
                [*notes, f"{_FINAL_ENDED[current.state]} ({current.state})"])), None
        return row, current

    def _requeue(self, job: SlurmJob, current: SlurmJob, row: RecoveryRow,
                 notes: list[str]) -> RecoveryRow:
        """Requeue away from the bad node, clear the begin time, watch it run again."""
        cfg, slurm = self.config, self.slurm
        assert slurm is not None  # noqa: S101
        try:
            slurm.requeue(job.job_id)
        except SlurmError as e:
            return self._save(row, status="failed", detail="; ".join(
                [*notes, f"requeue failed: {e}"]))
        requeue_ms = self._now()
        ckpt = self.store.checkpoint(job.job_id)  # one may have come in during the grace
        if ckpt is not None:
            lost: int | None = max(0, requeue_ms - ckpt.time_ms)
        elif job.start_time_s > 0:
            lost = max(0, requeue_ms - job.start_time_s * 1000)
        else:
            lost = None
        self._charge_lost_time(job, row, requeue_ms, lost)
        row = self._save(row, status="requeued", requeue_ms=requeue_ms, lost_work_ms=lost,
                         checkpoint_step=ckpt.step if ckpt else None,
                         checkpoint_ms=ckpt.time_ms if ckpt else None)
        # Every node of the killed instance is excluded too, not only the bad one: slurmd
        # refuses to launch a job id it killed until Slurm's credential lifetime (cred_expire,
        # 120 s; the very reason for the requeue BeginTime) has passed, and the job would
        # die at launch ("Job credential revoked"). Slurm cannot change ExcNodeList once the
        # job runs, so the healthy ones stay excluded for this job (narrowed below only if
        # the job cannot start without them).
        bad = tuple(dict.fromkeys([*(r.node for r in self.store.recoveries(job.job_id)),
                                   row.node]))
        narrow = tuple(dict.fromkeys((*current.excluded_nodes, *bad)))
        wide = tuple(dict.fromkeys((*narrow, *current.nodes)))
        pending = self._wait_state(job.job_id, lambda j: j.state == "PENDING",
                                   cfg.settle_timeout_s)
        delay = cfg.backoff_s(row.restart)
        try:
            slurm.update_job(job.job_id, start_now_plus_s=delay, excluded_nodes=wide)
        except SlurmError as e:
            notes.append(f"could not clear the begin time / exclude {row.node}: {e}")
            row = self._save(row, detail="; ".join(notes))
        if pending is None:
            notes.append(f"not PENDING within {cfg.settle_timeout_s:g} s after the requeue")
        log.warning("job %s requeued without %s (restart %d, starts in %d s, lost work %s s)",
                    job.job_id, ",".join(wide), row.restart, delay,
                    "?" if lost is None else f"{lost / 1000:.1f}")
        running = self._wait_state(job.job_id, lambda j: j.state == "RUNNING",
                                   min(cfg.cred_expire_s, cfg.running_timeout_s) + delay)
        if running is None and wide != narrow:
            try:  # not enough nodes without the old ones, whose credentials have expired now
                slurm.update_job(job.job_id, excluded_nodes=narrow)
                notes.append(f"excluded only {','.join(narrow)} after "
                             f"{cfg.cred_expire_s:g} s pending")
            except SlurmError as e:
                notes.append(f"could not narrow the exclusion: {e}")
            running = self._wait_state(job.job_id, lambda j: j.state == "RUNNING",
                                       max(0.0, cfg.running_timeout_s - cfg.cred_expire_s))
        if running is None:
            return self._save(row, detail="; ".join(
                [*notes, f"not running again within {cfg.running_timeout_s + delay:g} s"]))
        return self._save(row, status="running_again", running_ms=self._now(),
                          detail="; ".join([*notes, f"on {','.join(running.nodes)}"]))

    def _charge_lost_time(self, job: SlurmJob, row: RecoveryRow, requeue_ms: int,
                          lost_ms: int | None) -> None:
        """The killed run's lost work into the ledger, once per (job, run, node)."""
        if lost_ms is None:
            return
        if job.start_time_s > 0:  # a checkpoint from an earlier run: only this run's time
            lost_ms = min(lost_ms, max(0, requeue_ms - job.start_time_s * 1000))
        for node in dict.fromkeys((*job.nodes, row.node)):
            try:
                gpus = self.store.add_lost_time(job.job_id, node, lost_ms,
                                                run=job.restart_count, now_ms=requeue_ms)
            except StoreError as e:  # the recovery goes on; the ledger misses this charge
                log.error("job %s: cannot charge %d ms lost on %s to the ledger: %s",
                          job.job_id, lost_ms, node, e)
                continue
            log.info("job %s: %d ms of work lost on %s charged to %d GPU(s)", job.job_id,
                     lost_ms, node, gpus)

    def _poll(self, job_id: str) -> SlurmJob | None:
        assert self.slurm is not None  # noqa: S101
        try:
            return self.slurm.job(job_id)
        except SlurmError as e:
            log.warning("recovery: job %s: %s", job_id, e)
            return None

    def _wait_grace(self, job_id: str, grace_s: float) -> SlurmJob | None:
        """Wait the grace period, or less if the job ends first; the job's state after."""
        deadline = self._now() + int(grace_s * 1000)
        while True:
            current = self._poll(job_id)
            left_s = (deadline - self._now()) / 1000
            ended = current is not None and current.state not in _LIVE
            if ended or left_s <= 0 or self._stop.is_set():
                return current
            self._stop.wait(min(self.config.poll_s, left_s))

    def _wait_state(self, job_id: str, ok: Callable[[SlurmJob], bool],
                    timeout_s: float) -> SlurmJob | None:
        deadline = self._now() + int(timeout_s * 1000)
        while not self._stop.is_set():
            current = self._poll(job_id)
            if current is not None and ok(current):
                return current
            if self._now() >= deadline:
                return None
            self._stop.wait(self.config.poll_s)
        return None
