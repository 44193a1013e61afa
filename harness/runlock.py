"""One job per run folder: an OS lock on `run.dir/.lock`, held for the life of the run.

Two jobs on one run folder (a requeued SLURM job while the old one still lives, a second launch
by hand) would interleave checkpoints of two runs. So the global rank 0 takes `fcntl.flock`
(non-blocking) on `run.dir/.lock` before anything is written there, and keeps the descriptor
open until the run ends. Why flock:
- the kernel releases it when the process dies, however it dies (kill -9, OOM): no stale lock
  to clear by hand, unlike a "pid file exists" check;
- it works across nodes on NFS (Linux emulates flock with POSIX byte-range locks there, which
  the server arbitrates) and on Lustre / GPFS mounted with locking on. One lock taken by global
  rank 0 is enough: every rank of a run writes into the same folder on shared storage, and rank 0
  alone decides, then tells the others (a collective), so no rank starts work the lock refused.
The file records the holder's host and pid, so the job that is refused can say who holds it.

A lock is per process here: taking it again in the process that holds it (tests that run
`launch/train.py`'s `main()` twice) reuses the held descriptor; `release_all()` lets it go.
A forked child (a data-loader worker) closes its copies of the descriptors at once: a flock lasts
while any descriptor of the open file lives, so an orphaned or stuck worker would otherwise keep
the folder locked after the trainer died.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import socket
from pathlib import Path

import torch.distributed as tdist

LOCK_NAME = ".lock"
# Files the trainer writes into the run folder itself (checkpoints/, tb/, samples/ may be links: other storage).
OWN_FILES = (LOCK_NAME, "config.yaml", "train.log", "perception.json", "perception.safetensors")
_held: dict[Path, tuple] = {}  # run folder (resolved) -> descriptors holding its locks (.lock, folder)


class RunDirError(RuntimeError):
    """The run folder cannot be used (held by another job, a file, not writable): one line why."""


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode(errors="replace").split()
    info = dict(w.split("=", 1) for w in text if "=" in w)
    if not info:
        return "a process that has not written its name yet"
    return f"host {info.get('host', '?')} pid {info.get('pid', '?')}"


def refuse_checkpoint_folder(run_dir: Path) -> None:
    """A checkpoint folder given as run.dir (taken for a resume) would get a run written into it: its
    files beside the checkpoint's break its manifest, and the run it belongs to loses that step. A
    new folder inside a run's checkpoints/ is refused too (that folder is the trainer's to tidy)."""
    from harness.checkpoint import is_complete  # here: checkpoint.py is heavier than this module needs

    checkpoint = is_complete(run_dir)  # its trainer state or manifest, as a resume recognises one
    parent = run_dir.parent
    of_run = parent.name == "checkpoints" and any((parent.parent / n).exists() for n in ("latest", LOCK_NAME))
    if not (checkpoint or of_run):
        return
    what = "a checkpoint folder" if checkpoint else f"inside the checkpoints/ of run {parent.parent}"
    resume = f"run.dir={parent.parent} --resume latest" if of_run else f"a new run.dir with --resume {run_dir}"
    init = f"; to start a new run from its weights, train.init_from={run_dir}" if checkpoint else ""
    raise RunDirError(f"run.dir {run_dir} is {what}, not a run folder: to continue that run use {resume}{init}")


# What another tool wrote into a folder that is no run: an export (ours or diffusers'), a shard set, latent shards
FOREIGN = {"model.safetensors": "an export", "diffusion_pytorch_model.safetensors": "a diffusers export",
           "index.json": "a shard set", "latents.json": "latent shards"}
# (Not the .lock: shard sets built before the builder's lock was named .build.lock have one.)
RUN_MARKS = ("latest", "train.log", "checkpoints")


def refuse_foreign_folder(run_dir: Path) -> None:
    """A folder another tool wrote (an export, a shard set, latent shards) as run.dir: the run would write its
    config.yaml over the export's, and its checkpoints and logs among the files."""
    if not run_dir.is_dir() or any((run_dir / n).exists() for n in RUN_MARKS):
        return
    found = next((n for n in FOREIGN if (run_dir / n).exists()), None)
    if found is not None:
        raise RunDirError(f"run.dir {run_dir} holds {FOREIGN[found]} ({found}), not a run: a run writes its "
                          "config.yaml, checkpoints and logs there; choose another run.dir")


def acquire(run_dir: str | Path) -> None:
    """Take the run folder's lock for this process, or raise RunDirError saying who holds it."""
    run_dir = Path(run_dir)
    refuse_checkpoint_folder(run_dir)
    refuse_foreign_folder(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RunDirError(f"run.dir {run_dir} exists and is not a folder") from None
    except OSError as e:
        raise RunDirError(f"run.dir {run_dir} cannot be created: {e.strerror or e}") from None
    if not run_dir.is_dir():
        raise RunDirError(f"run.dir {run_dir} exists and is not a folder")
    key = run_dir.resolve()
    if key in _held:
        return
    # What the first save needs, found now rather than after checkpoint.every_steps steps of training.
    ck, latest = run_dir / "checkpoints", run_dir / "latest"
    for name in ("checkpoints", "tb", "samples"):  # the folders it writes into (tb/ and samples/: at start too)
        sub = run_dir / name
        if sub.is_symlink() and not sub.exists():
            raise RunDirError(f"run.dir {run_dir}: {name} is a link to nothing (to {os.readlink(sub)})")
        if sub.exists() and not sub.is_dir():
            raise RunDirError(f"run.dir {run_dir}: {name} exists and is not a folder")
    if ck.is_dir() and not os.access(ck, os.W_OK | os.X_OK):
        raise RunDirError(f"run.dir {run_dir}: checkpoints ({ck.resolve()}) is not writable")
    if latest.is_dir():
        raise RunDirError(f"run.dir {run_dir}: latest is a folder; the trainer keeps a one-line file there naming the "
                          "newest checkpoint: move the folder away")
    # The files the trainer writes in place: a link there (a run folder unpacked or shared) would have it
    # truncate or overwrite the file the link points to.
    for name in OWN_FILES:
        if (run_dir / name).is_symlink():
            raise RunDirError(f"run.dir {run_dir}: {name} is a symbolic link (to {os.readlink(run_dir / name)}); the "
                              "trainer writes this file, and would write through the link: remove the link")
    path = run_dir / LOCK_NAME
    try:
        # O_RDWR without O_TRUNC: a job that is refused must not erase the holder's name.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise RunDirError(f"run.dir {run_dir} is not writable ({path}: {e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        who = _holder(fd)
        os.close(fd)
        raise RunDirError(f"run.dir {run_dir} is in use by another job ({who}; {path}): wait for it to end, "
                          "or choose another run.dir") from None
    except OSError as e:
        os.close(fd)
        raise RunDirError(f"run.dir {run_dir}: cannot lock {path} ({e.strerror or e}); "
                          "a file system without locks cannot host a run folder") from None
    # The folder itself too: a `.lock` deleted by hand (taken for a stale lock) is a new file that a
    # second job could lock, but not the folder. Where folders cannot be locked (NFS locks files
    # opened for writing only), the file's lock is all there is.
    dir_fd = None
    try:
        dir_fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(dir_fd)
        os.close(fd)
        raise RunDirError(f"run.dir {run_dir} is in use by another job (its {LOCK_NAME} was deleted, the folder is "
                          "still locked): wait for it to end, or choose another run.dir") from None
    except OSError:
        if dir_fd is not None:
            os.close(dir_fd)
        dir_fd = None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host={socket.gethostname()} pid={os.getpid()}\n".encode(), 0)
    except OSError as e:
        os.close(fd)
        if dir_fd is not None:
            os.close(dir_fd)
        raise RunDirError(f"run.dir {run_dir} is not writable ({path}: {e.strerror or e})") from None
    _held[key] = (fd, dir_fd)


def _close_in_child() -> None:
    """After fork, in the child: drop the inherited descriptors (the parent's lock stays held)."""
    for fds in _held.values():
        for fd in fds:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


def holds(run_dir: str | Path) -> bool:
    """Whether this process holds the lock of `run_dir` (so what it writes there is this run's)."""
    try:
        return Path(run_dir).resolve() in _held
    except OSError:
        return False


def release_all() -> None:
    """Let go of every run folder this process holds (the kernel would at exit anyway)."""
    while _held:
        _, fds = _held.popitem()
        for fd in fds:
            if fd is not None:
                os.close(fd)  # closing the last descriptor of the open file drops the flock


def hold(run_dir: str | Path, world) -> str:
    """Collective: the global rank 0 locks the run folder and every rank learns the outcome.

    Returns a tag unique to this run's life (rank 0's pid and a random part, the same on every
    rank) for naming temporary checkpoint folders; raises RunDirError on every rank when refused."""
    found = [None, None]
    if world.is_main:
        try:
            acquire(run_dir)
            found[0] = f"{os.getpid()}-{secrets.token_hex(4)}"
        except RunDirError as e:
            found[1] = str(e)
    if world.world_size > 1 and tdist.is_available() and tdist.is_initialized():
        tdist.broadcast_object_list(found, src=0)
    if found[1]:
        raise RunDirError(found[1])
    return found[0]
