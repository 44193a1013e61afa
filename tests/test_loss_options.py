"""The classic VAE knobs and latent-diffusion's learned variance (harness/losses.py): each term on a
hand-computed case, then through launch/train.py (logged, trained, checkpointed, resumed bitwise),
and the shipped recipe configs each load and train 2 steps."""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from shardgen import make_shards
from test_train import args, logged

from harness.config import ConfigError, LossConfig, load_config
from harness.losses import AutoencoderLoss, LearnedLogVariance, bce, free_bits_kl, ms_ssim, ms_ssim_scales
from launch.train import main
from models.base import AutoencoderOutput
from models.distributions import DiagonalGaussianDistribution

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), num_samples=64, per_shard=16, size=40)


@pytest.fixture(scope="module")
def config():
    return ROOT / "tests/configs/tiny.yaml"


@pytest.fixture(scope="module")
def perception_file(tmp_path_factory):
    """Overrides that point a recipe with a perceptual term at a small untrained perception net
    (what it computes is not under test here, only that the recipe runs)."""
    from harness.perception_file import save_perception
    from models.perception import PerceptionNet

    torch.manual_seed(0)
    path = save_perception(PerceptionNet(channels=[8, 16], num_classes=3, norm_groups=4),
                           tmp_path_factory.mktemp("perception") / "perception.safetensors")
    uses = lambda name: "perceptual" in (ROOT / "launch/configs" / name).read_text()  # noqa: E731
    return lambda name: [f"loss.perceptual_net={path}"] if uses(name) else []


def loss_fn(**kw) -> AutoencoderLoss:
    return AutoencoderLoss(LossConfig(**kw))


# ------------------------------------------------------------------------------------------ terms


def test_learned_variance_is_latent_diffusions_nll():
    lv = LearnedLogVariance(init=0.5)
    rec = torch.tensor(0.3)
    nll, logvar = lv(rec)
    assert float(logvar) == 0.5 and float(nll.detach()) == pytest.approx(0.3 / math.exp(0.5) + 0.5)
    # its optimum is logvar = log(rec)
    nll.backward()
    assert float(lv.logvar.grad) == pytest.approx(1 - 0.3 / math.exp(0.5))
    # in the loss: recon + perceptual-like terms under the NLL, KL outside it
    fn = loss_fn(recon="l1", kl_weight=0.5)
    fn.variance = LearnedLogVariance(init=math.log(2.0))
    x = torch.zeros(1, 3, 4, 4)
    out = AutoencoderOutput(recon=torch.full((1, 3, 4, 4), 0.5), losses={"kl": torch.tensor(3.0)})
    terms = fn(x, out)
    assert float(terms.rec) == pytest.approx(0.5 / 2 + math.log(2.0))
    assert float(terms.total) == pytest.approx(0.5 / 2 + math.log(2.0) + 0.5 * 3.0)
    assert float(terms.terms["recon"]) == pytest.approx(0.5)  # logged as it is
    assert float(terms.terms["logvar"]) == pytest.approx(math.log(2.0))


def test_without_learned_variance_rec_is_the_reconstruction_part():
    fn = loss_fn(recon="l2", kl_weight=1.0, tv_weight=1.0)
    x = torch.zeros(1, 1, 2, 2)
    out = AutoencoderOutput(recon=torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]]), losses={"kl": torch.tensor(2.0)})
    terms = fn(x, out)
    assert float(terms.rec) == pytest.approx(0.25)  # what the adaptive GAN weight compares with
    assert float(terms.total) == pytest.approx(0.25 + 2.0 + 1.0)  # tv: 0.5 rows + 0.5 columns


def test_kl_annealing_linear_and_cyclical():
    fn = loss_fn(kl_weight=2.0, kl_anneal_steps=4)
    x = torch.zeros(1, 1, 2, 2)
    out = AutoencoderOutput(recon=x.clone(), losses={"kl": torch.tensor(1.0)})
    seen = []
    for step in (0, 1, 2, 4, 100):
        fn.step = lambda s=step: s
        seen.append(float(fn(x, out).terms["kl"]))
    assert seen == [0.0, 0.5, 1.0, 2.0, 2.0]
    fn = loss_fn(kl_weight=1.0, kl_anneal_steps=2, kl_anneal_cycle=5)
    factors = []
    for step in range(11):
        fn.step = lambda s=step: s
        factors.append(fn.kl_factor())
    assert factors == [0, 0.5, 1, 1, 1, 0, 0.5, 1, 1, 1, 0]


def test_free_bits_floor_each_channel():
    # channel 0: mean 2 at 2 positions -> KL 0.5 * 4 * 2 = 4 nats; channel 1: mean 0 -> KL 0 -> floored
    mean = torch.tensor([[[[2.0, 2.0]], [[0.0, 0.0]]]])  # b=1 c=2 h=1 w=2
    posterior = DiagonalGaussianDistribution(torch.cat([mean, torch.zeros_like(mean)], dim=1))
    assert float(posterior.kl().mean()) == pytest.approx(4.0)
    assert float(free_bits_kl(posterior, 0.5)) == pytest.approx(4.0 + 0.5)
    assert float(free_bits_kl(posterior, 5.0)) == pytest.approx(10.0)
    # no gradient pushes a channel below its floor
    mean.requires_grad_(True)
    p = DiagonalGaussianDistribution(torch.cat([mean, torch.zeros_like(mean)], dim=1))
    free_bits_kl(p, 0.5).backward()
    assert mean.grad[0, 1].abs().sum() == 0 and mean.grad[0, 0].abs().sum() > 0
    fn = loss_fn(kl_weight=1.0, kl_free_bits=0.5)
    out = AutoencoderOutput(recon=torch.zeros(1, 3, 2, 2), losses={"kl": posterior.kl().mean()}, posterior=posterior)
    assert float(fn(torch.zeros(1, 3, 2, 2), out).terms["kl"]) == pytest.approx(4.5)


def test_bce_on_images_mapped_to_unit_range():
    x = torch.tensor([1.0, -1.0, 0.0]).view(1, 1, 1, 3)  # targets 1, 0, 0.5
    recon = torch.zeros(1, 1, 1, 3, requires_grad=True)  # p = 0.5 everywhere: log 2 each
    loss = bce(recon, x)
    assert float(loss) == pytest.approx(math.log(2.0))
    # a pixel outside [-1, 1] still gets a gradient back towards its target
    far = torch.tensor([3.0]).view(1, 1, 1, 1).requires_grad_(True)
    bce(far, torch.full((1, 1, 1, 1), -1.0)).backward()
    assert float(far.grad) > 0
    assert float(loss_fn(recon="bce")(x, AutoencoderOutput(recon=recon)).total) == pytest.approx(math.log(2.0))


def test_ms_ssim_matches_pytorch_msssim_and_falls_back_on_small_images():
    from harness import metrics

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 192, 200, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    # pytorch-msssim 1.0: ms_ssim((x + 1) / 2, (y + 1) / 2, data_range=1.0) on these tensors
    assert float(ms_ssim(x, y)) == pytest.approx(0.9069712, abs=5e-5)
    assert float(ms_ssim(x, x)) == pytest.approx(1.0)
    assert [ms_ssim_scales(s) for s in (256, 176, 175, 88, 44, 22, 21, 8)] == [5, 5, 4, 4, 3, 2, 1, 1]
    xs, ys = x[..., :20, :20], y[..., :20, :20]  # one scale: plain SSIM
    assert float(ms_ssim(xs, ys)) == pytest.approx(float(metrics.ssim(xs, ys)), abs=1e-5)
    assert float(loss_fn(msssim_weight=2.0, recon_weight=0.0)(x, AutoencoderOutput(recon=y)).total) == \
        pytest.approx(2 * (1 - 0.9069712), abs=1e-4)


def test_new_options_are_validated():
    with pytest.raises(ConfigError, match="loss.recon: 'ce' is not allowed"):
        load_config([], ["data.train=x", "loss.recon=ce"])
    with pytest.raises(ConfigError, match="loss.kl_free_bits: -1.0 is out of range"):
        load_config([], ["data.train=x", "loss.kl_free_bits=-1"])
    with pytest.raises(ConfigError, match="loss.kl_anneal_cycle"):
        load_config([], ["data.train=x", "loss.kl_anneal_steps=10", "loss.kl_anneal_cycle=5"])


# ------------------------------------------------------------------------------------------ training


def test_learned_logvar_trains_with_the_model_and_resumes_bitwise(config, shards, tmp_path):
    common = ["loss.learned_logvar=true", "loss.logvar_init=0.25", "loss.kl_anneal_steps=4", "loss.kl_free_bits=0.01",
              "checkpoint.every_steps=0", "train.max_steps=6", "log.every_steps=1", "train.ema_decay=0.9"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(args(config, shards, straight, *common)) == 0
    assert main(args(config, shards, split, *common, "train.stop_after_steps=3")) == 0
    assert main(args(config, shards, split, *common, "--resume", "latest")) == 0
    a, b = (load_file(r / "checkpoints/step_6/model.safetensors") for r in (straight, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resume is not bitwise"
    assert a["loss.logvar"].shape == (1,) and float(a["loss.logvar"]) != 0.25  # trained from its init
    logvar = logged(straight, "loss/logvar")
    assert len(logvar) == 6 and logvar[0] == pytest.approx(0.25) and len(set(logvar)) > 1
    assert logged(straight, "loss/kl")[0] == 0  # annealed from 0
    assert logged(straight, "loss/nll")
    # the weights for use are the autoencoder's alone (latent-diffusion's `loss.*` convention)
    from harness.inference import state_dict_of

    assert "loss.logvar" not in state_dict_of(straight / "checkpoints/step_6")
    assert "loss.logvar" not in state_dict_of(straight / "checkpoints/step_6", ema=True)


def test_learned_logvar_is_in_the_optimizer(config, shards, tmp_path):
    from harness.trainer import Trainer

    cfg = load_config([config], [f"data.train={shards}", f"run.dir={tmp_path / 'run'}", "loss.learned_logvar=true"])
    trainer = Trainer(cfg)
    model = trainer.engine.unwrapped()
    in_optimizer = {id(p) for g in trainer.engine.optimizer.param_groups for p in g["params"]}
    assert id(model.loss.logvar) in in_optimizer and trainer.task.loss_fn.variance is model.loss
    assert trainer.num_params == sum(p.numel() for p in model.parameters()) - 1  # the model's own count


# ------------------------------------------------------------------------------------------ recipes

RECIPES = ["recipe_weighted.yaml", "recipe_classifier_perceptual.yaml", "recipe_ldm.yaml", "recipe_sd_vae.yaml"]


@pytest.mark.parametrize("name", [pytest.param(r, marks=pytest.mark.slow) if r == "recipe_weighted.yaml" else r
                                  for r in RECIPES])
def test_recipe_configs_load_and_train_two_steps(name, shards, tmp_path, perception_file):
    run = tmp_path / "run"
    extra = ["data.image_size=32", "train.batch_size=2", "train.max_steps=2", "log.every_steps=1",
             "log.images_every_steps=0", "data.num_workers=0", "data.shuffle_buffer=8", "log.progress=false",
             "checkpoint.every_steps=0"]
    cfg_path = ROOT / "launch/configs" / name
    cfg = load_config([cfg_path], [f"data.train={shards}", f"run.dir={run}", *extra, *perception_file(name)])
    small = small_model(cfg)
    assert main(["--config", str(cfg_path), f"data.train={shards}", f"run.dir={run}", *extra, *small,
                 *perception_file(name)]) == 0
    assert len(logged(run, "loss/total")) == 2


def small_model(cfg) -> list[str]:
    """Shrink each recipe's model to test size, keeping its architecture kind."""
    if cfg.model.arch == "spec":
        return []
    return ["model.ch=16", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.norm_groups=8",
            "model.attn_resolutions=[]", "loss.disc_channels=8", "loss.disc_layers=2"]


def test_what_the_new_knobs_cannot_do_is_one_line(config, shards, tmp_path, capsys):
    from types import SimpleNamespace

    from harness.losses import attach

    assert main(args(config, shards, tmp_path / "vq", "model.kind=vq", "model.vq_codebook_size=16",
                     "loss.kl_free_bits=0.5")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss.kl_free_bits: needs a Gaussian posterior" in err[0], err
    classifier = SimpleNamespace(cfg=SimpleNamespace(loss=SimpleNamespace(learned_logvar=True),
                                                     model=SimpleNamespace(kind="classifier")))
    with pytest.raises(ConfigError, match="loss.learned_logvar: model.kind=classifier has no reconstruction"):
        attach(torch.nn.Linear(1, 1), classifier, step=lambda: 0)
