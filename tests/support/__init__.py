"""Helpers shared by tests and benches, one of each; test modules import from here (or from a
suite's helper module), never from another test module.

- waiting: `wait_for`, the one way to wait for another process or thread (re-exported here)
- net: `free_port`
- agents: an in-process simulated agent (`make_agent`)
- recovery: one fault -> drain -> requeue -> running-again run on a real Slurm lab (the e2e
  test asserts on it, bench/recovery.py prints it)
- alertmanager: a JSON recorder and a real Alertmanager (fixtures)
- prometheus: promtool and the metric names of rules and registries
- inventory: a node inventory from a simulated NVML profile
- fuzzing: the parser fuzz of the security and conformance suites

A controller with N simulated agent processes is `gpufleet.scheduler.cli.simfleet.SimFleet`: the
shipped `gpufleet demo` uses it too, and it cannot import tests.
"""

from tests.support.waiting import WaitTimeout, wait_for

__all__ = ["WaitTimeout", "wait_for"]
