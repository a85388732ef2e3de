"""Switch holds (`gpufleet controller --switch-holds`, off by default): a multi-node job
waits for one leaf switch at most `grace_s` past the moment it could have started across
leaves, then Slurm places it as plain sbatch would.

With holds on, Place says so (cost `switch_hold`) and gpufleet's sbatch filter gives a
multi-node job it does not pin `--switches=1@1:59`: Slurm then starts it only inside one leaf.
Slurm's own wait (the 119 s) runs from the job's first evaluation, usually its submission, so
it cannot say "wait for a leaf at most a few seconds once the job could start": on a full
cluster it is either spent before any room appears or, long, holds the job for one leaf
where plain sbatch starts it across leaves (bench/placement_vs_slurm.py --fill: +3.1 s mean
wait with a 300 s hold). So the leader looks every `poll_s` at the pending jobs that carry
this hold and drops the count (`scontrol update Switches=0`) of a job that could have started
(enough healthy nodes free for it, by the engine Place uses, on several leaves only) `grace_s`
ago, counted from the first such moment: while it is held, backfill may start smaller jobs in
that room, and a grace restarted each time would hold it for good. Measured on the fill
trace, grace 1 s: 34-36 leaves for the 32 multi-node jobs against plain sbatch's 47-51, mean
wait 1.3-2.7 s longer (the chance a held job misses is the cost); hence opt-in. In doubt (a
request it cannot read, an engine refusal, Slurm leaving one leaf with room by the engine's
count unused for 3 x grace_s) the count is dropped: the job is then exactly as plain sbatch
submitted it, but for the unhealthy-node exclusion.

The keeper tells its own hold from a user's `--switches` by the wait, HOLD_WAIT_S (119 s, not
a round 2:00); a user's own switch count is never touched. With no controller, Slurm drops the
count itself 119 s after it first tried to place the job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gpufleet.scheduler.placement.engine import place
from gpufleet.scheduler.placement.model import ClusterView, PlacementError, PlacementRequest
from gpufleet.scheduler.placement.sources import PlacementUnavailable
from gpufleet.scheduler.poll_loop import PollLoop
from gpufleet.scheduler.slurm import SlurmError, SlurmJob, SwitchRequest
from gpufleet.scheduler.slurm.gres import gpu_count

log = logging.getLogger(__name__)

HOLD_WAIT_S = 119  # the filter's `--switches=1@1:59` (cli/sbatch_filter.py SWITCH_HOLD)
DEFAULT_GRACE_S = 1.0
# a pending job waiting for nodes; one held for a dependency, a begin time or by a user is
# not startable, whatever is free
_WAITING_REASONS = frozenset({"Resources", "Priority"})


@dataclass(frozen=True)
class Release:
    job_id: str
    why: str


class SwitchHolds:
    """`requests`: the pending jobs' switch counts (the Slurm door's switch_requests);
    `pending`: the pending jobs (reason, partitions, exclusions: pending_jobs); `view`: the
    cluster with gpufleet's health, as Place sees it; `release(job_id)`: drop the job's switch
    count. `shadow`: decide and log, never release. `on_release`: called per dropped count."""

    def __init__(self, requests: Callable[[], Sequence[SwitchRequest]],
                 pending: Callable[[], Sequence[SlurmJob]], view: Callable[[], ClusterView],
                 release: Callable[[str], None], grace_s: float = DEFAULT_GRACE_S,
                 poll_s: float = 1.0, shadow: bool = False,
                 clock: Callable[[], float] = time.monotonic,
                 on_release: Callable[[], None] | None = None) -> None:
        if grace_s < 0:  # poll_s is PollLoop's to check
            raise ValueError(f"grace_s={grace_s}: must be >= 0")
        self.requests = requests
        self.pending = pending
        self.view = view
        self.release = release
        self.grace_s = grace_s
        self.poll_s = poll_s
        self.shadow = shadow
        self.clock = clock
        self.on_release = on_release  # the controller's metric
        self.released: list[str] = []  # jobs whose switch count was dropped (tests, bench)
        # job -> since when it could start now (any leaves), since when only across leaves
        self._startable: dict[str, float] = {}
        self._across: dict[str, float] = {}
        # Slurm slow or away: look again at the next poll
        self._loop = PollLoop("switch-holds", self.tick, poll_s, log,
                              "switch hold: looking at held jobs",
                              expected=(SlurmError, PlacementUnavailable))

    def tick(self) -> list[Release]:
        """One look: the holds dropped (or, in shadow mode, that would have been)."""
        held = [r for r in self.requests() if r.switches == 1 and r.wait_s == HOLD_WAIT_S]
        if not held:
            self._startable.clear()
            self._across.clear()
            return []
        jobs = {j.job_id: j for j in self.pending()}
        view = self.view()
        now = self.clock()
        out: list[Release] = []
        for req in held:
            job = jobs.get(req.job_id)
            if job is None or job.state != "PENDING" or job.state_reason not in _WAITING_REASONS:
                self._forget(req.job_id)
                continue
            why = self._judge(view, req, job, now)
            if why is not None:
                out.append(Release(req.job_id, why))
        live = {r.job_id for r in held}
        for table in (self._startable, self._across):
            for gone in [j for j in table if j not in live]:
                del table[gone]
        for r in out:
            self._forget(r.job_id)
            if self.shadow:
                log.info("switch hold: would drop job %s's switch count (%s)", r.job_id, r.why)
                continue
            try:
                self.release(r.job_id)
            except SlurmError as e:  # gone or started meanwhile; else retried next look
                log.warning("switch hold: dropping job %s's switch count failed: %s",
                            r.job_id, e)
                continue
            self.released.append(r.job_id)
            if self.on_release is not None:
                self.on_release()
            log.info("switch hold: dropped job %s's switch count (%s)", r.job_id, r.why)
        return out

    def _forget(self, job_id: str) -> None:
        self._startable.pop(job_id, None)
        self._across.pop(job_id, None)

    def _judge(self, view: ClusterView, req: SwitchRequest, job: SlurmJob,  # noqa: PLR0911 - one reason per return
               now: float) -> str | None:
        """Why to drop the job's count now, or None to keep holding it."""
        gpus = gpu_count(req.tres_per_node)
        if "gpu" in req.tres_per_node and gpus == 0:
            return f"GPUs per node not readable from {req.tres_per_node!r}"
        if req.nodes < 1:
            return "its node count is not one number"
        leaves: list[int] = []
        for part in job.partitions or ("",):
            try:
                answer = place(view, PlacementRequest(
                    nodes=req.nodes, gpus_per_node=gpus or None,
                    partition=part or None, exclude=frozenset(job.excluded_nodes)))
            except PlacementError as e:
                return f"placement cannot judge it: {e}"
            if answer.ok:
                leaves.append(int(answer.cost.get("leaves", 0)))
        if not leaves:
            # no room now. If there was room across leaves before, the grace still runs from
            # then: while this job is held, backfill starts smaller jobs in that room, and a
            # grace restarted each time would hold it for one leaf indefinitely (fill trace:
            # every multi-node job on one leaf, +7 s mean wait for them)
            across = self._across.get(req.job_id)
            if across is not None and now - across >= self.grace_s:
                return (f"could have started across leaves {now - across:.0f} s ago, no "
                        "leaf freed")
            self._startable.pop(req.job_id, None)
            return None
        since = self._startable.setdefault(req.job_id, now)
        if min(leaves) <= 1:
            # fits one leaf now: Slurm starts it there itself, unless it sees something the
            # engine does not judge (CPUs, memory, licences): then the hold must not keep it
            if now - since >= 3 * self.grace_s:
                return (f"one leaf has room by gpufleet's count for {now - since:.0f} s, "
                        "yet Slurm has not started it")
            return None
        across = self._across.setdefault(req.job_id, now)
        if now - across >= self.grace_s:
            return (f"could start now across {min(leaves)} leaf switches, no leaf freed "
                    f"within {self.grace_s:g} s")
        return None

    # ------------------------------------------------------------ the loop (leader only)

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()
