"""gpufleet node agent: watches one compute node's GPUs, fabric and host and reports them.

It never imports the controller (`gpufleet.scheduler`); the two share only `gpufleet.rpc`.
"""

__version__ = "0.1.0"
