"""LPIPS(vgg) equals the `lpips` package on golden values, loads the user's files offline, says in one line
what is missing, and stays frozen.

The golden file was made by tests/reference/make_lpips_golden.py in a venv with torch 2.14.1,
torchvision 0.29.1 and lpips 0.1.4, on a backbone filled by tests/reference/recipe.py.
"""

import importlib
import sys
from pathlib import Path

import pytest
import torch
from reference.recipe import SEED_LIN, SEED_VGG, checksum, fill, shapes_of
from safetensors import safe_open
from safetensors.torch import load_file

from models.lpips import (
    LIN_RELATIVE,
    LPIPS,
    VGG16_FILE,
    find_lpips_lin,
    find_vgg16,
    normalize_channels,
)
from models.weights import WeightsNotFoundError

GOLDEN = Path(__file__).parent / "reference" / "lpips_golden.safetensors"


@pytest.fixture(scope="module")
def golden():
    with safe_open(str(GOLDEN), framework="pt") as f:
        meta = f.metadata()
    return load_file(str(GOLDEN)), meta


@pytest.fixture(scope="module")
def recipe_state():
    net = LPIPS()
    feats = {k: v for k, v in net.state_dict().items() if k.startswith("features.")}
    lins = {k: v for k, v in net.state_dict().items() if k.startswith("lin")}
    return fill(shapes_of(feats), SEED_VGG), fill(shapes_of(lins), SEED_LIN)


@pytest.fixture(scope="module")
def net(recipe_state):
    vgg, lin = recipe_state
    net = LPIPS()
    net.load_state_dict({**vgg, **lin})
    return net


def to_pm1(img: torch.Tensor) -> torch.Tensor:
    return img.float() / 127.5 - 1


def test_recipe_reproduces_the_golden_backbone_bitwise(golden, recipe_state):
    tensors, meta = golden
    vgg, lin = recipe_state
    assert checksum(vgg) == meta["vgg_checksum"], "the recipe drew other VGG16 weights than the golden script"
    assert checksum(lin) == meta["lin_checksum"]
    for k, v in lin.items():
        assert torch.equal(tensors[k], v), k


def test_matches_lpips_package(golden, net):
    tensors, _ = golden
    with torch.no_grad():
        d = net(to_pm1(tensors["img0"]), to_pm1(tensors["img1"]))
    assert d.shape == (3,)
    torch.testing.assert_close(d, tensors["distance"], rtol=1e-5, atol=1e-6)
    assert (d - tensors["distance"]).abs().max() < 1e-5


def net_scale(x: torch.Tensor) -> torch.Tensor:
    """LPIPS's ScalingLayer, written out independently of models/lpips.py."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    return (x - shift) / scale


def test_per_layer_terms_match(golden, net):
    tensors, _ = golden
    x, y = to_pm1(tensors["img0"]), to_pm1(tensors["img1"])
    with torch.no_grad():
        sx, sy = net.taps(net_scale(x)), net.taps(net_scale(y))
        per_layer = torch.stack([lin((normalize_channels(a) - normalize_channels(b)) ** 2).mean(dim=(1, 2, 3))
                                 for a, b, lin in zip(sx, sy, net.lins)])
    assert [t.shape[1] for t in sx] == [64, 128, 256, 512, 512]
    torch.testing.assert_close(per_layer, tensors["per_layer"], rtol=1e-5, atol=1e-7)


def test_closer_image_is_closer(golden, net):
    tensors, _ = golden
    x = to_pm1(tensors["img0"])
    with torch.no_grad():
        same = net(x, x)
        slight = net(x, (x + 0.02 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1))
        strong = net(x, (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1))
    assert torch.all(same.abs() < 1e-6)
    assert torch.all(slight < strong)
    # the golden pairs are ordered too: mild noise < a strong change < an unrelated image
    d = tensors["distance"]
    assert d[0] < d[1] < d[2]


def test_frozen_and_always_eval(net, golden):
    tensors, _ = golden
    assert not any(p.requires_grad for p in net.parameters())
    net.train()
    assert not net.training and not any(m.training for m in net.modules())
    # gradients still reach the images (the perceptual loss needs them), never the weights
    x = to_pm1(tensors["img0"][:1]).requires_grad_(True)
    net(x, to_pm1(tensors["img1"][:1])).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())
    assert len(list(net.buffers())) == 0


# -- files ------------------------------------------------------------------------------------


def fake_lpips_package(root: Path, lin_state: dict) -> Path:
    """An installed-looking `lpips` package whose import fails (the real one imports torchvision)."""
    pkg = root / "lpips"
    (pkg / "weights" / "v0.1").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('lpips must be located, not imported')\n")
    torch.save(lin_state, pkg / LIN_RELATIVE)
    return pkg / LIN_RELATIVE


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """No torch hub cache and no lpips package anywhere we would look."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not (Path(p) / "lpips").exists()])
    importlib.invalidate_caches()
    return tmp_path


def test_lin_heads_found_in_installed_package_without_importing_it(clean_env, monkeypatch, recipe_state):
    _, lin = recipe_state
    site = clean_env / "site"
    expected = fake_lpips_package(site, lin)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    assert find_lpips_lin().resolve() == expected.resolve()
    assert "lpips" not in sys.modules
    # an explicit path wins over the package
    other = clean_env / "mine.pth"
    torch.save(lin, other)
    assert find_lpips_lin(other) == other


def test_loads_files_from_hub_cache_and_package(clean_env, monkeypatch, recipe_state, golden):
    vgg, lin = recipe_state
    hub = clean_env / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    # torchvision's file also holds the classifier: ignored
    torch.save({**vgg, "classifier.0.weight": torch.zeros(2, 2)}, hub / VGG16_FILE)
    site = clean_env / "site"
    fake_lpips_package(site, lin)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    net = LPIPS.from_files()
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    tensors, _ = golden
    with torch.no_grad():
        d = net(to_pm1(tensors["img0"]), to_pm1(tensors["img1"]))
    torch.testing.assert_close(d, tensors["distance"], rtol=1e-5, atol=1e-6)


def test_missing_vgg_names_every_place(clean_env):
    with pytest.raises(WeightsNotFoundError) as e:
        find_vgg16()
    msg = str(e.value)
    assert "\n" not in msg and VGG16_FILE in msg
    for place in (clean_env / "torch_home" / "hub" / "checkpoints", clean_env / "xdg" / "torch" / "hub" / "checkpoints",
                  clean_env / "home" / ".cache" / "torch" / "hub" / "checkpoints"):
        assert str(place / VGG16_FILE) in msg
    assert isinstance(e.value, ValueError)
    with pytest.raises(WeightsNotFoundError, match="nope.pth: no such file"):
        LPIPS.from_files(vgg=clean_env / "nope.pth")


def test_missing_lin_heads_one_line(clean_env):
    with pytest.raises(WeightsNotFoundError) as e:
        find_lpips_lin()
    assert "\n" not in str(e.value) and "lpips" in str(e.value) and LIN_RELATIVE in str(e.value)
    with pytest.raises(WeightsNotFoundError, match="heads.pth: no such file"):
        find_lpips_lin(clean_env / "heads.pth")


def test_bad_files_one_line(clean_env, recipe_state):
    vgg, _ = recipe_state
    text = clean_env / "vgg.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(WeightsNotFoundError) as e:
        LPIPS.from_files(vgg=text, lin=text)
    assert "not a readable weights-only torch file" in str(e.value) and "\n" not in str(e.value)
    partial = clean_env / "partial.pth"
    torch.save({k: v for k, v in vgg.items() if k != "features.28.bias"}, partial)
    with pytest.raises(WeightsNotFoundError, match=r"missing \['features.28.bias'\]"):
        LPIPS.from_files(vgg=partial, lin=text)
    # a pickled object that is not plain tensors is refused by weights_only loading
    pickled = clean_env / "pickled.pth"
    torch.save({"x": object()}, pickled)
    with pytest.raises(WeightsNotFoundError, match="not a readable weights-only"):
        LPIPS.from_files(vgg=pickled, lin=text)
    # a dict of tensors under names that are no names (it used to be an AttributeError on `.startswith`)
    numbered = clean_env / "numbered.pth"
    torch.save({1: torch.zeros(1)}, numbered)
    with pytest.raises(WeightsNotFoundError) as e:
        LPIPS.from_files(vgg=numbered, lin=text)
    assert str(e.value) == (f"LPIPS VGG16 weights: {numbered}: not a state dict of tensors "
                            "(key 1 of type int, not a name)")
    nan = clean_env / "nan.pth"  # a NaN in the frozen VGG makes every LPIPS NaN (it was reported as "lpips nan")
    torch.save({**vgg, "features.28.bias": torch.full_like(vgg["features.28.bias"], float("nan"))}, nan)
    with pytest.raises(WeightsNotFoundError, match=r"nan\.pth: weight features\.28\.bias holds non-finite values"):
        LPIPS.from_files(vgg=nan, lin=text)
    torch.save({"features.0.weight": [1.0]}, clean_env / "lists.pth")
    with pytest.raises(WeightsNotFoundError, match=r"lists\.pth: not a state dict of tensors \('features\.0\.weight' "
                                                   r"holds a value of type list\)$"):
        LPIPS.from_files(vgg=clean_env / "lists.pth", lin=text)


# -- LPIPS as the perceptual loss -------------------------------------------------------------


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory, recipe_state):
    """A random VGG16 in torchvision's layout and random heads, written as the user's files."""
    vgg, lin = recipe_state
    root = tmp_path_factory.mktemp("lpips_weights")
    torch.save(vgg, root / VGG16_FILE)
    torch.save(lin, root / "vgg.pth")
    return root / VGG16_FILE, root / "vgg.pth"


def lpips_loss_cfg(weight_files, **kw):
    from harness.config import LossConfig

    vgg, lin = weight_files
    return LossConfig(perceptual_weight=0.5, perceptual="lpips", lpips_vgg=str(vgg), lpips_lin=str(lin), **kw)


def test_config_keys_and_validation():
    from harness.config import ConfigError, describe, load_config

    text = "\n".join(describe())
    for line in ("loss.perceptual ('net' | 'lpips') = 'net'  # ", "loss.lpips_vgg (str) = ''  # ",
                 "loss.lpips_lin (str) = ''  # "):
        assert line in text
    cfg = load_config([], ["data.train=x", "loss.perceptual_weight=0.5", "loss.perceptual=lpips"])
    assert cfg.loss.perceptual == "lpips" and cfg.loss.perceptual_net == ""  # no own net needed
    assert load_config([], ["data.train=x"]).loss.perceptual == "net"
    with pytest.raises(ConfigError, match=r"^loss\.perceptual: lpips compares RGB images .* 1 channels"):
        load_config([], ["data.train=x", "loss.perceptual_weight=0.5", "loss.perceptual=lpips", "model.out_ch=1"])
    with pytest.raises(ConfigError, match=r"^loss\.perceptual: "):
        load_config([], ["data.train=x", "loss.perceptual=vgg"])


def test_autoencoder_loss_uses_lpips(weight_files, net):
    from harness.losses import AutoencoderLoss
    from models.base import AutoencoderOutput

    loss = AutoencoderLoss(lpips_loss_cfg(weight_files))
    assert loss.perception is None and isinstance(loss.lpips, LPIPS)
    assert not any(p.requires_grad for p in loss.lpips.parameters()) and not loss.lpips.training
    assert set(loss.fingerprint()) == {"lpips_vgg", "lpips_lin"}
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    recon = (x + 0.2 * torch.randn(x.shape, generator=g)).requires_grad_(True)
    terms = loss(x, AutoencoderOutput(recon=recon, losses={}))
    with torch.no_grad():
        expected = 0.5 * net(recon, x).mean()
    torch.testing.assert_close(terms.terms["perceptual"], expected, rtol=1e-6, atol=1e-7)
    terms.total.backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.lpips.parameters())


def test_autoencoder_loss_missing_lpips_files_is_one_config_line(tmp_path, weight_files, monkeypatch):
    from harness.config import ConfigError, LossConfig
    from harness.losses import AutoencoderLoss

    for var, value in (("TORCH_HOME", tmp_path / "th"), ("XDG_CACHE_HOME", tmp_path / "xdg"), ("HOME", tmp_path)):
        monkeypatch.setenv(var, str(value))
    with pytest.raises(ConfigError, match=r"^loss\.lpips_vgg: LPIPS VGG16 weights: .*nope\.pth: no such file"):
        AutoencoderLoss(LossConfig(perceptual_weight=1.0, perceptual="lpips", lpips_vgg=str(tmp_path / "nope.pth")))
    with pytest.raises(ConfigError, match=r"^loss\.lpips_vgg: .*vgg16-397923af\.pth not found; looked in"):
        AutoencoderLoss(LossConfig(perceptual_weight=1.0, perceptual="lpips"))  # not in the (empty) hub cache
    with pytest.raises(ConfigError, match=r"^loss\.lpips_lin: .*heads\.pth: no such file"):
        AutoencoderLoss(LossConfig(perceptual_weight=1.0, perceptual="lpips", lpips_vgg=str(weight_files[0]),
                                   lpips_lin=str(tmp_path / "heads.pth")))
    numbered = tmp_path / "numbered.pth"
    torch.save({1: torch.zeros(1)}, numbered)
    for key, files in (("lpips_vgg", (numbered, weight_files[1])), ("lpips_lin", (weight_files[0], numbered))):
        with pytest.raises(ConfigError, match=rf"^loss\.{key}: .*numbered\.pth: not a state dict of tensors "
                                              r"\(key 1 of type int, not a name\)") as e:
            AutoencoderLoss(LossConfig(perceptual_weight=1.0, perceptual="lpips", lpips_vgg=str(files[0]),
                                       lpips_lin=str(files[1])))
        assert "\n" not in str(e.value)
    # weight 0: nothing is read
    assert AutoencoderLoss(LossConfig(perceptual="lpips", lpips_vgg="/nope")).lpips is None


def test_lpips_runs_in_the_input_dtype_with_fp32_fallback(net):
    from harness.losses import lpips_distance

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    with torch.no_grad():
        full = lpips_distance(net, y, x)
        half = lpips_distance(net, y.bfloat16(), x)
    assert half.dtype == torch.float32 and torch.isfinite(half)
    assert half == pytest.approx(full.item(), rel=0.05)

    class OverflowsInLowPrecision(torch.nn.Module):
        """Stands for an fp16 overflow: inf whenever the convs would not run in fp32."""

        def forward(self, a, b):
            low = a.dtype != torch.float32 or torch.is_autocast_enabled(a.device.type)
            return torch.full((a.shape[0],), float("inf") if low else 0.25)

    assert lpips_distance(OverflowsInLowPrecision(), y.bfloat16(), x).item() == 0.25


def test_lpips_stays_frozen_in_the_trainer(weight_files, tmp_path):
    from shardgen import make_colour_shards

    from harness.config import load_config
    from harness.trainer import Trainer

    shards = make_colour_shards(tmp_path / "shards", num_samples=24, per_shard=12, size=32, num_classes=3)
    vgg, lin = weight_files
    cfg = load_config([Path(__file__).parent / "configs/tiny.yaml"],
                      [f"data.train={shards}", f"run.dir={tmp_path / 'run'}", "train.max_steps=2",
                       "checkpoint.every_steps=2", "log.images_every_steps=0", "loss.perceptual_weight=1.0",
                       "loss.perceptual=lpips", f"loss.lpips_vgg={vgg}", f"loss.lpips_lin={lin}"])
    trainer = Trainer(cfg)
    net = trainer.task.loss_fn.lpips
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert trainer.train() == 0
    assert all(not p.requires_grad and p.grad is None for p in net.parameters()) and not net.training
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    model = trainer.engine.unwrapped()
    in_optimizer = {id(p) for g in trainer.engine.optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in net.parameters()}
    saved = load_file(tmp_path / "run/checkpoints/step_2/model.safetensors")
    assert set(saved) == set(model.state_dict())
    logged = [float(w.split("=", 1)[1]) for line in (tmp_path / "run/train.log").read_text().splitlines()
              for w in line.split() if w.startswith("loss/perceptual=")]
    assert logged and all(v > 0 for v in logged), logged
