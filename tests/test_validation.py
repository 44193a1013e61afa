"""Validation during training (eval.every_steps) and `checkpoints/best`; the metrics are those of
launch/evaluate.py (harness/evaluation.py is the code both run)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch
from shardgen import make_shards
from test_train import ROOT, args, logged, spawn, wait_for

from harness import checkpoint as ckpt
from harness.data import eval_batches
from harness.evaluation import Evaluator
from launch.evaluate import main as evaluate_main
from launch.train import main
from models.registry import build_model

VAL = ["eval.every_steps=2", "eval.samples=24", "eval.batch_size=5", "checkpoint.every_steps=2",
       "checkpoint.keep_last=1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), num_samples=96, per_shard=12, size=40)


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("val"), num_samples=30, per_shard=10, size=40)


@pytest.fixture(scope="module")
def config():
    return ROOT / "tests/configs/tiny.yaml"


def test_validation_equals_evaluate_and_keeps_the_best_step(config, shards, val, tmp_path):
    run = tmp_path / "run"
    assert main(args(config, shards, run, f"data.val={val}", "train.max_steps=6", *VAL)) == 0
    psnr = logged(run, "val/psnr")
    assert len(psnr) == 3 and len(logged(run, "val/ssim")) == 3 and logged(run, "val/samples") == [24.0] * 3
    best_step = 2 * (1 + max(range(3), key=lambda i: psnr[i]))
    best = run / "checkpoints" / "best"
    assert best.is_symlink() and os.readlink(best) == f"best-step_{best_step}" and ckpt.is_complete(best)
    state = ckpt.read_state(best)
    assert state["step"] == best_step and state["best"]["step"] == best_step and state["best"]["metric"] == "psnr"
    assert state["best"]["value"] == pytest.approx(max(psnr), rel=1e-9)
    # keep_last=1 pruned every step_N but the last; the best copy stays whole
    assert [p.name for _, p in ckpt.list_checkpoints(run)] == ["step_6"]
    out = tmp_path / "eval.json"
    assert evaluate_main([str(best), "--data", str(val), "--max-samples", "24", "--batch-size", "5",
                          "--workers", "0", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["samples"] == 24 and result["psnr"] == pytest.approx(max(psnr), abs=1e-6)
    assert result["ssim"] == pytest.approx(logged(run, "val/ssim")[best_step // 2 - 1], abs=1e-6)


def noise_shards(out: Path, n: int = 30) -> Path:
    """Held-out images of pure noise: far harder to reconstruct than the smooth training images."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    from shards.index import write_index

    out.mkdir(parents=True)
    with wds.TarWriter(str(out / "000000.tar")) as w:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
            w.write({"__key__": f"n{i:05d}", "png": buf.getvalue(), "cls": "0"})
    write_index(out, source={"kind": "test"}, shards=[{"name": "000000.tar", "num_samples": n,
                                                       "bytes": (out / "000000.tar").stat().st_size}], classes=["c0"])
    return out


def test_best_survives_resume_and_is_only_replaced_by_a_better_step(config, shards, val, tmp_path):
    run = tmp_path / "run"
    common = [f"data.val={val}", *VAL, "eval.best_metric=ssim"]
    assert main(args(config, shards, run, "train.max_steps=4", *common)) == 0
    before = ckpt.read_state(run / "checkpoints" / "best")["best"]
    assert before["step"] in (2, 4)
    # resumed on the same held-out images: the best before the resume is the yardstick after it
    assert main(args(config, shards, run, "train.max_steps=8", *common, "--resume", "latest")) == 0
    ssim = logged(run, "val/ssim")
    assert len(ssim) == 4 and before["value"] == pytest.approx(max(ssim[:2]), rel=1e-9)
    best = ckpt.read_state(run / "checkpoints" / "best")["best"]
    steps = [2, 4, 6, 8]
    first = max(range(4), key=lambda i: (ssim[i], -i))  # the first of the highest: an equal one is no better
    assert best["step"] == steps[first] and best["value"] == pytest.approx(ssim[first], rel=1e-9)
    assert ckpt.read_state(ckpt.resolve(run, "latest"))["best"] == best
    if first < 2:
        assert best == before  # never replaced by a later, worse step
    assert "measured otherwise" not in (run / "train.log").read_text()

@pytest.mark.slow
def test_kill_9_while_replacing_best_keeps_the_old_best(config, shards, val, tmp_path):
    run = tmp_path / "run"
    root = run / "checkpoints"
    assert main(args(config, shards, run, f"data.val={val}", *VAL, "train.max_steps=2")) == 0
    assert os.readlink(root / "best") == "best-step_2"
    # early in training the next validation is better: hold its copy before the link moves, kill -9
    proc = spawn(config, shards, run, f"data.val={val}", *VAL, "train.max_steps=100000", "--resume", "latest",
                 env={"HARNESS_CRASH_TEST_PAUSE": "best:30"})
    wait_for(lambda: (root / "best-step_4").is_dir(), proc)
    proc.kill()
    proc.wait()
    assert os.readlink(root / "best") == "best-step_2" and ckpt.is_complete(root / "best")
    assert ckpt.read_state(root / "best")["step"] == 2
    # the resumed state (step_4) counts step 4 as best: start-up points `best` at its complete copy
    assert main(args(config, shards, run, f"data.val={val}", *VAL, "train.max_steps=6", "--resume", "latest")) == 0
    best = ckpt.read_state(root / "best")["best"]
    assert best["step"] >= 4 and os.readlink(root / "best") == f"best-step_{best['step']}"
    assert ckpt.is_complete(root / "best") and not list(root.glob(".tmp-*"))
    assert sorted(p.name for p in root.glob("best-step_*")) == [os.readlink(root / "best")]


def test_ranks_share_the_samples_and_their_sums_equal_one_process(val):
    torch.manual_seed(0)
    from harness.config import ModelConfig

    model = build_model(ModelConfig(ch=16, ch_mult=[1, 2], num_res_blocks=1, norm_groups=8, attn_type="none")).eval()

    def measure(rank: int, world: int) -> Evaluator:
        loader, _ = eval_batches(str(val), image_size=32, batch_size=4, max_samples=17, rank=rank, world_size=world)
        ev = Evaluator(device="cpu", class_names=["c0", "c1", "c2", "c3"])
        keys = []
        for batch in loader:
            keys += list(batch["key"])
            ev.update(model, batch, None)
        return ev, keys

    whole, keys = measure(0, 1)
    (a, ka), (b, kb) = measure(0, 2), measure(1, 2)
    assert sorted(ka + kb) == sorted(keys) and not set(ka) & set(kb) and len(keys) == 17
    one = whole.result()
    a.n, a.bad = a.n + b.n, a.bad + b.bad
    for k in a.sums:
        a.sums[k] += b.sums[k]
    for k in a.model_terms:
        a.model_terms[k] += b.model_terms[k]
    two = a.result()
    assert two.keys() == one.keys()
    for k, v in one.items():
        assert two[k] == pytest.approx(v, rel=1e-6), k  # per-image values are float32 (batching differs)


def test_per_class_psnr_of_a_class_conditional_model(val):
    from harness.config import ModelConfig

    torch.manual_seed(0)
    model = build_model(ModelConfig(ch=16, ch_mult=[1, 2], num_res_blocks=1, norm_groups=8, attn_type="none",
                                    condition="class", num_classes=4)).eval()
    loader, sources = eval_batches(str(val), image_size=32, batch_size=4, max_samples=12)
    ev = Evaluator(device="cpu", class_names=sources[0].classes)
    for batch in loader:
        ev.update(model, batch, "cls")
    r = ev.result()
    per_class = {k: v for k, v in r.items() if k.startswith("psnr_class/")}
    assert set(per_class) == {f"psnr_class/c{i}" for i in range(4)}  # 12 samples, cls = i % 4
    assert sum(per_class.values()) / 4 == pytest.approx(r["psnr"], rel=1e-9)  # 3 samples per class
    assert all(math.isfinite(v) for v in per_class.values())


def test_validation_without_held_out_shards_or_with_an_unknown_metric_is_one_line(config, shards, val, tmp_path,
                                                                                    capsys):
    assert main(args(config, shards, tmp_path / "a", "eval.every_steps=2")) == 2
    assert main(args(config, shards, tmp_path / "b", f"data.val={val}", "eval.every_steps=2",
                     "eval.best_metric=rfid")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 2 and "data.val" in err[0] and "eval.best_metric" in err[1] and "rfid" in err[1]
    assert not (tmp_path / "b").exists()  # refused before the run folder is made: no lock, no empty train.log
    assert main(args(config, shards, tmp_path / "c", f"data.val={val}", "eval.every_steps=2",
                     f"eval.fid_weights={tmp_path / 'pt_inception.pth'}")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "FID Inception weights" in err[0] and "no such file" in err[0], err
    assert not (tmp_path / "c").exists()


def test_held_out_shards_with_nothing_readable_say_so_and_keep_no_best(config, shards, tmp_path):
    from shardgen import _write_shards

    from shards.index import write_index

    empty = tmp_path / "bad_val"
    shard = _write_shards(empty, 4, 4, lambda i: {"__key__": f"b{i}", "jpg": b"not a jpeg", "cls": "0"})
    write_index(empty, source={"kind": "test"}, shards=shard, classes=["a"])
    run = tmp_path / "run"
    assert main(args(config, shards, run, f"data.val={empty}", "eval.every_steps=2", "train.max_steps=4")) == 0
    log = (run / "train.log").read_text()
    assert log.count("gave no readable sample (bad or empty shards); nothing measured, no best") == 2
    assert "on 0 samples" not in log and not (run / "checkpoints/best").exists()


@pytest.mark.slow
def test_two_process_validation_equals_one_process(config, shards, val, tmp_path):
    """The same weights (lr 1e-12: one step changes nothing measurable) validated by 1 and 2 ranks."""
    from test_multiproc import accelerate_launch

    common = [f"data.val={val}", "eval.every_steps=1", "eval.samples=23", "eval.batch_size=4", "train.max_steps=1",
              "optim.lr=1e-12", "optim.warmup_steps=0", "checkpoint.every_steps=0", "model.dropout=0"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(args(config, shards, one, *common)) == 0
    r = accelerate_launch(ROOT / "launch/train.py", *args(config, shards, two, *common))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in (two / "train.log").read_text()
    for key in ("val/psnr", "val/ssim", "val/l1", "val/mse", "val/kl", "val/samples"):
        assert logged(two, key) == pytest.approx(logged(one, key), rel=1e-6), key
    assert logged(two, "val/samples") == [23.0]


@pytest.mark.slow
def test_a_stop_signal_cuts_validation_short_and_the_resumed_run_validates_that_step_first(config, shards, val,
                                                                                          tmp_path):
    """A big data.val can outlast SLURM's warning before the kill: the signal used to wait for the whole
    validation (and then one more step) before the checkpoint. Now the validation stops at the next batch,
    the checkpoint of that step owes it, and the resumed run validates that step before training on; a
    signal during that one again keeps the checkpoint as it is."""
    import re
    import signal

    run = tmp_path / "run"
    common = [f"data.val={val}", "eval.every_steps=2", "eval.samples=12", "eval.batch_size=2", "log.every_steps=1",
              "checkpoint.every_steps=0", "log.images_every_steps=0", "train.max_steps=4"]
    log = run / "train.log"

    def stopped_while_validating(said, *extra):
        proc = spawn(config, shards, run, *common, *extra, env={"HARNESS_CRASH_TEST_PAUSE": "validating:0.5"})
        wait_for(lambda: log.exists() and re.search(said, log.read_text(), re.M), proc)  # 6 batches of 0.5 s
        time.sleep(0.7)
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 75, out
        return out

    stopped_while_validating(r"^.*\bstep 2 loss")  # held in the validation of step 2
    text = log.read_text()
    assert "validation at step 2 stopped by the signal, nothing measured" in text
    assert "checkpoint at step 2 saved, exiting with 75" in text
    assert logged(run, "val/samples") == []
    assert (run / "preempted").read_text().startswith("SIGUSR1: checkpoint at step 2")
    assert [p.name for _, p in ckpt.list_checkpoints(run)] == ["step_2"]
    assert ckpt.read_state(run / "checkpoints/step_2")["validation_owed"] == 2

    # stopped again while validating the owed step: nothing saved, the checkpoint still owes it
    before = (run / "checkpoints/step_2/trainer_state.json").read_text()
    log.write_text("")
    stopped_while_validating("validating step 2 first", "--resume", "latest")
    assert (f"stop requested by signal: nothing saved ({run}/checkpoints/step_2 still owes step 2's validation), "
            "exiting with 75") in log.read_text()
    assert (run / "checkpoints/step_2/trainer_state.json").read_text() == before
    assert [p.name for _, p in ckpt.list_checkpoints(run)] == ["step_2"]

    # validated first, step 2 saved again owing nothing; then trained on, and stopped in step 4's validation
    log.write_text("")
    stopped_while_validating(r"^.*\bstep 4 loss", "--resume", "latest")
    assert logged(run, "val/samples") == [12.0]  # step 2 (owed)
    assert re.search(r"^.*val step 2 ", log.read_text(), re.M) and "nothing measured" in log.read_text()
    state = ckpt.read_state(run / "checkpoints/step_2")
    assert state["validation_owed"] is None and state["best"]["step"] == 2
    assert ckpt.read_state(run / "checkpoints/step_4")["validation_owed"] == 4
    assert os.readlink(run / "checkpoints/best") == "best-step_2"

    # the last step's owed validation: measured, step 4 saved again naming the best as it now stands
    log.write_text("")
    assert main(args(config, shards, run, *common, "--resume", "latest")) == 0
    assert logged(run, "val/samples") == [12.0] and re.search(r"^.*val step 4 ", log.read_text(), re.M)
    state, best = ckpt.read_state(run / "checkpoints/step_4"), ckpt.read_state(run / "checkpoints/best")
    assert state["validation_owed"] is None and state["best"] == best["best"]
    assert os.readlink(run / "checkpoints/best") == f"best-step_{best['best']['step']}"
    assert not (run / "preempted").exists()
    # a later start that does not validate keeps that best (the resumed state named the old one)
    assert main(args(config, shards, run, *common[1:-1], "eval.every_steps=0", "train.max_steps=5",
                     "--resume", "latest")) == 0
    assert ckpt.read_state(run / "checkpoints/best")["best"] == best["best"]
    assert ckpt.read_state(run / "checkpoints/step_5")["best"] == best["best"]


def test_an_owed_validation_this_run_does_not_make_is_said(config, shards, val, tmp_path):
    run = tmp_path / "run"
    common = [f"data.val={val}", "eval.samples=4", "checkpoint.every_steps=2", "log.images_every_steps=0"]
    assert main(args(config, shards, run, *common, "eval.every_steps=2", "train.max_steps=2")) == 0
    state = ckpt.read_state(run / "checkpoints/step_2")
    state["validation_owed"] = 2  # as a stop in step 2's validation leaves it
    (run / "checkpoints/step_2/trainer_state.json").write_text(json.dumps(state))
    ckpt.write_manifest(run / "checkpoints/step_2")
    assert main(args(config, shards, run, *common, "eval.every_steps=3", "train.max_steps=3",
                     "--resume", "latest")) == 0
    assert ("note: the validation of step 2, which the stop that ended the last start skipped, is not run: this run "
            "does not validate at step 2 (eval.every_steps=3)") in (run / "train.log").read_text()
    assert logged(run, "val/samples") == [4.0, 4.0]  # steps 2 (the first run) and 3: not 2 again
    assert ckpt.read_state(run / "checkpoints/step_3")["validation_owed"] is None
