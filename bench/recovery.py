"""Fault -> drain -> signal -> requeue -> running again, on the real Slurm 22.05 harness.

A 2-node batch job (bench/recovery_job.py, the batch script itself via `exec`) saves a
checkpoint every K seconds and registers each one through a simulated node agent; Xid 79 is
injected on its batch host; gpufleet's controller drains the node, signals the job, requeues
it without that node and clears Slurm's 120 s requeue delay. Prints each step's time after the
fault and the step the job resumed from. A torn checkpoint (a newer step without a manifest,
as a save killed mid-write leaves) is planted while the job is down: it must not be picked.

    sudo .venv/bin/python bench/recovery.py [--lab /tmp/gf-lab-rec --port 11917] [--ckpt-every-s 1]

Needs root (the harness starts slurmctld/slurmd). The run itself is tests/support/recovery.py's
`run()`, which tests/e2e/test_recovery_slurm.py asserts on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make `tests` importable
    sys.path.insert(0, str(REPO))

from tests.slurm.harness import SlurmLab, SlurmLabConfig  # noqa: E402
from tests.support.recovery import run  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # fixed /tmp paths on purpose: a root-only lab that the next run cleans up
    ap.add_argument("--lab", type=Path, default=Path("/tmp/gf-lab-rec"))  # noqa: S108
    ap.add_argument("--port", type=int, default=11917, help="slurmctld port (slurmd: +10183)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/gf-bench-recovery"))  # noqa: S108
    ap.add_argument("--ckpt-every-s", type=float, default=1.0)
    ap.add_argument("--grace-s", type=float, default=3.0)
    args = ap.parse_args()
    lab = SlurmLab(SlurmLabConfig(lab_dir=args.lab, ctld_port=args.port,
                                  node_port0=args.port + 10183))
    lab.start()
    try:
        import shutil

        shutil.rmtree(args.work, ignore_errors=True)
        result = run(lab, args.work, args.ckpt_every_s, args.grace_s)
    finally:
        lab.stop()
    for line in result.lines():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
