"""Checkpoint resolution and atomic save order (unit level; crash tests are in test_train.py)."""

import pytest

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
    if complete:
        (p / ckpt.STATE_NAME).write_text('{"step": %d}' % step)
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
    assert acc.saves[-1].endswith(".tmp-step_3")  # accelerate wrote under the temporary name
    assert ckpt.read_state(ckpt.resolve(tmp_path, "latest")) == {"step": 3}
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
