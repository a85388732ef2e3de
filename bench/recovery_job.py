"""A PyTorch-free training job that checkpoints with gpufleet.agent.job and resumes from it.

Run as a Slurm batch job (the recovery e2e test does) or by hand:

    GPUFLEET_CKPT_DIR=/tmp/ck python bench/recovery_job.py --steps 2000 --ckpt-every-s 2

It fits y = 3x + 2 by SGD, one step every --step-time-s, saves a checkpoint every
--ckpt-every-s seconds and at once when the checkpoint signal (SIGUSR1) arrives, and on start
resumes from the newest complete checkpoint. Its output lines are meant to be parsed:

    recovery-job start resumed_from_step=-1 restart_count=0 job_id=42
    recovery-job checkpoint step=120 save_ms=3.1 path=/tmp/ck/step-120
    recovery-job done step=2000 w=3.000 b=2.000

Exit 0 when done; 93 (gpufleet's "do not requeue") with --give-up-at-step.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import time
from pathlib import Path

from gpufleet.agent import job


def _batch(step: int, size: int = 32) -> list[tuple[float, float]]:
    # data depend on the step only, so a resumed run sees exactly what an unbroken one would
    rng = random.Random(step)
    xs = [rng.uniform(-1, 1) for _ in range(size)]
    return [(x, 3.0 * x + 2.0 + rng.gauss(0, 0.01)) for x in xs]


def _train_step(w: float, b: float, step: int, lr: float = 0.1) -> tuple[float, float]:
    batch = _batch(step)
    gw = sum(2 * (w * x + b - y) * x for x, y in batch) / len(batch)
    gb = sum(2 * (w * x + b - y) for x, y in batch) / len(batch)
    return w - lr * gw, b - lr * gb


def _save(ckpt_dir: Path | None, step: int, w: float, b: float, pad_bytes: int) -> None:
    def write(staging: Path) -> None:
        (staging / "model.json").write_text(json.dumps({"step": step, "w": w, "b": b}))
        if pad_bytes:  # stands in for real weights, to make saves take time
            with (staging / "weights.bin").open("wb") as f:
                for _ in range(pad_bytes // (1 << 20)):
                    f.write(b"\0" * (1 << 20))
                f.write(b"\0" * (pad_bytes % (1 << 20)))

    # The line is the record of a complete save that whoever reads the output relies on (the
    # recovery bench: "resumed from the newest step the first run saved"). SIGTERM (how slurmd
    # ends the run on a requeue) waits until both are done, so no complete checkpoint goes
    # unlogged; SIGKILL still may tear a save, which is what latest() copes with.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        t0 = time.perf_counter()
        ckpt = job.save(ckpt_dir, step, write, keep=3)
        ms = (time.perf_counter() - t0) * 1000
        print(f"recovery-job checkpoint step={step} save_ms={ms:.1f} path={ckpt.path}",
              flush=True)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt-dir", type=Path, default=None, help="default: $GPUFLEET_CKPT_DIR")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--step-time-s", type=float, default=0.01)
    ap.add_argument("--ckpt-every-s", type=float, default=5.0)
    ap.add_argument("--pad-bytes", type=int, default=0, help="extra checkpoint bytes")
    ap.add_argument("--give-up-at-step", type=int, default=None,
                    help=f"exit {job.EXIT_DO_NOT_REQUEUE} (do not requeue) at this step")
    args = ap.parse_args(argv)

    job.install()  # main thread, before anything else could start threads
    w, b, step = 0.0, 0.0, 0
    last = job.latest(args.ckpt_dir)
    if last is not None:
        state = json.loads(last.read_bytes("model.json"))
        w, b, step = state["w"], state["b"], state["step"] + 1
    print(f"recovery-job start resumed_from_step={last.step if last else -1} "
          f"restart_count={job.restart_count()} job_id={job.job_id()}", flush=True)

    next_ckpt = time.monotonic() + args.ckpt_every_s
    while step < args.steps:
        if args.give_up_at_step is not None and step >= args.give_up_at_step:
            print(f"recovery-job give-up step={step}", flush=True)
            return job.EXIT_DO_NOT_REQUEUE
        w, b = _train_step(w, b, step)
        time.sleep(args.step_time_s)
        if job.checkpoint_requested() or time.monotonic() >= next_ckpt:
            _save(args.ckpt_dir, step, w, b, args.pad_bytes)
            # saved: keep training; if the node is going away, the controller requeues us
            # and the next run resumes from here
            job.clear_request()
            next_ckpt = time.monotonic() + args.ckpt_every_s
        step += 1
    _save(args.ckpt_dir, args.steps - 1, w, b, 0)
    print(f"recovery-job done step={args.steps} w={w:.3f} b={b:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
