"""Every model kind trains a few steps through launch/train.py, with its grids and checkpoint."""

from pathlib import Path

import pytest

from harness import checkpoint as ckpt
from launch.train import main
from shards.__main__ import main as shards_main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "launch/configs"
FAST = ["train.batch_size=2", "train.max_steps=3", "log.every_steps=1", "log.images_every_steps=3", "log.num_images=4",
        "log.progress=false", "checkpoint.every_steps=3", "data.num_workers=0", "data.shuffle_buffer=8"]
SMALL_LDM = ["model.ch=32", "model.num_res_blocks=1", "model.ch_mult=[1,2]", "data.image_size=32"]

KINDS = {
    "kl_f8": ("kl_f8.yaml", SMALL_LDM + ["model.attn_resolutions=[16]"]),
    "spec_basic": ("spec_basic.yaml", ["data.image_size=32"]),
    "fc_latent": ("fc_latent.yaml", []),
    "conv4": ("conv4.yaml", []),
    "cond_demo": ("cond_demo.yaml", ["model.ch_mult=[1,2]", "data.image_size=32"]),
    "vq": ("vq.yaml", SMALL_LDM + ["model.vq_codebook_size=64"]),
    "fsq": ("fsq.yaml", SMALL_LDM),
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    assert shards_main(["demo", str(out), "--num-samples", "24", "--image-size", "64", "--shard-size", "8",
                        "--quiet"]) == 0
    return out


# spec_basic and fc_latent are the slowest kinds here (a wide spec net, a dense latent): in the slow set
@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) if k in ("spec_basic", "fc_latent") else k
                                  for k in KINDS])
def test_kind_trains_through_launch_train(kind, demo, tmp_path):
    config, extra = KINDS[kind]
    run = tmp_path / kind
    code = main(["--config", str(CONFIGS / config), f"data.train={demo}", f"run.dir={run}", *FAST, *extra])
    assert code == 0
    assert ckpt.read_state(ckpt.resolve(run, "latest"))["step"] == 3
    grids = {p.name.rsplit("_step", 1)[0] for p in (run / "samples").glob("*.png")}
    assert {"reconstruction", "interpolation"} <= grids
    assert ("prior_samples" in grids) == (kind not in ("vq", "fsq"))  # no learned prior for codes yet
    assert ("class_samples" in grids) == (kind == "cond_demo")
    log = (run / "train.log").read_text()
    if kind == "vq":
        assert "model/perplexity=" in log and "model/codes_used=" in log and "loss/vq=" in log
    if kind in ("kl_f8", "cond_demo"):
        assert "loss/kl=" in log


def test_multilabel_condition_on_demo_attributes(demo, tmp_path):
    """The demo's json.labels (multi-hot attributes) condition a model like COCO's 80 categories."""
    import json

    labels = json.loads((demo / "index.json").read_text())["label_names"]
    run = tmp_path / "ml"
    args = ["--config", str(CONFIGS / "cond_demo.yaml"), f"data.train={demo}", f"run.dir={run}", *FAST,
            "model.ch_mult=[1,2]", "data.image_size=32", "model.condition=multilabel"]
    assert main(args + ["model.num_classes=3"]) == 2  # the label count must match the shards
    assert main(args + [f"model.num_classes={len(labels)}"]) == 0
    assert any((run / "samples").glob("class_samples_*.png"))


def test_sample_script_modes(demo, tmp_path, capsys):
    """launch/sample.py on a trained conditional run: every mode writes a grid of the right shape."""
    from PIL import Image

    from launch.sample import main as sample_main

    run = tmp_path / "cond"
    assert main(["--config", str(CONFIGS / "cond_demo.yaml"), f"data.train={demo}", f"run.dir={run}", *FAST,
                 "model.ch_mult=[1,2]", "data.image_size=32", "train.ema_decay=0.9"]) == 0
    pad = 2  # make_grid pads every image by 2 on each side
    cell = 32 + 2 * pad
    expect = {"sample": (4 * cell, cell), "reconstruct": (4 * cell, 2 * cell),
              "interpolate": (5 * cell, 2 * cell), "classes": (4 * cell, 3 * cell)}
    for mode, size in expect.items():
        out = tmp_path / f"{mode}.png"
        args = [str(run), mode, "--out", str(out), "--n", "4", "--rows", "2" if mode != "classes" else "3",
                "--steps", "5", "--data", str(demo), "--device", "cpu"]
        assert sample_main(args + (["--ema"] if mode == "sample" else [])) == 0
        assert Image.open(out).size == size, mode
    assert sample_main([str(run), "sample", "--cls", "3", "--out", str(tmp_path / "c3.png"), "--device", "cpu"]) == 0
    assert sample_main([str(tmp_path / "nope"), "sample"]) == 2
    # more rows than there are (classes, pairs of the 24 demo images): all there are, and a note that says so
    capsys.readouterr()
    out = tmp_path / "more.png"
    assert sample_main([str(run), "classes", "--rows", "12", "--n", "2", "--out", str(out), "--device", "cpu"]) == 0
    assert Image.open(out).size == (2 * cell, 10 * cell)
    assert "--rows 12: the model has model.num_classes=10, one row each" in capsys.readouterr().err
    assert sample_main([str(run), "interpolate", "--rows", "13", "--steps", "2", "--data", str(demo), "--out", str(out),
                        "--device", "cpu"]) == 0
    assert Image.open(out).size == (2 * cell, 12 * cell)
    assert "the data held 24 readable images, enough for 12 pairs" in capsys.readouterr().err
    assert sample_main([str(run), "reconstruct", "--n", "30", "--data", str(demo), "--out", str(out),
                        "--device", "cpu"]) == 0
    assert "--n 30: the data held 24 readable images, all shown" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["kl_f8", "vq"])
def test_evaluate_script(kind, demo, tmp_path):
    """launch/evaluate.py reads every held-out sample once and reports recon metrics (+ codebook use)."""
    import json

    from launch.evaluate import main as evaluate_main

    config, extra = KINDS[kind]
    run = tmp_path / kind
    assert main(["--config", str(CONFIGS / config), f"data.train={demo}", f"run.dir={run}", *FAST, *extra]) == 0
    out = tmp_path / "eval.json"
    assert evaluate_main([str(run), "--data", str(demo), "--batch-size", "5", "--workers", "2", "--json", str(out),
                          "--device", "cpu"]) == 0
    r = json.loads(out.read_text())
    assert r["samples"] == 24 and r["bad_samples"] == 0  # every sample once, over 3 shards and 2 workers
    assert 5 < r["psnr"] < 60 and -1 <= r["ssim"] <= 1 and r["l1"] > 0
    if kind == "vq":
        assert 1 <= r["codebook_perplexity"] <= 64 and 0 < r["codebook_used"] <= 1
    else:
        assert r["kl"] >= 0
    assert evaluate_main([str(run), "--device", "cpu"]) == 2  # no data.val and no --data: one line, exit 2
