"""The loss recipe given what a user may get wrong: weights that leave nothing to learn, LPIPS on images
VGG16 cannot pool, LPIPS files that load but are not LPIPS's, a folder where a file was asked for, a
discriminator too deep for the images (refused before the run folder exists), and latent-diffusion's
clamp of the adaptive weight in this harness's scale."""

from pathlib import Path

import pytest
import torch
from shardgen import make_shards

from harness.config import ConfigError, load_config
from models.lpips import LPIPS
from models.weights import WeightsNotFoundError, find_weights, read_state_dict

CONFIG = Path(__file__).resolve().parent / "configs/tiny.yaml"


def cfg_with(*overrides):
    return load_config([CONFIG], ["data.train=x", "run.dir=r", *overrides])


@pytest.mark.parametrize("overrides, says", [
    (["loss.recon_weight=0", "loss.kl_weight=0"], r"^loss: no term compares the reconstruction with the input"),
    (["loss.recon_weight=0", "loss.tv_weight=1", "loss.sparsity_weight=1"], r"^loss: no term compares"),
    (["loss.recon_weight=0", "loss.ssim_weight=1", "loss.learned_logvar=true"],
     r"^loss\.learned_logvar: its NLL reads recon \+ perceptual.*fall without bound"),
    (["loss.recon_weight=0", "loss.ssim_weight=1", "loss.disc_weight=0.5"],
     r"^loss\.disc_adaptive: the adaptive weight .* would be 0"),
    (["loss.learned_logvar=true", "loss.logvar_init=-200"], r"^loss\.logvar_init: "),
    (["loss.perceptual_weight=0.1", "loss.perceptual=lpips", "data.image_size=8", "model.ch_mult=[1]"],
     r"^loss\.perceptual=lpips: LPIPS\(vgg\) needs images of at least 16 px a side \(data\.image_size=8\)"),
    (["eval.lpips=true", "eval.every_steps=5", "data.val=v", "data.image_size=8", "model.ch_mult=[1]"],
     r"^eval\.lpips: LPIPS\(vgg\) needs images of at least 16 px"),
])
def test_weights_that_cannot_train_are_refused_in_one_line(overrides, says):
    with pytest.raises(ConfigError, match=says) as e:
        cfg_with(*overrides)
    assert "\n" not in str(e.value)


def test_weights_that_can_train_pass():
    cfg_with("loss.recon_weight=0", "loss.ssim_weight=1")  # SSIM alone compares the images
    cfg_with("loss.recon_weight=0", "loss.ssim_weight=1", "loss.disc_weight=0.5", "loss.disc_adaptive=false")
    cfg_with("loss.learned_logvar=true", "loss.logvar_init=-5")
    cfg_with("eval.lpips=true", "data.image_size=8", "model.ch_mult=[1]")  # no validation runs: nothing measured
    # a stored config describes weights to load, not a run to train
    from harness.config import Config

    stored = cfg_with()
    stored.loss.recon_weight = 0.0
    Config.validate(stored, training=False)


def test_lpips_on_images_vgg16_cannot_pool_is_one_line():
    net = LPIPS()
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"^LPIPS: images of 8x8 px are too small.*at least 16 px"):
        net(x, x)
    assert net(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16)).shape == (1,)


def test_lpips_heads_must_be_non_negative_floats(tmp_path):
    net = LPIPS()
    heads = {k: v.abs() + 0.1 for k, v in net.state_dict().items() if k.startswith("lin")}
    net.load_lin_state(heads)
    negated = {k: -v for k, v in heads.items()}
    with pytest.raises(WeightsNotFoundError, match=r"lin0\.model\.1\.weight has negative weights"):
        net.load_lin_state(negated)
    ints = {k: v.long() for k, v in heads.items()}
    with pytest.raises(WeightsNotFoundError, match=r"holds int64 values, not floating-point weights"):
        net.load_lin_state(ints)


def test_a_crafted_pickle_is_named_without_terminal_codes(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    path = tmp_path / "vgg.pth"
    torch.save({"features.0.weight": Evil()}, path)
    with pytest.raises(WeightsNotFoundError) as e:
        read_state_dict("LPIPS VGG16 weights", path)
    text = str(e.value)
    assert "\x1b" not in text and "\n" not in text and "refused" in text and "print" in text, text


def test_a_folder_for_a_weights_file(tmp_path):
    (tmp_path / "w.pth").write_bytes(b"x")
    assert find_weights("W", tmp_path, "w.pth") == tmp_path / "w.pth"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsNotFoundError, match=r"empty: a folder, and it holds no w\.pth; give the file"):
        find_weights("W", empty, "w.pth")


def test_a_run_folder_for_the_perception_net(tmp_path):
    from harness.perception_file import PerceptionFileError, perception_path

    with pytest.raises(PerceptionFileError, match="a folder, and it holds no perception.safetensors"):
        perception_path(tmp_path)
    (tmp_path / "perception.safetensors").write_bytes(b"")
    assert perception_path(tmp_path) == tmp_path / "perception.safetensors"


def test_adaptive_weight_is_clamped_at_disc_adaptive_max():
    from harness.discriminator import DiscriminatorHook

    hook = object.__new__(DiscriminatorHook)
    hook.ae_scaler = None
    hook.last_layer = torch.nn.Parameter(torch.ones(3))
    rec, g = (hook.last_layer * 100).sum(), (hook.last_layer * 1).sum()  # gradient norms 100*sqrt3 and sqrt3
    hook.cfg = cfg_with().loss
    assert hook.cfg.disc_adaptive_max == 1e4
    assert float(hook.adaptive_weight(rec, g)) == pytest.approx(100, rel=1e-3)
    hook.cfg = cfg_with("loss.disc_adaptive_max=0.05086").loss
    assert float(hook.adaptive_weight(rec, g)) == pytest.approx(0.05086)
    ldm = load_config([Path(__file__).resolve().parents[1] / "launch/configs/recipe_ldm.yaml"], ["data.train=x"])
    c, size = ldm.model.out_ch, ldm.data.image_size  # latent-diffusion's 1e4, divided by its sum over pixels
    assert ldm.loss.disc_adaptive_max == pytest.approx(1e4 / (c * size * size), rel=1e-3)
    assert not ldm.loss.learned_logvar  # latent-diffusion's optimizer never gets its logvar: it stays 0


def test_a_discriminator_too_deep_is_refused_before_the_run_folder(tmp_path, capsys):
    from launch.train import main

    shards = make_shards(tmp_path / "shards", num_samples=8, per_shard=8, size=16)
    run = tmp_path / "run"
    rc = main(["--config", str(CONFIG), f"data.train={shards}", f"run.dir={run}", "data.image_size=16",
               "loss.disc_weight=0.5", "loss.disc_layers=5", "loss.disc_channels=8"])
    assert rc == 2
    assert "loss.disc_layers: 5 layers do not fit 16px images" in capsys.readouterr().err
    assert not run.exists(), sorted(p.name for p in run.iterdir())
