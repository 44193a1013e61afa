"""Atomic, durable file writes: a reader sees the old file or the new one, never half of one.

The one recipe, for shards/ and harness/ alike:

    write under a temporary name in the target's folder   (a rename is atomic only within one file system)
    -> fsync the file     (else a crash soon after the rename can leave an empty file under the final name:
                           the rename reached the disk, the data not yet)
    -> os.replace over the target
    -> fsync the folder   (else the rename itself may not survive a crash)

Temporary names are `.<name>.<pid>.<random>.tmp`: two writers of one target never share (and so
never truncate) a temporary file, and the last rename wins, whole. A writer that was killed leaves
its temporary behind; `is_temp_of` lets the owner of a folder recognise and remove such leftovers.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.\d+\.[0-9a-f]{8}\.tmp$")


def _proc_umask() -> int | None:
    """The process umask read without setting it (Linux: /proc/self/status), or None where that cannot tell."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def _umask_by_setting() -> int:
    mask = os.umask(0o022)  # set and set back: done once, at import, while one thread runs (two threads
    os.umask(mask)          # doing it at once can leave the process at umask 0, every file world-writable)
    return mask


_IMPORT_UMASK = _proc_umask()
if _IMPORT_UMASK is None:
    _IMPORT_UMASK = _umask_by_setting()


def _plain_mode(tmp: Path) -> None:
    """Give a file a writer created private (safetensors: 0600) the mode open() would have given it."""
    mask = _proc_umask()  # the umask now (a user may change it after import), else the one at import
    want = 0o666 & ~(_IMPORT_UMASK if mask is None else mask)
    try:
        if os.stat(tmp).st_mode & 0o777 != want:
            os.chmod(tmp, want)
    except OSError as e:  # a filesystem that refuses chmod (some CIFS/FUSE mounts): the file is still good
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES):
            raise


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary name next to `path`, unique to this process and this call."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def is_temp_of(name: str, target: str) -> bool:
    """Whether the file name `name` is a temporary that `temp_path` made for a file called `target`."""
    m = _TEMP_RE.match(name)
    return bool(m) and m.group("target") == target


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of a folder (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """Make a closed file's data durable (fsync through a fresh read-only descriptor)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and folder under `root` (a checkpoint folder before its rename)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync_file(os.path.join(dirpath, name))
        fsync_dir(dirpath)


def commit(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """The second half of the recipe, for a writer that has written (and closed) `tmp` itself:
    fsync it, rename it over `path`, fsync the folder."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to (for writers that take a file name,
    such as safetensors' `save_file`); on a clean exit it is committed, on an error removed."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        _plain_mode(tmp)  # safetensors creates files private (0600): ours are plain artifacts
        commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator:
    """`open(path, mode)` for writing whose content appears under `path` only when the block ends cleanly."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace `path` with `data` (text or bytes), atomically and durably."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
