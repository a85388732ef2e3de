"""An in-memory SlurmClient for unit tests; the real one is tested against real Slurm."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

from gpufleet.scheduler.slurm import SlurmError, SlurmJob, SlurmNode, SlurmNodeInfo


class FakeSlurm:
    def __init__(self, names: list[str]) -> None:
        self.state = dict.fromkeys(names, ("IDLE", ""))
        self.weight = dict.fromkeys(names, 1)
        self.features: dict[str, tuple[str, ...]] = dict.fromkeys(names, ("gpu",))
        self.calls: list[tuple[str, str]] = []
        self.down = False  # slurmctld not answering
        self.lock = threading.Lock()
        # jobs (recovery): job id -> job; what a signal / requeue does to a job is up to the
        # test (on_signal / on_requeue), by default: nothing / PENDING then RUNNING elsewhere
        self.jobs: dict[str, SlurmJob] = {}
        self.job_calls: list[tuple[str, ...]] = []
        self.on_signal: dict[str, SlurmJob] = {}  # job id -> its state after the signal
        self.requeue_fails: set[str] = set()
        # routine diagnostics read these: each node's partitions and LastBusyTime (Unix s)
        self.partitions: dict[str, tuple[str, ...]] = dict.fromkeys(names, ("gpu",))
        self.last_busy: dict[str, int | None] = dict.fromkeys(names, None)

    def _check(self) -> None:
        if self.down:
            raise SlurmError("slurm_load_node error: Unable to contact slurm controller")

    def ping(self) -> bool:
        return not self.down

    def nodes(self) -> dict[str, SlurmNode]:
        self._check()
        return {n: self.node(n) for n in self.state}

    def node(self, name: str) -> SlurmNode:
        self._check()
        if name not in self.state:
            raise SlurmError(f"Node {name} not found", transient=False)
        state, reason = self.state[name]
        return SlurmNode(name, state, reason, self.features[name], self.weight[name])

    def node_infos(self) -> dict[str, SlurmNodeInfo]:
        self._check()
        return {n: SlurmNodeInfo(self.node(n), "gpu:8", self.partitions[n], self.features[n],
                                 64, 0, self.last_busy[n]) for n in self.state}

    def pending_jobs(self) -> list[SlurmJob]:
        self._check()
        with self.lock:
            self.job_calls.append(("pending_jobs",))
            return [j for j in self.jobs.values() if j.state == "PENDING"]

    def add_pending(self, job_id: str, partitions: tuple[str, ...] = ("gpu",), *,
                    reason: str = "Resources", excluded: tuple[str, ...] = (),
                    required: tuple[str, ...] = ()) -> SlurmJob:
        job = SlurmJob(job_id, "PENDING", (), True, True, "", 0, None, 0, excluded, 0, reason,
                       0, (), partitions, required)
        self.jobs[job_id] = job
        return job

    def drain(self, name: str, reason: str) -> None:
        self._check()
        with self.lock:
            self.calls.append(("drain", name))
            self.state[name] = ("IDLE+DRAIN", reason)

    def resume(self, name: str) -> None:
        self._check()
        with self.lock:
            self.calls.append(("resume", name))
            self.state[name] = ("IDLE", "")

    def set_weight(self, name: str, weight: int) -> None:
        self._check()
        with self.lock:
            self.calls.append(("set_weight", name))
            self.weight[name] = weight

    def set_features(self, name: str, features: tuple[str, ...] | list[str]) -> None:
        self._check()
        with self.lock:
            self.calls.append(("set_features", name))
            self.features[name] = tuple(features)

    # ------------------------------------------------------------ jobs

    def add_job(self, job_id: str, nodes: tuple[str, ...], *, comment: str = "",
                requeue: bool = True, state: str = "RUNNING", exit_status: int | None = 0,
                start_time_s: int | None = None, end_time_s: int = 0) -> SlurmJob:
        start = int(time.time()) - 60 if start_time_s is None else start_time_s
        job = SlurmJob(job_id, state, nodes, requeue, True, comment, 0, exit_status, 0, (),
                       start, "None", end_time_s)
        self.jobs[job_id] = job
        return job

    def jobs_on_node(self, node: str) -> list[SlurmJob]:
        self._check()
        with self.lock:
            self.job_calls.append(("jobs_on_node", node))
            return [j for j in self.jobs.values() if node in j.nodes]

    def job(self, job_id: str) -> SlurmJob | None:
        self._check()
        with self.lock:
            job = self.jobs.get(job_id)
            # a requeued job is PENDING once polled, RUNNING on other nodes once updated
            if job is not None and job.state == "REQUEUED":
                job = self.jobs[job_id] = replace(job, state="PENDING")
            return job

    def signal_job(self, job_id: str, signal: str, scope: str) -> None:
        self._check()
        with self.lock:
            self.job_calls.append(("signal", job_id, signal, scope))
            if job_id not in self.jobs:
                raise SlurmError(f"Kill job error on job id {job_id}: Invalid job id specified",
                                 transient=False)
            if job_id in self.on_signal:
                self.jobs[job_id] = self.on_signal[job_id]

    def requeue(self, job_id: str) -> None:
        self._check()
        with self.lock:
            self.job_calls.append(("requeue", job_id))
            if job_id in self.requeue_fails:
                raise SlurmError(f"Requested operation is presently disabled for job {job_id}",
                                 transient=False)
            job = self.jobs[job_id]
            self.jobs[job_id] = replace(job, state="REQUEUED",
                                        restart_count=job.restart_count + 1)

    def update_job(self, job_id: str, *, start_now_plus_s: int | None = None,
                   excluded_nodes: tuple[str, ...] | None = None) -> None:
        self._check()
        with self.lock:
            self.job_calls.append(("update", job_id, str(start_now_plus_s),
                                   ",".join(excluded_nodes or ())))
            job = self.jobs[job_id]
            excluded = excluded_nodes if excluded_nodes is not None else job.excluded_nodes
            free = [n for n in self.state if n not in excluded]
            need = max(1, len(job.nodes))
            if len(free) < need:  # not enough nodes left: stays pending
                self.jobs[job_id] = replace(job, state="PENDING", excluded_nodes=excluded)
                return
            self.jobs[job_id] = replace(job, state="RUNNING", excluded_nodes=excluded,
                                        nodes=tuple(free[:need]))
