"""Loss terms (ssim, tv, sparsity, perceptual), the perception network and its training script,
and a VAE trained through launch/train.py with all of them on. The perception net is trained once
per module, on shards whose class is the dominant colour (easy: well above chance in 40 steps)."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from shardgen import make_colour_shards

from harness import losses as losses_mod
from harness import metrics
from harness.config import ConfigError, LossConfig, describe, load_config
from harness.losses import AutoencoderLoss, total_variation
from harness.perception_file import PerceptionFileError, load_distance, load_perception, save_perception
from launch.train import main as train_main
from launch.train_perception import main as perception_main
from models.base import AutoencoderOutput
from models.perception import PerceptionNet

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "launch/configs"
TINY_NET = ["--channels", "8,16,32", "--norm-groups", "4"]
FAST = ["train.batch_size=4", "train.max_steps=3", "log.every_steps=1", "log.images_every_steps=3", "log.num_images=4",
        "log.progress=false", "checkpoint.every_steps=3", "data.num_workers=0", "data.shuffle_buffer=8",
        "data.image_size=32"]


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return make_colour_shards(tmp_path_factory.mktemp("colours"), num_samples=96, per_shard=24, size=32, num_classes=3)


@pytest.fixture(scope="module")
def perception(colours, tmp_path_factory):
    """Output folder of launch/train_perception.py trained on the colour shards."""
    out = tmp_path_factory.mktemp("perception")
    code = perception_main(["--data", str(colours), "--out", str(out), "--steps", "40", "--batch-size", "8",
                            "--image-size", "32", "--num-workers", "0", "--shuffle-buffer", "32", "--log-every", "10",
                            "--eval-samples", "48", "--warmup", "5", *TINY_NET])
    assert code == 0
    return out


def images(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size // 4, size // 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def logged(run: Path, key: str) -> list[float]:
    return [float(w.split("=", 1)[1]) for line in (run / "train.log").read_text().splitlines()
            for w in line.split() if w.startswith(key + "=")]


# ---------------------------------------------------------------------------------------------
# The terms
# ---------------------------------------------------------------------------------------------


def output(x, seed=1):
    g = torch.Generator().manual_seed(seed)
    recon = (x + 0.3 * torch.randn(x.shape, generator=g)).requires_grad_(True)
    latent = torch.randn(x.shape[0], 4, 8, 8, generator=g).requires_grad_(True)
    return AutoencoderOutput(recon=recon, losses={"kl": torch.tensor(5.0)}, latent=latent)


def test_each_term_adds_its_weighted_value(perception):
    x = images()
    out = output(x)
    net = str(perception / "perception.safetensors")
    base = AutoencoderLoss(LossConfig(kl_weight=0.01, perceptual_net=net))(x, out)
    assert set(base.terms) == {"recon", "kl"}
    assert base.terms["kl"].item() == pytest.approx(0.05)
    expected = {
        "ssim": 1 - metrics.ssim(out.recon, x),
        "tv": total_variation(out.recon),
        "sparsity": out.latent.abs().mean(),
        "perceptual": load_distance(net)(out.recon, x),
    }
    for name, value in expected.items():
        assert value.item() > 0.01, name  # each term is far from zero in this case
        w = 0.5
        got = AutoencoderLoss(LossConfig(kl_weight=0.01, perceptual_net=net, **{f"{name}_weight": w}))(x, out)
        assert set(got.terms) == {"recon", "kl", name}
        assert got.terms[name].item() == pytest.approx(w * value.item(), rel=1e-5)
        assert (got.total - base.total).item() == pytest.approx(w * value.item(), rel=1e-4)
    both = AutoencoderLoss(LossConfig(kl_weight=0.01, ssim_weight=1, tv_weight=2, sparsity_weight=3))(x, out)
    assert list(both.terms) == ["recon", "ssim", "tv", "sparsity", "kl"]
    total = sum(w * expected[k].item() for k, w in (("ssim", 1), ("tv", 2), ("sparsity", 3)))
    assert (both.total - base.total).item() == pytest.approx(total, rel=1e-4)


def test_total_variation_known_values():
    stripes = torch.ones(1, 1, 4, 6)
    stripes[..., 1::2] = -1  # columns alternate: every horizontal step is 2, every vertical step 0
    assert total_variation(stripes).item() == pytest.approx(2.0)
    assert total_variation(stripes.transpose(-1, -2)).item() == pytest.approx(2.0)
    assert total_variation(torch.full((2, 3, 5, 5), 0.3)).item() == 0.0


def test_terms_with_weight_zero_are_not_computed(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("computed a term whose weight is 0")

    monkeypatch.setattr(metrics, "ssim", boom)
    monkeypatch.setattr(losses_mod, "total_variation", boom)
    x = images()
    out = AutoencoderOutput(recon=x.clone(), losses={}, latent=None)  # no latent: sparsity must not look
    loss = AutoencoderLoss(LossConfig(perceptual_net="/does/not/exist"))  # weight 0: the file is never read
    assert loss.perception is None and set(loss(x, out).terms) == {"recon"}
    with pytest.raises(ValueError, match="no latent"):
        AutoencoderLoss(LossConfig(sparsity_weight=1.0))(x, out)


def test_terms_are_documented_and_validated():
    lines = {line.split(" ")[0]: line for line in describe() if line.startswith("loss.")}
    for key in ("ssim_weight", "tv_weight", "sparsity_weight", "perceptual_weight", "perceptual_net"):
        assert f"loss.{key}" in lines and lines[f"loss.{key}"].split("  # ")[1]
    for key in ("ssim_weight", "tv_weight", "sparsity_weight", "perceptual_weight"):
        assert getattr(LossConfig(), key) == 0.0  # off by default
    with pytest.raises(ConfigError, match=r"^loss\.perceptual_net: .*perceptual_weight > 0"):
        load_config([], ["data.train=x", "loss.perceptual_weight=0.5"])
    with pytest.raises(ConfigError, match=r"^loss\.tv_weight: -1\.0 is out of range"):
        load_config([], ["data.train=x", "loss.tv_weight=-1"])


# ---------------------------------------------------------------------------------------------
# The perception network and its distance
# ---------------------------------------------------------------------------------------------


def test_perceptual_distance_is_zero_for_identical_images_and_grows_with_distortion(perception):
    dist = load_distance(perception / "perception.safetensors")
    x = images(n=4, seed=2)
    assert dist(x, x).item() == pytest.approx(0.0, abs=1e-6)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    d = [dist(x + a * noise, x).item() for a in (0.02, 0.05, 0.1, 0.2, 0.4)]
    assert all(d0 < d1 for d0, d1 in zip(d, d[1:])), d
    per_image = dist(x + 0.1 * noise, x, reduction="none")
    assert per_image.shape == (4,) and (per_image > 0).all()
    # a different image is further than a slightly noisy copy
    assert dist(images(n=4, seed=9), x).item() > d[0]


def test_gradients_reach_the_reconstruction_not_the_net(perception):
    dist = load_distance(perception / "perception.safetensors")
    x = images()
    recon = (x + 0.2).requires_grad_(True)
    dist(recon, x).backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in dist.parameters())
    dist.train()
    assert not dist.training and not dist.net.training  # stays in eval mode


def test_file_round_trip_and_refusals(tmp_path):
    torch.manual_seed(0)
    net = PerceptionNet(channels=[8, 16], num_classes=5, norm_groups=4).eval()
    path = save_perception(net, tmp_path / "p.safetensors", {"accuracy": 0.5})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.safetensors"]  # no temporary left behind
    loaded, info = load_perception(path)
    x = images(n=2, size=16)
    assert info == {"accuracy": 0.5} and loaded.arch == net.arch
    assert torch.equal(loaded(x), net(x))
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    torch.save(net.state_dict(), tmp_path / "pickle.safetensors")  # a pickle is never unpickled
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))  # safetensors, not ours
    for name, match in (("missing.safetensors", "no such file"), ("garbage.safetensors", "not a readable"),
                        ("pickle.safetensors", "not a readable"), ("other.safetensors", "not a perception network")):
        with pytest.raises(PerceptionFileError, match=match):
            load_perception(tmp_path / name)


def write_perception(path, state, arch, info="{}"):
    """A perception file written around save_perception: the metadata and weights a hand-made or
    damaged file could hold."""
    from safetensors.torch import save_file

    from harness.perception_file import FORMAT

    save_file(state, str(path), {"format": FORMAT, "arch": json.dumps(arch), "info": info})
    return path


def test_perception_file_in_another_float_precision_loads_as_fp32(tmp_path):
    torch.manual_seed(0)
    net = PerceptionNet(channels=[8, 16], num_classes=5, norm_groups=4).eval()
    x = images(n=2, size=16)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        state = {k: v.to(dtype) for k, v in net.state_dict().items()}
        path = write_perception(tmp_path / f"{dtype}.safetensors", state, {**vars(net.arch)})
        loaded, _ = load_perception(path)
        assert {p.dtype for p in loaded.state_dict().values()} == {torch.float32}
        torch.testing.assert_close(loaded(x), net(x), atol=0.05, rtol=0.05)  # used to fail: fp32 input, fp16 bias
        assert load_distance(path)(x, x.flip(0)).isfinite()


@pytest.mark.parametrize("arch, info, weights, says", [
    ({"norm_groups": 0}, "{}", None, "norm_groups must be a positive integer, got 0"),
    ({"norm_groups": 3}, "{}", None, "8 channels are not divisible into 3 GroupNorm groups"),
    ({"channels": "ab"}, "{}", None, "channels must be a non-empty list of positive integers, got 'ab'"),
    ({"channels": [8.0, 16.0]}, "{}", None, "channels must be a non-empty list of positive integers"),
    ({"channels": [-8, 16]}, "{}", None, "channels must be a non-empty list of positive integers, got [-8, 16]"),
    ({"channels": []}, "{}", None, "channels must be a non-empty list"),
    ({"num_classes": True}, "{}", None, "num_classes must be a positive integer, got True"),
    ({"in_channels": "3"}, "{}", None, "in_channels must be a positive integer"),
    ({}, "[1, 2]", None, "broken info metadata (info is a list, not a dict)"),
    ({}, '"hello"', None, "info is a str, not a dict"),
    ({}, '{"classes": 10}', None, "info 'classes' is 10, expected list"),
    ({}, '{"classes": [1, 2]}', None, "info 'classes' must be a list of class names"),
    ({}, '{"accuracy": "high"}', None, "info 'accuracy' is 'high', expected int or float"),
    ({}, '{"image_size": 3.5}', None, "info 'image_size' is 3.5, expected int"),
    ({}, "{", None, "broken info metadata"),
    ({}, "{}", lambda v: v.to(torch.int64), "is torch.int64, not floating point"),
    ({}, "{}", lambda v: v.bool(), "is torch.bool, not floating point"),
    ({}, "{}", lambda v: torch.full_like(v, float("nan")), "holds non-finite values"),
    ({}, "{}", lambda v: v.index_fill(0, torch.tensor([0]), float("inf")), "holds non-finite values"),
])
def test_perception_file_with_bad_contents_is_one_line_at_load(tmp_path, arch, info, weights, says):
    """Each of these passed the load once and failed later with a traceback: at the first forward pass
    (for eval.fd_net the first validation, mid-run) or in the trainer's start-up summary."""
    net = PerceptionNet(channels=[8, 16], num_classes=5, norm_groups=4)
    state = {k: (weights or (lambda v: v))(v).contiguous() for k, v in net.state_dict().items()}
    path = write_perception(tmp_path / "bad.safetensors", state, {**vars(net.arch), **arch}, info)
    with pytest.raises(PerceptionFileError) as e:
        load_perception(path)
    assert str(e.value).startswith(f"{path}: ") and says in str(e.value) and "\n" not in str(e.value), str(e.value)
    # the training loss (loss.perceptual_net) says it as one config line naming the key
    with pytest.raises(ConfigError, match=r"^loss\.perceptual_net: ") as e:
        losses_mod.load_perceptual(str(path))
    assert says in str(e.value) and "\n" not in str(e.value)


def test_train_perception_learns_and_writes_its_files(perception):
    meta = json.loads((perception / "perception.json").read_text())
    assert meta["classes"] == ["red", "green", "blue"] and meta["num_classes"] == 3
    assert meta["arch"] == {"in_channels": 3, "channels": [8, 16, 32], "num_classes": 3, "norm_groups": 4}
    assert meta["accuracy_on"] == "train" and meta["eval_samples"] == 48
    assert meta["accuracy"] >= 0.8 > meta["chance"] + 0.4, meta  # chance is 1/3
    loss = [float(w.split("=")[1]) for line in (perception / "train.log").read_text().splitlines()
            for w in line.split() if w.startswith("loss/total=")]
    assert len(loss) == 4 and loss[-1] < 0.7 * loss[0], loss
    with safe_open(str(perception / "perception.safetensors"), framework="pt") as f:
        stored = json.loads(f.metadata()["info"])
    assert stored["accuracy"] == meta["accuracy"]
    assert not [p for p in perception.iterdir() if p.name.endswith(".tmp")]


def test_train_perception_refuses_shards_without_classes(tmp_path, capsys):
    from shardgen import make_shards

    shards = make_shards(tmp_path / "one_class", num_samples=16, per_shard=8, size=32, num_classes=1)
    assert perception_main(["--data", str(shards), "--out", str(tmp_path / "p"), "--num-workers", "0",
                            "--batch-size", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cls" in err[0] and not (tmp_path / "p" / "perception.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# In training
# ---------------------------------------------------------------------------------------------


def test_vae_trains_with_every_term_through_launch_train(perception, colours, tmp_path):
    net = perception / "perception.safetensors"
    before = net.read_bytes()
    run = tmp_path / "run"
    code = train_main(["--config", str(CONFIGS / "perceptual_demo.yaml"), f"data.train={colours}", f"run.dir={run}",
                       *FAST, f"loss.perceptual_net={net}", "loss.ssim_weight=0.2", "loss.sparsity_weight=0.01"])
    assert code == 0
    for term in ("recon", "kl", "perceptual", "ssim", "tv", "sparsity"):
        values = logged(run, f"loss/{term}")
        assert len(values) == 3 and all(math.isfinite(v) for v in values), term
        if term != "kl":
            assert all(v > 0 for v in values), (term, values)
    total = logged(run, "loss/total")
    parts = [logged(run, f"loss/{t}") for t in ("recon", "kl", "perceptual", "ssim", "tv", "sparsity")]
    assert total[0] == pytest.approx(sum(p[0] for p in parts), rel=1e-3)
    assert "perceptual loss: frozen net" in (run / "train.log").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"loss/perceptual", "loss/ssim", "loss/tv", "loss/sparsity", "eval/grid_ssim", "eval/grid_psnr"} <= tags
    assert 0 < ea.Scalars("eval/grid_ssim")[-1].value < 1
    assert net.read_bytes() == before
    # The checkpoint holds the autoencoder only: no perception weights anywhere in model.safetensors.
    ckpt = run / "checkpoints/step_3"
    saved = load_file(ckpt / "model.safetensors")
    from harness.inference import load_config_of
    from models import build_model

    assert set(saved) == set(build_model(load_config_of(ckpt).model).state_dict())
    for p in load_file(net).values():
        assert not any(v.shape == p.shape and torch.equal(v, p) for v in saved.values())
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert len(state["loss_files"]["perceptual_net"]) == 16
    # The net is not in the checkpoint but is read again on resume; a different file is pointed out.
    other, _ = load_perception(net)
    torch.nn.init.normal_(other.head.weight)
    save_perception(other, tmp_path / "other.safetensors")
    args = ["--config", str(CONFIGS / "perceptual_demo.yaml"), f"data.train={colours}", f"run.dir={run}", *FAST,
            "train.max_steps=4", "loss.ssim_weight=0.2", "loss.sparsity_weight=0.01"]
    assert train_main([*args, f"loss.perceptual_net={tmp_path / 'other.safetensors'}", "--resume", "latest"]) == 0
    assert "note: loss.perceptual_net is not the file this run was trained with" in (run / "train.log").read_text()


def test_perception_net_stays_frozen_in_the_trainer(perception, colours, tmp_path):
    from harness.trainer import Trainer

    cfg = load_config([ROOT / "tests/configs/tiny.yaml"],
                      [f"data.train={colours}", f"run.dir={tmp_path / 'run'}", "train.max_steps=3",
                       "checkpoint.every_steps=3", "log.images_every_steps=0", "loss.perceptual_weight=1.0",
                       f"loss.perceptual_net={perception / 'perception.safetensors'}"])
    trainer = Trainer(cfg)
    dist = trainer.task.loss_fn.perception
    before = {k: v.clone() for k, v in dist.state_dict().items()}
    model_before = {k: v.clone() for k, v in trainer.engine.unwrapped().state_dict().items()}
    assert trainer.train() == 0
    assert all(not p.requires_grad and p.grad is None for p in dist.parameters())
    assert all(torch.equal(v, before[k]) for k, v in dist.state_dict().items())
    assert not dist.training
    model = trainer.engine.unwrapped()
    assert any(not torch.equal(v, model_before[k]) for k, v in model.state_dict().items())  # the VAE did train
    in_optimizer = {id(p) for g in trainer.engine.optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in dist.parameters()}
    assert in_optimizer == {id(p) for p in model.parameters()}
    saved = load_file(tmp_path / "run/checkpoints/step_3/model.safetensors")
    assert set(saved) == set(model.state_dict())


def test_missing_perception_file_is_one_line_and_exit_2(tmp_path, capsys, colours):
    run = tmp_path / "run"
    for bad in (tmp_path / "nope.safetensors", tmp_path / "garbage.safetensors"):
        if bad.name.startswith("garbage"):
            bad.write_bytes(b"not a safetensors file")
        code = train_main(["--config", str(CONFIGS / "perceptual_demo.yaml"), f"data.train={colours}",
                           f"run.dir={run}", *FAST, f"loss.perceptual_net={bad}"])
        assert code == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("error: loss.perceptual_net: ") and str(bad) in err[0], err
        assert not run.exists()  # stopped before writing anything
    assert train_main(["--config", str(CONFIGS / "perceptual_demo.yaml"), f"data.train={colours}", f"run.dir={run}",
                       "loss.perceptual_net="]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("config error: loss.perceptual_net:")


def test_spec_ssim_config_has_its_four_terms():
    cfg = load_config([CONFIGS / "spec_ssim.yaml"], ["data.train=x", "data.image_size=32"])
    assert cfg.model.arch == "spec" and cfg.loss.ssim_weight > 0 and cfg.loss.sparsity_weight > 0
    from models import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model)
    x = images(n=2, size=32)
    out = model(x)
    terms = AutoencoderLoss(cfg.loss)(x, out)
    assert set(terms.terms) == {"recon", "kl", "ssim", "sparsity"}
    terms.total.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
def test_two_processes_train_the_net_and_then_a_vae_with_it(colours, tmp_path):
    """Both entry points under `accelerate launch` with 2 CPU processes (DDP over gloo)."""
    from test_multiproc import accelerate_launch

    out = tmp_path / "perception"
    r = accelerate_launch(ROOT / "launch/train_perception.py", "--data", colours, "--out", out, "--steps", "20",
                          "--batch-size", "8", "--image-size", "32", "--num-workers", "0", "--shuffle-buffer", "32",
                          "--log-every", "10", "--eval-samples", "48", "--warmup", "5", *TINY_NET)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((out / "perception.json").read_text())
    assert meta["world_size"] == 2 and meta["accuracy"] > meta["chance"]
    assert "2 process(es)" in (out / "train.log").read_text()
    run = tmp_path / "run"
    r = accelerate_launch(ROOT / "launch/train.py", "--config", CONFIGS / "perceptual_demo.yaml",
                          f"data.train={colours}",
                          f"run.dir={run}", *FAST, f"loss.perceptual_net={out / 'perception.safetensors'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es) (MULTI_CPU" in r.stderr and len(logged(run, "loss/perceptual")) == 3
