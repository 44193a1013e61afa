"""The optional patch discriminator (loss.disc_weight > 0): the model, its losses, and training with
it through launch/train.py: it starts at loss.disc_start, trains, checkpoints, resumes bitwise, and
the combinations it does not support are one-line refusals."""

import pytest
import torch
from safetensors.torch import load_file
from shardgen import make_shards
from test_train import args, logged

from harness import checkpoint as ckpt
from launch.train import main
from models.discriminator import PatchDiscriminator, hinge_d_loss, last_decoder_layer, vanilla_d_loss


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), num_samples=64, per_shard=16, size=40)


@pytest.fixture(scope="module")
def config():
    from pathlib import Path

    return Path(__file__).resolve().parent / "configs/tiny.yaml"


def test_patch_discriminator_judges_patches():
    d = PatchDiscriminator(3, channels=8, num_layers=3)
    # pix2pix's 70x70 PatchGAN: 256 px in, 30x30 patch logits out
    assert d(torch.zeros(2, 3, 256, 256)).shape == (2, 1, 30, 30)
    assert d(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 6, 6)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert [c.out_channels for c in convs] == [8, 16, 32, 64, 1]


def test_real_and_fake_are_normalised_as_separate_batches():
    # D judges the fakes alone for the generator, so it must learn on them alone too: batched with
    # the reals, BatchNorm would hand it statistics (a colour or contrast shift) it never sees there.
    torch.manual_seed(0)
    d = PatchDiscriminator(3, channels=8, num_layers=2)
    real, fake = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32) * 0.2 + 0.5
    lr, lf = d(real, fake)
    assert torch.allclose(lf, d(fake)) and torch.allclose(lr, d(real))
    assert not torch.allclose(lf, d(torch.cat([real, fake]))[4:])


def test_discriminator_losses():
    sure = torch.full((4,), 3.0)
    assert hinge_d_loss(sure, -sure) == 0  # confident and right: nothing to learn
    assert hinge_d_loss(-sure, sure) == pytest.approx(4.0)  # 0.5 * (4 + 4)
    zero = torch.zeros(4)
    assert hinge_d_loss(zero, zero) == pytest.approx(1.0)
    assert vanilla_d_loss(zero, zero) == pytest.approx(float(torch.log(torch.tensor(2.0))))


def test_the_adaptive_weight_compares_gradients_at_the_decoders_last_layer(config):
    from harness.config import load_config
    from models import build_model

    model = build_model(load_config([config], ["data.train=x", "run.dir=y"]).model)
    assert last_decoder_layer(model) is model.decoder.conv_out.weight


def test_training_with_a_discriminator_starts_at_disc_start_and_checkpoints_it(config, shards, tmp_path):
    run = tmp_path / "run"
    common = ["train.max_steps=8", "log.every_steps=1", "checkpoint.every_steps=4", "checkpoint.keep_last=2"]
    assert main(args(config, shards, run, *common, "loss.disc_weight=0.5", "loss.disc_start=4")) == 0
    log = (run / "train.log").read_text().splitlines()
    judged = [line.startswith("[") and "loss/adv=" in line for line in log if " step " in line and "loss/recon" in line]
    assert judged == [False] * 4 + [True] * 4, log  # steps 1-4 without, 5-8 with the adversarial term
    assert all(w > 0 for w in logged(run, "disc/adaptive_weight"))
    assert len(logged(run, "disc/loss")) == 4
    before, after = (load_file(run / f"checkpoints/step_{n}/model_1.safetensors") for n in (4, 8))
    assert before.keys() == after.keys() and any(k.endswith("running_mean") for k in after)
    assert not all(torch.equal(before[k], after[k]) for k in before), "the discriminator did not train"
    # the autoencoder's own weights stay where inference, export and init_from read them
    from harness.inference import load_model

    model, _, _ = load_model(run)
    assert not any(k.startswith("main.") for k in model.state_dict())
    # and the adversarial term changed the autoencoder's training
    plain = tmp_path / "plain"
    assert main(args(config, shards, plain, *common)) == 0
    a, b = (load_file(r / "checkpoints/step_8/model.safetensors") for r in (run, plain))
    assert not all(torch.equal(a[k], b[k]) for k in a)
    b4 = load_file(plain / "checkpoints/step_4/model.safetensors")
    a4 = load_file(run / "checkpoints/step_4/model.safetensors")
    assert all(torch.equal(a4[k], b4[k]) for k in a4), "before disc_start the discriminator must not change training"


def test_resume_with_a_discriminator_is_bitwise(config, shards, tmp_path):
    common = ["loss.disc_weight=0.5", "loss.disc_start=2", "checkpoint.every_steps=0", "train.max_steps=8"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(args(config, shards, straight, *common)) == 0
    assert main(args(config, shards, split, *common, "train.stop_after_steps=4")) == 0
    assert main(args(config, shards, split, *common, "--resume", "latest")) == 0
    for name in ("model.safetensors", "model_1.safetensors"):
        wa, wb = (load_file(r / "checkpoints/step_8" / name) for r in (straight, split))
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f"{name} differs after resume"


def test_what_the_discriminator_does_not_support_is_one_line(config, shards, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(args(config, shards, run, "train.max_steps=2")) == 0
    capsys.readouterr()
    assert main(args(config, shards, run, "train.max_steps=4", "loss.disc_weight=0.5", "--resume", "latest")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained without a discriminator and this run sets loss.disc_weight=0.5" in err[0], err
    assert ckpt.read_state(ckpt.resolve(run, "latest"))["step"] == 2
    # another discriminator than the checkpoint's
    assert main(args(config, shards, tmp_path / "d", "train.max_steps=2", "loss.disc_weight=0.5")) == 0
    capsys.readouterr()
    assert main(args(config, shards, tmp_path / "d", "train.max_steps=4", "loss.disc_weight=0.5",
                     "loss.disc_channels=8", "--resume", "latest")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "its discriminator was built as {'layers': 3, 'channels': 64}" in err[0], err
    # a discriminator too deep for the images: at start, not at disc_start
    assert main(args(config, shards, tmp_path / "deep", "loss.disc_weight=0.5", "loss.disc_layers=5",
                     "loss.disc_start=50000")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss.disc_layers: 5 layers do not fit 32px images" in err[0], err
    # DeepSpeed: refused before anything starts (accelerate launch sets this variable)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert main(args(config, shards, tmp_path / "ds", "loss.disc_weight=0.5")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "runs under DDP or in one process, not DeepSpeed" in err[0], err
    assert not (tmp_path / "ds").exists()
