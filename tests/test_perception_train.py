"""The perception network trains through the one Trainer: class labels (`model.kind: classifier`)
or none at all (`model.kind: rotnet`), with checkpoints and resume like any run."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from shardgen import make_colour_shards

from harness.perception_file import load_distance
from launch.train import main as train_main
from launch.train_perception import main as perception_main
from shards.index import write_index

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--channels", "8,16,32", "--norm-groups", "4", "--image-size", "32", "--num-workers", "0",
        "--shuffle-buffer", "32", "--eval-samples", "48", "--warmup", "5", "--batch-size", "8"]


def make_unlabelled_shards(out: Path, num_samples: int = 96, size: int = 32) -> Path:
    """Shards with no `cls` and no classes in index.json (as img2dataset writes them): a bright
    lower half under noise and a random bar, so the upright direction can be learned."""
    out.mkdir(parents=True)
    with wds.TarWriter(str(out / "000000.tar")) as w:
        for i in range(num_samples):
            rng = np.random.default_rng(i)
            arr = np.linspace(30, 220, size)[:, None, None] + rng.normal(0, 20, (size, size, 3))
            x0 = int(rng.integers(0, size - 4))
            arr[:, x0:x0 + 3] = rng.uniform(0, 255, 3)
            buf = io.BytesIO()
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
            w.write({"__key__": f"u{i:05d}", "png": buf.getvalue()})
    write_index(out, source={"kind": "test"}, shards=[{"name": "000000.tar", "num_samples": num_samples,
                                                       "bytes": (out / "000000.tar").stat().st_size}])
    return out


def test_rotation_net_trains_without_labels_and_serves_the_perceptual_loss(tmp_path):
    shards = make_unlabelled_shards(tmp_path / "unlabelled")
    out = tmp_path / "rot"
    assert perception_main(["--data", str(shards), "--labels", "rotation", "--out", str(out), "--steps", "40",
                            "--log-every", "10", "--lr", "3e-3", *TINY]) == 0
    meta = json.loads((out / "perception.json").read_text())
    assert meta["labels"] == "rotation" and meta["classes"] == ["0", "90", "180", "270"]
    assert meta["eval_samples"] == 4 * 48 and meta["chance"] == 0.25
    assert meta["accuracy"] >= 0.6, meta  # the upright direction is easy here; chance is 0.25
    dist = load_distance(out / "perception.safetensors")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert dist(x, x).item() == pytest.approx(0.0, abs=1e-6) and dist(x, x.flip(-1)).item() > 0
    assert (out / "checkpoints").is_dir() and (out / "tb").is_dir()


def test_the_autoencoder_tools_refuse_a_perception_run_in_one_line(tmp_path, capsys):
    """sample.py, evaluate.py and encode.py ended in an AttributeError traceback on a classifier run."""
    from launch.encode import main as encode_main
    from launch.evaluate import main as evaluate_main
    from launch.sample import main as sample_main

    shards = make_unlabelled_shards(tmp_path / "unlabelled", num_samples=16)
    out = tmp_path / "rot"
    assert perception_main(["--data", str(shards), "--labels", "rotation", "--out", str(out), "--steps", "2",
                            *TINY]) == 0
    capsys.readouterr()
    for tool, argv in (("sample.py", lambda: sample_main([str(out), "sample", "--out", str(tmp_path / "s.png")])),
                       ("evaluate.py", lambda: evaluate_main([str(out), "--data", str(shards)])),
                       ("encode.py", lambda: encode_main([str(out), "--data", str(shards), "--out",
                                                          str(tmp_path / "lat"), "--workers", "0"]))):
        assert argv() == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "model.kind=rotnet run is a perception network" in err[0], (tool, err)
        assert f"{tool} needs an autoencoder run" in err[0]
    assert not (tmp_path / "lat").exists()


def test_rotation_net_on_a_list_of_shard_sets_naming_classes_otherwise_loads(tmp_path):
    """--data a,b of two sets whose index.json name different classes: a rotation net reads none, so the
    run mixes them, measures its accuracy on them at the end, and its file (whose info holds the list)
    loads."""
    from shardgen import rename_classes

    a = make_colour_shards(tmp_path / "a", num_samples=24, per_shard=24, size=32, num_classes=3)
    b = make_colour_shards(tmp_path / "b", num_samples=24, per_shard=24, size=32, num_classes=3)
    rename_classes(b, ["x", "y", "z"])
    out = tmp_path / "rot"
    assert perception_main(["--data", f"{a},{b}", "--labels", "rotation", "--out", str(out), "--steps", "2",
                            "--log-every", "1", *TINY]) == 0
    assert json.loads((out / "perception.json").read_text())["data"] == [str(a), str(b)]
    load_distance(out / "perception.safetensors")


def test_classifier_run_resumes_like_any_run(tmp_path):
    shards = make_colour_shards(tmp_path / "colours", num_samples=48, per_shard=24, size=32, num_classes=3)
    run = tmp_path / "run"
    args = ["--config", str(ROOT / "launch/configs/perception.yaml"), f"data.train={shards}", f"run.dir={run}",
            "model.ch=8", "model.ch_mult=[1,2]", "model.norm_groups=4", "data.image_size=32", "train.batch_size=8",
            "train.max_steps=6", "log.every_steps=1", "log.eval_samples=16", "data.num_workers=0",
            "data.shuffle_buffer=8", "log.progress=false", "checkpoint.every_steps=3"]
    assert train_main([*args, "train.stop_after_steps=3"]) == 0
    assert not (run / "perception.safetensors").exists()  # only a finished run writes the net
    assert train_main([*args, "--resume", "latest"]) == 0
    log = (run / "train.log").read_text()
    assert "resuming from" in log and "step_3" in log
    meta = json.loads((run / "perception.json").read_text())
    assert meta["steps"] == 6 and meta["classes"] == ["red", "green", "blue"] and meta["labels"] == "cls"


def test_rotation_net_refuses_a_class_count_other_than_four(tmp_path, capsys):
    shards = make_unlabelled_shards(tmp_path / "u", num_samples=16)
    code = train_main(["--config", str(ROOT / "launch/configs/perception.yaml"), "model.kind=rotnet",
                       "model.num_classes=10", f"data.train={shards}", f"run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "model.num_classes" in err[0] and "4" in err[0]


def test_a_sample_without_a_label_is_a_bad_sample_and_validation_is_refused(tmp_path, capsys):
    from shardgen import colour_image

    shards = tmp_path / "colours"
    shards.mkdir()
    entries = []
    for k in range(2):  # two shards of 10 labelled images and 2 without `cls`
        with wds.TarWriter(str(shards / f"00000{k}.tar")) as w:
            for i in range(12):
                buf = io.BytesIO()
                Image.fromarray(colour_image(i % 3, 100 * k + i)).save(buf, format="PNG")
                sample = {"__key__": f"s{k}_{i:03d}", "png": buf.getvalue()}
                if i < 10:
                    sample["cls"] = str(i % 3)
                w.write(sample)
        entries.append({"name": f"00000{k}.tar", "num_samples": 12, "bytes": (shards / f"00000{k}.tar").stat().st_size})
    write_index(shards, source={"kind": "test"}, shards=entries, classes=["red", "green", "blue"])
    base = ["--config", str(ROOT / "launch/configs/perception.yaml"), f"data.train={shards}", "model.ch=8",
            "model.ch_mult=[1,2]", "model.norm_groups=4", "data.image_size=32", "train.batch_size=8",
            "log.every_steps=1", "log.eval_samples=16", "data.num_workers=0", "data.shuffle_buffer=8",
            "log.progress=false", "checkpoint.every_steps=0"]
    run = tmp_path / "run"
    assert train_main([*base, f"run.dir={run}", "train.max_steps=6"]) == 0
    log = (run / "train.log").read_text()
    assert "bad samples skipped" in log and "cls" in log  # skipped and counted, not a crash
    assert train_main([*base, f"run.dir={tmp_path / 'v'}", f"data.val={shards}", "eval.every_steps=2"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "eval.every_steps" in err[0]


def test_the_classifier_kinds_say_why_not_deepspeed():
    from harness.config import ModelConfig
    from models.registry import deepspeed_unsupported

    for kind in ("classifier", "rotnet"):
        assert "DDP" in deepspeed_unsupported(ModelConfig(kind=kind))


@pytest.mark.parametrize("flags, says", [
    (["--steps", "0"], "error: --steps: 0 is out of range; must be >= 1"),
    (["--lr", "-1"], "error: --lr: -1.0 is out of range; must be > 0.0"),
    (["--norm-groups", "0"], "error: --norm-groups: 0 is out of range"),
])
def test_bad_flag_values_are_told_by_the_flag_not_the_config_key(tmp_path, capsys, flags, says):
    assert perception_main(["--data", str(tmp_path / "none"), "--out", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(says) and "\n" not in err, err
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit):  # a negative stage: argparse's own one line
        perception_main(["--data", "x", "--channels", "8,-16"])


def test_held_out_shards_a_classifier_cannot_read_are_named_as_data_val(tmp_path, capsys):
    from shardgen import make_shards

    train = make_shards(tmp_path / "train", num_samples=16, per_shard=8, size=32, num_classes=3)
    val = make_shards(tmp_path / "val", num_samples=8, per_shard=8, size=32, num_classes=1)
    assert train_main(["--config", str(ROOT / "launch/configs/perception.yaml"), f"data.train={train}",
                       f"data.val={val}", f"run.dir={tmp_path / 'run'}", "data.image_size=32",
                       "train.batch_size=4", "data.num_workers=0"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert err == ["error: data.val: the shards name 1 class(es) in index.json; a classifier needs `cls` labels "
                   "of at least 2 classes"], err
