"""An in-memory SlurmClient for unit tests; the real one is tested against real Slurm."""

from __future__ import annotations

import threading

from gpufleet.scheduler.slurm import SlurmError, SlurmNode


class FakeSlurm:
    def __init__(self, names: list[str]) -> None:
        self.state = dict.fromkeys(names, ("IDLE", ""))
        self.weight = dict.fromkeys(names, 1)
        self.features: dict[str, tuple[str, ...]] = dict.fromkeys(names, ("gpu",))
        self.calls: list[tuple[str, str]] = []
        self.down = False  # slurmctld not answering
        self.lock = threading.Lock()

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
