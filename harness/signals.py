"""Graceful stop on SIGTERM / SIGUSR1: finish the current step, checkpoint, exit with EXIT_PREEMPTED.

SLURM sends SIGUSR1 before a time limit (`#SBATCH --signal`) and SIGTERM on preemption; the sbatch
script requeues the job when the trainer exits with EXIT_PREEMPTED, and the requeued job resumes
from `latest`. The handler only sets a flag: the training loop reads it between steps, and all
ranks agree on it through one all-reduce, so every rank stops at the same step (a checkpoint is a
collective operation and no rank may skip it).
"""

from __future__ import annotations

import signal

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry".
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def install(self) -> StopFlag:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
