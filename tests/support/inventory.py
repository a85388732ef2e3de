"""A node's inventory as the agent reports it, from the simulated NVML of a hardware profile:
what topology, fuzz and CLI tests feed the controller's readers."""

from __future__ import annotations

from gpufleet.agent import nvml_sim, wire
from gpufleet.agent.nvml import NvmlBackend, load_library
from gpufleet.rpc.v1 import fleet_pb2
from gpufleet.scheduler.service.convert import inventory_from_pb
from gpufleet.scheduler.topology.inventory import NodeInventory


def sim_inventory(profile: str) -> NodeInventory:
    """The simulated profile's inventory as the agent sends it, read as the controller does."""
    return inventory_from_pb(sim_inventory_pb(profile))


def sim_inventory_pb(profile: str) -> fleet_pb2.NodeInventory:
    """The simulated profile's inventory as the agent sends it."""
    nvml_sim.nvmlShutdown()  # the simulator is process-global, as NVML is: start it afresh
    backend = NvmlBackend(load_library("simulated", profile, None, "n1"), f"simulated:{profile}")
    try:
        gpus = backend.inventory()
        return fleet_pb2.NodeInventory(
            node_name="n1", gpus=[wire.gpu_info(g) for g in gpus],
            gpu_links=[wire.gpu_link(lk) for lk in backend.links()],
            gpu_nic_affinity=[wire.nic_affinity(*a) for a in backend.nic_affinity()])
    finally:
        nvml_sim.nvmlShutdown()
