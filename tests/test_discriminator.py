"""The optional patch discriminator (loss.disc_weight > 0): the model, its losses, and training with
it through launch/train.py: it starts at loss.disc_start, trains, checkpoints, resumes bitwise (one
process here; 2-process DDP, ZeRO-2 and bf16 in the slow tests), keeps its own fp16 loss scaler, and
what it cannot do is a one-line refusal."""

import pytest
import torch
from safetensors.torch import load_file
from shardgen import make_shards
from test_train import args, logged

from harness import checkpoint as ckpt
from launch.train import main
from models.discriminator import PatchDiscriminator, hinge_d_loss, last_decoder_layer, lecam_reg, vanilla_d_loss


def disc_state(checkpoint) -> dict:
    """The discriminator's custom object in a checkpoint folder (model, optimizer, scaler, lecam_ema)."""
    for f in sorted(checkpoint.glob("custom_checkpoint_*.pkl")):
        state = torch.load(f, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "lecam_ema" in state:
            return state
    raise AssertionError(f"no discriminator state in {checkpoint}")


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


def test_group_norm_judges_each_image_on_its_own():
    torch.manual_seed(0)
    d = PatchDiscriminator(3, channels=8, num_layers=2, norm="group")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules())
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(d(x[:1]), d(x)[:1], atol=1e-6)  # no batch statistics
    # sync_batch is batch converted: the same tensors, so checkpoints move between the two
    sync = torch.nn.SyncBatchNorm.convert_sync_batchnorm(PatchDiscriminator(3, channels=8, num_layers=2))
    assert sync.state_dict().keys() == PatchDiscriminator(3, channels=8, num_layers=2).state_dict().keys()


def test_lecam_regulariser():
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 0.5])
    # relu(real - ema_fake)^2: (1 - 0)^2, (3 - 0)^2 -> mean 5; relu(ema_real - fake)^2: (2 + 1)^2, (2 - 0.5)^2 -> 5.625
    assert float(lecam_reg(real, fake, torch.tensor(2.0), torch.tensor(0.0))) == pytest.approx(5 + 5.625)
    assert float(lecam_reg(real, fake, torch.tensor(-5.0), torch.tensor(5.0))) == 0  # inside the anchors


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


@pytest.mark.slow
def test_training_with_a_discriminator_starts_at_disc_start_and_checkpoints_it(config, shards, tmp_path):
    run = tmp_path / "run"
    common = ["train.max_steps=8", "log.every_steps=1", "checkpoint.every_steps=4", "checkpoint.keep_last=2"]
    assert main(args(config, shards, run, *common, "loss.disc_weight=0.5", "loss.disc_start=4")) == 0
    log = (run / "train.log").read_text().splitlines()
    judged = [line.startswith("[") and "loss/adv=" in line for line in log if " step " in line and "loss/recon" in line]
    assert judged == [False] * 4 + [True] * 4, log  # steps 1-4 without, 5-8 with the adversarial term
    assert all(w > 0 for w in logged(run, "disc/adaptive_weight"))
    assert len(logged(run, "disc/loss")) == 4
    before, after = (disc_state(run / f"checkpoints/step_{n}")["model"] for n in (4, 8))
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


@pytest.mark.slow
def test_resume_with_a_discriminator_is_bitwise(config, shards, tmp_path):
    common = ["loss.disc_weight=0.5", "loss.disc_start=2", "checkpoint.every_steps=0", "train.max_steps=8",
              "loss.lecam_weight=0.1", "loss.lecam_decay=0.9", "train.ema_decay=0.9", "loss.learned_logvar=true"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(args(config, shards, straight, *common)) == 0
    assert main(args(config, shards, split, *common, "train.stop_after_steps=4")) == 0
    assert main(args(config, shards, split, *common, "--resume", "latest")) == 0
    wa, wb = (load_file(r / "checkpoints/step_8/model.safetensors") for r in (straight, split))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), "the autoencoder differs"
    da, db = (disc_state(r / "checkpoints/step_8") for r in (straight, split))
    for part in ("model",):
        assert all(torch.equal(da[part][k], db[part][k]) for k in da[part]), "the discriminator differs after resume"
    assert torch.equal(da["lecam_ema"], db["lecam_ema"]) and da["lecam_ema"].abs().sum() > 0
    moments = lambda s: [v["exp_avg_sq"] for v in s["optimizer"]["state"].values()]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(moments(da), moments(db), strict=True))


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
    built = "its discriminator was built as {'layers': 3, 'channels': 64, 'norm': 'batch'}"
    assert len(err) == 1 and built in err[0], err
    # a discriminator too deep for the images: at start, not at disc_start
    assert main(args(config, shards, tmp_path / "deep", "loss.disc_weight=0.5", "loss.disc_layers=5",
                     "loss.disc_start=50000")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss.disc_layers: 5 layers do not fit 32px images" in err[0], err
    # a checkpoint of the earlier layout (D as accelerate's model_1)
    from harness.config import ConfigError, load_config
    from harness.discriminator import check_resume_layout, refuse_unsupported

    cfg = load_config([config], ["data.train=x", "loss.disc_weight=0.5", "loss.disc_norm=sync_batch"])
    (tmp_path / "old").mkdir()
    (tmp_path / "old/model_1.safetensors").write_bytes(b"")
    with pytest.raises(ckpt.ResumeError, match="its discriminator was saved as accelerate's model_1 \\(an earlier"):
        check_resume_layout(tmp_path / "old", {"disc": {"layers": 3, "channels": 64}}, cfg)
    # SyncBatchNorm needs GPUs; one process is plain BatchNorm and runs anywhere
    refuse_unsupported(cfg, device=torch.device("cpu"), world_size=1)
    with pytest.raises(ConfigError, match="loss.disc_norm=sync_batch: torch's SyncBatchNorm runs on GPUs only"):
        refuse_unsupported(cfg, device=torch.device("cpu"), world_size=2)


@pytest.mark.slow
def test_the_discriminator_keeps_its_own_fp16_scaler(config, shards, tmp_path):
    """Two scalers, as LlamaGen: a D overflow skips D's step and halves D's scale only; the
    autoencoder steps on. On CPU with fp16 autocast for D (accelerate's fp16 needs CUDA)."""
    from harness.config import load_config
    from harness.trainer import Trainer

    cfg = load_config([config], [f"data.train={shards}", f"run.dir={tmp_path / 'run'}", "loss.disc_weight=0.5",
                                 "train.max_steps=3", "checkpoint.every_steps=0", "optim.grad_clip=0"])
    trainer = Trainer(cfg)
    hook = trainer.hooks[-1]
    hook.amp_dtype = torch.float16
    hook.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)  # sure to overflow fp16 gradients
    d0 = {k: v.clone() for k, v in hook.module.state_dict().items()}
    ae0 = {k: v.clone() for k, v in trainer.engine.unwrapped().state_dict().items()}
    assert trainer.train() == 0
    assert trainer.engine.scaler is None  # the autoencoder has none here: its steps were never skipped
    assert trainer.totals["disc_overflow_steps"] == 3 and hook.scaler.get_scale() == 2.0**57
    assert all(torch.equal(v, d0[k]) for k, v in hook.module.state_dict().items() if k.endswith("weight"))
    assert any(not torch.equal(v, ae0[k]) for k, v in trainer.engine.unwrapped().state_dict().items())
    # the scaler is checkpointed with D
    assert disc_state(ckpt.resolve(tmp_path / "run", "latest"))["scaler"]["scale"] == 2.0**57
    # a sane scale: D steps under fp16 autocast
    hook.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    trainer.cfg.train.max_steps = 5
    assert trainer.train() == 0
    assert any(not torch.equal(v, d0[k]) for k, v in hook.module.state_dict().items() if k.endswith("weight"))


@pytest.mark.slow
def test_bf16_trains_with_a_discriminator(config, shards, tmp_path, fresh_accelerate_state):
    """accelerate's bf16 autocast for the autoencoder, D under the same autocast with fp32 weights."""
    run = tmp_path / "run"
    assert main(args(config, shards, run, "train.mixed_precision=bf16", "loss.disc_weight=0.5", "train.max_steps=4",
                     "log.every_steps=1", "loss.lecam_weight=0.01")) == 0
    assert "(NO, bf16), NCHW batches," in (run / "train.log").read_text()  # train.channels_last=auto on CPU
    d = logged(run, "disc/loss")
    assert len(d) == 4 and all(v == v for v in d + logged(run, "loss/total"))
    assert all(v.dtype == torch.float32 for v in disc_state(ckpt.resolve(run, "latest"))["model"].values()
               if v.is_floating_point())


# ------------------------------------------------------------------------------------------ at scale (slow)

GAN = ["loss.disc_weight=0.5", "loss.disc_start=1", "loss.lecam_weight=0.1", "loss.learned_logvar=true",
       "loss.disc_channels=16", "checkpoint.every_steps=0", "log.every_steps=1"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "zero3"])
def test_the_gan_resumes_bitwise_in_two_processes(backend, shards, tmp_path):
    """2-process DDP and DeepSpeed ZeRO-3 (D beside the engine, under torch DDP): 6 steps straight
    and 3 + 3 with a resume end with the same autoencoder, D, D's Adam moments and LeCAM anchors.
    (ZeRO-2 keeps D the same way: its engine's own resume is in test_scale.py.)"""
    from test_scale import BACKENDS, train

    from harness.inference import state_dict_of

    # DDP with accumulation (D's own no_sync), ZeRO with GroupNorm
    extra = ["loss.disc_norm=batch", "train.grad_accum=2"] if backend == "ddp" else ["loss.disc_norm=group"]
    common = [*GAN, "train.max_steps=6", *extra]
    straight, split = tmp_path / "straight", tmp_path / "split"
    for run, extra in ((straight, []), (split, ["train.stop_after_steps=3"]), (split, ["--resume", "latest"])):
        r = train(BACKENDS[backend][0], shards, run, *common, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = (state_dict_of(ckpt.resolve(r, "latest")) for r in (straight, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the autoencoder differs after resume"
    da, db = (disc_state(ckpt.resolve(r, "latest")) for r in (straight, split))
    assert all(torch.equal(da["model"][k], db["model"][k]) for k in da["model"]), "D differs after resume"
    assert torch.equal(da["lecam_ema"], db["lecam_ema"])
    moments = lambda s: [v["exp_avg_sq"] for v in s["optimizer"]["state"].values()]  # noqa: E731
    assert all(torch.equal(x, y) for x, y in zip(moments(da), moments(db), strict=True))
    assert len(logged(straight, "disc/loss")) == 5  # judged from step 2 (disc_start=1) on


@pytest.mark.slow
def test_zero3_takes_the_adaptive_weight_from_the_partitioned_last_layer(shards, tmp_path):
    """Under ZeRO-3 the decoder's last layer is partitioned; autograd.grad through the engine's
    gathering hooks still gives the whole gradient: step 1's adaptive weight equals DDP's."""
    from test_scale import BACKENDS, train

    weights = {}
    for backend in ("ddp", "zero3"):
        run = tmp_path / backend
        r = train(BACKENDS[backend][0], shards, run, *GAN, "loss.disc_start=0", "train.max_steps=2")
        assert r.returncode == 0, r.stderr[-3000:]
        weights[backend] = logged(run, "disc/adaptive_weight")
    assert weights["zero3"][0] == pytest.approx(weights["ddp"][0], rel=1e-4) and weights["ddp"][0] > 0


def test_the_advice_after_a_divergence_names_the_discriminators_learning_rate_when_there_is_one():
    from types import SimpleNamespace

    from harness.config import load_config
    from harness.trainer import Trainer

    def advice(*extra):
        cfg = load_config([], ["data.train=unused", *extra])
        return Trainer._divergence_advice(SimpleNamespace(cfg=cfg))

    assert advice() == "lower optim.lr, enable optim.grad_clip or check the data"
    assert "lower optim.lr (or loss.disc_lr: the discriminator's" in advice("loss.disc_weight=0.5")
