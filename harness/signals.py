"""Graceful stop on SIGTERM / SIGUSR1: finish the current step, checkpoint, exit with EXIT_PREEMPTED.
A first Ctrl-C (SIGINT) in the training loop does the same and exits with EXIT_INTERRUPTED (130, as
the shell has it, so that sbatch does not requeue); a second one interrupts at once (KeyboardInterrupt:
launch/train.py says so in one line), with the checkpoints saved before. SIGHUP (the terminal
closed, the ssh session dropped) stops the same way with 129; what went to the terminal goes to
/dev/null from then on (a write to a terminal that is gone fails; output redirected to a file stays
there), and train.log keeps the record. A run started as `nohup python launch/train.py` ignores
SIGHUP and goes on, as nohup means; torchrun (inside a multi-process `accelerate launch`) installs
its own SIGHUP handler and forwards the signal to the workers, so there use
`PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGQUIT nohup accelerate launch ...`, setsid or tmux.

SLURM sends SIGUSR1 before a time limit (`#SBATCH --signal`) and SIGTERM on preemption; the trainer
then exits with EXIT_PREEMPTED after its checkpoint, and the main process leaves PREEMPTED_MARK in the
run folder (step and signal): `accelerate launch` reports any worker's non-zero exit as 1, so the sbatch
script requeues the job when it finds the mark (removed before each start), and the requeued job
resumes from `latest`. The handler only sets a flag: the training loop reads it between steps, and all
ranks agree on it through an all-reduce (`StopVote`), so every rank stops at the same step (a
checkpoint is a collective operation and no rank may skip it). A validation pass reads it between
batches and ends early (harness/validation.py: the ranks agree in one all-reduce there).
"""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry".
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_HANGUP = 129  # 128 + SIGHUP
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PREEMPTED_MARK = "preempted"  # in the run folder: the last start ended by a stop signal, its checkpoint saved


def mark_preempted(run_dir, step: int | None, signum: int | None) -> None:
    """Leave PREEMPTED_MARK in `run_dir` (one line; atomic): what the sbatch script requeues on. Best
    effort: a run folder that cannot take it leaves the job to end as failed, which is said."""
    from pathlib import Path

    from shards.atomic import write_atomic

    what = signal.Signals(signum).name if signum else "another rank's stop signal"
    job = f" (job {os.environ['SLURM_JOB_ID']})" if os.environ.get("SLURM_JOB_ID") else ""  # whose: sbatch checks
    line = f"{what}: {'nothing trained from this start' if step is None else f'checkpoint at step {step}'}{job}\n"
    try:
        if Path(run_dir).is_dir():
            write_atomic(Path(run_dir) / PREEMPTED_MARK, line)
    except OSError:
        pass


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


class StopFlag:
    def __init__(self):
        self.signum: int | None = None
        self._previous = {}
        self._on_tty: list[int] = []

    def install(self) -> StopFlag:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where someone else took it
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)
        if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:  # SIG_IGN: started under nohup, keep going
            # Which of stdout/stderr are the terminal, known now: a hung-up tty may no longer say so.
            self._on_tty = [fd for fd in (1, 2) if _isatty(fd)]
            self._previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._hangup)
        return self

    def _hangup(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
        if not self._on_tty:
            return
        null = os.open(os.devnull, os.O_WRONLY)
        for fd in self._on_tty:  # the terminal is gone: the next progress bar or log line would fail with EIO
            os.dup2(null, fd)
        os.close(null)

    def _handle(self, signum, frame) -> None:
        if self.signum is None:  # the first one says why (SLURM's USR1, then torchrun's SIGTERM as ranks exit)
            self.signum = signum

    def _interrupt(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
        signal.signal(signal.SIGINT, self._previous[signal.SIGINT])  # a second Ctrl-C: at once
        # os.write, not print: the handler may run inside a write to stderr (tqdm's), where print raises
        os.write(2, b"\nCtrl-C: a checkpoint after this step, then exit (Ctrl-C again: exit now, without it)\n")

    @property
    def exit_code(self) -> int:
        return {signal.SIGINT: EXIT_INTERRUPTED, signal.SIGHUP: EXIT_HANGUP}.get(self.signum, EXIT_PREEMPTED)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class StopVote:
    """The ranks' stop flags, agreed on without waiting for a collective in every step.

    After each step every rank puts its flag into an all-reduce that runs in the background, on the
    CPU (gloo: a group of its own when the training backend is NCCL, so no GPU stream is involved),
    and reads the sum after the next step, by when it has long arrived. All ranks vote at the same
    steps, so they stop at the same step: one step after the first rank saw its signal (SLURM's
    warning comes minutes before the kill). In one process the flag is read directly."""

    def __init__(self, flag: StopFlag):
        self.flag = flag
        self.spread = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.group = dist.new_group(backend="gloo") if self.spread and dist.get_backend() != "gloo" else None
        self.pending, self.votes = None, torch.zeros(1)

    def __call__(self) -> bool:
        """After each step, on every rank: True once all ranks know that one of them was signalled."""
        if not self.spread:
            return self.flag.requested
        agreed = False
        if self.pending is not None:
            self.pending.wait()
            agreed, self.pending = bool(self.votes.item() > 0), None  # a CPU tensor: no device sync
        if not agreed:
            self.votes = torch.tensor([float(self.flag.requested)])
            self.pending = dist.all_reduce(self.votes, group=self.group, async_op=True)
        return agreed

    def close(self) -> None:
        """At the end of a loop every rank ran to it: the last vote is collected (nothing left in flight)."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
