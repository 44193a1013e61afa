"""Latent statistics for diffusion training (launch/export.py --latent-stats): against a direct
computation, the expectation shortcut against drawn latents, and 2 ranks against 1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from shardgen import make_shards

from harness.config import load_config, to_dict
from harness.data import eval_batches, to_model_input
from harness.export import save_safetensors
from harness.latents import LatentMoments
from launch.export import main as export_main
from models import build_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.ch=16", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.norm_groups=8", "model.z_channels=4",
        "model.embed_dim=4", "model.attn_type=none", "data.image_size=32"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), num_samples=30, per_shard=8, size=40)


@pytest.fixture(scope="module")
def exported(shards, tmp_path_factory):
    """Our export of a tiny random KL model whose data.train is `shards`, and the model."""
    cfg = load_config([], [*TINY, f"data.train={shards}"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    with torch.no_grad():  # a latent with a clear mean and spread per channel
        model.quant_conv.bias.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0, -1.0, -2.0, 0.0, 1.0]))
    folder = tmp_path_factory.mktemp("ours")
    save_safetensors(model.state_dict(), folder / "model.safetensors")
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    return folder, model


def direct(model, shards, n):
    """Mean/std of latents drawn from the posterior, computed plainly from the same n images."""
    loader, _ = eval_batches(str(shards), image_size=32, batch_size=7, max_samples=n)
    x = torch.cat([to_model_input(b["image"], "cpu") for b in loader if b["image"] is not None])
    assert len(x) == n
    with torch.no_grad():
        post = model.posterior(x)
    mean, var = post.mean.double(), post.var.double()
    mean_c = mean.mean(dim=(0, 2, 3))
    # E[z^2] of a drawn z = mean^2 + var
    var_c = (mean.pow(2) + var).mean(dim=(0, 2, 3)) - mean_c.pow(2)
    all_var = (mean.pow(2) + var).mean() - mean.mean().pow(2)
    return mean_c, var_c.sqrt(), float(mean.mean()), float(1 / all_var.sqrt())


def test_latent_stats_equal_a_direct_computation_and_are_written_beside_the_export(exported, shards, tmp_path, capsys):
    folder, model = exported
    out = tmp_path / "out"
    assert export_main([str(folder), "--out", str(out), "--latent-stats", "20", "--batch-size", "6",
                        "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    stats = json.loads((out / "latent_stats.json").read_text())
    assert f"scaling_factor={stats['scaling_factor']:.5f}" in printed and stats["num_images"] == 20
    mean_c, std_c, shift, scale = direct(model, shards, 20)
    assert torch.allclose(torch.tensor(stats["latents_mean"], dtype=torch.float64), mean_c, atol=1e-6)
    assert torch.allclose(torch.tensor(stats["latents_std"], dtype=torch.float64), std_c, atol=1e-6)
    assert abs(stats["shift_factor"] - shift) < 1e-6 and abs(stats["scaling_factor"] - scale) < 1e-5 * scale
    assert max(stats["latents_mean"]) - min(stats["latents_mean"]) > 1.0  # the biases above show: per channel


def test_moments_in_expectation_match_drawn_latents():
    torch.manual_seed(0)
    scale, shift = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0.0, 1.0, -3.0])
    mean = torch.randn(64, 3, 8, 8) * scale[:, None, None] + shift[:, None, None]
    var = torch.rand(64, 3, 8, 8) * 0.5
    moments = LatentMoments()
    moments.update(mean[:40], var[:40])
    moments.update(mean[40:], var[40:])
    stats = moments.result(3)
    drawn = mean[None] + var.sqrt()[None] * torch.randn(200, *mean.shape)  # 200 draws of every latent
    assert torch.allclose(torch.tensor(stats.latents_mean), drawn.mean(dim=(0, 1, 3, 4)), atol=0.01)
    assert torch.allclose(torch.tensor(stats.latents_std), drawn.std(dim=(0, 1, 3, 4)), rtol=0.01)
    assert abs(stats.scaling_factor * drawn.std().item() - 1) < 0.01 and abs(stats.shift_factor - drawn.mean()) < 0.01


def test_latent_stats_with_bad_input_are_one_line(exported, tmp_path, capsys):
    folder, _ = exported
    assert export_main([str(folder), "--out", str(tmp_path / "o"), "--latent-stats", "5", "--data",
                        str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("export: ") and "nowhere" in err[0], err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_two_ranks_measure_what_one_does(exported, tmp_path):
    folder, _ = exported
    env = dict(os.environ, OMP_NUM_THREADS="1")
    outs = {}
    for nproc in (1, 2):
        out = tmp_path / f"out{nproc}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(ROOT / "launch/export.py"), str(folder), "--out", str(out), "--latent-stats", "21", "--workers", "0"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[nproc] = json.loads((out / "latent_stats.json").read_text())
    assert outs[1]["num_images"] == outs[2]["num_images"] == 21
    for k in ("latents_mean", "latents_std"):
        assert torch.allclose(torch.tensor(outs[1][k]), torch.tensor(outs[2][k]), atol=1e-9)
    assert abs(outs[1]["scaling_factor"] - outs[2]["scaling_factor"]) < 1e-9


@pytest.mark.slow
def test_two_ranks_without_latent_stats_export_once(exported, tmp_path):
    """torchrun with nothing to share out: rank 0 writes the export, rank 1 neither races it nor fails."""
    folder, _ = exported
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "launch/export.py"), str(folder), "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote ") == 1 and "already" not in r.stderr, (r.stdout, r.stderr)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors"]
