"""gpufleet controller: ingests agent reports and acts inside Slurm.

It never imports the agent (`gpufleet.agent`); the two share only `gpufleet.rpc`.
"""

__version__ = "0.1.0"
