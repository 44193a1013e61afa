"""Stand-in for launch/train.py in the SLURM tests: same command line, same signal contract.

`standin.py --config FILE run.dir=DIR train.max_steps=N ... --resume latest` "trains" N steps of
STANDIN_STEP_S seconds on every rank, keeps `DIR/latest` (the step of its newest "checkpoint"),
and on SIGUSR1/SIGTERM stops at a step all ranks agree on, saves, and exits 75. It appends one
line per event to DIR/events, which the test reads.
"""

import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator

PREEMPTED = 75


def main(argv):
    overrides = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("--"))
    run_dir = Path(overrides["run.dir"])
    max_steps = int(overrides.get("train.max_steps", 50))
    step_s = float(os.environ.get("STANDIN_STEP_S", "0.2"))
    resume = "--resume" in argv

    stop = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda s, f: stop.append(signal.Signals(s).name))

    acc = Accelerator(cpu=not torch.cuda.is_available())
    rank, world = dist.get_rank(), dist.get_world_size()
    run_dir.mkdir(parents=True, exist_ok=True)
    latest = run_dir / "latest"
    start = int(latest.read_text()) if resume and latest.exists() else 0

    def event(msg):
        if rank == 0:
            with open(run_dir / "events", "a") as f:
                f.write(f"{msg} restart={os.environ.get('SLURM_RESTART_COUNT', '0')} world={world}\n")

    event(f"start step={start} argv={' '.join(argv)}")
    for step in range(start + 1, max_steps + 1):
        time.sleep(step_s)
        # Ranks see a signal at different moments: agree on it, so all stop after the same step.
        flag = torch.tensor([1.0 if stop else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if rank == 0 and step % 5 == 0:
            event(f"step {step}")
        if flag.item():
            if rank == 0:
                latest.write_text(str(step))
            dist.barrier()
            event(f"preempted step={step} signal={stop[0] if stop else 'peer'}")
            dist.destroy_process_group()
            return PREEMPTED
    if rank == 0:
        latest.write_text(str(max_steps))
    event(f"done step={max_steps}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
