"""What a save says when the disk or the run folder fails it, at each stage (safetensors' own full-disk
error, `latest` not writable, a prune that fails), and what resume says of a checkpoint whose files are
damaged although its manifest matches (a safetensors header, a pickle that is no pickle)."""

import errno
import os
import pickle
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from harness import checkpoint as ckpt


class TinyAccelerator:
    """accelerate's save_state in miniature: real safetensors weights and a torch.save'd RNG state."""

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        Path(path).mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.arange(4.0)}, str(Path(path) / "model.safetensors"))
        torch.save({"step": torch.tensor(1)}, Path(path) / "random_states_0.pkl")


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------
# A full disk inside safetensors (the first file accelerate writes)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("os_error, says", [(28, "no space left on device (ENOSPC)"),
                                            (5, "Input/output error (EIO) while safetensors wrote a file")])
def test_a_full_disk_in_safetensors_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, os_error,
                                                                                  says):
    """Through accelerate's real save_state: its model.safetensors goes through safetensors' writer."""
    import accelerate.utils.other
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model, opt = acc.prepare(torch.nn.Linear(3, 2), torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1))
    m = ckpt.CheckpointManager(tmp_path, keep_last=1, accelerator=acc, is_main=True, tag="1-ab")
    s1 = m.save(1, {"step": 1}, "")
    assert (s1 / "model.safetensors").is_file()
    wrote = []

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 12)  # part of a file, then the disk is full
        wrote.append(filename)
        raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(os_error)} (os error {os_error})")

    monkeypatch.setattr(accelerate.utils.other, "safe_save_file", full)
    with pytest.raises(ckpt.CheckpointError) as e:
        m.save(2, {"step": 2}, "")
    assert wrote and ".tmp-step_2.1-ab" in str(wrote[0])
    assert str(e.value) == (f"could not write checkpoint step_2 in {tmp_path / 'checkpoints'}: {says}; the previous "
                            "checkpoint step_1 is intact")
    assert listing(tmp_path / "checkpoints") == ["step_1"]  # no .tmp left
    assert (tmp_path / "latest").read_text() == "checkpoints/step_1\n"
    assert ckpt.resolve(tmp_path, "latest") == s1 and ckpt.verify(s1) is None


def test_a_safetensors_error_that_is_not_about_the_disk_stays_a_bug(tmp_path):
    class Buggy(TinyAccelerator):
        def save_state(self, path):
            raise SafetensorError("Error while serializing: the tensor 'w' is not contiguous")

    with pytest.raises(SafetensorError, match="not contiguous"):
        ckpt.CheckpointManager(tmp_path, 1, Buggy(), True).save(1, {"step": 1}, "")
    assert not (tmp_path / "checkpoints").exists() or listing(tmp_path / "checkpoints") == []


# ---------------------------------------------------------------------------------------------
# After step_N is in place: `latest`, the prune
# ---------------------------------------------------------------------------------------------


def test_latest_not_writable_says_the_new_checkpoint_was_saved(tmp_path, monkeypatch):
    m = ckpt.CheckpointManager(tmp_path, keep_last=1, accelerator=TinyAccelerator(), is_main=True, tag="1-ab")
    m.save(1, {"step": 1}, "")
    real = ckpt.write_atomic

    def refused(path, data):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(ckpt, "write_atomic", refused)  # the run folder immutable, checkpoints/ writable
    with pytest.raises(ckpt.CheckpointError) as e:
        m.save(2, {"step": 2}, "")
    root = tmp_path / "checkpoints"
    assert str(e.value) == (f"checkpoint step_2 was saved in {root}, but `latest` could not be updated (Permission "
                            f"denied ({tmp_path / 'latest'})): --resume latest still finds step_2")
    assert listing(root) == ["step_1", "step_2"]  # complete, and step_1 (which `latest` names) not pruned
    assert (tmp_path / "latest").read_text() == "checkpoints/step_1\n"
    assert ckpt.resolve(tmp_path, "latest") == root / "step_2" and ckpt.verify(root / "step_2") is None
    ckpt.check_pickles(root / "step_2")
    monkeypatch.setattr(ckpt, "write_atomic", real)  # writable again: the next save catches up
    m.save(3, {"step": 3}, "")
    assert listing(root) == ["step_3"] and (tmp_path / "latest").read_text() == "checkpoints/step_3\n"


def test_other_ranks_say_the_checkpoint_was_saved_when_rank_0_fails_after_the_rename(tmp_path, monkeypatch):
    """Rank 1's view: the second agreement reports a failure that came after the rename."""
    import harness.dist

    calls = []

    def reduce(values, device=None):
        calls.append(list(values))
        return [0.0, 0.0] if len(calls) == 1 else [1.0, 1.0]  # rank 0: renamed, then `latest` failed

    monkeypatch.setattr(harness.dist, "all_reduce_sum", reduce)
    m = ckpt.CheckpointManager(tmp_path, keep_last=1, accelerator=TinyAccelerator(), is_main=False, tag="1-ab")
    with pytest.raises(ckpt.CheckpointError) as e:
        m.save(2, {"step": 2}, "")
    assert str(e.value) == (f"checkpoint step_2 was saved in {tmp_path / 'checkpoints'}, but rank 0 failed after it: "
                            "--resume latest still finds step_2")
    calls.clear()
    monkeypatch.setattr(harness.dist, "all_reduce_sum", lambda v, d=None: [1.0, 0.0])  # failed before the rename
    with pytest.raises(ckpt.CheckpointError, match=r"could not write checkpoint step_3 .*: another rank could not "
                                                   r"write its part; no earlier checkpoint$"):
        m.save(3, {"step": 3}, "")


def test_a_failed_prune_is_a_warning_and_the_save_stands(tmp_path, monkeypatch):
    said = []
    m = ckpt.CheckpointManager(tmp_path, keep_last=1, accelerator=TinyAccelerator(), is_main=True, tag="1-ab",
                               say=said.append)
    m.save(1, {"step": 1}, "")
    real = os.rename

    def rename(src, dst):
        if Path(dst).name.startswith(".trash-step_1."):
            raise PermissionError(errno.EPERM, "Operation not permitted", str(src))
        return real(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", rename)
    root = tmp_path / "checkpoints"
    assert m.save(2, {"step": 2}, "") == root / "step_2"
    assert said == [f"warning: could not prune old checkpoint {root / 'step_1'} (Operation not permitted "
                    f"({root / 'step_1'})): it stays (tried again at the next save); step_2 and `latest` are saved, "
                    "training goes on"]
    assert listing(root) == ["step_1", "step_2"] and (tmp_path / "latest").read_text() == "checkpoints/step_2\n"
    monkeypatch.setattr(ckpt.os, "rename", real)
    m.save(3, {"step": 3}, "")  # the next save prunes both
    assert listing(root) == ["step_3"] and len(said) == 1


def test_a_prune_that_cannot_delete_says_so_on_stderr_by_default(tmp_path, monkeypatch, capsys):
    m = ckpt.CheckpointManager(tmp_path, keep_last=1, accelerator=TinyAccelerator(), is_main=True, tag="1-ab")
    m.save(1, {"step": 1}, "")
    real = ckpt.shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if not Path(path).name.startswith(".trash-step_1."):  # the rest of that folder cannot be deleted
            real(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)
    m.save(2, {"step": 2}, "")
    trash = tmp_path / "checkpoints" / ".trash-step_1.1-ab"
    assert capsys.readouterr().err == (f"warning: could not delete all of {trash} (pruned step_1): it is removed at "
                                       "the next start; training goes on\n")
    monkeypatch.setattr(ckpt.shutil, "rmtree", real)
    m.clean_stale()
    assert listing(tmp_path / "checkpoints") == ["step_2"]


def test_a_resaved_steps_old_folder_is_deleted(tmp_path):
    m = ckpt.CheckpointManager(tmp_path, keep_last=3, accelerator=TinyAccelerator(), is_main=True, tag="1-ab")
    m.save(5, {"step": 5, "v": 1}, "")
    m.save(5, {"step": 5, "v": 2}, "")
    assert listing(tmp_path / "checkpoints") == ["step_5"]  # no .trash-step_5.* until the next start
    assert ckpt.read_state(tmp_path / "checkpoints/step_5")["v"] == 2


def test_a_bug_on_rank_0_after_the_writes_is_raised_after_the_other_ranks_know(tmp_path, monkeypatch):
    """Raised before the second agreement, it would leave the other ranks waiting in it forever."""
    import harness.dist

    calls = []

    def reduce(values, device=None):
        calls.append(list(values))
        return list(values)

    monkeypatch.setattr(harness.dist, "all_reduce_sum", reduce)

    def buggy(folder):
        raise KeyError("size")

    monkeypatch.setattr(ckpt, "write_manifest", buggy)
    with pytest.raises(KeyError):
        ckpt.CheckpointManager(tmp_path, 1, TinyAccelerator(), True, tag="1-ab").save(1, {"step": 1}, "")
    assert calls == [[0.0, 0.0], [1.0, 0.0]]  # both agreements ran, the second one reporting the failure
    assert listing(tmp_path / "checkpoints") == []  # the partial folder removed


# ---------------------------------------------------------------------------------------------
# Damage that matches the manifest (rewritten with it): one line at resume
# ---------------------------------------------------------------------------------------------


def saved(tmp_path) -> Path:
    return ckpt.CheckpointManager(tmp_path, keep_last=3, accelerator=TinyAccelerator(), is_main=True).save(
        1, {"step": 1}, "")


@pytest.mark.parametrize("name", ["model.safetensors", "model_1.safetensors"])
def test_a_damaged_safetensors_header_that_matches_its_manifest_is_refused_in_one_line(tmp_path, name):
    from harness.resume import resolve_on_main

    p = saved(tmp_path)
    if name != "model.safetensors":
        save_file({"d": torch.ones(2)}, str(p / name))
    damaged = bytearray((p / name).read_bytes())
    damaged[:8] = struct.pack("<Q", 2**40)  # the header length: larger than the file
    (p / name).write_bytes(bytes(damaged))
    ckpt.write_manifest(p)  # someone rewrote the manifest
    assert ckpt.verify(p) is None
    says = (f"cannot resume {p}: {name} does not read (Error while deserializing header: header too large), though it "
            "matches the manifest: resume an earlier checkpoint by its path")
    with pytest.raises(ckpt.ResumeError) as e:
        ckpt.check_pickles(p)
    assert str(e.value) == says
    world = SimpleNamespace(is_main=True, world_size=1, rank=0)
    with pytest.raises(ckpt.ResumeError) as e:  # what `--resume latest` runs before anything loads
        resolve_on_main(tmp_path, "latest", world, SimpleNamespace(info=print))
    assert str(e.value) == says


@pytest.mark.parametrize("content", [b"\x00" * 64, b"not a pickle at all\n" * 4, b"", b"\xff\xfe" * 16,
                                     pickle.dumps({"a": [1, 2, 3]})[:-4]],
                         ids=["zeros", "text", "empty", "binary", "truncated"])
def test_bytes_that_are_no_pickle_are_called_that(tmp_path, content):
    p = saved(tmp_path)
    (p / "random_states_0.pkl").write_bytes(content)
    ckpt.write_manifest(p)
    with pytest.raises(ckpt.ResumeError) as e:
        ckpt.check_pickles(p)
    assert str(e.value) == (f"cannot resume {p}: random_states_0.pkl is not a readable pickle (damaged, or not "
                            "written by torch.save)")


def test_while_loading_too_bytes_that_are_no_pickle_are_called_that(tmp_path):
    """What accelerate's load_state meets, should a file change after check_pickles read it."""
    (tmp_path / "random_states_0.pkl").write_bytes(b"\x00" * 64)
    with ckpt.weights_only_loads(tmp_path) as refused, pytest.raises(ckpt.ResumeError) as e:
        torch.load(tmp_path / "random_states_0.pkl")
    assert refused == ["random_states_0.pkl is not a readable pickle (damaged, or not written by torch.save)"]
    assert str(e.value) == f"cannot resume {tmp_path}: {refused[0]}"


def test_a_real_pickle_outside_the_allow_list_is_still_named_as_one(tmp_path):
    p = saved(tmp_path)
    (p / "random_states_0.pkl").write_bytes(b"cos\nsystem\n(S'true'\ntR.")  # protocol 0: GLOBAL os.system
    with pytest.raises(ckpt.ResumeError, match=r"random_states_0.pkl holds a pickled os.system, outside the "
                                               r"allow-list of plain data: refusing to unpickle it$"):
        ckpt.check_pickles(p)
    (p / "random_states_0.pkl").write_bytes(pickle.dumps(os.system))  # protocol 5: an operand torch does not read
    with pytest.raises(ckpt.ResumeError, match=r"random_states_0.pkl holds pickled objects, outside the allow-list"):
        ckpt.check_pickles(p)
