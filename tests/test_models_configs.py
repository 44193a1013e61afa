"""The model configs in launch/configs/ load through the config system, build, and run."""

from pathlib import Path

import pytest
import torch

from harness.config import ConfigError, describe, load_config
from models import build_model

CONFIGS = Path(__file__).resolve().parents[1] / "launch" / "configs"
# name -> (model class, latent shape at the config's image size, loss terms)
EXPECTED = {
    "kl_f8.yaml": ("AutoencoderKL", (4, 32, 32), {"kl"}),
    "spec_basic.yaml": ("AutoencoderKL", (4, 16, 16), {"kl"}),
    "spec_ssim.yaml": ("AutoencoderKL", (4, 16, 16), {"kl"}),  # + harness terms ssim, sparsity (test_losses.py)
    "perceptual_demo.yaml": ("AutoencoderKL", (4, 16, 16), {"kl"}),  # + perceptual, tv (test_losses.py)
    "fc_latent.yaml": ("AutoencoderKL", (4096,), {"kl"}),
    "conv4.yaml": ("AutoencoderKL", (512, 4, 4), {"kl"}),
    "conv4_ae.yaml": ("AutoencoderKL", (512, 4, 4), {"kl"}),
    "cond_demo.yaml": ("AutoencoderKL", (4, 16, 16), {"kl"}),
    "vq.yaml": ("VQAutoencoder", (4, 64, 64), {"vq"}),
    "fsq.yaml": ("VQAutoencoder", (4, 64, 64), set()),
}
# Shrink the big ones for a CPU forward pass; the shape of the model stays the same.
SMALL = {
    "kl_f8.yaml": ["model.ch=32", "data.image_size=32"],
    "spec_basic.yaml": ["data.image_size=32"],
    "spec_ssim.yaml": ["data.image_size=32"],
    "vq.yaml": ["model.ch=32", "data.image_size=16"],
    "fsq.yaml": ["model.ch=32", "data.image_size=16"],
    "cond_demo.yaml": ["data.image_size=16"],
}


# Configs whose own tests live elsewhere: what they train is not an autoencoder built here alone.
COVERED_ELSEWHERE = {
    "demo.yaml": "launch/quickstart.sh, tests/test_train.py",
    "perception.yaml": "tests/test_perception_train.py (model.kind=classifier)",
    "vq_prior.yaml": "tests/test_prior.py (model.kind=prior over a trained VQ run)",
    "recipe_weighted.yaml": "tests/test_loss_options.py (each recipe trains two steps)",
    "recipe_classifier_perceptual.yaml": "tests/test_loss_options.py",
    "recipe_ldm.yaml": "tests/test_loss_options.py",
    "recipe_sd_vae.yaml": "tests/test_loss_options.py",
}


def test_every_model_config_is_covered():
    shipped = {p.name for p in CONFIGS.glob("*.yaml")}
    assert shipped - set(COVERED_ELSEWHERE) == set(EXPECTED)
    assert set(COVERED_ELSEWHERE) <= shipped  # no stale entry


@pytest.mark.parametrize("name", EXPECTED)
def test_config_loads_and_builds_at_full_size(name):
    cfg = load_config([CONFIGS / name], ["data.train=x"])
    with torch.device("meta"):  # full size, without spending seconds initialising 80M weights
        model = build_model(cfg.model)
    cls, latent, _ = EXPECTED[name]
    assert type(model).__name__ == cls
    assert model.latent_shape(cfg.data.image_size) == latent
    if name == "kl_f8.yaml":  # latent diffusion's kl-f8 autoencoder has 83.65M parameters
        assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 83.65


@pytest.mark.parametrize("name", EXPECTED)
def test_config_model_trains_a_step(name):
    cfg = load_config([CONFIGS / name], ["data.train=x", *SMALL.get(name, [])])
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    s = cfg.data.image_size
    x = torch.rand(2, 3, s, s) * 2 - 1
    cond = torch.tensor([3, 7]) if cfg.model.condition == "class" else None
    out = model(x, cond=cond)
    assert out.recon.shape == x.shape and set(out.losses) == EXPECTED[name][2]
    loss = (out.recon - x).abs().mean() + sum(getattr(cfg.loss, f"{k}_weight") * v for k, v in out.losses.items())
    loss.backward()
    assert torch.isfinite(loss)
    if name == "conv4_ae.yaml":
        assert out.losses["kl"] == 0 and cfg.loss.kl_weight == 0
    if name == "cond_demo.yaml":
        assert model.sample(10, s, cond=torch.arange(10)).shape == (10, 3, s, s)


def test_spec_paths_are_resolved_into_the_config():
    cfg = load_config([CONFIGS / "spec_basic.yaml"], ["data.train=x"])
    assert cfg.model.encoder[0] == "C2d_3_128_3_1_1" and cfg.model.decoder[-1] == "C2d_128_3_3_1_1"


def test_model_section_is_documented():
    lines = [line for line in describe() if line.startswith("model.")]
    assert len(lines) >= 30 and all("  # " in line and not line.endswith("# ") for line in lines)
    assert any(line.startswith("loss.vq_weight") for line in describe())


def test_model_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="^model.kind: 'vqgan' is not allowed"):
        load_config([], ["data.train=x", "model.kind=vqgan"])
    with pytest.raises(ConfigError, match="^model.vq_codebook_size: 1 is out of range"):
        load_config([], ["data.train=x", "model.vq_codebook_size=1"])
    with pytest.raises(ConfigError, match=r'^model.encoder: item 14 "Lin_4096_8192": .* \(at data.image_size=32\)$'):
        load_config([CONFIGS / "fc_latent.yaml"], ["data.train=x", "data.image_size=32"])
    with pytest.raises(ConfigError, match="^model.encoder: output .* has 8 channels but the quantizer needs 4"):
        load_config([CONFIGS / "spec_basic.yaml"], ["data.train=x", "model.kind=vq"])
