"""A job's Epilog may write its end while the agent is paused in the middle of a sample
(SIGSTOP, a descheduled process, a VM steal): busy time must stop exactly at the end wherever
in the sample the pause fell. The CI failure this reproduces: job 2001 at 75 % on 4 GPUs for
6 s came out at 5388 busy ms, not 4500 (tests/faults/test_standby_kill.py): the agent had
scanned the job spool, was stopped, the Epilog wrote the end, and the agent, resumed 1.18 s
after the end, read its clock only then and integrated the job up to it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from gpufleet.agent import runner
from gpufleet.agent.accounting import Accountant, GpuUsage, JobPhase, write_hook_file
from gpufleet.agent.config import AgentConfig
from gpufleet.agent.nvml import NvmlBackend, load_library
from gpufleet.agent.runner import Agent
from gpufleet.agent.telemetry import GpuSample

T0 = 1_700_000_000_000  # ms
GPUS = (0, 1, 2, 3)
UTIL_PCT = 75.0
START_MS, END_MS = T0 + 500, T0 + 6000
PAUSED_AT_MS, RESUMED_AT_MS = T0 + 5290, T0 + 7184  # the Epilog runs in between


class Clock:
    def __init__(self) -> None:
        self.now_ms = T0

    def __call__(self) -> int:
        return self.now_ms


@pytest.mark.parametrize("paused", ["after the spool scan", "after the clock read"])
def test_an_end_written_while_the_agent_is_paused_mid_sample_clips_busy_exactly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, paused: str) -> None:
    cfg = AgentConfig(node_name="n2", controller="127.0.0.1:1", gpu_backend="simulated",
                      sim_profile="l40s-pcie", state_dir=str(tmp_path), interval_s=0.1,
                      metrics_listen="")
    agent = Agent(cfg, NvmlBackend(load_library("simulated", "l40s-pcie", None, "n2"), "sim"))
    agent.inventory()
    clock = Clock()
    # the GPUs run the job at a fixed 75 % (x whole ms: exact in binary floating point)
    monkeypatch.setattr(agent.backend, "sample", lambda: [
        GpuSample(index=g, energy_mj=1_000_000, utilization_gpu_pct=UTIL_PCT) for g in GPUS])
    job = {"job_id": "2001", "gpus": [str(g) for g in GPUS], "user": "u", "account": "chem",
           "restart_count": 0}
    pause_armed = False

    def pause() -> None:
        """The agent is stopped here: the Epilog writes the end, time passes the end."""
        nonlocal pause_armed
        pause_armed = False
        write_hook_file(tmp_path, "end", job, END_MS)
        clock.now_ms = RESUMED_AT_MS

    scan = agent.accounting.poll_spool

    def scan_then_maybe_pause() -> bool:
        found = scan()
        if pause_armed and paused == "after the spool scan":
            pause()
        return found

    def clock_then_maybe_pause() -> int:
        t = clock()
        if pause_armed and paused == "after the clock read":
            pause()
        return t

    monkeypatch.setattr(agent.accounting, "poll_spool", scan_then_maybe_pause)
    monkeypatch.setattr(runner, "_now_ms", clock_then_maybe_pause)
    rows: list[GpuUsage] = []
    on_sample = agent.accounting.on_sample

    def keep_rows(*args: Any, **kwargs: Any) -> list[GpuUsage]:
        out = on_sample(*args, **kwargs)
        rows.extend(out)
        return out

    monkeypatch.setattr(agent.accounting, "on_sample", keep_rows)

    write_hook_file(tmp_path, "start", job, START_MS)  # a start in the future, as Slurm's
    for t in range(T0, PAUSED_AT_MS, 1000):
        clock.now_ms = t
        agent.sample()
    clock.now_ms = PAUSED_AT_MS
    pause_armed = True
    agent.sample()  # paused in here
    assert not pause_armed
    agent.sample()
    clock.now_ms += 1000
    agent.sample()

    ended = [r for r in rows if r.phase == JobPhase.ENDED]
    assert sorted(r.gpu_index for r in ended) == list(GPUS)
    for r in ended:
        assert (r.start_ms, r.end_ms) == (START_MS, END_MS)
        assert r.allocated_ms == END_MS - START_MS
        # 75 % of exactly the time the job held the GPU: neither past its end nor short of it
        assert r.busy_ms == (END_MS - START_MS) * 3 // 4, (paused, r.busy_ms)


def test_an_end_stamped_after_the_sample_waits_one_sample_only(tmp_path: Path) -> None:
    """Found with a stamp after the sample's time, an end is applied at the next sample, up to
    which the job is integrated; still ahead of that one (a clock stepped back), it is applied
    anyway: a job is never kept open waiting for its end's time."""
    acc = Accountant(tmp_path, "n1")

    def sample(now_ms: int) -> list[GpuUsage]:
        acc.poll_spool()
        return acc.on_sample([GpuSample(index=0, energy_mj=0, utilization_gpu_pct=50.0)],
                             now_ms)

    job = {"job_id": "9", "gpus": ["0"], "user": "u", "account": "a"}
    write_hook_file(tmp_path, "start", job, T0)
    sample(T0)
    sample(T0 + 1000)
    write_hook_file(tmp_path, "end", job, T0 + 1500)
    assert not [r for r in sample(T0 + 1200) if r.phase == JobPhase.ENDED]
    [row] = [r for r in sample(T0 + 2200) if r.phase == JobPhase.ENDED]
    assert (row.end_ms, row.allocated_ms, row.busy_ms) == (T0 + 1500, 1500, 750)

    job2 = {**job, "job_id": "10"}
    write_hook_file(tmp_path, "start", job2, T0 + 3000)
    sample(T0 + 3000)
    write_hook_file(tmp_path, "end", job2, T0 + 9000)  # its Epilog's clock ahead
    assert not [r for r in sample(T0 + 4000) if r.phase == JobPhase.ENDED]
    [row] = [r for r in sample(T0 + 5000) if r.phase == JobPhase.ENDED]
    assert (row.end_ms, row.allocated_ms, row.busy_ms) == (T0 + 9000, 6000, 1000)


def test_an_end_file_that_turns_up_late_takes_back_the_busy_time_past_the_end(
        tmp_path: Path) -> None:
    """Hooks stamp their time before Python starts (the wrapper), so an Epilog's file turns up
    0.2 s to seconds after its end; the samples in between integrated the job past its end
    (at 1 Hz and at 100 Hz alike), and finding the end takes that back."""
    for step_ms in (1000, 10):
        acc = Accountant(tmp_path / str(step_ms), "n1")
        util = {"pct": 75.0}

        def sample(now_ms: int, acc: Accountant = acc, util: dict[str, float] = util
                   ) -> list[GpuUsage]:
            acc.poll_spool()
            return acc.on_sample([GpuSample(index=0, energy_mj=0,
                                            utilization_gpu_pct=util["pct"])], now_ms)

        job = {"job_id": "5", "gpus": ["0"], "user": "u", "account": "a"}
        write_hook_file(tmp_path / str(step_ms), "start", job, T0 + 250)
        t = T0
        while t <= T0 + 6000:
            sample(t)
            t += step_ms
        util["pct"] = 25.0  # the job's last 2 s and what came after: another rate
        while t < T0 + 9500:
            sample(t)
            t += step_ms
        write_hook_file(tmp_path / str(step_ms), "end", job, T0 + 8000)  # 1.5 s late
        rows = sample(t)
        [row] = [r for r in rows if r.phase == JobPhase.ENDED]
        assert (row.start_ms, row.end_ms, row.allocated_ms) == (T0 + 250, T0 + 8000, 7750)
        assert row.busy_ms == (6000 - 250) * 3 // 4 + 2000 // 4 == 4812, (step_ms, row.busy_ms)
