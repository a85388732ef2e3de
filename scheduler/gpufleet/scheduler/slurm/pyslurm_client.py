"""SlurmClient over pyslurm (Slurm's C API from Python), where pyslurm is installed and
built for the Slurm the cluster runs.

pyslurm's major.minor follows Slurm's (pyslurm 23.2.x <-> Slurm 23.02); a pyslurm built for
another Slurm is refused at construction with a message saying which client to use instead.
PyPI ships only pyslurm 25.11, which does not build against Slurm 22.05 (this project's test
Slurm), so this client is exercised by contract tests that run only where pyslurm imports.
Written against pyslurm's object API (23.02+, checked against 25.11's sources: `Nodes.load()`,
`Node.load(name)`, `Node(name).modify(Node(...))`, `Jobs.load()`, `Job.load(id)`,
`Job(id).send_signal(sig, steps=...)`, `Job(id).requeue()`, `RPCError`). Job updates
(StartTime, ExcNodeList) go through `scontrol update`, as the REST client's do.

pyslurm calls block in C for up to Slurm's MessageTimeout; each call runs on a small worker
pool and the caller waits at most `timeout_s` (a stuck call keeps its worker, not the caller).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from gpufleet.scheduler.slurm.cli import CliSlurmClient, slurm_version
from gpufleet.scheduler.slurm.types import (
    SIGNAL_SCOPES,
    SlurmError,
    SlurmJob,
    SlurmNode,
    check_features,
    check_job_id,
    check_node_name,
    check_signal,
    check_weight,
    clean_reason,
    expand_hostlist,
    is_permanent_message,
)

# recovery's signal scopes -> pyslurm's Job.send_signal(steps=...)
_PYSLURM_STEPS = {"batch": "batch", "full": "all", "steps": "children"}

T = TypeVar("T")


def _major_minor(version: str) -> tuple[int, int] | None:
    m = re.search(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def running_slurm_version(timeout_s: float = 10.0) -> str:
    """`scontrol --version` -> '24.11.5' (what the cluster's client libraries are)."""
    return str(slurm_version(timeout_s=timeout_s))


class PyslurmClient:
    """SlurmClient over pyslurm; refuses a pyslurm that does not match the running Slurm."""

    def __init__(self, timeout_s: float = 10.0, slurm_version: str | None = None,
                 workers: int = 4, job_update_client: CliSlurmClient | None = None) -> None:
        try:
            import pyslurm  # type: ignore[import-not-found,unused-ignore]
        except ImportError as e:
            raise SlurmError(
                "pyslurm is not installed (PyPI has only 25.11, which needs Slurm 25.11): "
                "install the pyslurm matching your Slurm, or use the cli or rest client",
                transient=False,
            ) from e
        self._pyslurm: Any = pyslurm
        self.timeout_s = timeout_s
        self.pyslurm_version = str(getattr(pyslurm, "__version__", "") or pyslurm.version())
        self.slurm_version = slurm_version or running_slurm_version()
        mine, theirs = _major_minor(self.pyslurm_version), _major_minor(self.slurm_version)
        if mine is None or theirs is None or mine != theirs:
            raise SlurmError(
                f"pyslurm {self.pyslurm_version} does not match Slurm {self.slurm_version} "
                "(major.minor must agree): use the cli or rest client", transient=False)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pyslurm")
        self.job_update_client = job_update_client or CliSlurmClient(timeout_s=timeout_s)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        future = self._pool.submit(fn)
        try:
            return future.result(timeout=self.timeout_s)
        except FutureTimeout as e:
            raise SlurmError(f"pyslurm {what} timed out after {self.timeout_s} s") from e
        except SlurmError:
            raise
        except ValueError as e:  # pyslurm's own argument checks
            raise SlurmError(f"pyslurm {what}: {e}", transient=False) from e
        except Exception as e:  # RPCError and whatever the C layer raises
            msg = str(e)
            raise SlurmError(f"pyslurm {what} failed: {msg}",
                             transient=not is_permanent_message(msg)) from e

    def _to_node(self, n: Any) -> SlurmNode:
        return SlurmNode(str(n.name), str(n.state or "").upper(), str(n.reason or ""),
                         tuple(n.available_features or ()), int(n.weight or 1))

    def _load(self, name: str) -> Any:
        node_cls = self._pyslurm.Node
        if hasattr(node_cls, "load"):
            return node_cls.load(name)
        return node_cls(name).reload()

    def ping(self) -> bool:
        try:
            self.nodes()
        except SlurmError:
            return False
        return True

    def nodes(self) -> dict[str, SlurmNode]:
        def load() -> dict[str, SlurmNode]:
            nodes_cls = self._pyslurm.Nodes
            coll = nodes_cls.load() if hasattr(nodes_cls, "load") else nodes_cls()
            return {str(k): self._to_node(v) for k, v in coll.items()}

        return self._call("load nodes", load)

    def node(self, name: str) -> SlurmNode:
        check_node_name(name)
        return self._call(f"load node {name}", lambda: self._to_node(self._load(name)))

    def _modify(self, name: str, what: str, **changes: Any) -> None:
        check_node_name(name)
        node_cls = self._pyslurm.Node
        self._call(f"{what} node {name}",
                   lambda: node_cls(name).modify(node_cls(**changes)))

    def drain(self, name: str, reason: str) -> None:
        self._modify(name, "drain", state="DRAIN", reason=clean_reason(reason))

    def resume(self, name: str) -> None:
        self._modify(name, "resume", state="RESUME")

    def set_weight(self, name: str, weight: int) -> None:
        self._modify(name, "set weight of", weight=check_weight(name, weight))

    def set_features(self, name: str, features: tuple[str, ...]) -> None:
        value = list(check_features(name, features))
        self._modify(name, "set features of", available_features=value,
                     active_features=value)

    # ------------------------------------------------------------------ jobs (recovery)

    def _to_job(self, j: Any) -> SlurmJob:
        sig = int(j.exit_code_signal or 0)
        nodes, excluded = str(j.allocated_nodes or ""), str(j.excluded_nodes or "")
        return SlurmJob(
            job_id=str(j.id), state=str(j.state or "").upper(),
            nodes=tuple(expand_hostlist(nodes)) if nodes else (),
            requeue=bool(j.is_requeueable), batch=bool(j.is_batch_job),
            comment=str(j.comment or ""), restart_count=int(j.requeue_count or 0),
            exit_status=None if sig else int(j.exit_code or 0), exit_signal=sig,
            excluded_nodes=tuple(expand_hostlist(excluded)) if excluded else (),
            start_time_s=int(j.start_time or 0), state_reason=str(j.state_reason or ""),
            end_time_s=int(j.end_time or 0))

    def jobs_on_node(self, node: str) -> list[SlurmJob]:
        check_node_name(node)

        def load() -> list[SlurmJob]:
            jobs = [self._to_job(j) for j in self._pyslurm.Jobs.load().values()]
            return [j for j in jobs if node in j.nodes]

        return self._call(f"load jobs on node {node}", load)

    def job(self, job_id: str) -> SlurmJob | None:
        jid = int(check_job_id(job_id))
        try:
            return self._call(f"load job {job_id}",
                              lambda: self._to_job(self._pyslurm.Job.load(jid)))
        except SlurmError as e:
            if "invalid job id" in str(e).lower() or "not found" in str(e).lower():
                return None
            raise

    def signal_job(self, job_id: str, signal: str, scope: str) -> None:
        if scope not in SIGNAL_SCOPES:
            raise SlurmError(f"signal scope {scope!r}: use one of {', '.join(SIGNAL_SCOPES)}",
                             transient=False)
        jid, sig = int(check_job_id(job_id)), check_signal(signal)
        if not sig.isdecimal() and not sig.startswith("SIG"):
            sig = "SIG" + sig  # pyslurm looks names up in signal.Signals: SIGUSR1, not USR1
        self._call(f"signal job {job_id}", lambda: self._pyslurm.Job(jid).send_signal(
            sig, steps=_PYSLURM_STEPS[scope]))

    def requeue(self, job_id: str) -> None:
        jid = int(check_job_id(job_id))
        self._call(f"requeue job {job_id}", lambda: self._pyslurm.Job(jid).requeue())

    def update_job(self, job_id: str, *, start_now_plus_s: int | None = None,
                   excluded_nodes: tuple[str, ...] | None = None) -> None:
        self.job_update_client.update_job(job_id, start_now_plus_s=start_now_plus_s,
                                          excluded_nodes=excluded_nodes)
