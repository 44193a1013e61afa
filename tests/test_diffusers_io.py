"""Hand-off to diffusers: export -> diffusers from_pretrained -> same outputs; a diffusers folder ->
train.init_from -> same outputs; what cannot map is one line. diffusers is a test extra (skipped
without it); everything runs on CPU in fp32 with tiny random models."""

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from harness import diffusers_io as dio
from harness.config import load_config, to_dict
from harness.export import save_safetensors
from harness.inference import LoadError, init_weights, weights_source
from launch.export import main as export_main
from models import build_model

diffusers = pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
# ch 32, two levels, one residual block, 8 groups, attention in the middle and at the 16 px level
TINY = ["model.ch=32", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.norm_groups=8", "model.z_channels=4",
        "model.embed_dim=4", "model.attn_resolutions=[16]", "data.image_size=32", "data.train=unused"]
TOL = 1e-5


def config(*extra, files=()):
    return load_config(list(files), [*TINY, *extra])


def randomised(model):
    """Random weights everywhere (GroupNorm affines included, which start at 1 and 0), so that a
    tensor mapped to the wrong place shows in the outputs."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def our_export(tmp_path, cfg, name="ours"):
    """Our own export folder (model.safetensors + config.yaml), as launch/export.py writes it."""
    model = randomised(build_model(cfg.model))
    folder = tmp_path / name
    save_safetensors(model.state_dict(), folder / "model.safetensors")
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    return model, folder


def from_pretrained(cls, folder):
    """Load with diffusers, collecting what it says about keys (its logger does not propagate)."""
    said = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("diffusers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = cls.from_pretrained(folder).eval()
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    return model, said + [str(w.message) for w in caught]


def images(n=2, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def close(a, b):
    """Equal to TOL relative to the outputs' scale (random weights give outputs up to ~5; the two
    attention implementations round differently, about 1e-7 relative per block)."""
    return (a - b).abs().max().item() <= TOL * max(1.0, b.abs().max().item())


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kl_export_loads_in_diffusers_with_no_key_warning_and_the_same_outputs(tmp_path, capsys):
    cfg = config()
    ours, folder = our_export(tmp_path, cfg)
    out = tmp_path / "diffusers"
    assert export_main([str(folder), "--format", "diffusers", "--out", str(out)]) == 0
    assert "AutoencoderKL.from_pretrained loads it" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    theirs, said = from_pretrained(diffusers.AutoencoderKL, out)
    assert not said, said
    meta = json.loads((out / "config.json").read_text())
    assert meta["down_block_types"] == ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]
    assert meta["norm_num_groups"] == 8 and meta["sample_size"] == 32
    x = images()
    with torch.no_grad():
        post, dist = ours.posterior(x), theirs.encode(x).latent_dist
        assert close(post.mean, dist.mean) and close(post.logvar, dist.logvar)
        assert close(ours.decode(post.mode()), theirs.decode(dist.mode()).sample)
        # and the whole forward pass from the mean, both ways round
        assert close(ours(x, sample_posterior=False).recon, theirs(x, sample_posterior=False).sample)


def test_vq_export_loads_in_diffusers_vqmodel_with_the_same_reconstructions(tmp_path):
    cfg = config("model.kind=vq", "model.embed_dim=3", "model.vq_codebook_size=16", "model.vq_init=none")
    ours, folder = our_export(tmp_path, cfg)
    out = tmp_path / "vq"
    assert export_main([str(folder), "--format", "diffusers", "--out", str(out)]) == 0
    theirs, said = from_pretrained(diffusers.VQModel, out)
    assert not said, said
    x = images()
    with torch.no_grad():
        assert close(ours.decode(ours.encode(x)), theirs(x).sample)


@pytest.mark.parametrize("extra, says", [
    (["model.attn_type=linear"], "model.attn_type=linear"),
    (["model.condition=class", "model.num_classes=3"], "model.condition=class"),
    (["model.resamp_with_conv=false"], "model.resamp_with_conv=false"),
    (["model.ch_mult=[2,2]"], "model.ch_mult[0]=2"),
    (["model.embed_dim=3"], "model.embed_dim=3 != model.z_channels=4"),
    (["model.double_z=false"], "model.double_z=false"),
    (["model.kind=fsq"], "model.kind=fsq"),
    (["model.kind=vq", "model.vq_cosine=true"], "model.vq_cosine=true"),
])
def test_what_diffusers_cannot_express_is_refused_in_one_line(extra, says):
    with pytest.raises(dio.DiffusersError, match="^cannot export to diffusers: .*" + says.replace("[", r"\[")) as e:
        dio.check_exportable(config(*extra).model)
    assert "\n" not in str(e.value)


def test_export_of_a_spec_model_is_one_line_and_writes_nothing(tmp_path, capsys):
    cfg = load_config([ROOT / "launch/configs/spec_basic.yaml"], ["data.train=unused", "data.image_size=32"])
    _, folder = our_export(tmp_path, cfg)
    assert export_main([str(folder), "--format", "diffusers", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("export: cannot export to diffusers: model.arch=spec"), err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Import (train.init_from)
# ---------------------------------------------------------------------------------------------


def tiny_diffusers(**kw):
    torch.manual_seed(2)
    cfg = {"block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8, "latent_channels": 4,
           "sample_size": 32, "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
               "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"]}
    return randomised(diffusers.AutoencoderKL(**(cfg | kw)))


@pytest.mark.parametrize("layout", ["sd", "flux"])  # flux: no quant_conv / post_quant_conv (SD3 and FLUX VAEs)
def test_a_diffusers_folder_initialises_our_model_to_the_same_outputs(tmp_path, layout):
    extra = {"use_quant_conv": False, "use_post_quant_conv": False} if layout == "flux" else {}
    theirs = tiny_diffusers(**extra)
    pipe = tmp_path / "pipeline"  # a pipeline folder: the autoencoder lives in vae/
    theirs.save_pretrained(pipe / "vae")
    (pipe / "model_index.json").write_text("{}")
    keys = dio.model_keys(theirs.config)
    assert keys["attn_resolutions"] == [16] and keys["ch_mult"] == [1, 2]
    cfg = load_config([], ["data.train=unused", "data.image_size=32", *dio.overrides(keys).split()])
    ours = build_model(cfg.model).eval()
    n, source = init_weights(ours, weights_source(pipe), cfg.model)  # its config.json agrees with ours
    assert source == (pipe / "vae").resolve() and n == len(ours.state_dict())
    x = images()
    with torch.no_grad():
        post, dist = ours.posterior(x), theirs.encode(x).latent_dist
        assert close(post.mean, dist.mean) and close(post.logvar, dist.logvar)
        assert close(ours.decode(post.mode()), theirs.decode(dist.mode()).sample)
    # the lone weights file converts the same way
    again = build_model(cfg.model)
    init_weights(again, pipe / "vae" / dio.WEIGHTS_NAME)
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in again.state_dict().items())


def test_a_diffusers_vqmodel_initialises_our_vq_model_with_its_codebook_counted_as_initialised(tmp_path):
    torch.manual_seed(3)
    theirs = randomised(diffusers.VQModel(block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8,
                                          latent_channels=4, vq_embed_dim=3, num_vq_embeddings=16,
                                          down_block_types=["DownEncoderBlock2D"] * 2,
                                          up_block_types=["UpDecoderBlock2D"] * 2))
    theirs.save_pretrained(tmp_path / "vq")
    cfg = load_config([], ["data.train=unused", "data.image_size=32",
                           *dio.overrides(dio.model_keys(theirs.config)).split()])
    ours = build_model(cfg.model).eval()
    init_weights(ours, tmp_path / "vq")
    assert bool(ours.quantizer.initted)  # else training would replace the codebook by k-means at once
    x = images()
    with torch.no_grad():
        assert close(ours.decode(ours.encode(x)), theirs(x).sample)


def test_init_from_a_diffusers_folder_of_another_shape_names_the_keys_to_set(tmp_path):
    tiny_diffusers().save_pretrained(tmp_path / "vae")
    ours = build_model(config("model.ch=16").model)
    with pytest.raises(LoadError) as e:
        init_weights(ours, tmp_path / "vae")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("train.init_from: ") and "of another shape" in msg
    assert "its config.json builds model.kind=kl model.arch=ldm model.in_channels=3 model.out_ch=3 model.ch=32 " \
           "model.ch_mult=[1,2] model.num_res_blocks=1 model.z_channels=4 model.norm_groups=8" in msg


@pytest.mark.parametrize("change, says", [
    ({"norm_num_groups": 16}, "builds these weights with model.norm_groups=16, this run has model.norm_groups=8: "
                              "the same tensors would compute another network; set model.norm_groups=16"),
    ({"act_fn": "gelu"}, "act_fn=gelu: our blocks use silu"),
])
def test_init_from_a_diffusers_folder_of_the_same_shapes_but_another_network_is_refused(tmp_path, change, says):
    """GroupNorm over 16 groups, or GELU, on the very same tensors: loaded, it computed something else
    (0.8 and 1.7 off diffusers' own reconstruction), silently."""
    tiny_diffusers(**change).save_pretrained(tmp_path / "vae")
    cfg = config()
    with pytest.raises(LoadError) as e:
        init_weights(build_model(cfg.model), tmp_path / "vae", cfg.model)
    assert str(e.value).startswith("train.init_from: ") and says in str(e.value) and "\n" not in str(e.value)


def test_init_from_our_folder_of_other_norm_groups_or_nan_weights_is_refused(tmp_path):
    _, folder = our_export(tmp_path, config("model.norm_groups=16"))
    cfg = config()  # model.norm_groups=8, the same shapes
    with pytest.raises(LoadError, match=r"config\.yaml builds these weights with model\.norm_groups=16, this run has "
                                        r"model\.norm_groups=8"):
        init_weights(build_model(cfg.model), folder, cfg.model)
    model, folder = our_export(tmp_path, cfg, name="nan")
    state = model.state_dict()
    state["encoder.conv_in.weight"][0, 0, 0, 0] = float("nan")
    save_safetensors(state, folder / "model.safetensors")
    with pytest.raises(LoadError, match=r"^train.init_from: .*weight encoder.conv_in.weight holds non-finite values"):
        init_weights(build_model(cfg.model), folder, cfg.model)


def test_a_diffusers_folder_without_its_weights_file_is_one_line(tmp_path):
    tiny_diffusers().save_pretrained(tmp_path / "vae")
    (tmp_path / "vae" / dio.WEIGHTS_NAME).unlink()
    with pytest.raises(LoadError, match=f"^train.init_from: .*has config.json but no {dio.WEIGHTS_NAME}") as e:
        init_weights(build_model(config().model), tmp_path / "vae")
    assert "\n" not in str(e.value)
    # a pickled weights file whose keys are no names (was an AttributeError on `.startswith`)
    torch.save({1: torch.zeros(1)}, tmp_path / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(LoadError, match=r"^train.init_from: .*diffusion_pytorch_model\.bin: not a state dict of "
                                        r"tensors \(key 1 of type int, not a name\)$"):
        init_weights(build_model(config().model), tmp_path / "vae")
    # and a pipeline without an autoencoder
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    with pytest.raises(LoadError, match="a diffusers pipeline without a vae/ or vqvae/ folder"):
        weights_source(tmp_path / "pipe")


@pytest.mark.parametrize("change, says", [
    ({"act_fn": "gelu"}, "act_fn=gelu"),
    ({"block_out_channels": [32, 48]}, "block_out_channels=[32, 48]"),
    ({"up_block_types": ["UpDecoderBlock2D"] * 2}, "attention at different levels"),
    ({"mid_block_add_attention": False}, "attention blocks without mid-block attention"),
    ({"_class_name": "UNet2DModel"}, "not one of AutoencoderKL, VQModel"),
])
def test_diffusers_configs_we_cannot_build_are_one_line(change, says):
    cfg = dict(tiny_diffusers().config) | change
    with pytest.raises(dio.DiffusersError, match=says.replace("[", r"\[")):
        dio.model_keys(cfg)


def test_the_key_table_maps_every_tensor_both_ways_and_back():
    m = config("model.ch_mult=[1,2,2]", "model.num_res_blocks=2", "model.attn_resolutions=[16,8]").model
    state = build_model(m).state_dict()
    there = dio.state_to_diffusers(state)
    theirs = diffusers.AutoencoderKL(**dio.diffusers_config(m, sample_size=32))
    assert {k: tuple(v.shape) for k, v in there.items()} == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    back = dio.state_from_diffusers(there)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    assert dio.rename("decoder.up.0.upsample.conv.weight", 3) == "decoder.up_blocks.2.upsamplers.0.conv.weight"
    assert dio.rename("decoder.up_blocks.0.attentions.1.query.weight", 3, to_diffusers=False) == \
        "decoder.up.2.attn.1.q.weight"  # diffusers' pre-0.14 attention names are read too


def test_train_init_from_a_diffusers_pipeline_starts_a_run(tmp_path):
    from shardgen import make_shards

    from launch.train import main as train_main

    shards = make_shards(tmp_path / "shards", num_samples=16, per_shard=8, size=40)
    theirs = tiny_diffusers(block_out_channels=[16, 32], mid_block_add_attention=False,
                            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    theirs.save_pretrained(tmp_path / "pipe" / "vae")
    run = tmp_path / "run"
    assert train_main(["--config", str(ROOT / "tests/configs/tiny.yaml"), f"data.train={shards}", f"run.dir={run}",
                       "train.max_steps=1", f"train.init_from={tmp_path / 'pipe'}"]) == 0
    assert f"initialised 104 tensors from {(tmp_path / 'pipe' / 'vae').resolve()}" in (run / "train.log").read_text()


def test_latent_stats_reach_the_diffusers_config(tmp_path):
    from shardgen import make_shards

    shards = make_shards(tmp_path / "shards", num_samples=12, per_shard=6, size=40)
    _, folder = our_export(tmp_path, config(f"data.train={shards}"))
    out = tmp_path / "d"
    assert export_main([str(folder), "--format", "diffusers", "--out", str(out), "--latent-stats", "12",
                        "--workers", "0"]) == 0
    theirs, said = from_pretrained(diffusers.AutoencoderKL, out)
    assert not said, said
    with torch.no_grad():  # the factors normalise the latents diffusers' own encoder draws
        dists = [theirs.encode(x).latent_dist for x in batches_of(shards, 12)]
    mean, var = torch.cat([d.mean for d in dists]).double(), torch.cat([d.var for d in dists]).double()
    shift, scale = theirs.config.shift_factor, theirs.config.scaling_factor
    # a draw z = mean + std * eps: E[(z - shift) * scale] = 0 and E[((z - shift) * scale)^2] = 1
    assert abs((mean - shift).mean().item() * scale) < 1e-5
    assert abs((((mean - shift) ** 2 + var).mean().item()) * scale**2 - 1) < 1e-5
    # not the per-channel ones: SDXL pipelines would normalise by them on top of scaling_factor (std ~scale)
    assert theirs.config.latents_mean is None and theirs.config.latents_std is None
    stats = json.loads((out / "latent_stats.json").read_text())  # all of them, also beside the config
    assert len(stats["latents_mean"]) == len(stats["latents_std"]) == 4
    assert stats["scaling_factor"] == theirs.config.scaling_factor and stats["num_images"] == 12


def test_latent_stats_a_vqmodel_config_cannot_hold_are_written_beside_it(tmp_path, capsys):
    from shardgen import make_shards

    shards = make_shards(tmp_path / "shards", num_samples=6, per_shard=6, size=40)
    cfg = config(f"data.train={shards}", "model.kind=vq", "model.embed_dim=3", "model.vq_codebook_size=16",
                 "model.vq_init=none")
    _, folder = our_export(tmp_path, cfg)
    out = tmp_path / "d"
    assert export_main([str(folder), "--format", "diffusers", "--out", str(out), "--latent-stats", "6",
                        "--workers", "0"]) == 0
    assert "VQModel's config has no shift_factor: read it there" in capsys.readouterr().out
    theirs, _ = from_pretrained(diffusers.VQModel, out)
    stats = json.loads((out / "latent_stats.json").read_text())
    assert stats["scaling_factor"] == theirs.config.scaling_factor and len(stats["latents_mean"]) == 3
    assert "shift_factor" in stats and "shift_factor" not in json.loads((out / "config.json").read_text())
    # the latents diffusers' VQModel.encode gives a diffusion model (before quantization) are the ones measured
    with torch.no_grad():
        h = torch.cat([theirs.encode(x).latents for x in batches_of(shards, 6)]).double()
    assert abs(h.mean().item() - stats["shift_factor"]) < 1e-5
    assert abs(1 / h.std(unbiased=False).item() - stats["scaling_factor"]) < 1e-4 * stats["scaling_factor"]


def batches_of(shards, n):
    from harness.data import eval_batches, to_model_input

    loader, _ = eval_batches(str(shards), image_size=32, batch_size=5, max_samples=n)
    return [to_model_input(b["image"], "cpu") for b in loader if b["image"] is not None]
