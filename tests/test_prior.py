"""model.kind=prior: a transformer over a frozen VQ/FSQ model's codes, trained through launch/train.py,
sampled through launch/sample.py."""

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from shardgen import make_shards

from harness import checkpoint as ckpt
from harness.config import ConfigError, ModelConfig, load_config
from launch.evaluate import main as evaluate_main
from launch.export import main as export_main
from launch.sample import main as sample_main
from launch.train import main as train_main
from models import ModelConfigError, build_model, check_config
from models.prior import CodePrior, VQWithPrior

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests/configs/tiny.yaml"
PRIOR = ROOT / "launch/configs/vq_prior.yaml"
# A class-conditional VQ model small enough to train in seconds: 16 px -> an 8x8 grid of 16 codes.
VQ = ["model.kind=vq", "model.vq_codebook_size=16", "model.ch=8", "model.ch_mult=[1,2]", "model.condition=class",
      "model.num_classes=4", "model.cond_dim=8", "data.image_size=16", "log.images_every_steps=0"]
SMALL_PRIOR = ["model.prior_layers=2", "model.prior_dim=32", "model.prior_heads=2", "data.image_size=16",
               "train.batch_size=8", "optim.lr=3e-3", "optim.warmup_steps=2", "log.every_steps=2",
               "data.num_workers=0", "data.shuffle_buffer=32", "log.num_images=4", "log.class_rows=4",
               "checkpoint.every_steps=0"]


def prior(**kw) -> CodePrior:
    return CodePrior(**{"codebook_size": 16, "grid": (3, 4), "dim": 32, "layers": 2, "heads": 2, **kw}).eval()


# ------------------------------------------------------------------------------------- the model


def test_causal_each_position_sees_only_earlier_codes():
    torch.manual_seed(0)
    p = prior()
    codes = torch.randint(16, (2, 3, 4))
    other = codes.clone()
    other[:, 1, 2] = (other[:, 1, 2] + 1) % 16  # raster position 6
    a, b = p(codes), p(other)
    assert a.shape == (2, 12, 16)
    assert torch.equal(a[:, :7], b[:, :7])  # position i predicts code i from codes < i: 0..6 unchanged
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_cached_sampling_is_the_full_forward():
    """Greedy codes from the KV-cached sampler are those a full forward picks at every position."""
    torch.manual_seed(0)
    p = prior(condition="class", num_classes=3)
    cond = torch.tensor([0, 1, 2])
    codes = p.sample(3, cond=cond, temperature=0)
    assert codes.shape == (3, 3, 4) and codes.dtype == torch.long
    assert torch.equal(p(codes, cond).argmax(-1), codes.flatten(1))


def test_temperature_and_top_k_are_deterministic_with_a_seed():
    torch.manual_seed(0)
    p = prior()

    def draw(seed, **kw):
        return p.sample(6, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    assert not torch.equal(draw(1, temperature=1.0), draw(1, temperature=0.3))
    assert torch.equal(draw(1, top_k=1), draw(5, temperature=0))  # top-1 is the most likely code, whatever the seed
    assert torch.equal(draw(3, top_k=4), draw(3, top_k=4)) and not torch.equal(draw(3, top_k=4), draw(3))
    with pytest.raises(ValueError, match="temperature"):
        p.sample(2, temperature=-1)
    # a tiny temperature is the greedy draw (it was inf - inf = nan: "probability tensor contains nan")
    assert torch.equal(draw(1, temperature=1e-45), draw(5, temperature=0))
    assert torch.equal(draw(1, temperature=1e-46), draw(5, temperature=0))  # 0 in float32: was 0/0 = nan
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="must be finite"):
            p.sample(2, temperature=bad)


def test_a_class_conditional_prior_learns_its_classes():
    """Codes that are the class (class c: every code c, one noisy position) are learnt in a few
    steps; samples per class then hold that class's code, and the null class samples too."""
    torch.manual_seed(0)
    p = prior(condition="class", num_classes=4, cond_dropout=0.2).train()
    opt = torch.optim.AdamW(p.parameters(), lr=3e-3)
    for _ in range(60):
        cls = torch.randint(4, (32,))
        codes = cls[:, None, None].expand(32, 3, 4).clone()
        codes[:, 2, 3] = torch.randint(16, (32,))
        loss = torch.nn.functional.cross_entropy(p(codes, cls).transpose(1, 2), codes.flatten(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    p.eval()
    cls = torch.arange(4).repeat_interleave(5)
    codes = p.sample(20, cond=cls, generator=torch.Generator().manual_seed(0)).flatten(1)[:, :-1]
    assert torch.equal(codes.mode(-1).values, cls), codes  # every sample mostly its class's code
    assert (codes == cls[:, None]).float().mean() > 0.85
    greedy = p.sample(20, cond=cls, temperature=0).flatten(1)[:, :-1]
    assert torch.equal(greedy, cls[:, None].expand_as(greedy))
    unconditioned = p.sample(8, generator=torch.Generator().manual_seed(0))  # the null class: some class's codes
    assert ((unconditioned.flatten(1)[:, :-1] < 4).float().mean()) > 0.9


def test_unconditional_samples_never_decode_through_an_untrained_null_class():
    """A prior trained with cond_dropout draws unconditionally, but a VQ model trained without it has a
    null class row that never trained: its decoder must read a drawn class instead."""
    cfg = load_config([TINY], ["data.train=unused", *VQ])  # model.cond_dropout 0
    torch.manual_seed(0)
    vq = build_model(cfg.model).eval()
    p = prior(codebook_size=16, grid=tuple(vq.latent_shape(16)[1:]), condition="class", num_classes=4,
              cond_dropout=0.2)
    seen, real = [], vq.decode_indices
    vq.decode_indices = lambda codes, cond=None: seen.append(cond) or real(codes, cond)
    VQWithPrior(vq, p).sample(3, 16, generator=torch.Generator().manual_seed(0))
    assert seen[-1] is not None and seen[-1].shape == (3,) and int(seen[-1].max()) < 4
    trained = build_model(load_config([TINY], ["data.train=unused", *VQ, "model.cond_dropout=0.1"]).model).eval()
    seen.clear()
    trained.decode_indices = lambda codes, cond=None: seen.append(cond) or real(codes, cond)
    VQWithPrior(trained, p).sample(3, 16, generator=torch.Generator().manual_seed(0))
    assert seen[-1] is None  # both nulls trained: truly unconditional


def test_vq_and_fsq_models_sample_through_a_prior():
    for kind, codebook in (("vq", 32), ("fsq", 8 * 5 * 5 * 5)):
        m = ModelConfig(kind=kind, ch=8, ch_mult=[1, 2], num_res_blocks=1, norm_groups=8, attn_type="none",
                        vq_codebook_size=32)
        check_config(m, 16)
        vq = build_model(m).eval()
        x = torch.rand(2, 3, 16, 16) * 2 - 1
        indices = vq.encode_indices(x)
        assert indices.shape == (2, 8, 8) and int(indices.max()) < codebook == vq.quantizer.codebook_size
        model = VQWithPrior(vq, prior(codebook_size=codebook, grid=(8, 8)), top_k=5)
        images = model.sample(3, 16, generator=torch.Generator().manual_seed(0))
        assert images.shape == (3, 3, 16, 16) and torch.isfinite(images).all()
        with pytest.raises(ValueError, match="code grid"):
            model.sample(1, 32)


# ------------------------------------------------------------------------------------- config


def test_config_errors_are_one_line(tmp_path):
    base = ["data.train=x", "model.kind=prior"]
    with pytest.raises(ConfigError, match=r"^model.prior_vq: missing"):
        load_config([], base)
    with pytest.raises(ConfigError, match=r"^model.prior_vq: .*nope: no such run"):
        load_config([], [*base, f"model.prior_vq={tmp_path / 'nope'}"])
    kl = tmp_path / "kl"
    kl.mkdir()
    with pytest.raises(ConfigError, match=r"^model.prior_vq: .*no config.yaml"):
        load_config([], [*base, f"model.prior_vq={kl}"])
    (kl / "config.yaml").write_text("model: {kind: kl}\n")
    with pytest.raises(ConfigError, match=r"^model.prior_vq: .* holds a model.kind=kl model"):
        load_config([], [*base, f"model.prior_vq={kl}"])
    (kl / "config.yaml").write_text("model: {kind: vq}\n")
    with pytest.raises(ConfigError, match=r"^model.prior_heads: 256 \(model.prior_dim\) is not divisible into 7"):
        load_config([], [*base, f"model.prior_vq={kl}", "model.prior_heads=7"])
    with pytest.raises(ModelConfigError, match="not filled in yet"):
        build_model(ModelConfig(kind="prior", prior_vq=str(kl)))


# ------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), num_samples=48, per_shard=12, size=20)


@pytest.fixture(scope="module")
def vq_run(shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("vq") / "vq"
    assert train_main(["--config", str(TINY), f"data.train={shards}", f"run.dir={run}", *VQ, "train.max_steps=4",
                       "checkpoint.every_steps=0"]) == 0
    return run


def prior_args(shards, vq_run, run, *extra):
    return ["--config", str(TINY), "--config", str(PRIOR), f"data.train={shards}", f"run.dir={run}",
            f"model.prior_vq={vq_run}", *SMALL_PRIOR, *extra]


def logged(run: Path, key: str) -> list[float]:
    return [float(w.split("=", 1)[1]) for line in (run / "train.log").read_text().splitlines()
            for w in line.split() if w.startswith(key + "=")]


def test_prior_trains_on_a_vq_run_and_samples(shards, vq_run, tmp_path, capsys):
    run = tmp_path / "prior"
    assert train_main(prior_args(shards, vq_run, run, "train.max_steps=24", "log.images_every_steps=24")) == 0
    ce, bits = logged(run, "loss/ce"), logged(run, "model/bits_per_code")
    assert len(ce) == 12 and sum(ce[-3:]) < 0.9 * sum(ce[:3]), f"loss did not fall: {ce}"
    assert bits[-1] == pytest.approx(ce[-1] / 0.6931471805599453, rel=1e-3)
    log = (run / "train.log").read_text()
    assert "class-conditional (4 classes) prior over 16 codes on a 8x8 grid" in log
    grids = {p.name for p in (run / "samples").glob("*.png")}
    assert {"prior_samples_step0000024.png", "class_samples_step0000024.png"} <= grids
    # the checkpoint holds the prior alone: the VQ model is read from model.prior_vq
    weights = load_file(ckpt.resolve(run, "latest") / "model.safetensors")
    assert weights and not any(k.startswith(("encoder.", "decoder.", "quantizer.", "vq.")) for k in weights)

    out = tmp_path / "s.png"
    assert sample_main([str(run), "sample", "--n", "3", "--out", str(out), "--temperature", "0.8", "--top-k", "4"]) == 0
    assert out.is_file()
    assert sample_main([str(run), "classes", "--rows", "4", "--n", "2", "--out", str(tmp_path / "c.png")]) == 0
    assert sample_main([str(run), "sample", "--cls", "2", "--n", "2", "--out", str(tmp_path / "c2.png")]) == 0
    capsys.readouterr()
    # a VQ run alone: one line on how to train its prior; sampling knobs on a non-prior run: one line
    assert sample_main([str(vq_run), "sample", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    step = ckpt.resolve(vq_run, "latest")  # the VQ model as it is now, not whatever the run holds later
    assert len(err.splitlines()) == 1 and f"--config launch/configs/vq_prior.yaml model.prior_vq={step} " in err
    assert sample_main([str(vq_run), "sample", "--top-k", "3", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error: --top-k applies to a prior run (model.kind=prior)" in err
    assert evaluate_main([str(run), "--data", str(shards)]) == 2
    assert "a model.kind=prior run has no reconstructions to evaluate" in capsys.readouterr().err


def test_sampling_notes_a_vq_model_that_went_on_training(shards, vq_run, tmp_path, capsys):
    """model.prior_vq named the VQ *run*; the VQ run then trained on: the prior's codes are no longer the VQ model's.
    sample.py says so (the trainer does at a resume), and still samples."""
    vq = tmp_path / "vq"
    shutil.copytree(vq_run, vq)
    run = tmp_path / "prior"
    assert train_main(prior_args(shards, vq, run, "train.max_steps=2", "log.images_every_steps=0")) == 0
    out = tmp_path / "s.png"
    capsys.readouterr()
    assert sample_main([str(run), "sample", "--n", "2", "--out", str(out)]) == 0
    assert "note: model.prior_vq" not in capsys.readouterr().err
    # an export keeps model.prior_vq as trained (a pinned step_N could be pruned) and records the digest of
    # the VQ weights the prior learned
    assert export_main([str(run), "--out", str(tmp_path / "pinned")]) == 0
    assert yaml.safe_load((tmp_path / "pinned" / "config.yaml").read_text())["model"]["prior_vq"] == str(vq)
    assert train_main(["--config", str(TINY), f"data.train={shards}", f"run.dir={vq}", *VQ, "train.max_steps=5",
                       "checkpoint.every_steps=0", "--resume", "latest"]) == 0
    capsys.readouterr()
    assert sample_main([str(run), "sample", "--n", "2", "--out", str(out)]) == 0
    assert (f"note: model.prior_vq now gives other weights ({vq / 'checkpoints/step_5'}) than this prior was trained "
            "on") in capsys.readouterr().err
    assert sample_main([str(tmp_path / "pinned"), "sample", "--n", "2", "--out", str(out)]) == 0
    assert "note: model.prior_vq now gives other weights" in capsys.readouterr().err  # the export's record tells
    # exported after the VQ run went on: noted then, and the digest recorded is still the one the prior learned
    assert export_main([str(run), "--out", str(tmp_path / "late")]) == 0
    assert "the export records the digest of the ones it learned" in capsys.readouterr().err
    assert sample_main([str(tmp_path / "late"), "sample", "--n", "2", "--out", str(out)]) == 0
    assert "note: model.prior_vq now gives other weights" in capsys.readouterr().err
    # the prior resumed over the VQ model that went on: noted under the key that names it
    assert train_main(prior_args(shards, vq, run, "train.max_steps=3", "log.images_every_steps=0",
                                 "--resume", "latest")) == 0
    assert "note: model.prior_vq is not the file this run was trained with" in (run / "train.log").read_text()


def test_prior_resume_is_bitwise(shards, vq_run, tmp_path):
    common = ["train.ema_decay=0.9", "model.prior_dropout=0.1", "model.cond_dropout=0.2", "train.max_steps=8",
              "log.images_every_steps=0"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train_main(prior_args(shards, vq_run, straight, *common)) == 0
    assert train_main(prior_args(shards, vq_run, split, *common, "train.stop_after_steps=4")) == 0
    assert ckpt.read_state(ckpt.resolve(split, "latest"))["step"] == 4
    assert train_main(prior_args(shards, vq_run, split, *common, "--resume", "latest")) == 0
    a, b = straight / "checkpoints/step_8", split / "checkpoints/step_8"
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ema_a = torch.load(a / "custom_checkpoint_1.pkl", weights_only=True)["shadow"]
    ema_b = torch.load(b / "custom_checkpoint_1.pkl", weights_only=True)["shadow"]
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


def test_a_prior_follows_its_vq_model_to_an_export_at_a_resume(shards, vq_run, tmp_path, capsys):
    """The VQ run prunes the step_N a prior names: the prior could then never be loaded again. The error
    says so, and a resume may point model.prior_vq at an export of the same weights."""
    from models.prior import vq_kind_of

    with pytest.raises(ModelConfigError, match="a checkpoint its run has pruned since"):
        vq_kind_of(str(vq_run / "checkpoints" / "step_999"))
    step = ckpt.resolve(vq_run, "latest")
    run = tmp_path / "prior"
    common = ["train.max_steps=4", "log.images_every_steps=0"]
    assert train_main(prior_args(shards, step, run, *common, "train.stop_after_steps=2")) == 0
    assert export_main([str(step), "--out", str(tmp_path / "vq_export")]) == 0
    capsys.readouterr()
    assert train_main(prior_args(shards, tmp_path / "vq_export", run, *common, "--resume", "latest")) == 0
    log = (run / "train.log").read_text()
    assert f"model.prior_vq follows the config at this resume: {str(step)!r} -> {str(tmp_path / 'vq_export')!r}" in log
    assert "is not the file this run was trained with" not in log  # the same VQ weights: no digest note
    assert ckpt.read_state(ckpt.resolve(run, "latest"))["step"] == 4
    # reconstruct runs the VQ model alone: any size it takes (was refused as for sampling the code grid)
    out = tmp_path / "r.png"
    assert sample_main([str(run), "reconstruct", "--data", str(shards), "--image-size", "32", "--out", str(out)]) == 0
    assert sample_main([str(run), "sample", "--cls", "1", "--image-size", "32", "--out", str(out)]) == 2
    assert "the prior models the code grid at 16 px" in capsys.readouterr().err


def test_prior_run_errors(shards, vq_run, tmp_path, capsys):
    run = tmp_path / "p"
    assert train_main(prior_args(shards, vq_run, run, "model.prior_codebook_size=99", "train.max_steps=1")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.prior_codebook_size: 99 here, but the model in model.prior_vq gives 16")
    assert train_main(prior_args(shards, vq_run, run, "loss.disc_weight=0.5", "train.max_steps=1")) == 2
    assert "error: loss.disc_weight: a discriminator judges reconstructions" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cpu2", "zero3"])
def test_prior_trains_under_ddp_and_zero3(backend, shards, vq_run, tmp_path):
    """Two processes: the frozen VQ model on every rank outside the engine; under ZeRO-3 the grids
    gather the prior's parameters collectively; sample.py reads the (sharded) checkpoint."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / backend
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"launch/accelerate/{backend}.yaml",
           "--num_processes", "2", "--main_process_port", str(port), "launch/train.py",
           *prior_args(shards, vq_run, run, "train.max_steps=4", "log.images_every_steps=4", "train.ema_decay=0.9")]
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stderr and ckpt.read_state(ckpt.resolve(run, "latest"))["step"] == 4
    assert {"prior_samples_step0000004.png", "class_samples_step0000004.png"} <= {p.name for p in
                                                                                  (run / "samples").glob("*.png")}
    assert sample_main([str(run), "classes", "--rows", "2", "--n", "2", "--ema", "--out", str(tmp_path / "c.png")]) == 0


def test_a_prior_pointed_at_another_kind_of_vq_model_is_one_line(shards, vq_run, tmp_path, capsys):
    """The README invites editing an export's model.prior_vq: a VQ model with another codebook (or grid, or
    condition) gave an index error, an empty grid, or wrong images; now one line naming what differs."""
    run, other = tmp_path / "prior", tmp_path / "vq8"
    assert train_main(prior_args(shards, vq_run, run, "train.max_steps=1", "log.images_every_steps=0")) == 0
    assert train_main(["--config", str(TINY), f"data.train={shards}", f"run.dir={other}", *VQ,
                       "model.vq_codebook_size=8", "train.max_steps=1", "checkpoint.every_steps=0"]) == 0
    export = tmp_path / "export"
    assert export_main([str(run), "--out", str(export)]) == 0
    config = export / "config.yaml"
    config.write_text(config.read_text().replace(f"prior_vq: {vq_run}", f"prior_vq: {other}"))
    capsys.readouterr()
    assert sample_main([str(export), "sample", "--n", "2", "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not the kind of VQ model this prior was trained on: it gives " \
        "prior_codebook_size 8 (the prior's: 16)" in err, err
    assert not (tmp_path / "s.png").exists()


def test_a_prior_whose_vq_step_is_gone_samples_and_exports_with_prior_vq(shards, vq_run, tmp_path, capsys):
    """The VQ run pruned the step_N a prior names: sample.py and export.py said only that it is gone; now
    the error names --prior-vq, which reads the VQ model from where it is now (an export of that step),
    and an export made so names that place in its config.yaml."""
    step = tmp_path / "vq_step"
    shutil.copytree(ckpt.resolve(vq_run, "latest"), step)
    run = tmp_path / "prior"
    assert train_main(prior_args(shards, step, run, "train.max_steps=1", "log.images_every_steps=0")) == 0
    assert export_main([str(step), "--out", str(tmp_path / "vq_export")]) == 0
    shutil.rmtree(step)  # pruned by its run
    out = tmp_path / "s.png"
    capsys.readouterr()
    assert sample_main([str(run), "sample", "--n", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith("(an export of that step), name it with --prior-vq PATH"), err
    assert export_main([str(run), "--out", str(tmp_path / "e")]) == 2
    assert "name it with --prior-vq PATH" in capsys.readouterr().err and not (tmp_path / "e").exists()
    vq_export = tmp_path / "vq_export"
    assert sample_main([str(run), "sample", "--n", "2", "--prior-vq", str(vq_export), "--out", str(out)]) == 0
    assert "note:" not in capsys.readouterr().err  # the same weights: nothing to say
    assert export_main([str(run), "--out", str(tmp_path / "e"), "--prior-vq", str(vq_export)]) == 0
    assert yaml.safe_load((tmp_path / "e" / "config.yaml").read_text())["model"]["prior_vq"] == str(vq_export)
    assert sample_main([str(tmp_path / "e"), "sample", "--n", "2", "--out", str(out)]) == 0
    assert "note:" not in capsys.readouterr().err
    # --prior-vq naming nothing, or given for a model that is not a prior: one line each
    assert sample_main([str(run), "sample", "--prior-vq", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --prior-vq: {tmp_path / 'nowhere'}: no such run, checkpoint or export folder", err
    assert "--prior-vq PATH" not in err
    assert sample_main([str(vq_export), "reconstruct", "--data", str(shards), "--prior-vq", str(vq_export),
                        "--out", str(out)]) == 2
    assert "error: --prior-vq applies to a prior run (model.kind=prior)" in capsys.readouterr().err
    assert export_main([str(vq_run), "--out", str(tmp_path / "e2"), "--prior-vq", str(vq_export)]) == 2
    assert "--prior-vq: applies to a prior (model.kind=prior)" in capsys.readouterr().err


def test_prior_vq_errors_name_the_flag_and_export_refuses_other_weights(shards, vq_run, tmp_path, capsys):
    """What --prior-vq names is said of --prior-vq (it was said of the prior's config.yaml); a file is
    called a file; an export refuses a VQ model whose weights the prior never learned (sample.py notes it)."""
    run = tmp_path / "prior"
    assert train_main(prior_args(shards, vq_run, run, "train.max_steps=1", "log.images_every_steps=0")) == 0
    out = tmp_path / "s.png"
    weights = ckpt.resolve(vq_run, "latest") / "model.safetensors"
    for given, said in ((str(run), "holds a model.kind=prior model"), (str(weights), "is a file; give the VQ model's"),
                        ("", "missing")):
        capsys.readouterr()
        assert sample_main([str(run), "sample", "--prior-vq", given, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: --prior-vq: ") and said in err, err
    other = tmp_path / "vq_other"  # the same kind of VQ model, trained apart
    assert train_main(["--config", str(TINY), f"data.train={shards}", f"run.dir={other}", *VQ, "train.max_steps=1",
                       "train.seed=5", "checkpoint.every_steps=0"]) == 0
    capsys.readouterr()
    assert sample_main([str(run), "sample", "--n", "2", "--prior-vq", str(other), "--out", str(out)]) == 0
    assert "note: --prior-vq gives other weights" in capsys.readouterr().err
    assert export_main([str(run), "--out", str(tmp_path / "e"), "--prior-vq", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"--prior-vq {other}: gives other weights" in err and not (tmp_path / "e").exists()
