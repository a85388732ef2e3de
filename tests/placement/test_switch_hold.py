"""The controller's switch holds (placement/switch_hold.py): a job the sbatch filter asked to
stay on one leaf keeps that only while it costs the job at most grace_s."""

from __future__ import annotations

import pytest
from gpufleet.scheduler.cli.sbatch_filter import SWITCH_HOLD
from gpufleet.scheduler.placement.model import ClusterView, NodeView
from gpufleet.scheduler.placement.switch_hold import HOLD_WAIT_S, SwitchHolds
from gpufleet.scheduler.slurm import SlurmError, SlurmJob, SwitchRequest, slurm_time_s

GRACE_S = 5.0


def _view(busy: set[str], health: dict[str, str] | None = None) -> ClusterView:
    """Two leaves of four 8-GPU nodes: s1 = n1..n4, s2 = n5..n8; `busy` nodes have no GPU
    free."""
    nodes = {}
    leaf_of = {}
    for i in range(1, 9):
        name = f"n{i}"
        nodes[name] = NodeView(name, 8, frozenset() if name in busy else frozenset(range(8)),
                               health=(health or {}).get(name, "ok"),
                               partitions=frozenset({"main"}))
        leaf_of[name] = "s1" if i <= 4 else "s2"
    return ClusterView(nodes=nodes, leaf_of=leaf_of, default_partition="main")


def _job(job_id: str, reason: str = "Resources", excluded: tuple[str, ...] = ()) -> SlurmJob:
    return SlurmJob(job_id=job_id, state="PENDING", nodes=(), requeue=False, batch=True,
                    comment="", restart_count=0, exit_status=None, exit_signal=0,
                    excluded_nodes=excluded, start_time_s=0, state_reason=reason,
                    partitions=("main",))


class Lab:
    """What the keeper reads and the releases it makes; `now` is its clock."""

    def __init__(self) -> None:
        self.now = 0.0
        self.requests: list[SwitchRequest] = []
        self.jobs: list[SlurmJob] = []
        self.view = _view(set())
        self.released: list[str] = []
        self.fail_release = False
        self.view_reads = 0
        self.counted = 0  # the controller's metric

    def keeper(self, shadow: bool = False) -> SwitchHolds:
        def release(job_id: str) -> None:
            if self.fail_release:
                raise SlurmError("slurm_update error: Job has already finished")
            self.released.append(job_id)

        def view() -> ClusterView:
            self.view_reads += 1
            return self.view

        def count() -> None:
            self.counted += 1

        return SwitchHolds(lambda: self.requests, lambda: self.jobs, view, release,
                           grace_s=GRACE_S, shadow=shadow, clock=lambda: self.now,
                           on_release=count)

    def hold(self, job_id: str, nodes: int, wait_s: int = HOLD_WAIT_S, switches: int = 1,
             tres: str = "gres:gpu:8", **job: object) -> None:
        self.requests.append(SwitchRequest(job_id, switches, wait_s, nodes, tres))
        self.jobs.append(_job(job_id, **job))  # type: ignore[arg-type]


def _run(lab: Lab, keeper: SwitchHolds, until_s: float) -> None:
    while lab.now < until_s:
        keeper.tick()
        lab.now += 1.0


def test_the_filters_hold_is_the_one_the_keeper_knows() -> None:
    assert slurm_time_s(SWITCH_HOLD) == HOLD_WAIT_S
    assert slurm_time_s("2:00") == 120 and slurm_time_s("1-00") == 86400
    assert slurm_time_s("UNLIMITED") is None
    with pytest.raises(ValueError, match="not a Slurm time"):
        slurm_time_s("soon")


def test_a_job_that_could_start_across_leaves_is_released_after_the_grace() -> None:
    lab = Lab()
    lab.view = _view({"n1", "n2", "n5", "n6"})  # 2 free on each leaf, the job needs 3
    lab.hold("7", nodes=3)
    keeper = lab.keeper()
    _run(lab, keeper, GRACE_S)  # t = 0..4: still within the grace
    assert lab.released == []
    _run(lab, keeper, GRACE_S + 1)
    assert lab.released == ["7"] and keeper.released == ["7"] and lab.counted == 1


def test_a_leaf_that_frees_within_the_grace_keeps_the_hold() -> None:
    lab = Lab()
    lab.view = _view({"n1", "n2", "n5", "n6"})
    lab.hold("7", nodes=3)
    keeper = lab.keeper()
    _run(lab, keeper, 3)
    lab.view = _view({"n1", "n5", "n6"})  # leaf s1 has 3 free now: Slurm starts it there
    _run(lab, keeper, 3 * GRACE_S - 1)
    assert lab.released == []


def test_room_taken_by_other_jobs_does_not_restart_the_grace() -> None:
    """While the job is held, backfill starts smaller jobs in the room it had: the grace
    still runs from the first moment it could have started (restarted, the job was held for
    one leaf for good: fill trace, every multi-node job on one leaf, +7 s mean wait)."""
    lab = Lab()
    lab.view = _view({"n1", "n2", "n5", "n6"})
    lab.hold("7", nodes=3)
    keeper = lab.keeper()
    _run(lab, keeper, 2)
    lab.view = _view({"n1", "n2", "n3", "n5", "n6", "n7"})  # backfill took n3 and n7
    _run(lab, keeper, GRACE_S)
    assert lab.released == []
    _run(lab, keeper, GRACE_S + 1)
    assert lab.released == ["7"]


def test_no_room_anywhere_costs_nothing() -> None:
    lab = Lab()
    lab.view = _view({"n1", "n2", "n3", "n5", "n6", "n7"})  # 2 free: the job needs 3
    lab.hold("7", nodes=3)
    keeper = lab.keeper()
    _run(lab, keeper, 60)
    assert lab.released == []  # the grace starts when it could start, not at submission
    lab.view = _view({"n1", "n2", "n5", "n6"})  # now 4 free, 2 + 2
    _run(lab, keeper, 60 + GRACE_S)
    assert lab.released == []
    _run(lab, keeper, 60 + GRACE_S + 1)
    assert lab.released == ["7"]


def test_unhealthy_and_excluded_nodes_do_not_count_as_room() -> None:
    lab = Lab()
    # 3 free on s1 but n3 degraded; the job also excludes n8: only n4 + n7 are usable
    lab.view = _view({"n1", "n2", "n5", "n6"}, health={"n3": "degraded"})
    lab.hold("7", nodes=3, excluded=("n8",))
    keeper = lab.keeper()
    _run(lab, keeper, 30)
    assert lab.released == []


def test_one_leaf_with_room_that_slurm_does_not_use_is_released_in_the_end() -> None:
    lab = Lab()  # all free: Slurm should start it on one leaf at once
    lab.hold("7", nodes=2)
    keeper = lab.keeper()
    _run(lab, keeper, 3 * GRACE_S)
    assert lab.released == []
    _run(lab, keeper, 3 * GRACE_S + 1)  # Slurm sees something the engine does not judge
    assert lab.released == ["7"]


def test_only_gpufleets_own_hold_on_jobs_waiting_for_nodes_is_touched() -> None:
    lab = Lab()
    lab.view = _view({"n1", "n2", "n5", "n6"})
    lab.hold("1", nodes=3, wait_s=120)  # the user's own --switches=1@2:00
    lab.hold("2", nodes=3, switches=2)  # the user's own count
    lab.hold("3", nodes=3, reason="Dependency")  # not waiting for nodes
    lab.hold("4", nodes=3, reason="JobHeldUser")
    keeper = lab.keeper()
    _run(lab, keeper, 30)
    assert lab.released == []


def test_in_doubt_the_hold_goes() -> None:
    lab = Lab()
    lab.hold("7", nodes=3, tres="gres:gpu")  # a GPU count the keeper cannot read
    lab.hold("8", nodes=0)  # a node range (squeue's "2-4")
    keeper = lab.keeper()
    keeper.tick()
    assert lab.released == ["7", "8"]


def test_shadow_mode_decides_but_never_releases() -> None:
    lab = Lab()
    lab.view = _view({"n1", "n2", "n5", "n6"})
    lab.hold("7", nodes=3)
    keeper = lab.keeper(shadow=True)
    decided = []
    while lab.now <= GRACE_S:
        decided += keeper.tick()
        lab.now += 1.0
    assert [r.job_id for r in decided] == ["7"] and "across 2 leaf" in decided[0].why
    assert lab.released == [] and keeper.released == [] and lab.counted == 0


def test_a_failed_release_is_tried_again_and_no_holds_cost_no_view() -> None:
    lab = Lab()
    keeper = lab.keeper()
    keeper.tick()
    assert lab.view_reads == 0  # nothing held: only the one squeue read
    lab.view = _view({"n1", "n2", "n5", "n6"})
    lab.hold("7", nodes=3)
    lab.fail_release = True
    _run(lab, keeper, GRACE_S + 1)
    assert lab.released == [] and keeper.released == [] and lab.counted == 0
    lab.fail_release = False
    _run(lab, keeper, 2 * GRACE_S + 2)
    assert lab.released == ["7"]
