"""Atomic, resumable checkpoints on top of `accelerator.save_state`.

Layout inside the run folder:

    checkpoints/step_<N>/      accelerate's state (sharded by DeepSpeed where it runs),
                               trainer_state.json and config.yaml (written last)
    checkpoints/.tmp-step_<N>  a checkpoint being written (never read)
    checkpoints/.trash-...     an old checkpoint being pruned (never read)
    latest                     one line naming the newest complete checkpoint

The order of a save is what makes a kill at any moment safe:
1. every rank writes into `.tmp-step_N` (save_state is collective under DeepSpeed: a rank that
   skipped it would deadlock the others);
2. all ranks wait; rank 0 writes trainer_state.json + config.yaml, fsyncs, renames the folder to
   `step_N` (atomic), then replaces `latest` (write + fsync + os.replace, atomic);
3. only then are old checkpoints pruned: renamed into `.trash-*` first (atomic), then deleted.
So a `step_*` folder is always complete, and `latest` always names one. `resolve` is the one
function that finds where to resume from, for `--resume latest`, a path, and requeued SLURM jobs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from shards.atomic import fsync_dir, fsync_tree, is_temp_of, write_atomic

STATE_NAME = "trainer_state.json"
CONFIG_NAME = "config.yaml"
LATEST_NAME = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")


# Crash tests set this to "<stage>:<seconds>" to hold a save at one stage while they kill the
# process: stages are "written" (files in .tmp, not renamed), "renamed" (before `latest`), "pruning".
_PAUSE_ENV = "HARNESS_CRASH_TEST_PAUSE"


def _pause(stage: str) -> None:
    spec = os.environ.get(_PAUSE_ENV, "")
    if spec.partition(":")[0] == stage:
        time.sleep(float(spec.partition(":")[2] or 1))


class ResumeError(RuntimeError):
    """The resume request cannot be honoured: one line saying why."""


def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / STATE_NAME).is_file()


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve(run_dir: str | Path, resume: str | None) -> Path | None:
    """Where to resume from: None = start fresh.

    `latest` reads the run's `latest` file and falls back to the newest complete `step_*` folder
    (a run killed before its first checkpoint, or a requeued job, then simply starts fresh).
    Anything else is a path that must be a complete checkpoint.
    """
    if resume is None:
        return None
    run_dir = Path(run_dir)
    if resume == "latest":
        # The newest complete step_N. `latest` names it, except after a kill between the rename of
        # a new checkpoint and the update of `latest`: the complete folder is newer, and wins.
        found = list_checkpoints(run_dir)
        pointer = run_dir / LATEST_NAME
        if pointer.is_file():
            target = run_dir / pointer.read_text().strip()
            m = _STEP_DIR.match(target.name)
            if is_complete(target) and m and (not found or int(m.group(1)) >= found[-1][0]):
                return target
        return found[-1][1] if found else None
    path = Path(resume)
    if not path.exists():
        raise ResumeError(f"--resume {resume}: no such checkpoint folder")
    if not is_complete(path):
        raise ResumeError(f"--resume {resume}: not a complete checkpoint (no {STATE_NAME})")
    return path


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_NAME).read_text())


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep_last: int, accelerator, is_main: bool):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.keep_last = keep_last
        self.accelerator = accelerator
        self.is_main = is_main

    def set_aside_newer(self, resumed: Path, step: int) -> list[Path]:
        """Resuming this run from an older checkpoint: its newer ones belong to the abandoned branch.
        Renamed to `abandoned-step_N` (kept, never resumed or pruned) so that `latest` cannot pick
        them up after a crash, and pruning counts only this branch. Main process."""
        if not self.is_main or resumed.parent.resolve() != self.root.resolve():
            return []
        moved = []
        for n, p in list_checkpoints(self.run_dir):
            if n > step:
                target = self.root / f"abandoned-{p.name}"
                shutil.rmtree(target, ignore_errors=True)
                os.rename(p, target)
                moved.append(target)
        if moved:
            write_atomic(self.run_dir / LATEST_NAME, f"checkpoints/{resumed.name}\n")
        return moved

    def clean_stale(self) -> None:
        """Remove leftovers of saves or prunes that were killed (main process, at start-up)."""
        if self.is_main and self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith((".tmp-", ".trash-")):
                    shutil.rmtree(p, ignore_errors=True)
        if self.is_main and self.run_dir.is_dir():  # a `latest` whose write was killed before its rename
            for p in self.run_dir.iterdir():
                if is_temp_of(p.name, LATEST_NAME):
                    p.unlink(missing_ok=True)

    def save(self, step: int, state: dict, config_yaml: str) -> Path:
        """Collective: every rank must call this at the same step."""
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp-step_{step}"
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        self.accelerator.wait_for_everyone()  # every rank's shard is on disk
        if self.is_main:
            (tmp / CONFIG_NAME).write_text(config_yaml)
            (tmp / STATE_NAME).write_text(json.dumps(state, indent=1))
            fsync_tree(tmp)
            _pause("written")
            if final.exists():  # re-saving a step (resumed from an older checkpoint): swap out the old one
                trash = self.root / f".trash-step_{step}"
                shutil.rmtree(trash, ignore_errors=True)
                os.rename(final, trash)
            os.rename(tmp, final)
            fsync_dir(self.root)
            _pause("renamed")
            write_atomic(self.run_dir / LATEST_NAME, f"checkpoints/{final.name}\n")
            self._prune(keep=final)
        self.accelerator.wait_for_everyone()
        return final

    def _prune(self, keep: Path) -> None:
        found = list_checkpoints(self.run_dir)
        old = [p for _, p in found if p != keep][: max(0, len(found) - self.keep_last)]
        for p in old:
            trash = self.root / f".trash-{p.name}"
            os.rename(p, trash)
            _pause("pruning")
            shutil.rmtree(trash, ignore_errors=True)
