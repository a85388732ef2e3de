"""Agents whose clocks are wrong: 10 minutes ahead, 10 minutes behind, 8 days ahead.

Each agent is the real `gpufleet-agent run` under libfaketime (LD_PRELOAD, FAKETIME="+600",
"-600", "+8d": Python's time.time() and gRPC's C core both see the offset clock; checked here
by the timestamps the controller stores). The controller runs on the true clock. What must
hold:

* liveness uses the controller's own receive time: a node 10 minutes ahead or behind that
  keeps reporting is never "unreachable", and once killed it goes unreachable after
  `--unreachable-after-s` like any node (a controller that trusted the agent's +10 min
  timestamps would keep it alive 10 minutes too long);
* a job's allocated time comes from two times on the node's own clock (prolog and epilog):
  skew does not change it, nor busy time or energy;
* reports stamped more than 7 days ahead of the controller (limits.MAX_FUTURE_MS) are
  acked as rejected (Ack.rejected) with a reason naming the field, each once (not resent
  forever: the agent keeps them in its dead-letter file, STATE_DIR/rejected.jsonl), and
  nothing in them is stored: no event, no usage;
  such a node is not kept "alive" by reports that were refused;
* nothing is drained because of skew.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.faults.fleet_helpers import (
    AgentProc,
    ControllerProc,
    faketime_lib,
    finish_hooks,
    ledger,
    run_hook,
    sql,
    stopped_all,
    wait_for,
)

pytestmark = pytest.mark.slow  # agents under faketime in real time: ~20 s on a loaded box

UNREACHABLE_AFTER_S = 3.0
SKEWS = {"ahead10m": ("+600", 600), "behind10m": ("-600", -600), "ahead8d": ("+8d", 8 * 86_400)}


def _node(db: str, name: str) -> tuple[int, bool] | None:
    rows = sql(db, "SELECT last_seen_ms, reachable FROM nodes WHERE name = ?", (name,))
    return (int(rows[0][0]), bool(rows[0][1])) if rows else None


# .ci/setup installs faketime: under CI=true a missing one fails instead of skipping
@pytest.mark.skipif(faketime_lib() is None and os.environ.get("CI") != "true",
                    reason="libfaketime (Debian faketime) missing")
def test_skewed_agents(tmp_path: Path) -> None:  # noqa: PLR0912 - one scenario, in order
    db = str(tmp_path / "state.db")
    ctl = ControllerProc(db, tmp_path, extra_args=(
        "--slurm", "none", "--unreachable-after-s", str(UNREACHABLE_AFTER_S)))
    agents = {name: AgentProc(name, tmp_path, ctl.address, clock=spec)
              for name, (spec, _off) in SKEWS.items()}
    with stopped_all([*agents.values(), ctl]):
        ctl.start()
        for a in agents.values():
            a.load.set_util({0: 100, 1: 50, 2: 0, 3: 0})
            a.start()
        wait_for(lambda: all(_node(db, n) is not None for n in agents), 30, "hellos")

        # the agents really run on their skewed clocks: the ledger keeps the node's times,
        # so a job's start shows each offset (checked below); first, liveness
        time.sleep(UNREACHABLE_AFTER_S + 2.0)  # past the silence limit, while reporting
        now_ms = int(time.time() * 1000)
        for name in ("ahead10m", "behind10m"):
            seen = _node(db, name)
            assert seen is not None and seen[1], f"{name} marked unreachable while reporting"
            # last seen is the controller's receive time, not the agent's +-10 min stamp
            assert abs(now_ms - seen[0]) < 2_500, (name, now_ms - seen[0])

        # one job per node, prolog/epilog on the node's own (skewed) clock, 3 s long
        offsets = {name: off for name, (_spec, off) in SKEWS.items()}
        start_real = math.ceil(time.time()) + 2
        hooks = [run_hook("prolog", agents[n].state_dir, str(500 + i), (0, 1),
                          start_real + offsets[n]) for i, n in enumerate(agents)]
        finish_hooks(hooks)
        assert time.time() < start_real - 0.2, "prologs took too long"
        for i, (n, a) in enumerate(agents.items()):
            if n != "ahead8d":
                job_id = str(500 + i)
                wait_for(lambda a=a, job_id=job_id: job_id in a.jobs(),  # type: ignore[misc]
                         10, f"{n} to take its job")
                a.load.add_energy({0: 7_000_000, 1: 3_000_000})
        end_real = start_real + 3
        while time.time() < end_real - 0.3:
            time.sleep(0.02)
        # stopped across the end second, so the epilog's time lies between two samples
        for a in agents.values():
            a.pause()
        try:
            finish_hooks([run_hook("epilog", agents[n].state_dir, str(500 + i), (0, 1),
                                   end_real + offsets[n]) for i, n in enumerate(agents)])
            while time.time() < end_real + 0.05:
                time.sleep(0.01)
        finally:
            for a in agents.values():
                a.resume()

        # Xid 48 on the node 8 days ahead: its event is stamped +8 d and must be refused
        agents["ahead8d"].inject_xid(2, 48)
        want = {("500", "ahead10m"), ("501", "behind10m")}
        wait_for(lambda: {(j, n) for (j, n, _g), u in ledger(db).items() if u.ended} >= want,
                 20, "the skewed nodes' jobs in the ledger")
        time.sleep(1.0)
        rows = ledger(db)
        for (job, node, gpu), use in sorted(rows.items()):
            print(f"ledger {job} {node} GPU {gpu}: allocated {use.allocated_ms} ms, busy "
                  f"{use.busy_ms} ms, energy {use.energy_mj} mJ")
        for job, node in sorted(want):
            assert rows[(job, node, 0)].allocated_ms == 3_000
            assert rows[(job, node, 0)].busy_ms == 3_000  # 100 % for 3 s
            assert rows[(job, node, 1)].busy_ms == 1_500  # 50 %
            assert rows[(job, node, 0)].energy_mj == 7_000_000
            assert rows[(job, node, 1)].energy_mj == 3_000_000
        starts = dict(sql(db, "SELECT node, min(start_ms) FROM acct_ledger GROUP BY node"))
        for node in ("ahead10m", "behind10m"):  # the node's clock, as the hooks stamped it
            assert starts[node] == (start_real + offsets[node]) * 1000

        # the node 8 days ahead: refused with a reason, nothing of it stored
        logs = ctl.logs()
        print("controller on the +8 d node:", [ln for ln in logs.splitlines()
                                                if "ahead8d" in ln and "7 days" in ln][:3])
        assert "more than 7 days ahead of the controller" in logs
        assert "timestamp_ms" in logs  # the reason names the field
        # acked as rejected (Ack.rejected), each report once: not refused and resent forever
        refused = re.findall(r"rejected report (\d+) \(\w+\) from ahead8d", logs)
        assert refused and len(refused) == len(set(refused)), refused
        def dead_letters() -> list[dict[str, Any]]:
            path = agents["ahead8d"].state_dir / "rejected.jsonl"
            return [json.loads(line) for line in path.read_text().splitlines()]

        # the controller logs a rejection before its ack reaches the agent, which writes the
        # dead letter then: wait for the ones logged so far to arrive
        wait_for(lambda: {str(d["seq"]) for d in dead_letters()} >= set(refused), 10,
                 "the +8 d agent's dead letters for every rejection logged")
        dead = dead_letters()
        print(f"+8 d agent: {len(refused)} reports rejected, each once; dead-letter file: "
              f"{len(dead)} lines, first reason {dead[0]['reason']!r}")
        assert {str(d["seq"]) for d in dead} >= set(refused)
        assert all("7 days ahead" in d["reason"] for d in dead)
        assert not [k for k in rows if k[1] == "ahead8d"], "usage from +8 d stored"
        assert sql(db, "SELECT count(*) FROM events")[0][0] == 0, "an event from +8 d stored"
        # refused reports do not keep it alive: it goes unreachable like a silent node
        wait_for(lambda: not (_node(db, "ahead8d") or (0, True))[1], UNREACHABLE_AFTER_S + 10,
                 "the +8 d node to be unreachable")

        # kill the agent 10 min ahead: unreachable after the limit, by the controller's clock
        t_kill = time.monotonic()
        agents["ahead10m"].kill9()
        wait_for(lambda: not (_node(db, "ahead10m") or (0, True))[1], UNREACHABLE_AFTER_S + 10,
                 "the killed +10 min node to go unreachable")
        silent_s = time.monotonic() - t_kill
        print(f"killed +10 min agent: unreachable after {silent_s:.1f} s "
              f"(limit {UNREACHABLE_AFTER_S} s)")
        assert silent_s >= UNREACHABLE_AFTER_S - 1.0  # not early, not 10 minutes late
        seen = _node(db, "behind10m")
        assert seen is not None and seen[1], "the -10 min node went unreachable"

        # nothing drained because of skew (the Xid 48 on +8 d was refused, never acted on)
        assert sql(db, "SELECT node, action FROM actions") == []
    for name, a in agents.items():
        assert "Traceback" not in a.logs(), (name, a.logs()[-3000:])
