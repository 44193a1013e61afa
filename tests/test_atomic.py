"""shards/atomic.py: the one atomic-write recipe (temporary in the same folder, fsync, rename, fsync folder)."""

import os
import threading

import pytest

from shards import atomic


def test_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "latest"
    atomic.write_atomic(target, "one\n")
    atomic.write_atomic(target, b"two\n")
    assert target.read_text() == "two\n"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_an_error_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "index.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic.atomic_open(target) as f:
        f.write("half of the new")
        raise RuntimeError("killed while writing")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"]


def test_atomic_path_for_writers_that_take_a_file_name(tmp_path):
    target = tmp_path / "w.bin"
    with atomic.atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target and atomic.is_temp_of(tmp.name, "w.bin")
        tmp.write_bytes(b"\x00" * 10)
        assert not target.exists()  # nothing under the final name before the commit
    assert target.read_bytes() == b"\x00" * 10


def test_temporary_names_are_unique_and_recognised(tmp_path):
    names = {atomic.temp_path(tmp_path / "latest").name for _ in range(50)}
    assert len(names) == 50 and all(str(os.getpid()) in n for n in names)
    assert all(atomic.is_temp_of(n, "latest") for n in names)
    assert not atomic.is_temp_of(next(iter(names)), "lates")
    assert not atomic.is_temp_of(".latest.tmp", "latest") and not atomic.is_temp_of("latest", "latest")


def test_concurrent_writers_never_mix(tmp_path):
    """Many threads of one process write one target: each result is one writer's whole content."""
    target = tmp_path / "shared.txt"
    contents = [str(i) * 20000 for i in range(8)]
    errors = []

    def write(text):
        try:
            for _ in range(10):
                atomic.write_atomic(target, text)
        except Exception as e:  # noqa: BLE001 - a thread's exception would not reach the test otherwise
            errors.append(e)

    threads = [threading.Thread(target=write, args=(c,)) for c in contents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert target.read_text() in contents
    assert [p.name for p in tmp_path.iterdir()] == ["shared.txt"]


def test_files_written_through_atomic_path_get_the_umask_mode_not_0600(tmp_path):
    """safetensors' save_file creates private files (0600): exported weights, perception nets and FID statistics
    would be unreadable to a colleague on shared storage while their config.json beside them is not."""
    import torch
    from safetensors.torch import save_file

    from shards.atomic import atomic_path

    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "w.safetensors") as tmp:
            save_file({"a": torch.zeros(1)}, str(tmp))
        assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)  # a user who wants private files gets them
        with atomic_path(tmp_path / "p.safetensors") as tmp:
            save_file({"a": torch.zeros(1)}, str(tmp))
        assert (tmp_path / "p.safetensors").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_writing_never_touches_the_process_umask(tmp_path, monkeypatch):
    """Reading the umask by setting it (to 0) and back races between threads and can leave a process at umask 0:
    every file it makes world-writable. atomic_path reads it from /proc instead."""
    import torch
    from safetensors.torch import save_file

    from shards.atomic import atomic_path

    def no(*a):
        raise AssertionError("os.umask called while writing")

    monkeypatch.setattr(os, "umask", no)
    with atomic_path(tmp_path / "w.safetensors") as tmp:
        save_file({"a": torch.zeros(1)}, str(tmp))
    atomic.write_atomic(tmp_path / "latest", "x")


def test_a_filesystem_that_refuses_chmod_still_gets_the_file(tmp_path, monkeypatch):
    """Some CIFS/FUSE mounts refuse chmod: the write must still land (`latest` goes through here)."""
    import errno

    calls = []

    def refuse(*a, **k):
        calls.append(a)
        raise OSError(errno.EPERM, "Operation not permitted")

    with atomic.atomic_path(tmp_path / "w.bin") as tmp:
        tmp.write_bytes(b"x")
        os.chmod(tmp, 0o600)  # as safetensors leaves it: a chmod is wanted
        monkeypatch.setattr(os, "chmod", refuse)
    assert (tmp_path / "w.bin").read_bytes() == b"x" and len(calls) == 1
