"""GPUs the controller handed out a moment ago, held back from the next placements.

A job pinned by FleetUser.Place is still PENDING when the next submission asks: Slurm's view
(squeue) does not show its GPUs as used yet. Without this, submissions in a row were pinned
to the same node and each waited for the one before (bench/placement_vs_slurm.py: 1-GPU jobs
waiting 4-8 s behind a whole-node job pinned to the same node, where plain sbatch started them
at once). Each answer's GPUs (the indices the engine predicts Slurm gives) and one CPU are
held for `hold_s`; once the job runs, Slurm's view shows the same GPUs used, so holding them
too changes nothing. A held answer that was never submitted only makes the next placements
a little more careful (a pin elsewhere, or no pin) for hold_s. Pure: no Slurm, no store.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace

from gpufleet.scheduler.placement.model import ClusterView, Placement

HOLD_S = 10.0


class HandedOut:
    def __init__(self, hold_s: float = HOLD_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.hold_s = hold_s
        self.clock = clock
        self._lock = threading.Lock()
        self._held: list[tuple[float, str, frozenset[int]]] = []  # (until, node, GPUs)

    def add(self, placement: Placement) -> None:
        if not placement.ok:
            return
        until = self.clock() + self.hold_s
        with self._lock:
            self._held.extend((until, c.node, frozenset(c.gpus)) for c in placement.nodes)

    def apply(self, view: ClusterView) -> ClusterView:
        """The view less what is held (GPUs, and one CPU per held answer on a node)."""
        now = self.clock()
        with self._lock:
            self._held = [h for h in self._held if h[0] > now]
            held = list(self._held)
        if not held:
            return view
        nodes = dict(view.nodes)
        for _, name, gpus in held:
            node = nodes.get(name)
            if node is None:
                continue
            cpus = None if node.cpus_free is None else max(0, node.cpus_free - 1)
            nodes[name] = replace(node, free_gpus=node.free_gpus - gpus, cpus_free=cpus)
        return replace(view, nodes=nodes)
