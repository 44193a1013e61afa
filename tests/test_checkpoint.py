"""Checkpoint resolution, manifests and atomic save order (unit level; crash tests are in test_train.py,
whole-run hardening in test_hardening_run.py)."""

import errno
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from harness import checkpoint as ckpt


class FakeAccelerator:
    """Stands in for accelerate: save_state writes one file per 'rank'."""

    def __init__(self):
        self.saves = []

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        from pathlib import Path

        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_bytes(b"weights")
        self.saves.append(path)


def make(run, step, complete=True):
    p = run / "checkpoints" / f"step_{step}"
    p.mkdir(parents=True)
    (p / "model.safetensors").write_bytes(b"weights %d" % step)
    if complete:
        (p / ckpt.STATE_NAME).write_text(json.dumps({"step": step, "manifest": ckpt.MANIFEST_NAME}))
        ckpt.write_manifest(p)
    return p


def test_resolve_latest_pointer_and_fallbacks(tmp_path):
    assert ckpt.resolve(tmp_path, "latest") is None  # nothing yet: a fresh start (requeued job before 1st save)
    assert ckpt.resolve(tmp_path, None) is None
    make(tmp_path, 10)
    s20 = make(tmp_path, 20)
    make(tmp_path, 30, complete=False)  # never complete folders are ignored
    assert ckpt.resolve(tmp_path, "latest") == s20  # no pointer: newest complete
    (tmp_path / "latest").write_text("checkpoints/step_20\n")
    assert ckpt.resolve(tmp_path, "latest") == s20  # the pointer names the newest
    (tmp_path / "latest").write_text("checkpoints/step_10\n")
    # killed after step_20 was renamed into place but before `latest` moved: the newer one wins
    assert ckpt.resolve(tmp_path, "latest") == s20
    (tmp_path / "latest").write_text("checkpoints/step_99\n")
    assert ckpt.resolve(tmp_path, "latest") == s20  # a dangling pointer falls back
    assert ckpt.resolve(tmp_path, str(s20)) == s20
    with pytest.raises(ckpt.ResumeError, match="not a complete checkpoint"):
        ckpt.resolve(tmp_path, str(tmp_path / "checkpoints" / "step_30"))
    with pytest.raises(ckpt.ResumeError, match="no such checkpoint"):
        ckpt.resolve(tmp_path, str(tmp_path / "nope"))


def test_save_renames_points_latest_and_prunes(tmp_path):
    acc = FakeAccelerator()
    m = ckpt.CheckpointManager(tmp_path, keep_last=2, accelerator=acc, is_main=True)
    for step in (1, 2, 3):
        m.save(step, {"step": step}, "model: {}\n")
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_2", "step_3"]  # pruned to keep_last, no .tmp or .trash left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "latest"]  # no temporary of `latest`
    assert (tmp_path / "latest").read_text().strip() == "checkpoints/step_3"
    assert ".tmp-step_3." in acc.saves[-1]  # accelerate wrote under the temporary name
    assert ckpt.read_state(ckpt.resolve(tmp_path, "latest")) == {"step": 3, "manifest": ckpt.MANIFEST_NAME}
    assert (tmp_path / "checkpoints/step_3/config.yaml").read_text() == "model: {}\n"


def test_resaving_a_step_replaces_it(tmp_path):
    m = ckpt.CheckpointManager(tmp_path, keep_last=3, accelerator=FakeAccelerator(), is_main=True)
    m.save(5, {"step": 5, "v": 1}, "")
    m.save(5, {"step": 5, "v": 2}, "")
    assert ckpt.read_state(tmp_path / "checkpoints/step_5")["v"] == 2


def test_clean_stale_removes_partial_saves(tmp_path):
    make(tmp_path, 1)
    (tmp_path / "checkpoints/.tmp-step_2").mkdir()
    (tmp_path / "checkpoints/.trash-step_0").mkdir()
    (tmp_path / ".latest.4242.0123abcd.tmp").write_text("checkpoints/step_2\n")  # a `latest` write killed
    (tmp_path / ".notes.4242.0123abcd.tmp").write_text("not ours")
    ckpt.CheckpointManager(tmp_path, 3, FakeAccelerator(), True).clean_stale()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.4242.0123abcd.tmp", "checkpoints"]


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path):
    s10 = make(tmp_path, 10)
    make(tmp_path, 20)
    make(tmp_path, 30)
    m = ckpt.CheckpointManager(tmp_path, 2, FakeAccelerator(), True)
    moved = m.set_aside_newer(s10, 10)
    assert sorted(p.name for p in moved) == ["abandoned-step_20", "abandoned-step_30"]
    assert ckpt.resolve(tmp_path, "latest") == s10  # a crash now resumes this branch, not the old one
    m.save(11, {"step": 11}, "")
    m.save(12, {"step": 12}, "")
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["abandoned-step_20", "abandoned-step_30", "step_11", "step_12"]
    assert m.set_aside_newer(tmp_path / "elsewhere" / "step_5", 5) == []  # another run's checkpoint: nothing moves
    second = m.set_aside_newer(s10, 10)  # a second branch from step 10: the first's abandoned ones stay
    assert sorted(p.name for p in second) == ["abandoned-step_11", "abandoned-step_12"]
    m.save(11, {"step": 11}, "")
    m.set_aside_newer(s10, 10)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["abandoned-step_11", "abandoned-step_11.2", "abandoned-step_12", "abandoned-step_20",
                     "abandoned-step_30"]


def test_manifest_lists_every_file_and_verify_names_what_changed(tmp_path):
    m = ckpt.CheckpointManager(tmp_path, keep_last=3, accelerator=FakeAccelerator(), is_main=True)
    p = m.save(1, {"step": 1}, "model: {}\n")
    listed = json.loads((p / ckpt.MANIFEST_NAME).read_text())["files"]
    assert sorted(listed) == ["config.yaml", "model.safetensors", "trainer_state.json"]
    assert listed["model.safetensors"]["size"] == len(b"weights")
    assert ckpt.verify(p) is None
    (p / "model.safetensors").write_bytes(b"weightz")  # same size, one byte changed
    assert "model.safetensors does not match its sha256" in ckpt.verify(p)
    (p / "model.safetensors").write_bytes(b"weight")
    assert "model.safetensors has 6 bytes, its manifest says 7" in ckpt.verify(p)
    (p / "model.safetensors").unlink()
    assert ckpt.verify(p) == "model.safetensors is missing"
    (p / "model.safetensors").write_bytes(b"weights")
    (p / "custom_checkpoint_9.pkl").write_bytes(b"planted")
    assert ckpt.verify(p) == "custom_checkpoint_9.pkl is not in its manifest"
    (p / ckpt.MANIFEST_NAME).write_text("{not json")
    assert "manifest.json is unreadable" in ckpt.verify(p)
    (p / ckpt.MANIFEST_NAME).unlink()
    assert ckpt.verify(p) == "no manifest.json"
    # a checkpoint from before manifests (its trainer state names none) resumes unverified, with a note
    state = json.loads((p / ckpt.STATE_NAME).read_text())
    (p / ckpt.STATE_NAME).write_text(json.dumps({k: v for k, v in state.items() if k != "manifest"}))
    assert ckpt.verify(p).startswith("model.safetensors does not read (")  # not safetensors: the header tells
    save_file({"w": torch.zeros(64)}, str(p / "model.safetensors"))
    assert ckpt.verify(p) is None
    said = []
    assert ckpt.resolve(tmp_path, "latest", say=said.append) == p
    assert len(said) == 1 and "has no manifest.json (written before checkpoints had one)" in said[0]
    whole = (p / "model.safetensors").read_bytes()
    (p / "model.safetensors").write_bytes(whole[:-8])  # truncated: the header promises more than is there
    assert ckpt.verify(p).startswith("model.safetensors does not read (")
    (p / ckpt.STATE_NAME).write_text('{"step": 1')
    assert ckpt.verify(p) == "no manifest.json, and trainer_state.json is unreadable (JSONDecodeError)"


def test_latest_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path):
    make(tmp_path, 10)
    s20 = make(tmp_path, 20)
    s30 = make(tmp_path, 30)
    (tmp_path / "latest").write_text("checkpoints/step_30\n")
    (s30 / "model.safetensors").write_bytes(b"weights 31")
    said = []
    assert ckpt.resolve(tmp_path, "latest", say=said.append) == s20
    assert said == ["note: step_30 fails verification (model.safetensors does not match its sha256 (corrupted on disk "
                    "or edited)): resuming from step_20, the newest checkpoint that verifies"]
    with pytest.raises(ckpt.ResumeError, match=r"^--resume .*step_30: the checkpoint fails verification \(model"):
        ckpt.resolve(tmp_path, str(s30))
    for p in (tmp_path / "checkpoints").iterdir():
        (p / ckpt.MANIFEST_NAME).unlink()
    with pytest.raises(ckpt.ResumeError, match="no checkpoint in .* verifies: step_30 fails verification .no manifest"):
        ckpt.resolve(tmp_path, "latest")


def test_latest_without_checkpoints_is_an_error_not_a_fresh_start(tmp_path):
    import shutil

    make(tmp_path, 10)
    (tmp_path / "latest").write_text("checkpoints/step_10\n")
    shutil.rmtree(tmp_path / "checkpoints")
    with pytest.raises(ckpt.ResumeError, match="names 'checkpoints/step_10' but .* holds no complete checkpoint"):
        ckpt.resolve(tmp_path, "latest")
    (tmp_path / "latest").unlink()
    assert ckpt.resolve(tmp_path, "latest") is None  # a run that never checkpointed starts fresh


def test_two_writers_never_share_a_temporary_folder(tmp_path):
    a, b = FakeAccelerator(), FakeAccelerator()
    ckpt.CheckpointManager(tmp_path, 3, a, True, tag="111-aaaa").save(4, {"step": 4}, "")
    ckpt.CheckpointManager(tmp_path, 3, b, True, tag="222-bbbb").save(4, {"step": 4}, "")
    assert a.saves[0].endswith(".tmp-step_4.111-aaaa") and b.saves[0].endswith(".tmp-step_4.222-bbbb")


class FullDisk(FakeAccelerator):
    """save_state writes part of a file, then the disk is full."""

    def save_state(self, path):
        from pathlib import Path

        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "optimizer.bin").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["save_state", "manifest"])
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where):
    m = ckpt.CheckpointManager(tmp_path, keep_last=1, accelerator=FakeAccelerator(), is_main=True, tag="1-ab")
    s1 = m.save(1, {"step": 1}, "")
    if where == "save_state":
        m.accelerator = FullDisk()
    else:
        def full(folder):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(ckpt, "write_manifest", full)
    with pytest.raises(ckpt.CheckpointError) as e:
        m.save(2, {"step": 2}, "")
    assert str(e.value) == (f"could not write checkpoint step_2 in {tmp_path / 'checkpoints'}: no space left on "
                            "device (ENOSPC); the previous checkpoint step_1 is intact")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_1"]  # partial folder removed
    assert ckpt.resolve(tmp_path, "latest") == s1 and ckpt.verify(s1) is None
    assert (tmp_path / "latest").read_text().strip() == "checkpoints/step_1"


def test_a_bug_during_a_save_is_not_dressed_up_as_a_full_disk(tmp_path):
    class Buggy(FakeAccelerator):
        def save_state(self, path):
            raise KeyError("model_3")

    with pytest.raises(KeyError):
        ckpt.CheckpointManager(tmp_path, 1, Buggy(), True).save(1, {"step": 1}, "")


@pytest.mark.parametrize("state, says", [("[]", "not a trainer state written by vae-harness"),
                                         ("{}", "not a trainer state written by vae-harness"),
                                         ('{"step": "twelve"}', "not a trainer state written by vae-harness"),
                                         ("{", "cannot read the trainer state"),
                                         (None, "cannot read the trainer state (No such file or directory)")])
def test_a_trainer_state_that_is_not_ours_is_one_line(tmp_path, state, says):
    """A checkpoint whose manifest verifies may still hold someone else's files (regenerated by hand)."""
    if state is not None:
        (tmp_path / ckpt.STATE_NAME).write_text(state)
    with pytest.raises(ckpt.ResumeError, match=re.escape(says)):
        ckpt.read_state(tmp_path)
    (tmp_path / ckpt.CONFIG_NAME).write_text("[1, 2]\n")
    with pytest.raises(ckpt.ResumeError, match="config.yaml: not a config mapping"):
        ckpt.read_config(tmp_path)


def test_a_pruned_step_that_is_a_link_is_unlinked_not_left_as_trash(tmp_path):
    """A step_N that links to another run's checkpoint: pruning renamed the link to .trash-* and rmtree
    refused it, so it stayed, noted again at every start. The link goes; what it points to stays."""
    other = tmp_path / "other"
    ckpt.CheckpointManager(other, keep_last=3, accelerator=FakeAccelerator(), is_main=True).save(1, {"step": 1}, "")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints/step_1").symlink_to(other / "checkpoints/step_1")
    (run / "checkpoints/.trash-step_0.1-ab").symlink_to(other / "checkpoints/step_1")  # left by an older prune
    m = ckpt.CheckpointManager(run, keep_last=1, accelerator=FakeAccelerator(), is_main=True)
    m.clean_stale()
    m.save(2, {"step": 2}, "")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2"]
    assert ckpt.read_state(other / "checkpoints/step_1")["step"] == 1
