"""GPU-only paths: fp16 with dynamic loss scaling (accelerate's GradScaler and DeepSpeed's), bf16,
ZeRO-2 on one GPU, NCCL. Marked `gpu`: skipped where torch.cuda is not available.

accelerate keeps one AcceleratorState per process, mixed precision included, and these tests train in
this process with one precision after another: each test runs with a fresh state (`fresh_accelerate_state`,
tests/conftest.py), reset before and after it. The one test not marked `gpu` shows that on any device.
launch/gpu_check.sh runs this file blind, inside a budget: a launched process gets SUBPROCESS_TIMEOUT_S."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from shardgen import make_shards

from harness import checkpoint as ckpt
from launch.train import main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
gpu = pytest.mark.gpu
SUBPROCESS_TIMEOUT_S = 120  # one tiny run; well inside launch/gpu_check.sh's part for this file


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), num_samples=128, per_shard=16, size=40)


def logged(run: Path, key: str) -> list[float]:
    return [float(w.split("=")[1]) for line in (run / "train.log").read_text().splitlines()
            for w in line.split() if w.startswith(key + "=")]


@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_in_process_runs_may_change_precision(precision, shards, tmp_path):
    """Any device: a run in bf16, then one in fp32, in one process (without the reset around each test,
    accelerate refuses the second: 'AcceleratorState has already been initialized')."""
    run = tmp_path / "run"
    assert main(["--config", str(ROOT / "tests/configs/tiny.yaml"), f"data.train={shards}", f"run.dir={run}",
                 f"train.mixed_precision={precision}", "train.max_steps=2"]) == 0
    assert f"(NO, {precision})" in (run / "train.log").read_text()


@gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_one_gpu(precision, shards, tmp_path):
    run = tmp_path / "run"
    args = ["--config", str(ROOT / "tests/configs/tiny.yaml"), f"data.train={shards}", f"run.dir={run}",
            f"train.mixed_precision={precision}", "train.max_steps=30", "model.attn_resolutions=[16]",
            "model.norm_groups=8", "model.attn_type=vanilla"]
    assert main(args) == 0
    recon = logged(run, "loss/recon")
    assert all(v == v for v in recon) and recon[-1] < recon[0]  # finite and falling
    overflow = logged(run, "train/overflow_steps")
    if precision == "fp16":
        assert overflow[-1] < 30  # the scaler found a scale: not every step was skipped
    assert ckpt.read_state(ckpt.resolve(run, "latest"))["step"] == 30


@gpu
def test_zero2_fp16_one_gpu(shards, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/accelerate/zero2.yaml",
           "--num_processes", "1", "--mixed_precision", "fp16", str(ROOT / "launch/train.py"),
           "--config", str(ROOT / "tests/configs/tiny.yaml"), f"data.train={shards}", f"run.dir={run}",
           "train.max_steps=20", "checkpoint.every_steps=10"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(DEEPSPEED, fp16)" in r.stderr
    assert ckpt.read_state(ckpt.resolve(run, "latest"))["step"] == 20
    assert "train/overflow_steps=" in (run / "train.log").read_text()


@gpu
def test_attention_stays_finite_in_fp16():
    """Large activations into attention under fp16 autocast: the upcast keeps softmax finite."""
    from models.blocks import AttnBlock

    block = AttnBlock(in_channels=64).cuda()
    x = torch.randn(2, 64, 16, 16, device="cuda") * 300
    with torch.autocast("cuda", dtype=torch.float16):
        y = block(x)
    assert torch.isfinite(y).all()


@gpu
@pytest.mark.parametrize("direct_half", [False, True])
def test_kl_model_stays_finite_in_fp16_on_cuda(direct_half):
    """tests/test_blocks_numerics.py on CUDA kernels: GroupNorm inputs whose squares pass 65504, under fp16
    autocast and as a .half() model (DeepSpeed fp16's case): finite and close to fp32."""
    from harness.config import ModelConfig
    from models import build_model

    cfg = ModelConfig(kind="kl", ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], resolution=16,
                      z_channels=4, embed_dim=4, norm_groups=8)
    torch.manual_seed(0)
    model = build_model(cfg).cuda().eval()
    x = torch.randn(2, 3, 16, 16, device="cuda") * 3000
    with torch.no_grad():
        ref = model.decode(model.encode(x))
        if direct_half:
            y = model.half().decode(model.encode(x.half()))
        else:
            with torch.autocast("cuda", dtype=torch.float16):
                y = model.decode(model.encode(x))
    assert torch.isfinite(y).all()
    assert (y.float() - ref).abs().max() < 5e-2 * ref.abs().max()


@gpu
@pytest.mark.parametrize("fused", [False, True])
def test_fp16_gan_keeps_two_loss_scalers(fused, shards, tmp_path):
    """fp16 with a discriminator: accelerate's GradScaler for the autoencoder, D's own (LlamaGen's
    two scalers); both train, both are checkpointed, and the run resumes. With optim.fused both
    AdamWs are fused and each scaler hands its found_inf to its kernel."""
    from harness.config import load_config
    from harness.trainer import Trainer

    run = tmp_path / "run"
    common = ["--config", str(ROOT / "tests/configs/tiny.yaml"), f"data.train={shards}", f"run.dir={run}",
              "train.mixed_precision=fp16", "loss.disc_weight=0.5", "loss.lecam_weight=0.01", "log.every_steps=1",
              "checkpoint.every_steps=10", "loss.learned_logvar=true", f"optim.fused={str(fused).lower()}"]
    cfg = load_config([common[1]], [*common[2:], "train.max_steps=20"])
    trainer = Trainer(cfg)
    hook = trainer.hooks[-1]
    assert trainer.engine.scaler is not None and trainer.engine.scaler.is_enabled()
    assert hook.scaler.is_enabled() and hook.scaler is not trainer.engine.scaler
    assert trainer.train() == 0
    d = logged(run, "disc/loss")
    assert len(d) == 20 and all(v == v for v in d + logged(run, "loss/total"))
    state = next(s for f in sorted(ckpt.resolve(run, "latest").glob("custom_checkpoint_*.pkl"))
                 if "lecam_ema" in (s := torch.load(f, map_location="cpu", weights_only=True)))
    assert state["scaler"]["scale"] > 0
    assert main([*common, "train.max_steps=24", "--resume", "latest"]) == 0
    assert ckpt.read_state(ckpt.resolve(run, "latest"))["step"] == 24


@gpu
def test_zero2_fp16_gan_one_gpu(shards, tmp_path):
    """DeepSpeed's fp16 loss scaling for the autoencoder, D beside the engine with its own scaler."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/accelerate/zero2.yaml",
           "--num_processes", "1", "--mixed_precision", "fp16", str(ROOT / "launch/train.py"),
           "--config", str(ROOT / "tests/configs/tiny.yaml"), f"data.train={shards}", f"run.dir={run}",
           "train.max_steps=12", "checkpoint.every_steps=6", "loss.disc_weight=0.5", "log.every_steps=1"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(DEEPSPEED, fp16)" in r.stderr
    d = logged(run, "disc/loss")
    assert len(d) == 12 and all(v == v for v in d)


@gpu
def test_tf32_follows_the_config():
    from harness import scale

    scale.set_tf32(torch.device("cuda"), False)
    assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    assert not torch.backends.cuda.matmul.allow_tf32  # the legacy flag still reads (torch >= 2.9 may raise)
    scale.set_tf32(torch.device("cuda"), True)
    assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32


@gpu
def test_fused_bf16_step_reads_nothing_back_from_the_gpu(shards, tmp_path, monkeypatch):
    from test_sync_free import GAN, syncs_per_step

    host, steps = syncs_per_step(monkeypatch, shards, tmp_path / "host", "train.mixed_precision=bf16")
    assert steps == 6 and host >= steps
    fused, _ = syncs_per_step(monkeypatch, shards, tmp_path / "fused", "train.mixed_precision=bf16", "optim.fused=true")
    assert fused == 0
    gan, _ = syncs_per_step(monkeypatch, shards, tmp_path / "gan", "train.mixed_precision=bf16", "optim.fused=true",
                            *GAN)
    assert gan == 0  # with a discriminator and LeCAM too


@gpu
@pytest.mark.parametrize("first, then", [("false", "true"), ("true", "false")])
def test_optim_fused_switched_at_a_resume_on_the_gpu(first, then, shards, tmp_path):
    """torch places Adam's step counters by the fused flag saved with the state: a resume that switches
    optim.fused on must move them onto the GPU (harness/engine.py: place_steps), else the fused kernel
    refuses CPU counters beside CUDA parameters. Both AdamWs: the autoencoder's and the discriminator's."""
    run = tmp_path / "run"
    common = ["--config", str(ROOT / "tests/configs/tiny.yaml"), f"data.train={shards}", f"run.dir={run}",
              "checkpoint.every_steps=0", "train.max_steps=4", "loss.disc_weight=0.5", "loss.disc_start=1"]
    assert main([*common, f"optim.fused={first}", "train.stop_after_steps=2"]) == 0
    assert main([*common, f"optim.fused={then}", "--resume", "latest"]) == 0
    assert ckpt.read_state(ckpt.resolve(run, "latest"))["step"] == 4
    assert f"optim.fused is {then} (the checkpoint's {first})" in (run / "train.log").read_text()
