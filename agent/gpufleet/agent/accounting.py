"""Per-job GPU accounting on the node: which job holds which GPU, to the second, and what it used.

How a job becomes known (design):

* Slurm's Prolog runs ``gpufleet-agent prolog`` and its Epilog ``gpufleet-agent epilog``. Each
  writes ONE small JSON file, atomically (write + fsync + rename), into ``STATE_DIR/jobs/``:
  ``start-<job>.r<restarts>.json`` / ``end-<job>.t<time_ms>.json`` with the job id, its GPUs,
  user, account, Slurm's restart count and the wall-clock time in ms (one file per run: see
  Runs). That is all they do: no NVML, no socket, no waiting on the agent, and
  they exit 0 whatever happens, because a failing Prolog drains the node and a failing Epilog
  fails the job. The time in the file is the job's start/end, so a slow or stopped agent
  changes nothing about "to the second".
* The agent polls that spool directory each sample (one ``scandir`` of a near-empty folder),
  takes a fresh energy-counter read when a job starts or ends (``expire_counters()``), and
  otherwise keeps NVML's slow energy counter at its ``nvml_counter_interval_s`` (10 s).
* Per GPU the agent integrates utilisation x time for the job holding it (clipped to the
  job's start and end; an end found only after the samples went past it, as the hooks stamp
  their time before Python starts, takes back what was integrated beyond it) and adds
  energy-counter differences (a counter that went backwards was
  reset by a driver reload and counts on from 0; one near 2^64 wrapped). Allocated time is
  ``end - start`` from the hook times, never a sum of samples.
* Usage leaves as CUMULATIVE per (job, run, GPU) totals at the run's start, at every minute
  boundary, and at its end (`GpuUsage` rows; `gpufleet.agent.wire` makes them
  gpufleet.v1.JobGpuUsage). The controller keeps the newest per
  (job, run, node, GPU), so a replay can never count twice. Before a report is queued, the totals
  are written to ``STATE_DIR/accounting.json`` (the on-disk spool): after an agent restart
  the jobs, their totals and the last raw energy readings come back, every job is reported
  again, and energy used while the agent was down is still counted (the counter kept
  running). Busy time while the agent was down is not observed and so not counted.
* A job's GPUs come from SLURM_JOB_GPUS (indices) or CUDA_VISIBLE_DEVICES (indices or
  GPU-UUIDs, mapped through the inventory). Several jobs on one node each hold their own
  GPUs, so each GPU has at most one owner and shared nodes are exact. (Sharded/MPS GPUs shared
  by two jobs at once: the later job wins; not supported.)

Runs (a requeued job runs again under the SAME job id: gpufleet's recovery, `scontrol
requeue`, `--requeue` after a node failure):

* A run is Slurm's restart count, which 22.05 puts into the Prolog's and Epilog's
  environment as SLURM_JOB_RESTART_COUNT (0 for the first run; seen in the lab). It is the
  same number on every node of the run, it is what sacct's records of the job count and
  what recovery charges lost time to, and a replayed report carries it, so a report always
  maps to its run. (The Prolog's start time would be unique too, but differs per node.)
* The Prolog names its run; the Epilog does NOT: after `scontrol requeue` the killed run's
  Epilog already sees the next run's count. So an end hook closes the job's open run on
  this node that started last before the hook's time; hook files are applied in time order,
  so with the agent down across a whole requeue both runs still come out right.
* A start hook of a run this agent already holds, or of a run already ended and forgotten
  (ids of the last `_ENDED_RUNS_KEPT` jobs are kept, in the state file), is a repeat and is
  ignored. A start without a restart count (another Slurm) is the open run (a repeat) or one
  past the last run known here. A new run while an older one is still open here means the
  older run's Epilog was lost: it is ended at the new run's start.

The /proc safety net (for a Prolog that is not configured or whose spool file was lost):

* At most every ``proc_scan_interval_s`` (10 s), the GPUs that no hook-announced job holds
  are asked for their compute processes (NVML), and only pids not seen before are mapped to
  a Slurm job through ``/proc/<pid>/cgroup`` or environ (`gpufleet.agent.procmap`). A node
  where every busy GPU has its hook owner costs nothing; an idle node one NVML call per GPU
  per interval.
* Such a GPU is attributed to that job from the check that first saw its processes to the
  check that no longer saw them (per GPU; each end is late by up to one interval, so the
  allocated time is APPROXIMATE), and busy time and energy are integrated over exactly that
  span, as for a hooked job. The user comes from the
  job's uid, the account is unknown (""). These rows are marked ``source=proc`` (per GPU in
  the state file and on the wire, JobGpuUsage.source). A job already seen ending here is
  not attributed from /proc again (stragglers); a rerun of it is seen through its Prolog.
* A job known only from /proc ends at its last sighting once none of its processes has been
  seen for ``PROC_END_GRACE_MS``, or exactly at its Epilog's time if one comes.
* A start hook arriving later wins: the job keeps its totals so far (cumulative, same
  (job, run, GPU) keys, so nothing is counted twice; the run keeps the number it had), and
  takes the hook's start, user, account and GPUs; allocated time is then exact. A GPU the
  job's processes used outside the hook's list stays counted first-seen to last-seen.

Never does: talk to Slurm, know the wire format (protobuf is `gpufleet.agent.wire`'s), block
the sample loop on I/O other than the spool folder and its own state file, or raise out of
`on_sample` for one bad spool file (it is logged and moved aside as ``*.bad``).

One module (~770 lines, 70 of them this design): the hooks' files, the GPU holdings and the
cumulative totals are one state machine, and splitting it would split its invariants.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from gpufleet.agent import procmap
from gpufleet.agent.telemetry import GpuBackendError, GpuSample

log = logging.getLogger(__name__)

SPOOL_DIR = "jobs"
STATE_FILE = "accounting.json"
REPORT_PERIOD_MS = 60_000  # RUNNING reports at each minute boundary: per-minute rollups
# totals are saved this often even without a report: an agent crash loses at most this much
# busy time (energy and allocated time are never lost: they come from counters and times)
SAVE_PERIOD_MS = 10_000
# how far back an end hook may be stamped before the sample that finds it and still clip busy
# time exactly: hooks stamp their time before Python starts (cli.HOOK_TIME_MAX_AGE_MS, 60 s),
# so an Epilog's file turns up 0.2-1 s (seconds on a loaded node) after its end
LATE_END_MS = 60_000
_JOB_ID = re.compile(r"^[0-9]{1,12}([_+][0-9]{1,9})?$")
# Slurm's restart count in the Prolog/Epilog environment (22.05: SLURM_JOB_RESTART_COUNT,
# seen in the lab; SLURM_RESTART_COUNT is the batch step's name for it)
RESTART_COUNT_VARS = ("SLURM_JOB_RESTART_COUNT", "SLURM_RESTART_COUNT")
_ENDED_RUNS_KEPT = 4096  # job -> last run forgotten after its ENDED ack (repeated hooks)
_NAME = re.compile(r"^[A-Za-z0-9._@+-]{0,64}$")
_UUID = re.compile(r"^(GPU|MIG)-[0-9A-Fa-f-]{8,64}$")
_U64 = 1 << 64
# a counter value above this that then reads lower is taken as a uint64 wrap, not a reset
_WRAP_NEAR = 1 << 63
# /proc safety net: how often GPUs without a hook owner are checked for processes, and how
# long a job known only from /proc may show no process before it is taken as ended
PROC_SCAN_INTERVAL_S = 10.0
PROC_END_GRACE_MS = 120_000
_PROC_ENDED_KEPT = 4096  # ids of /proc-ended jobs not attributed again (stragglers)
# GPU index -> pids of its compute processes (NvmlBackend.compute_pids); GPUs it cannot
# tell about are left out
ProcessSource = Callable[[Sequence[int]], Mapping[int, Sequence[int]]]
JobKey = tuple[str, int]  # (Slurm job id, run)


class AccountingError(ValueError):
    """A job hook's input is unusable; the message names the variable and the problem."""


class JobPhase(StrEnum):
    STARTED = "started"  # the prolog ran (or /proc first saw it): it holds these GPUs from start
    RUNNING = "running"  # a periodic report (each minute boundary)
    ENDED = "ended"  # the epilog ran (or /proc saw it gone): totals are final, end_ms is set


class UsageSource(StrEnum):
    HOOK = "hook"  # prolog/epilog: allocated time exact
    PROC = "proc"  # the /proc safety net: first to last sighting, approximate


@dataclass(frozen=True)
class GpuUsage:
    """One (job, run, GPU)'s cumulative totals as of `as_of_ms`; what the controller keeps."""

    job_id: str
    gpu_index: int
    user: str
    account: str
    start_ms: int
    as_of_ms: int
    allocated_ms: int
    busy_ms: int
    energy_mj: int
    phase: JobPhase
    run: int
    source: UsageSource
    end_ms: int | None = None  # set with ENDED only
    idle_since_ms: int | None = None  # at 0 % utilisation since then; never with ENDED


# ------------------------------------------------------------------ hook side (prolog/epilog)

def parse_gpu_list(text: str, name: str = "SLURM_JOB_GPUS") -> tuple[str, ...]:
    """'0,1', '0-3', '2,4-5' or GPU-UUIDs into a tuple of entries (indices as digit strings)."""
    out: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part.isascii() and part.isdigit():
            out.append(str(int(part)))
        elif re.fullmatch(r"[0-9]+-[0-9]+", part):
            lo, hi = (int(x) for x in part.split("-"))
            if hi < lo or hi - lo > 255:
                raise AccountingError(f"{name}={text!r}: bad range {part!r}")
            out.extend(str(i) for i in range(lo, hi + 1))
        elif _UUID.match(part):
            out.append(part)
        else:
            raise AccountingError(
                f"{name}={text!r}: {part!r} is neither a GPU index, a range nor a GPU-UUID")
    return tuple(dict.fromkeys(out))  # de-duplicated, order kept


def job_from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """The job a Prolog/Epilog runs for, from Slurm's environment; AccountingError if unusable."""
    job_id = env.get("SLURM_JOB_ID", "")
    if not _JOB_ID.match(job_id):
        raise AccountingError(f"SLURM_JOB_ID={job_id!r}: not a Slurm job id")
    gpus_var = "SLURM_JOB_GPUS" if env.get("SLURM_JOB_GPUS") else "CUDA_VISIBLE_DEVICES"
    gpus = parse_gpu_list(env.get(gpus_var, ""), gpus_var)
    user = env.get("SLURM_JOB_USER", "")
    account = env.get("SLURM_JOB_ACCOUNT", "")
    for var, value in (("SLURM_JOB_USER", user), ("SLURM_JOB_ACCOUNT", account)):
        if not _NAME.match(value):
            raise AccountingError(f"{var}={value[:80]!r}: unexpected characters")
    out: dict[str, Any] = {"job_id": job_id, "gpus": list(gpus), "user": user,
                           "account": account}
    for var in RESTART_COUNT_VARS:
        restarts = env.get(var, "")
        if restarts:
            if not (restarts.isascii() and restarts.isdigit()) or len(restarts) > 9:
                raise AccountingError(f"{var}={restarts[:80]!r}: not a restart count")
            out["restart_count"] = int(restarts)
            break
    return out


def write_hook_file(state_dir: str | os.PathLike[str], kind: str, job: Mapping[str, Any],
                    time_ms: int) -> Path:
    """Record a job's start ('start') or end ('end') in the spool; atomic and durable."""
    if kind not in ("start", "end"):
        raise AccountingError(f"kind={kind!r}: must be 'start' or 'end'")
    spool = Path(state_dir) / SPOOL_DIR
    spool.mkdir(parents=True, exist_ok=True)
    # one file per run and hook: a rerun of the job (same id) never overwrites a file of the
    # run before it that the agent has not read yet. A Prolog names its run (Slurm's restart
    # count); an Epilog's count may already be the next run's, so its file is named by time.
    restarts = job.get("restart_count")
    run = f"r{restarts}" if kind == "start" and restarts is not None else f"t{time_ms}"
    path = spool / f"{kind}-{job['job_id']}.{run}.json"
    tmp = spool / f".{kind}-{job['job_id']}.{run}.{os.getpid()}.tmp"
    data = json.dumps({**job, "kind": kind, "time_ms": time_ms}).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------ agent side

def counter_delta(last: int | None, raw: int | None) -> int:
    """Energy (mJ) between two reads of NVML's total-energy counter.

    None on either side: nothing known, 0. Lower than before: near 2^64 it wrapped, else the
    driver was reloaded and the counter restarted from 0, so `raw` is what was used since.
    """
    if last is None or raw is None:
        return 0
    if raw >= last:
        return raw - last
    if last >= _WRAP_NEAR:
        return _U64 - last + raw
    return raw


@dataclass
class _GpuUse:
    busy_ms: float = 0.0
    energy_mj: int = 0
    idle_since_ms: int | None = None
    # set only for a GPU attributed from /proc (source=proc): first and last sighting
    first_ms: int | None = None
    last_ms: int | None = None
    # (from_ms, to_ms, utilisation %) of what was integrated in the last LATE_END_MS, so an
    # end found after the samples went past it takes back what lies beyond it. In memory
    # only: after a restart busy time is not integrated across the gap anyway.
    recent: deque[tuple[int, int, float]] = field(default_factory=deque, compare=False,
                                                  repr=False)

    def add_busy(self, from_ms: int, to_ms: int, util_pct: float) -> None:
        self.busy_ms += util_pct / 100.0 * (to_ms - from_ms)
        if to_ms > from_ms:
            self.recent.append((from_ms, to_ms, util_pct))
            while self.recent and self.recent[0][1] < to_ms - LATE_END_MS:
                self.recent.popleft()

    def take_back_after(self, end_ms: int) -> None:
        """Busy time integrated past `end_ms` is not the job's: its end was found late."""
        self.busy_ms -= sum(util / 100.0 * (hi - max(lo, end_ms))
                            for lo, hi, util in self.recent if hi > end_ms)
        self.recent.clear()

    @property
    def from_proc(self) -> bool:
        return self.first_ms is not None


@dataclass
class _Job:
    job_id: str
    user: str
    account: str
    gpus: tuple[int, ...]
    start_ms: int
    end_ms: int | None = None
    final_seq: int | None = None  # outbox seq of the ENDED report; forgotten once acked
    use: dict[int, _GpuUse] = field(default_factory=dict)
    source: str = "hook"  # "hook": a Prolog announced it; "proc": known only from /proc
    run: int = 0  # Slurm's restart count of this run (module docstring: Runs)

    @property
    def key(self) -> JobKey:
        return (self.job_id, self.run)

    def to_json(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "run": self.run, "user": self.user,
                "account": self.account,
                "gpus": list(self.gpus), "start_ms": self.start_ms, "end_ms": self.end_ms,
                "final_seq": self.final_seq, "source": self.source,
                "use": {str(g): [u.busy_ms, u.energy_mj, u.idle_since_ms, u.first_ms, u.last_ms]
                        for g, u in self.use.items()}}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> _Job:
        job = cls(str(d["job_id"]), str(d["user"]), str(d["account"]),
                  tuple(int(g) for g in d["gpus"]), int(d["start_ms"]),
                  None if d.get("end_ms") is None else int(d["end_ms"]),
                  source=str(d.get("source", "hook")), run=int(d.get("run", 0)))
        # state files written before the /proc safety net hold three values per GPU
        job.use = {int(g): _GpuUse(float(v[0]), int(v[1]), v[2], *(list(v[3:5]) + [None] * 2)[:2])
                   for g, v in d.get("use", {}).items()}
        return job


@dataclass(frozen=True)
class HookRecord:
    kind: str  # start | end
    job_id: str
    gpus: tuple[str, ...]
    user: str
    account: str
    time_ms: int
    path: Path
    # Slurm's restart count from the hook's environment; None: not given (another Slurm)
    restart_count: int | None = None


class Accountant:
    """Owns the job -> GPU map and each job's running totals. Called from the sample loop only."""

    def __init__(self, state_dir: str | os.PathLike[str], node: str, *,
                 processes: ProcessSource | None = None, proc_root: str = "/proc",
                 proc_scan_interval_s: float = PROC_SCAN_INTERVAL_S) -> None:
        self.node = node
        self.state_dir = Path(state_dir)
        self.spool = self.state_dir / SPOOL_DIR
        self.state_path = self.state_dir / STATE_FILE
        self.jobs: dict[JobKey, _Job] = {}
        # job -> its last run forgotten after the ENDED ack: a repeated or late hook of it
        # is not taken for a new run, and /proc stragglers of it are not attributed
        self._ended_runs: dict[str, int] = {}
        self._last_raw: dict[int, int] = {}
        self._last_t_ms: int | None = None
        self._last_period = -1
        self._uuid_to_index: dict[str, int] = {}
        self._pending: list[HookRecord] = []
        self._done_files: list[Path] = []
        # end hooks stamped after the sample that found them, left for the next sample once
        self._ends_waited: set[Path] = set()
        self._saved_ms = 0
        # /proc safety net (None: off)
        self._processes = processes
        self.proc_root = proc_root
        self._proc_interval_ms = int(proc_scan_interval_s * 1000)
        self._next_proc_ms = 0
        self._proc_live: dict[int, str] = {}  # GPU -> job seen on it at the last check
        self._pid_jobs: dict[int, procmap.ProcJob | None] = {}  # pid -> job; None: not Slurm's
        self._proc_ended: deque[str] = deque(maxlen=_PROC_ENDED_KEPT)
        self._warned: set[tuple[str, int]] = set()
        self.proc_checks = 0  # checks that looked at /proc, and the seconds they took
        self.proc_check_s = 0.0
        self._restored = self._load()

    # ------------------------------------------------------------ inputs

    def set_inventory(self, uuids: Mapping[str, int]) -> None:
        self._uuid_to_index = dict(uuids)

    def poll_spool(self) -> bool:
        """Read new hook files; True when a job starts or ends (take a fresh energy read)."""
        try:
            names = sorted(e.name for e in os.scandir(self.spool)
                           if e.name.endswith(".json") and not e.name.startswith("."))
        except FileNotFoundError:
            return False
        # by file, not by job: every run has its own files (write_hook_file); files applied
        # but not yet deleted (they go once the state is saved) are not read again
        seen = {r.path for r in self._pending} | set(self._done_files)
        for name in names:
            path = self.spool / name
            if path in seen:
                continue
            try:
                rec = self._read_hook(path)
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.error("job spool: %s is unusable (%s); moved aside as .bad", path, e)
                with contextlib.suppress(OSError):
                    path.replace(path.with_suffix(".bad"))
                continue
            self._pending.append(rec)
            seen.add(path)
        return bool(self._pending)

    def _read_hook(self, path: Path) -> HookRecord:
        d = json.loads(path.read_text())
        kind = d["kind"]
        if kind not in ("start", "end") or not _JOB_ID.match(str(d["job_id"])):
            raise ValueError(f"kind={kind!r} job_id={d.get('job_id')!r}")
        restarts = d.get("restart_count")
        if restarts is not None and (not isinstance(restarts, int) or restarts < 0):
            raise ValueError(f"restart_count={restarts!r}")
        return HookRecord(kind, str(d["job_id"]), tuple(str(g) for g in d.get("gpus", [])),
                          str(d.get("user", "")), str(d.get("account", "")),
                          int(d["time_ms"]), path, restarts)

    def on_sample(self, samples: Sequence[GpuSample], now_ms: int,
                  acked_seq: int = 0) -> list[GpuUsage]:
        """Integrate one sample; apply pending starts/ends; return the rows to report now.

        Energy and busy time up to `now_ms` go to the job that held each GPU before this
        sample's starts and ends are applied (an ending job held it up to its end_ms, a
        starting job only from its start_ms: busy time is clipped to both).

        `now_ms` must be read BEFORE the `poll_spool()` that precedes this call: busy time is
        clipped only at the ends that poll found, so an Epilog that wrote its end between
        the poll and a later clock read (the agent paused or descheduled there) would have
        the job integrated past its end. Read first, an end file the poll misses was written
        after `now_ms`, and an end the poll finds stamped after `now_ms` is applied at the
        next sample, which integrates the job up to it. (An end stamped long before its file
        was written, which the wrapper's stamp makes the rule, is clipped when found: what
        the samples integrated past it, up to LATE_END_MS back, is taken back.)
        """
        owner = self._owners()
        last_t = self._last_t_ms if self._last_t_ms is not None else now_ms
        ends = {r.job_id: r for r in self._pending if r.kind == "end"}
        for s in samples:
            raw = s.energy_mj if not s.lost else None
            delta = counter_delta(self._last_raw.get(s.index), raw)
            if raw is not None:
                self._last_raw[s.index] = raw
            job = owner.get(s.index)
            if job is None:
                continue
            use = job.use.setdefault(s.index, _GpuUse())
            use.energy_mj += delta
            if use.first_ms is not None:
                use.last_ms = now_ms  # a /proc GPU is held as long as its usage is counted
            end_ms = ends[job.job_id].time_ms if job.job_id in ends else now_ms
            dt_ms = max(0, min(now_ms, end_ms) - max(last_t, job.start_ms))
            util = s.utilization_gpu_pct
            if util is not None and not s.lost:
                use.add_busy(min(now_ms, end_ms) - dt_ms, min(now_ms, end_ms), util)
                if util > 0:
                    use.idle_since_ms = None
                elif use.idle_since_ms is None:
                    use.idle_since_ms = max(last_t, job.start_ms)
        self._last_t_ms = now_ms
        rows = self._apply_pending(now_ms)
        if self._processes is not None and now_ms >= self._next_proc_ms:
            self._next_proc_ms = now_ms + self._proc_interval_ms
            rows += self._attribute_from_proc(self._processes, samples, now_ms)
        period = now_ms // REPORT_PERIOD_MS
        if self._restored or period != self._last_period:
            # every running job at a minute boundary; after a restart, every job we hold
            # (an ENDED one too: its ack may have been lost with the old agent)
            reported = {(r.job_id, r.run) for r in rows}
            for job in self.jobs.values():
                if job.key not in reported and (job.end_ms is None or self._restored):
                    rows += self._rows(job, now_ms)
            self._restored = False
            self._last_period = period
        self._forget_acked(acked_seq)
        if rows or (self.jobs and now_ms - self._saved_ms >= SAVE_PERIOD_MS):
            self._saved_ms = now_ms
            self.save()  # before the rows are queued: reported totals are never ahead of disk
        return rows

    def _apply_pending(self, now_ms: int) -> list[GpuUsage]:
        rows: list[GpuUsage] = []
        done: list[HookRecord] = []
        started: set[JobKey] = set()  # runs opened here: their end waits for one sample
        # in time order (an end before a start at the same ms): several runs of one job may
        # be waiting when the agent was down across a requeue
        waiting: set[str] = set()  # jobs with a hook left for the next sample: so are the rest
        for rec in sorted(self._pending, key=lambda r: (r.time_ms, r.kind == "start")):
            if rec.job_id in waiting:
                continue
            if rec.kind == "end":
                out = self._apply_end(rec, now_ms, started, done)
                if out is None:
                    waiting.add(rec.job_id)  # next sample, and the job's later hooks after it
                    continue
                rows += out
            else:
                rows += self._apply_start(rec, now_ms, started)
            done.append(rec)
        self._pending = [r for r in self._pending if r not in done]
        self._done_files += [r.path for r in done]
        self._ends_waited.difference_update(r.path for r in done)
        return rows

    def _apply_end(self, rec: HookRecord, now_ms: int, started: set[JobKey],
                   done: list[HookRecord]) -> list[GpuUsage] | None:
        """Close the run an end hook names; None: leave the hook for the next sample."""
        job = self._run_ending(rec)
        if job is not None and job.key in started:
            return None  # started and ended within one sample: start first, end next time
        if job is not None and rec.time_ms > now_ms and rec.path not in self._ends_waited:
            # Stamped after this sample's time (the caller reads its clock before it scans the
            # spool, so an Epilog that ran in between is found with a later stamp): the job
            # held its GPUs up to its end, which the next sample integrates up to (clipped at
            # the end). Ended now, that time would be lost. Once only: a clock stepped back
            # must not keep a job open.
            self._ends_waited.add(rec.path)
            return None
        if job is not None:
            return self._end_run(job, rec.time_ms, now_ms)
        if any(r.kind == "start" and r.job_id == rec.job_id and r not in done
               for r in self._pending):
            return None  # its start is stamped later (a clock step): start first
        if self._last_run(rec.job_id) is None:
            log.warning("job %s ended but its start was never recorded (prolog not "
                        "configured?); no usage for it", rec.job_id)
        else:
            log.info("job %s: end hook with no run of it running here (a repeated "
                     "Epilog); ignored", rec.job_id)
        return []

    def _apply_start(self, rec: HookRecord, now_ms: int, started: set[JobKey]
                     ) -> list[GpuUsage]:
        """Open the run a start hook names (or adopt it from /proc, or ignore a repeat)."""
        run = rec.restart_count if rec.restart_count is not None else self._next_run(rec.job_id)
        job = self.jobs.get((rec.job_id, run))
        proc_job = next((j for j in self._open_runs(rec.job_id) if j.source == "proc"), None)
        if job is not None and not (job.source == "proc" and job.end_ms is None):
            log.info("job %s run %d: start hook seen before; ignored", rec.job_id, run)
            return []
        if job is None and run <= self._ended_runs.get(rec.job_id, -1):
            log.info("job %s run %d: start hook of a run already ended and reported; "
                     "ignored", rec.job_id, run)
            return []
        if job is not None or proc_job is not None:
            # known from /proc so far: the hook wins; its rows keep their run (renumbering
            # would count the totals so far again under a new key)
            adopted = job or proc_job
            assert adopted is not None  # noqa: S101 - one of the two, just checked
            self._adopt_hook(adopted, rec)
            return self._rows(adopted, now_ms)
        rows: list[GpuUsage] = []
        for old in self._open_runs(rec.job_id):
            if old.run > run:
                log.info("job %s run %d: start hook older than run %d running here; "
                         "ignored", rec.job_id, run, old.run)
                return rows
            # an earlier run still open here: its Epilog never came (a run starts only after
            # the one before it ended); it ended at the latest when this one began
            log.warning("job %s run %d: run %d had no end hook; ended at the new run's "
                        "start", rec.job_id, run, old.run)
            rows += self._end_run(old, rec.time_ms, now_ms)
        gpus = self._resolve(rec)
        job = _Job(rec.job_id, rec.user, rec.account, gpus, rec.time_ms, run=run)
        for g in gpus:
            job.use[g] = _GpuUse()
        self.jobs[job.key] = job
        started.add(job.key)
        return rows + self._rows(job, now_ms, JobPhase.STARTED)

    def _end_run(self, job: _Job, end_ms: int, now_ms: int) -> list[GpuUsage]:
        job.end_ms = max(end_ms, job.start_ms)
        for g, u in job.use.items():
            u.take_back_after(job.end_ms)  # samples went past it before its file was found
            # a /proc GPU still in use at the Epilog was held until then
            if u.from_proc and self._proc_live.get(g) == job.job_id:
                u.last_ms = max(job.end_ms, u.first_ms or 0)
        return self._rows(job, now_ms)

    def _open_runs(self, job_id: str) -> list[_Job]:
        """The runs of `job_id` not ended here, oldest first (normally at most one)."""
        return sorted((j for j in self.jobs.values() if j.job_id == job_id and j.end_ms is None),
                      key=lambda j: (j.start_ms, j.run))

    def _open_run(self, job_id: str) -> _Job | None:
        runs = self._open_runs(job_id)
        return runs[-1] if runs else None

    def _run_ending(self, rec: HookRecord) -> _Job | None:
        """The run an end hook closes: the job's open run that started last before the hook
        (not by the Epilog's restart count: after a requeue it is already the next run's)."""
        runs = self._open_runs(rec.job_id)
        before = [j for j in runs if j.start_ms <= rec.time_ms]
        if before:
            return before[-1]
        return runs[0] if runs else None

    def _last_run(self, job_id: str) -> int | None:
        """The highest run of `job_id` this agent knows (held, or ended and forgotten)."""
        runs = [j.run for j in self.jobs.values() if j.job_id == job_id]
        if job_id in self._ended_runs:
            runs.append(self._ended_runs[job_id])
        return max(runs, default=None)

    def _next_run(self, job_id: str) -> int:
        """The run a start without a restart count belongs to: the open one (a repeated
        hook), else one past the last run known here, else 0."""
        open_run = self._open_run(job_id)
        if open_run is not None:
            return open_run.run
        last = self._last_run(job_id)
        return 0 if last is None else last + 1

    def _resolve(self, rec: HookRecord) -> tuple[int, ...]:
        out: list[int] = []
        for g in rec.gpus:
            if g.isascii() and g.isdigit():
                out.append(int(g))
            elif g in self._uuid_to_index:
                out.append(self._uuid_to_index[g])
            else:
                log.warning("job %s: GPU %s is not on this node; not accounted", rec.job_id, g)
        return tuple(out)

    def _adopt_hook(self, job: _Job, rec: HookRecord) -> None:
        """A start hook for a job so far known only from /proc: the hook wins.

        Its totals so far stay (the same cumulative (job, GPU) rows go on growing, so the
        controller counts nothing twice); start, user, account and GPUs become the hook's.
        """
        gpus = self._resolve(rec)
        log.info("job %s: start hook arrived; attribution from /proc replaced by it", rec.job_id)
        job.source, job.user, job.account = "hook", rec.user, rec.account
        job.start_ms = min(rec.time_ms, job.start_ms)
        for g in gpus:
            u = job.use.setdefault(g, _GpuUse())
            u.first_ms = u.last_ms = None  # allocated from the hook's start from now on
            if self._proc_live.get(g) == job.job_id:
                del self._proc_live[g]
        extra = tuple(g for g in job.gpus if g not in gpus)
        if extra:
            log.warning("job %s: its processes used GPU(s) %s outside its allocation %s; "
                        "kept as seen in /proc", job.job_id, extra, gpus)
        job.gpus = gpus + extra

    def _attribute_from_proc(self, processes: ProcessSource, samples: Sequence[GpuSample],
                             now_ms: int) -> list[GpuUsage]:
        """The /proc safety net: attribute GPUs busy with a job no hook announced."""
        hooked = self._hook_gpus()
        candidates = [s.index for s in samples if not s.lost and s.index not in hooked]
        live: dict[int, str] = {}
        if candidates:
            try:
                procs = processes(candidates)
            except GpuBackendError as e:
                log.warning("GPU processes unreadable (%s); /proc attribution skipped", e)
                return []  # unknown is not idle: end nothing
            t0 = time.perf_counter()
            live = self._map_gpus(procs)
            self.proc_check_s += time.perf_counter() - t0
            self.proc_checks += 1
        self._proc_live = {}
        new_jobs: list[_Job] = []
        for g, job_id in sorted(live.items()):
            job = self._proc_job(g, job_id, now_ms)
            if job is not None:
                self._proc_live[g] = job_id
                if job.start_ms == now_ms and job.source == "proc" and job not in new_jobs:
                    new_jobs.append(job)
        rows: list[GpuUsage] = []
        for job in new_jobs:
            rows += self._rows(job, now_ms, JobPhase.STARTED)
        return rows + self._end_unseen(now_ms)

    def _proc_job(self, g: int, job_id: str, now_ms: int) -> _Job | None:
        """Record that GPU g runs job `job_id` now; the job, or None where it is not counted."""
        job = self._open_run(job_id)
        if job is None:
            if job_id in self._proc_ended or self._last_run(job_id) is not None:
                # a straggler of a job already ended here (epilog, or gone for long): not a
                # new allocation; a rerun of it announces itself with its Prolog
                return None
            pj = next(p for p in self._pid_jobs.values() if p is not None and p.job_id == job_id)
            job = _Job(job_id, procmap.user_name(pj.uid), "", (), now_ms, source="proc")
            self.jobs[job.key] = job
            log.warning("GPU %d is busy with job %s that no prolog announced: attributed "
                        "from /proc (%s), first-seen to last-seen", g, job_id, pj.via)
        use = job.use.get(g)
        if use is None or g not in job.gpus:
            use = job.use[g] = _GpuUse(first_ms=now_ms)
            job.gpus += (g,)
            if job.source == "hook" and (job_id, g) not in self._warned:
                self._warned.add((job_id, g))
                log.warning("job %s runs on GPU %d outside its allocation: counted from "
                            "/proc", job_id, g)
        elif not use.from_proc:
            return None  # a GPU its hook announced (so never a candidate)
        use.last_ms = now_ms
        return job

    def _end_unseen(self, now_ms: int) -> list[GpuUsage]:
        """End jobs known only from /proc whose processes have been gone PROC_END_GRACE_MS."""
        rows: list[GpuUsage] = []
        live = set(self._proc_live.values())
        for job in list(self.jobs.values()):
            if job.source != "proc" or job.end_ms is not None or job.job_id in live:
                continue
            last_ms = max((u.last_ms for u in job.use.values() if u.last_ms is not None),
                          default=job.start_ms)
            if now_ms - last_ms >= PROC_END_GRACE_MS:
                job.end_ms = last_ms
                self._proc_ended.append(job.job_id)
                log.info("job %s (known from /proc only) no longer seen: ended at its last "
                         "sighting", job.job_id)
                rows += self._rows(job, now_ms)
        return rows

    def _map_gpus(self, procs: Mapping[int, Sequence[int]]) -> dict[int, str]:
        """GPU -> job of most of its processes; /proc is read only for pids not seen before."""
        live: dict[int, str] = {}
        present: set[int] = set()
        for g, pids in procs.items():
            count: dict[str, int] = {}
            for pid in pids:
                present.add(pid)
                if pid not in self._pid_jobs:
                    self._pid_jobs[pid] = procmap.job_of_pid(pid, self.proc_root)
                pj = self._pid_jobs[pid]
                if pj is not None:
                    count[pj.job_id] = count.get(pj.job_id, 0) + 1
            if count:
                live[g] = max(sorted(count), key=lambda j: count[j])
        # a pid gone from every GPU is forgotten: its number may come back as another process
        for pid in [p for p in self._pid_jobs if p not in present]:
            del self._pid_jobs[pid]
        return live

    def _hook_gpus(self) -> set[int]:
        return {g for job in self.jobs.values() if job.end_ms is None
                for g in job.gpus if not job.use.get(g, _GpuUse()).from_proc}

    def _owners(self) -> dict[int, _Job]:
        owner: dict[int, _Job] = {}
        for g, job_id in self._proc_live.items():
            proc_job = self._open_run(job_id)
            if proc_job is not None and proc_job.end_ms is None:
                owner[g] = proc_job
        for job in sorted(self.jobs.values(), key=lambda j: j.start_ms):
            if job.end_ms is None:
                for g in job.gpus:
                    if not job.use.get(g, _GpuUse()).from_proc:
                        owner[g] = job  # the later job wins a GPU two jobs claim (docstring)
        return owner

    def _rows(self, job: _Job, now_ms: int,
              phase: JobPhase = JobPhase.RUNNING) -> list[GpuUsage]:
        if job.end_ms is not None:
            phase, as_of = JobPhase.ENDED, job.end_ms
        else:
            as_of = max(now_ms, job.start_ms)
        rows = []
        for g in job.gpus:
            u = job.use.setdefault(g, _GpuUse())
            start_ms, allocated_ms = job.start_ms, max(0, as_of - job.start_ms)
            if u.first_ms is not None:  # source=proc: first to last sighting (approximate)
                start_ms = min(u.first_ms, as_of)
                allocated_ms = max(0, min(u.last_ms or start_ms, as_of) - start_ms)
            rows.append(GpuUsage(
                job_id=job.job_id, gpu_index=g, user=job.user, account=job.account,
                start_ms=start_ms, as_of_ms=as_of,
                allocated_ms=allocated_ms, busy_ms=int(u.busy_ms),
                energy_mj=u.energy_mj, phase=phase, run=job.run,
                source=UsageSource.PROC if u.from_proc else UsageSource.HOOK,
                end_ms=job.end_ms,
                idle_since_ms=u.idle_since_ms if job.end_ms is None else None,
            ))
        return rows

    def queued(self, rows: Sequence[GpuUsage], seq: int) -> None:
        """The rows went out as `seq`: an ended job is forgotten once that seq is acked."""
        ended = {(r.job_id, r.run) for r in rows if r.phase == JobPhase.ENDED}
        for key in ended:
            if key in self.jobs:
                self.jobs[key].final_seq = seq
        self.save()

    def _forget_acked(self, acked_seq: int) -> None:
        gone = [j for j in self.jobs.values()
                if j.final_seq is not None and j.final_seq <= acked_seq]
        for job in gone:
            del self.jobs[job.key]
            # re-inserted: the job forgotten last is kept longest
            last = self._ended_runs.pop(job.job_id, -1)
            self._ended_runs[job.job_id] = max(job.run, last)
            while len(self._ended_runs) > _ENDED_RUNS_KEPT:
                del self._ended_runs[next(iter(self._ended_runs))]
        if gone:
            self.save()

    # ------------------------------------------------------------ state on disk

    def save(self) -> None:
        doc = {"jobs": [j.to_json() for j in self.jobs.values()],
               "last_raw": {str(g): v for g, v in self._last_raw.items()},
               "last_t_ms": self._last_t_ms, "saved_ms": int(time.time() * 1000),
               "proc_ended": list(self._proc_ended),
               "ended_runs": self._ended_runs}
        tmp = self.state_path.with_suffix(".tmp")
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(doc))
            tmp.replace(self.state_path)
        except OSError as e:
            log.error("accounting state not saved to %s: %s", self.state_path, e)
            return
        # the hook files are in the state now: only then may they go
        for path in self._done_files:
            with contextlib.suppress(OSError):
                path.unlink()
        self._done_files = []

    def _load(self) -> bool:
        try:
            doc = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return False
        except (OSError, ValueError) as e:
            bad = self.state_path.with_suffix(".bad")
            log.error("accounting state %s unreadable (%s); kept as %s, starting empty",
                      self.state_path, e, bad)
            with contextlib.suppress(OSError):
                self.state_path.replace(bad)
            return False
        for d in doc.get("jobs", []):
            job = _Job.from_json(d)
            self.jobs[job.key] = job
        self._ended_runs = {str(j): int(r) for j, r in doc.get("ended_runs", {}).items()}
        self._last_raw = {int(g): int(v) for g, v in doc.get("last_raw", {}).items()}
        self._proc_ended.extend(str(j) for j in doc.get("proc_ended", []))
        # not last_t_ms: busy time while the agent was down was not observed, so the first
        # sample after a restart integrates nothing; energy does count on (last_raw)
        return bool(self.jobs)
