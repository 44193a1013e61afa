"""The one place that knows the distributed world.

`world()` answers rank / local rank / world size / node from, in order: an initialised
torch.distributed process group (the truth once a launcher has set one up: under DeepSpeed on CPU,
accelerate's own process count has been seen to say 1 while DeepSpeed ran 2 ranks), then the
torchrun / accelerate environment variables, then SLURM's. A half-set environment is an error.

`RankLogger` prints and writes the text log on the main process only; other ranks get a logger
that does nothing, so no call site needs `if rank == 0`.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as tdist
from tqdm.auto import tqdm


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    node: int = 0
    num_nodes: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class DistEnvError(RuntimeError):
    """The launcher left an inconsistent environment."""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistEnvError(f"environment variable {name}={value!r} is not an integer") from None


def world() -> World:
    """Rank and size of this process; see the module docstring for the order of sources."""
    local_world = _env_int("LOCAL_WORLD_SIZE")
    if tdist.is_available() and tdist.is_initialized():
        rank, size = tdist.get_rank(), tdist.get_world_size()
        local_rank = _env_int("LOCAL_RANK") or 0
        per_node = local_world or size
        return World(rank, local_rank, size, rank // per_node, max(1, size // per_node))

    torchrun = {k: _env_int(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if any(v is not None for v in torchrun.values()):
        missing = [k for k, v in torchrun.items() if v is None]
        if missing:
            raise DistEnvError(f"partially set distributed environment: {', '.join(missing)} missing "
                               f"(set by torchrun / accelerate launch; unset the others to run one process)")
        rank, size, local_rank = torchrun["RANK"], torchrun["WORLD_SIZE"], torchrun["LOCAL_RANK"]
        if not 0 <= rank < size:
            raise DistEnvError(f"RANK={rank} is outside WORLD_SIZE={size}")
        per_node = local_world or size
        return World(rank, local_rank, size, rank // per_node, max(1, size // per_node))

    slurm = {k: _env_int(k) for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")}
    if all(v is not None for v in slurm.values()) and slurm["SLURM_NTASKS"] > 1:
        # Only meaningful when one task = one training process (srun python ...); under
        # `srun accelerate launch` the launcher sets RANK etc. and we never get here.
        return World(slurm["SLURM_PROCID"], slurm["SLURM_LOCALID"], slurm["SLURM_NTASKS"],
                     _env_int("SLURM_NODEID") or 0, _env_int("SLURM_NNODES") or 1)
    return World()


def all_reduce_sum(values: list[float], device=None) -> list[float]:
    """Sum a few floats over all ranks (identity in a single process)."""
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return list(values)
    import torch

    t = torch.tensor(values, dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return t.tolist()


class RankLogger:
    """Rank-0 printing plus a plain-text log file; a silent stand-in on other ranks."""

    def __init__(self, is_main: bool, log_file: str | Path | None = None):
        self.enabled = is_main
        self.file = None
        if is_main and log_file is not None:
            Path(log_file).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(log_file, "a", buffering=1)

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        tqdm.write(line, file=sys.stderr)  # above a progress bar, not through it
        if self.file:
            self.file.write(line + "\n")

    def file_only(self, msg: str) -> None:
        if self.enabled and self.file:
            self.file.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None
