"""Slurm's own accounting (`sacct --json`, 22.05 to 26.05) and its reconciliation with the ledger.

Slurm records a job's allocated GPUs (AllocTRES `gres/gpu`, with `AccountingStorageTRES=
gres/gpu`) and its start and end in whole seconds; gpufleet records each GPU's allocation in
milliseconds from the Prolog/Epilog hooks. `reconcile` puts the two side by side per job.

A requeued job (gpufleet's recovery, `scontrol requeue`, `--requeue` after a node failure)
runs again under the same job id: sacct lists one record per run (state REQUEUED for all but
the last; the CLI asks with `--duplicates` so that none is left out), and the ledger keeps
each run apart (Slurm's restart count). They are compared per job, over all runs: Slurm's
GPU-seconds are the sum of `gres/gpu x elapsed` over its records, gpufleet's the sum over
its runs, the GPUs those of the largest run on each side; both sides' run counts are
printed (records that never started are not runs).

Slurm's times are whole seconds, so even exact hooks differ by up to a second of wall time,
on each GPU and on each run: the tolerance is therefore per allocated GPU and per run Slurm
timed (`tolerance_s x GPUs x runs`; a requeued job's runs each start and end on a second).

Each version's document is read on purpose: 22.05 and 23.02 (data_parser v0.0.39) print a
record's `state.current` as a string, 23.11+ (v0.0.40..) as a list of flags and name their
data_parser in `meta`; the version comes from `sacct --version` (or, for a saved document,
from its `meta`). Never touches the store (the CLI does); never guesses a field it cannot
read: a bad document is a SacctParseError (a SlurmError) naming the job and the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gpufleet.scheduler.accounting.ledger import UsageTotal
from gpufleet.scheduler.slurm.schema import SlurmVersion, doc_data_parser
from gpufleet.scheduler.slurm.types import SlurmError

STATUS_OK = "ok"
STATUS_MISMATCH = "mismatch"
STATUS_MISSING_GPUFLEET = "missing-gpufleet"  # Slurm gave the job GPUs; the ledger has none
STATUS_MISSING_SLURM = "missing-slurm"  # in the ledger; sacct does not know the job
STATUS_RUNNING = "running"  # not ended on one side yet: compared once it has
BAD_STATUSES = frozenset({STATUS_MISMATCH, STATUS_MISSING_GPUFLEET, STATUS_MISSING_SLURM})


class SacctParseError(SlurmError, ValueError):
    """`sacct --json` output that cannot be read; the message names the job and the field."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=False)


@dataclass(frozen=True)
class SacctJob:
    """One sacct job record (one run of a job: a requeued job has several)."""

    job_id: str
    user: str
    account: str
    state: str
    nodes: str
    start_s: int | None  # epoch seconds; None: not started
    end_s: int | None  # None: still running (sacct prints 0)
    elapsed_s: int
    gpus: int  # AllocTRES gres/gpu (0 without AccountingStorageTRES=gres/gpu)

    @property
    def gpu_s(self) -> int:
        return self.gpus * self.elapsed_s


def _field(job: Mapping[str, Any], path: str, label: str) -> Any:
    value: Any = job
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise SacctParseError(f"{label}: field {path!r} is missing")
        value = value[part]
    return value


def _int(value: Any, path: str, label: str, *, none_ok: bool = False) -> int:
    if value is None and none_ok:
        return 0
    # bool is an int in Python, never in sacct's JSON
    if isinstance(value, bool) or not isinstance(value, int):
        raise SacctParseError(f"{label}: field {path!r} is {value!r}, not an integer")
    return value


def _str(value: Any, path: str, label: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise SacctParseError(f"{label}: field {path!r} is {value!r}, not a string")
    return value


def _state(value: Any, label: str, flags: bool) -> str:
    """22.05, 23.02: 'COMPLETED'; 23.11+: ['COMPLETED'] (or ['PENDING', 'REQUEUED'])."""
    path = "state.current"
    if not flags:
        if not isinstance(value, str) or not value:
            raise SacctParseError(f"{label}: field {path!r} is {value!r}, not a state string "
                                  "(sacct of Slurm 22.05/23.02)")
        return value
    if not isinstance(value, list) or not value or \
            not all(isinstance(v, str) for v in value):
        raise SacctParseError(f"{label}: field {path!r} is {value!r}, not a list of state "
                              "flags (sacct of Slurm 23.11+)")
    return "+".join(value)


def _gpus(job: Mapping[str, Any], label: str) -> int:
    tres = _field(job, "tres.allocated", label)
    if not isinstance(tres, list):
        raise SacctParseError(f"{label}: field 'tres.allocated' is {tres!r}, not a list")
    total = 0
    for i, entry in enumerate(tres):
        path = f"tres.allocated[{i}]"
        if not isinstance(entry, Mapping):
            raise SacctParseError(f"{label}: field {path!r} is {entry!r}, not an object")
        # gres/gpu only: a typed TRES (gres/gpu:a100), if tracked too, counts the same GPUs
        if entry.get("type") == "gres" and entry.get("name") == "gpu":
            total += _int(entry.get("count"), f"{path}.count", label)
    return total


def parse_job(job: Any, index: int, state_flags: bool = False) -> SacctJob:
    """One element of sacct's `jobs` list; `state_flags`: 23.11+ (state.current a list)."""
    if not isinstance(job, Mapping):
        raise SacctParseError(f"sacct job #{index}: {job!r:.80} is not an object")
    raw_id = job.get("job_id")
    label = f"sacct job {raw_id}" if raw_id is not None else f"sacct job #{index}"
    job_id = _int(raw_id, "job_id", label)
    start = _int(_field(job, "time.start", label), "time.start", label, none_ok=True)
    end = _int(_field(job, "time.end", label), "time.end", label, none_ok=True)
    elapsed = _int(_field(job, "time.elapsed", label), "time.elapsed", label)
    if elapsed < 0 or (start and end and end < start):
        raise SacctParseError(
            f"{label}: time.start={start} time.end={end} time.elapsed={elapsed} do not add up")
    return SacctJob(
        job_id=str(job_id),
        user=_str(job.get("user"), "user", label),
        account=_str(job.get("account"), "account", label),
        state=_state(_field(job, "state.current", label), label, state_flags),
        nodes=_str(job.get("nodes"), "nodes", label),
        start_s=start or None,
        end_s=end or None,
        elapsed_s=elapsed,
        gpus=_gpus(job, label),
    )


def parse_sacct_json(text: str, source: str = "sacct --json",
                     version: SlurmVersion | None = None) -> list[SacctJob]:
    """All job records of a `sacct --json` document of `version` (that sacct's `--version`);
    None (a saved document): the version its `meta` names (none: 22.05)."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise SacctParseError(f"{source}: not JSON: {e}") from None
    if not isinstance(doc, Mapping) or not isinstance(doc.get("jobs"), list):
        raise SacctParseError(f"{source}: no 'jobs' list at the top level")
    errors = doc.get("errors") or []
    if errors:
        raise SacctParseError(f"{source}: sacct reported errors: {errors!r:.300}")
    have = doc_data_parser(doc)
    have_short = have.rsplit("/", 1)[-1] if have else None
    if version is not None:
        try:
            want = version.data_parser
        except SlurmError as e:
            raise SacctParseError(f"{source}: {e}") from e
        if want is not None and have_short is None and version >= SlurmVersion(23, 11):
            raise SacctParseError(f"{source}: field 'meta.plugin.data_parser' is missing "
                                  f"(sacct of Slurm {version} prints data_parser/{want})")
        if have_short != want and have_short is not None:
            raise SacctParseError(
                f"{source}: field 'meta.plugin.data_parser' is {have!r}, expected "
                + (f"data_parser/{want}" if want else "none (Slurm 22.05)")
                + f" (sacct of Slurm {version})")
    state_flags = have_short is not None and have_short != "v0.0.39"
    return [parse_job(job, i, state_flags) for i, job in enumerate(doc["jobs"])]


# ------------------------------------------------------------------------- reconciliation


@dataclass(frozen=True)
class Reconciled:
    """One job on both sides. GPU-seconds are None on a side that does not have the job."""

    job_id: str
    user: str
    account: str
    state: str
    status: str
    slurm_gpus: int
    slurm_elapsed_s: int | None
    slurm_gpu_s: float | None
    gpufleet_gpus: int
    gpufleet_gpu_s: float | None
    diff_gpu_s: float | None  # gpufleet - Slurm
    reason: str = ""
    slurm_runs: int = 0  # sacct records that started
    gpufleet_runs: int = 0  # runs in the ledger

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id, "user": self.user, "account": self.account,
            "state": self.state, "status": self.status, "slurm_gpus": self.slurm_gpus,
            "slurm_elapsed_s": self.slurm_elapsed_s, "slurm_gpu_s": self.slurm_gpu_s,
            "gpufleet_gpus": self.gpufleet_gpus, "gpufleet_gpu_s": self.gpufleet_gpu_s,
            "diff_gpu_s": self.diff_gpu_s, "reason": self.reason,
            "slurm_runs": self.slurm_runs, "gpufleet_runs": self.gpufleet_runs,
        }


@dataclass
class _Slurm:
    """A job's sacct records taken together (a requeued job ran several times)."""

    first: SacctJob
    gpus: int
    elapsed_s: int
    gpu_s: int
    ended: bool
    runs: int
    last: SacctJob  # the record that started last: its state is the job's state


def _merge(records: Iterable[SacctJob]) -> dict[str, _Slurm]:
    out: dict[str, _Slurm] = {}
    for r in records:
        have = out.get(r.job_id)
        if have is None:
            out[r.job_id] = _Slurm(r, r.gpus, r.elapsed_s, r.gpu_s, r.end_s is not None,
                                   int(r.start_s is not None), r)
        else:
            have.gpus = max(have.gpus, r.gpus)
            have.elapsed_s += r.elapsed_s
            have.gpu_s += r.gpu_s
            have.ended = have.ended and r.end_s is not None
            have.runs += int(r.start_s is not None)
            if (r.start_s or 0) >= (have.last.start_s or 0):
                have.last = r
    return out


def reconcile_jobs(slurm: Sequence[SacctJob], ledger: Sequence[UsageTotal],
              tolerance_s: float = 1.0) -> list[Reconciled]:
    """Slurm's GPU-seconds against the ledger's allocated GPU-seconds, per job (by job id).

    `ledger` holds per-job totals over all runs (`store.usage(UsageQuery(group_by="job"))`);
    `slurm` may hold several records (runs) per job: they are summed. Jobs without
    GPUs in Slurm and not in the ledger are left out. A job still running on either side is
    `running`, not compared. Ended on both: `mismatch` when the GPU counts differ or
    |diff| > tolerance_s x GPUs x runs (Slurm's whole seconds: see the module docstring).
    """
    by_id = _merge(slurm)
    ours = {t.key: t for t in ledger}
    out: list[Reconciled] = []
    for job_id in sorted(set(by_id) | set(ours), key=_job_order):
        s, g = by_id.get(job_id), ours.get(job_id)
        if g is None:
            if s is None or s.gpus == 0:
                continue
            status = STATUS_MISSING_GPUFLEET if s.ended else STATUS_RUNNING
            out.append(Reconciled(
                job_id, s.first.user, s.first.account, s.last.state, status, s.gpus,
                s.elapsed_s, float(s.gpu_s), 0, None, None,
                "no ledger rows (Prolog not run, or the agent never reported)"
                if s.ended else "", s.runs, 0))
            continue
        ours_s = g.allocated_ms / 1000.0
        if s is None:
            out.append(Reconciled(
                job_id, g.user, g.account, "", STATUS_MISSING_SLURM, 0, None, None, g.gpus,
                ours_s, None, "sacct has no such job (slurmdbd down, or outside the window)",
                0, g.runs))
            continue
        diff = round(ours_s - s.gpu_s, 3)
        reason = ""
        if not s.ended or g.end_ms is None:
            status = STATUS_RUNNING
        elif g.gpus != s.gpus:
            status, reason = STATUS_MISMATCH, f"GPUs: gpufleet {g.gpus}, Slurm {s.gpus}"
        elif abs(diff) > tolerance_s * max(s.gpus, 1) * max(s.runs, 1):
            status = STATUS_MISMATCH
            reason = (f"|diff| {abs(diff):.3f} > {tolerance_s:g} s x {max(s.gpus, 1)} GPU(s)"
                      + (f" x {s.runs} runs" if s.runs > 1 else ""))
        else:
            status = STATUS_OK
        if status != STATUS_RUNNING and g.runs and g.runs != s.runs:
            # informational: a run on nodes without hooks, or one cut off by the window
            reason = "; ".join(filter(None, (reason, f"runs: gpufleet {g.runs}, Slurm "
                                                     f"{s.runs}")))
        out.append(Reconciled(
            job_id, s.first.user, s.first.account, s.last.state, status, s.gpus,
            s.elapsed_s, float(s.gpu_s), g.gpus, ours_s, diff, reason, s.runs, g.runs))
    return out


def _job_order(job_id: str) -> tuple[int, str]:
    head = job_id.split("_", 1)[0].split("+", 1)[0]
    return (int(head) if head.isdecimal() else 0, job_id)
