"""`checkpoints/best` and the data mixture across resumes that change what they were measured on:
a best of an abandoned branch or a deleted copy, another data.val, a best_metric the model does not
make, another data.train mixture. Each is said in one line, never kept silently."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from shardgen import make_shards
from test_train import ROOT, args, logged
from test_validation import noise_shards

from harness import checkpoint as ckpt
from harness.config import ConfigError, load_config
from harness.resume import _warn_if_changed
from harness.validation import Validator, reference_nets
from launch.train import main

VAL = ["eval.samples=12", "eval.batch_size=4"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), num_samples=48, per_shard=12, size=40)


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("val"), num_samples=12, per_shard=12, size=40)


@pytest.fixture(scope="module")
def config():
    return ROOT / "tests/configs/tiny.yaml"


def notes(run: Path, text: str) -> list[str]:
    return [line for line in (run / "train.log").read_text().splitlines() if text in line]


# ------------------------------------------------------------------------- 4: a best no longer in the run


def test_best_of_an_abandoned_branch_is_set_aside_not_kept(config, shards, val, tmp_path):
    run, root = tmp_path / "run", tmp_path / "run/checkpoints"
    common = [f"data.val={val}", *VAL, "eval.every_steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=5"]
    assert main(args(config, shards, run, *common, "train.max_steps=6")) == 0
    assert os.readlink(root / "best") == "best-step_4" and ckpt.read_state(root / "step_2")["best"] is None
    # back to step 2, which had measured no best: step 4 is the abandoned branch's
    assert main(args(config, shards, run, *common, "train.max_steps=3", "--resume", str(root / "step_2"))) == 0
    assert not os.path.lexists(root / "best") and not (root / "best-step_4").exists()
    assert ckpt.is_complete(root / "abandoned-best-step_4")  # set aside, as abandoned-step_4 is: nothing lost
    assert ckpt.is_complete(root / "abandoned-step_4") and ckpt.read_state(root / "step_3")["best"] is None
    said = notes(run, "checkpoints/best named best-step_4")
    assert len(said) == 1 and "kept as abandoned-best-step_4" in said[0] and "at step 2" in said[0], said


def test_a_resume_without_validation_still_sets_an_abandoned_best_aside_and_carries_the_best(config, shards, val,
                                                                                              tmp_path):
    """`best` used to go on naming the abandoned branch's copy when the resumed run did not validate
    (evaluate.py, export.py and --resume .../best then read weights the run had left), and a run that did
    not validate saved checkpoints without the best (a later run with validation set a real best aside)."""
    run, root = tmp_path / "run", tmp_path / "run/checkpoints"
    common = ["checkpoint.every_steps=2", "checkpoint.keep_last=5"]
    assert main(args(config, shards, run, *common, f"data.val={val}", *VAL, "eval.every_steps=4",
                     "train.max_steps=4")) == 0
    assert os.readlink(root / "best") == "best-step_4" and ckpt.read_state(root / "step_2")["best"] is None
    assert main(args(config, shards, run, *common, "train.max_steps=3", "--resume", str(root / "step_2"))) == 0
    assert not os.path.lexists(root / "best") and ckpt.is_complete(root / "abandoned-best-step_4")
    assert len(notes(run, "checkpoints/best named best-step_4")) == 1

    run, root = tmp_path / "run2", tmp_path / "run2/checkpoints"
    assert main(args(config, shards, run, *common, f"data.val={val}", *VAL, "eval.every_steps=2",
                     "train.max_steps=2")) == 0
    assert main(args(config, shards, run, *common, "train.max_steps=4", "--resume", "latest")) == 0
    assert ckpt.read_state(root / "step_4")["best"]["step"] == 2  # carried by the run that did not validate
    assert os.readlink(root / "best") == "best-step_2"


def test_a_checkpoint_written_without_the_best_key_keeps_the_best_its_copy_names(config, shards, val, tmp_path):
    """Runs that did not validate used to save no "best": reconciled as "no best", a resume of such a
    checkpoint set a good best aside. The copy `best` names says what it was."""
    import json

    run, root = tmp_path / "run", tmp_path / "run/checkpoints"
    common = ["checkpoint.every_steps=2", "checkpoint.keep_last=5"]
    assert main(args(config, shards, run, *common, f"data.val={val}", *VAL, "eval.every_steps=2",
                     "train.max_steps=2")) == 0
    assert main(args(config, shards, run, *common, "train.max_steps=4", "--resume", "latest")) == 0
    state = json.loads((root / "step_4" / ckpt.STATE_NAME).read_text())
    del state["best"]  # as the code before wrote it
    (root / "step_4" / ckpt.STATE_NAME).write_text(json.dumps(state))
    ckpt.write_manifest(root / "step_4")
    assert main(args(config, shards, run, *common, "train.max_steps=6", "--resume", "latest")) == 0
    assert os.readlink(root / "best") == "best-step_2" and not (root / "abandoned-best-step_2").exists()
    assert ckpt.read_state(root / "step_6")["best"]["step"] == 2


def test_best_whose_copy_and_step_are_gone_is_dropped_and_a_new_best_can_come(config, shards, val, tmp_path):
    run, root = tmp_path / "run", tmp_path / "run/checkpoints"
    common = [f"data.val={val}", *VAL, "checkpoint.every_steps=2", "checkpoint.keep_last=1"]
    assert main(args(config, shards, run, *common, "eval.every_steps=2", "train.max_steps=2")) == 0
    # on to step 4 with no validation: step_2 is pruned, its best copy alone holds it; then deleted by hand
    assert main(args(config, shards, run, *common, "eval.every_steps=100", "train.max_steps=4", "--resume",
                     "latest")) == 0
    assert ckpt.read_state(root / "step_4")["best"]["step"] == 2 and not (root / "step_2").exists()
    for p in (root / "best-step_2").iterdir():
        p.unlink()
    (root / "best-step_2").rmdir()
    assert main(args(config, shards, run, *common, "eval.every_steps=5", "train.max_steps=5", "--resume",
                     "latest")) == 0
    said = notes(run, "is not part of this run any more")
    assert len(said) == 1 and "neither checkpoints/best-step_2 nor step_2 exists" in said[0], said
    # the dropped best is no yardstick: the validation at step 5 is the best, whatever step 2 measured
    best = ckpt.read_state(root / "best")["best"]
    assert best["step"] == 5 and os.readlink(root / "best") == "best-step_5"
    assert best["value"] == pytest.approx(logged(run, "val/psnr")[-1], rel=1e-9)


def fake_validator(tmp_path: Path, best: dict | None, **overrides) -> Validator:
    cfg = load_config([ROOT / "tests/configs/tiny.yaml"], [f"data.train={tmp_path}", f"data.val={tmp_path}",
                                                           "eval.every_steps=2",
                                                           *(f"{k}={v}" for k, v in overrides.items())])
    trainer = SimpleNamespace(cfg=cfg, device="cpu", world=SimpleNamespace(is_main=True, world_size=1))
    v = Validator(trainer, ([], None, None))
    v.best = best
    return v


def fake_checkpoint(path: Path, step: int) -> Path:
    path.mkdir(parents=True)
    (path / ckpt.STATE_NAME).write_text(json.dumps({"step": step}))
    return path


class Log(list):
    def info(self, msg: str) -> None:
        self.append(msg)


def test_reconcile_sets_aside_newer_copies_and_drops_a_best_after_the_resumed_step(tmp_path):
    root = tmp_path / "checkpoints"
    for n in (3, 5, 9):
        fake_checkpoint(root / f"best-step_{n}", n)
    fake_checkpoint(root / "abandoned-best-step_9", 9)  # an earlier branch's: kept beside
    os.symlink("best-step_9", root / "best")
    # resumed at step 6, whose state counts step 5 best: 9 is an abandoned branch's, 3 a superseded best
    v, log = fake_validator(tmp_path, {"metric": "psnr", "value": 20.0, "step": 5}), Log()
    v.reconcile(root, 6, log)
    assert os.readlink(root / "best") == "best-step_5" and v.best["step"] == 5
    assert len(log) == 1 and "best-step_9 kept as abandoned-best-step_9.2" in log[0], log  # set aside, and said
    assert sorted(p.name for p in root.iterdir()) == ["abandoned-best-step_9", "abandoned-best-step_9.2", "best",
                                                      "best-step_5"]
    # a best after the resumed step (a hand-made or another branch's state) is not kept as a yardstick
    v, log = fake_validator(tmp_path, {"metric": "psnr", "value": 20.0, "step": 5}), Log()
    v.reconcile(root, 4, log)
    assert v.best is None and not os.path.lexists(root / "best") and ckpt.is_complete(root / "abandoned-best-step_5")
    assert len(log) == 1 and "step 5 comes after the resumed step 4" in log[0] and "checkpoints/best removed" in log[0]
    # nothing best, nothing named: nothing said
    v, log = fake_validator(tmp_path, None), Log()
    v.reconcile(root, 4, log)
    assert not log


# ------------------------------------------------------------------------- 5: measured on other images


def test_a_best_measured_on_other_held_out_images_is_no_yardstick(config, shards, val, tmp_path):
    run, root = tmp_path / "run", tmp_path / "run/checkpoints"
    common = [*VAL, "eval.every_steps=2", "checkpoint.every_steps=2", "eval.best_metric=ssim"]
    assert main(args(config, shards, run, f"data.val={val}", *common, "train.max_steps=2")) == 0
    before = ckpt.read_state(root / "best")["best"]
    assert before["step"] == 2 and before["measured_on"]["data.val"] == str(val)
    # against noise every number is worse: still the first validation there is this run's best
    hard = noise_shards(tmp_path / "noise")
    assert main(args(config, shards, run, f"data.val={hard}", *common, "train.max_steps=4", "--resume",
                     "latest")) == 0
    said = notes(run, "was measured otherwise")
    assert len(said) == 1 and f"data.val {str(val)!r} -> {str(hard)!r}" in said[0], said
    after = ckpt.read_state(root / "best")["best"]
    assert after["step"] == 4 and after["value"] < before["value"] and after["measured_on"]["data.val"] == str(hard)
    assert os.readlink(root / "best") == "best-step_4"


def test_what_a_best_was_measured_on(tmp_path):
    best = {"metric": "psnr", "value": 20.0, "step": 2}
    v = fake_validator(tmp_path, best)
    v.best["measured_on"] = v.measured_on()
    assert v._changed(v.best) == []
    for key, value in (("eval.samples", 7), ("data.image_size", 64), ("eval.best_metric", "ssim")):
        assert key in " ".join(fake_validator(tmp_path, None, **{key: value})._changed(v.best)), key
    # the EMA weights are validated only with an EMA: eval.ema alone changes nothing
    assert fake_validator(tmp_path, None, **{"eval.ema": "false"})._changed(v.best) == []
    ema = fake_validator(tmp_path, None, **{"train.ema_decay": 0.9})._changed(v.best)
    assert ema == ["ema_weights False -> True"]
    # a checkpoint from before `measured_on`: taken as measured alike
    assert fake_validator(tmp_path, None)._changed({"metric": "psnr", "value": 1.0, "step": 2}) == []


# ------------------------------------------------------------------------- 7: eval.best_metric the model makes


@pytest.mark.parametrize("metric", ["vq", "klx"])
def test_a_best_metric_the_model_does_not_make_is_refused_naming_all_it_makes(config, shards, val, tmp_path, capsys,
                                                                              metric):
    run = tmp_path / "run"
    assert main(args(config, shards, run, f"data.val={val}", "eval.every_steps=2", f"eval.best_metric={metric}")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "eval.best_metric" in err[0] and repr(metric) in err[0], err
    assert "kl, l1, mse, psnr, ssim" in err[0] and not run.exists()


@pytest.mark.parametrize("kind, terms", [(["model.kind=kl"], ["kl"]), (["model.kind=vq"], ["vq"]),
                                         (["model.kind=fsq", "model.fsq_levels=[5,4,4]"], [])])
def test_the_best_metrics_are_those_the_model_kind_makes(tmp_path, kind, terms):
    """Its own terms (what val/<term> shows), asked of the model: a VQ model's vq, none for FSQ."""
    def refusal(metric: str) -> str | None:
        cfg = load_config([ROOT / "tests/configs/tiny.yaml"], [f"data.train={tmp_path}", f"data.val={tmp_path}",
                                                               "eval.every_steps=2", f"eval.best_metric={metric}",
                                                               *kind])
        try:
            reference_nets(cfg, "cpu")
        except ConfigError as e:
            return str(e)
        return None

    for term in terms:
        assert refusal(term) is None, term
    why = refusal("kl" if "vq" in terms else "vq")
    assert why is not None and why.endswith(f"choose one of {', '.join(sorted(['l1', 'mse', 'psnr', 'ssim', *terms]))} "
                                            "(or '' for none)"), why


def test_a_model_term_is_a_best_metric(config, shards, val, tmp_path):
    run = tmp_path / "run"
    assert main(args(config, shards, run, f"data.val={val}", *VAL, "eval.every_steps=2", "eval.best_metric=kl",
                     "train.max_steps=2")) == 0
    best = ckpt.read_state(run / "checkpoints/best")["best"]
    assert best["metric"] == "kl" and best["value"] == pytest.approx(logged(run, "val/kl")[0], rel=1e-9)


# ------------------------------------------------------------------------- 8: the data mixture


def test_the_mixture_is_shown_and_a_changed_one_is_said_at_resume(config, shards, tmp_path):
    other = make_shards(tmp_path / "other", num_samples=24, per_shard=12, size=40)
    run = tmp_path / "run"
    common = ["checkpoint.every_steps=0", "log.images_every_steps=0"]
    assert main(args(config, f"[{shards}::3, {other}::1]", run, *common, "train.max_steps=1")) == 0
    shown = notes(run, "data.train mixture of 2 sources")
    assert len(shown) == 1, shown
    assert f"{shards}::3 weight 3 (48 samples, 75%)" in shown[0]
    assert f"{other}::1 weight 1 (24 samples, 25%)" in shown[0]
    layout = ckpt.read_state(run / "checkpoints/step_1")["data_layout"]
    assert layout["sources"] == [{"spec": f"{shards}::3", "weight": 3.0, "samples": 48},
                                 {"spec": f"{other}::1", "weight": 1.0, "samples": 24}]
    assert main(args(config, f"[{shards}::0.01, {other}::100]", run, *common, "train.max_steps=2",
                     "--resume", "latest")) == 0
    said = notes(run, "mixture differs from the checkpoint's")
    assert len(said) == 1 and "weight 3 (48 samples, 75%)" in said[0] and "weight 100 (24 samples, 100%)" in said[0]
    # the same mixture again: nothing said
    assert main(args(config, f"[{shards}::0.01, {other}::100]", run, *common, "train.max_steps=3",
                     "--resume", "latest")) == 0
    assert len(notes(run, "mixture differs")) == 1


def test_a_checkpoint_without_the_mixture_resumes_without_a_note():
    log = Log()
    now = {"world_size": 1, "num_workers": 0, "image_size": 32, "sources": [{"spec": "a", "weight": 1.0,
                                                                             "samples": 8}]}
    trainer = SimpleNamespace(data_layout=lambda: now, log=log, task=SimpleNamespace(fingerprint=lambda: {}))
    _warn_if_changed(trainer, {"data_layout": {k: v for k, v in now.items() if k != "sources"}})
    assert log == []
    _warn_if_changed(trainer, {"data_layout": {**now, "sources": [{"spec": "a", "weight": 2.0, "samples": 8}]}})
    assert len(log) == 1 and "mixture differs" in log[0]
