"""The controller's ledger: idempotent replays, restarts of agent and controller, rollups.

Runs on SQLite and on a real PostgreSQL (store_backend)."""

from __future__ import annotations

import random
from pathlib import Path

from gpufleet.agent.accounting import Accountant, write_hook_file
from gpufleet.agent.outbox import Outbox
from gpufleet.agent.telemetry import GpuSample
from gpufleet.rpc.v1 import fleet_pb2 as pb
from gpufleet.scheduler.accounting.ledger import UsageQuery
from gpufleet.scheduler.health.actions import ActionQueue
from gpufleet.scheduler.health.policy import HealthPolicy, PolicyConfig
from gpufleet.scheduler.observability.metrics import ControllerMetrics
from gpufleet.scheduler.service.ingest import Ingestor

from .conftest import Backend

T0 = 1_700_000_040_000  # a minute boundary


def _agent_run(state: Path, jobs: list[tuple[str, list[int], str, int, int]],
               seconds: int) -> list[pb.AgentMessage]:
    """Drive one agent's accountant over a simulated node; return the usage messages queued."""
    acc = Accountant(state, "n1")
    box = Outbox("inst-1")
    energy = dict.fromkeys(range(8), 1_000_000)
    util = {g: float(10 * g) for g in range(8)}
    for t in range(seconds + 1):
        now = T0 + t * 1000
        for g in energy:
            energy[g] += (100 + 10 * g) * 1000
        for job_id, gpus, account, start_s, end_s in jobs:
            job = {"job_id": job_id, "gpus": [str(g) for g in gpus], "user": "u" + account,
                   "account": account}
            if t == start_s:
                write_hook_file(state, "start", job, now)
            if t == end_s:
                write_hook_file(state, "end", job, now)
        acc.poll_spool()
        rows = acc.on_sample(
            [GpuSample(index=g, energy_mj=e, utilization_gpu_pct=util[g])
             for g, e in energy.items()], now)
        if rows:
            seq = box.put_usage(acc.report(rows))
            acc.queued(rows, seq)
    return box.pending_messages()


JOBS = [("101", [0, 1], "phys", 0, 150), ("102", [2, 3, 4], "chem", 10, 200),
        ("103", [5], "phys", 30, 95)]


def _ingestor(store: object, metrics: ControllerMetrics | None = None) -> Ingestor:
    if store.node("n1") is None:  # type: ignore[attr-defined]
        store.upsert_node("n1", "h1", 8, b"", "inst-1", T0)  # type: ignore[attr-defined]
    policy = HealthPolicy(store, ActionQueue(store, None), PolicyConfig())  # type: ignore[arg-type]
    return Ingestor(store, policy, metrics=metrics)  # type: ignore[arg-type]


def test_ledger_totals_are_exact_and_replays_count_once(store_backend: Backend,
                                                        tmp_path: Path) -> None:
    msgs = _agent_run(tmp_path, JOBS, 210)
    store = store_backend.open()
    metrics = ControllerMetrics(process_metrics=False)
    ing = _ingestor(store, metrics)
    for m in msgs:
        ing.handle("n1", m)
    by_job = {t.key: t for t in store.usage(UsageQuery(group_by="job"))}
    assert by_job["101"].allocated_ms == 2 * 150_000
    assert by_job["102"].allocated_ms == 3 * 190_000
    assert by_job["103"].allocated_ms == 65_000
    # busy: GPU g runs at 10*g %; energy: GPU g at 100+10g W
    assert by_job["102"].busy_ms == (0.2 + 0.3 + 0.4) * 190_000
    assert by_job["101"].energy_mj == (100 + 110) * 150_000
    assert by_job["103"].energy_mj == 150 * 65_000
    assert by_job["102"].gpus == 3 and by_job["102"].account == "chem"
    # controller restart that lost its sequence bookkeeping: everything replayed
    store.close()
    store = store_backend.open()
    store.touch_node("n1", "inst-1", 0, T0)
    ing2 = _ingestor(store)
    for m in msgs:
        ing2.handle("n1", m)
    again = {t.key: t for t in store.usage(UsageQuery(group_by="job"))}
    assert again == by_job
    # per-minute rollups hold the same totals, split over the minutes
    acct = {t.key: t for t in store.usage_by_minute(0, 2**62, "account")}
    assert acct["phys"].allocated_ms == by_job["101"].allocated_ms + by_job["103"].allocated_ms
    assert acct["chem"].energy_mj == by_job["102"].energy_mj
    inside = {t.key: t for t in store.usage_by_minute(T0, T0 + 60_000, "account")}
    assert inside["phys"].allocated_ms == 2 * 60_000 + 30_000  # 101 all minute, 103 from 30 s
    # Prometheus counters per account, fed once
    got = metrics.registry.get_sample_value("gpufleet_acct_gpu_allocated_seconds_total",
                                            {"account": "phys"})
    assert got == (2 * 150_000 + 65_000) / 1000
    joules = metrics.registry.get_sample_value("gpufleet_acct_gpu_energy_joules_total",
                                               {"account": "chem"})
    assert joules == by_job["102"].energy_mj / 1000


def test_random_kills_and_resends_give_the_same_totals(store_backend: Backend,
                                                       tmp_path: Path) -> None:
    msgs = _agent_run(tmp_path, JOBS, 210)
    store = store_backend.open()
    ing = _ingestor(store)
    for m in msgs:
        ing.handle("n1", m)
    expected = store.usage(UsageQuery(group_by="account"))
    rng = random.Random(7)
    for trial in range(5):
        for table in ("acct_ledger", "acct_jobs", "acct_minute", "acct_day",
                      "acct_jobday_account", "acct_jobday_user"):
            store_backend.raw(f"DELETE FROM {table}")  # noqa: S608 - constant
        store_backend.raw("UPDATE nodes SET last_seq = 0")
        acked = 0  # what the agent knows is stored; it resends everything after it
        while acked < msgs[-1].seq:
            # a controller (re)start; its stored sequence may lag what it applied (batched
            # touches lost in the crash), so replays reach the ledger: it must not recount
            stored_seq = store.last_seq("n1")[1]
            lag = rng.randint(0, stored_seq)
            store_backend.raw(f"UPDATE nodes SET last_seq = {lag}")  # noqa: S608 - an int
            ing2 = _ingestor(store)
            crash_after = rng.randint(1, 12)
            sent = 0
            for m in msgs:
                if m.seq <= acked:
                    continue
                ing2.handle("n1", m)
                sent += 1
                if rng.random() < 0.7:  # an ack may be lost with the crash
                    acked = m.seq
                if sent == crash_after:
                    break
        assert store.usage(UsageQuery(group_by="account")) == expected, trial


def test_lost_time_hook_and_filters(store_backend: Backend, tmp_path: Path) -> None:
    store = store_backend.open()
    ing = _ingestor(store)
    for m in _agent_run(tmp_path, JOBS, 210):
        ing.handle("n1", m)
    assert store.add_lost_time("102", "n1", 30_000) == 3
    t = store.usage(UsageQuery(jobs=("102",), group_by="job"))[0]
    assert t.lost_ms == 90_000
    phys = store.usage(UsageQuery(accounts=("phys",), group_by="user"))
    assert [(x.key, x.jobs) for x in phys] == [("uphys", 2)]
    # window: jobs running in [T0+100 s, ...): 101 and 102, not 103 (ended at 95 s)
    late = store.usage(UsageQuery(since_ms=T0 + 100_000, group_by="job"))
    assert [x.key for x in late] == ["101", "102"]
    nodes = store.usage(UsageQuery(group_by="node"))
    assert nodes[0].key == "n1" and nodes[0].gpus == 6 and nodes[0].jobs == 3
