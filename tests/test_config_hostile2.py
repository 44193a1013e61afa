"""Config start-up checks a reviewer broke: what the data loader cannot feed, unreadable files, YAML merge
keys, BatchNorm at batch 1, keys a kind does not read, a VQ prior over a flat latent. Each is one line
naming the key, exit code 2, before any step."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import save_file

from harness.config import ConfigError, ModelConfig, from_dict, load_config, model_keys_not_read, to_dict
from launch.train import main

ROOT = Path(__file__).resolve().parents[1]
SPEC = ["model.arch=spec", "data.image_size=16", "data.train=x"]
ENC = "model.encoder=[C2d_3_8_4_2_1, ReLU, C2d_8_8_3_1_1]"
DEC = "model.decoder=[CT2d_4_3_4_2_1]"


def one_line_exit_2(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("config error: "), err
    return err


# ----------------------------------------------------------------- 1. the loader delivers RGB


@pytest.mark.parametrize("overrides, says", [
    (["model.in_channels=1"], r"^model\.in_channels: 1, but the data loader delivers 3-channel RGB images; "
                              r"set model\.in_channels=3$"),
    (["model.out_ch=1"], r"^model\.out_ch: 1, but the model reconstructs the data loader's 3-channel RGB images"),
    (["model.kind=vq", "model.out_ch=4"], r"^model\.out_ch: 4, "),
    ([*SPEC, "model.in_channels=1", "model.encoder=[C2d_1_8_4_2_1, ReLU, C2d_8_8_3_1_1]", DEC],
     r"^model\.in_channels: 1, .* 3-channel RGB .* encoder's first layer read 3"),
    ([*SPEC, "model.out_ch=1", ENC, "model.decoder=[CT2d_4_1_4_2_1]"],
     r"^model\.out_ch: 1, .* 3-channel RGB .* decoder's last layer emit 3"),
    (["model.kind=classifier", "model.in_channels=4"], r"^model\.in_channels: 4, "),
    ([*SPEC, "model.out_ch=1", ENC, DEC], r"^model\.out_ch: 1, .* RGB"),  # not the spec's shapes: the channels
])
def test_channels_other_than_rgb_are_refused_for_training(overrides, says):
    with pytest.raises(ConfigError, match=says):
        load_config([], ["data.train=x", "model.ch=32", *overrides])


def test_a_stored_config_of_other_channels_still_loads():
    """Loading a model (export, inspection, an imported 1-channel diffusers VAE) is not training on RGB."""
    cfg = load_config([], ["data.train=x"])
    cfg.model.in_channels = cfg.model.out_ch = 1
    assert from_dict(to_dict(cfg)).model.in_channels == 1


def test_channels_refused_on_the_command_line_before_any_step(tmp_path, capsys):
    err = one_line_exit_2(capsys, ["data.train=/nonexistent", f"run.dir={tmp_path / 'r'}", "model.out_ch=1"])
    assert "model.out_ch: 1" in err and "RGB" in err
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------- 2. unreadable files


def test_an_unreadable_config_file_is_one_line(capsys):
    err = one_line_exit_2(capsys, ["--config", "/proc/self/mem", "data.train=x"])
    assert re.search(r"/proc/\w+/mem: cannot read the config file", err)
    with pytest.raises(ConfigError, match="cannot read the config file .File name too long"):
        load_config(["a" * 5000 + ".yaml"], ["data.train=x"])


def test_an_unreadable_spec_file_is_one_line(capsys):
    err = one_line_exit_2(capsys, ["data.train=x", "model.arch=spec", "model.encoder=/proc/self/mem"])
    assert "model.encoder: /proc/self/mem: cannot read the layer spec file" in err


# ----------------------------------------------------------------- 3. YAML merge keys


def test_yaml_merge_keys_work_and_duplicates_are_still_refused(tmp_path):
    from harness.config import _UniqueKeyLoader

    f = tmp_path / "merge.yaml"
    f.write_text("data: {train: x}\ntrain:\n  <<: {batch_size: 3, max_steps: 7}\n  max_steps: 9\n")
    cfg = load_config([f])
    assert (cfg.train.batch_size, cfg.train.max_steps) == (3, 9)  # merged, and the mapping's own key wins
    g = tmp_path / "alias.yaml"
    g.write_text("opt: &o {lr: 0.5, warmup_steps: 2}\ndata: {train: x}\noptim:\n  <<: *o\n  lr: 0.25\n")
    with pytest.raises(ConfigError, match="opt: unknown key"):  # an anchor's own section is still a key
        load_config([g])
    # a merged mapping that itself merges and overrides: read as YAML says, not as duplicates
    text = "a: &a {lr: 0.5, warmup_steps: 2}\nb: &b {<<: *a, lr: 0.1}\noptim: {<<: *b, eps: 1.0e-6}\n"
    read = yaml.load(text, Loader=_UniqueKeyLoader)
    assert read["optim"] == {"lr": 0.1, "warmup_steps": 2, "eps": 1e-6} and read["b"] == {"lr": 0.1, "warmup_steps": 2}
    assert read == yaml.safe_load(text)
    f.write_text("data: {train: x}\ntrain:\n  <<: {batch_size: 3}\n  max_steps: 9\n  max_steps: 8\n")
    with pytest.raises(ConfigError, match="line 5 is not valid YAML .key 'max_steps' appears twice"):
        load_config([f])


# ----------------------------------------------------------------- 4. a prior over a flat latent


def test_a_prior_over_a_flat_vq_latent_is_one_line(tmp_path):
    import torch

    from harness.tasks import PriorTask
    from models import build_model

    vq_cfg = load_config([], ["data.train=x", "model.kind=vq", "model.arch=spec", "data.image_size=16",
                              "model.embed_dim=16", "model.vq_codebook_size=8",
                              "model.encoder=[Flat, Lin_768_16, Latent, Lin_16_768, Unflat_3_16_16]"])
    folder = tmp_path / "vq_export"
    folder.mkdir()
    model = build_model(vq_cfg.model)
    save_file({k: v.contiguous().clone() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(vq_cfg)))
    cfg = load_config([ROOT / "launch/configs/vq_prior.yaml"],
                      ["data.train=x", f"model.prior_vq={folder}", "data.image_size=16"])
    with pytest.raises(ConfigError, match=r"^model\.prior_vq: .*vq_export has a latent of shape \(16,\) at "
                                          r"data\.image_size=16; a prior needs a \(c, h, w\) code grid"):
        PriorTask(cfg, torch.device("cpu"))


# ----------------------------------------------------------------- 5. BatchNorm at one value per channel


@pytest.mark.parametrize("overrides, says", [
    (["train.batch_size=1", "model.encoder=[Flat, Lin_768_16, BN1d_16, Latent, Lin_8_768, Unflat_3_16_16]"],
     r'^model\.encoder: item 3 "BN1d_16": BatchNorm1d sees one value per channel \(input \(16,\) at '
     r"train\.batch_size=1 per rank\)"),
    (["train.batch_size=1", "model.encoder=[C2d_3_8_16_1_0, BN2d_8]", "model.decoder=[CT2d_4_3_16_1_0]"],
     r'^model\.encoder: item 2 "BN2d_8": BatchNorm2d sees one value per channel \(input \(8, 1, 1\)'),
    (["train.batch_size=1", "model.encoder=[C2d_3_8_4_2_1, Latent, C2d_4_4_8_1_0, BN2d_4, CT2d_4_3_16_1_0]"],
     r'^model\.encoder: item 4 "BN2d_4": BatchNorm2d sees one value'),  # the decoder after Latent: as written
    (["train.batch_size=1", "model.encoder=[C2d_3_8_4_2_1]", "model.decoder=[C2d_4_4_8_1_0, BN2d_4, "
      "CT2d_4_3_16_1_0]"], r'^model\.decoder: item 2 "BN2d_4"'),
])
def test_batchnorm_on_a_single_value_per_channel_is_refused(overrides, says):
    with pytest.raises(ConfigError, match=says):
        load_config([], [*SPEC, *overrides])


def test_batchnorm_with_more_than_one_value_per_channel_trains():
    enc = "model.encoder=[Flat, Lin_768_16, BN1d_16, Latent, Lin_8_768, Unflat_3_16_16]"
    load_config([], [*SPEC, "train.batch_size=2", enc])  # two samples: two values per channel
    load_config([], [*SPEC, "train.batch_size=1", "model.encoder=[C2d_3_8_4_2_1, BN2d_8]", DEC])  # 8x8 map


# ----------------------------------------------------------------- 9. keys a kind does not read


def test_keys_not_read_include_embed_dim_of_kl_spec_and_double_z_of_vq():
    assert "embed_dim" in model_keys_not_read(ModelConfig(kind="kl", arch="spec"))
    assert "embed_dim" not in model_keys_not_read(ModelConfig(kind="kl", arch="ldm"))
    for kind in ("vq", "fsq"):
        assert "double_z" in model_keys_not_read(ModelConfig(kind=kind))
    assert "double_z" not in model_keys_not_read(ModelConfig(kind="kl"))
    from harness.config import unused_settings

    cfg = load_config([], [*SPEC, ENC, DEC, "model.embed_dim=8"])
    assert any("model.embed_dim" in n and "does not read" in n for n in unused_settings(cfg))
    cfg = load_config([], ["data.train=x", "model.kind=vq", "model.double_z=false"])
    assert any("model.double_z" in n and "does not read" in n for n in unused_settings(cfg))


# ----------------------------------------------------------------- 12. smaller ones


def test_a_list_override_names_the_item_that_is_no_string():
    with pytest.raises(ConfigError, match=r"^model\.encoder\[0\]: expected str, got True"):
        load_config([], [*SPEC, "model.encoder=[true, ReLU]"])


def test_a_list_in_yaml_names_the_item_that_is_no_string(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {arch: spec, encoder: [C2d_3_8_4_2_1, 7]}\ndata: {train: x}\n")
    with pytest.raises(ConfigError, match=r"^model\.encoder\[1\]: expected str, got 7"):
        load_config([f])


def test_an_encoder_file_holding_a_mapping_gives_its_decoder(tmp_path):
    spec = tmp_path / "both.yaml"
    spec.write_text(yaml.safe_dump({"encoder": ["C2d_3_8_4_2_1", "ReLU", "C2d_8_8_3_1_1"],
                                    "decoder": ["CT2d_4_3_4_2_1"]}))
    cfg = load_config([], [*SPEC, f"model.encoder={spec}"])
    assert cfg.model.decoder == ["CT2d_4_3_4_2_1"]  # read into the config, as the encoder is
    conv4 = load_config([], ["data.train=x", "model.arch=spec", "model.encoder=launch/configs/specs/conv4.yaml"])
    assert conv4.model.decoder[-1] == "Tanh"


def test_a_spec_file_given_as_config_says_so():
    with pytest.raises(ConfigError, match=r"^encoder: unknown key; this looks like a layer-spec file, not a config: "
                                          r"pass it as model\.encoder=FILE"):
        load_config([ROOT / "launch/configs/specs/conv4.yaml"], ["data.train=x"])


def test_train_py_says_it_in_one_line():
    r = subprocess.run([sys.executable, "launch/train.py", "--config", "launch/configs/specs/conv4.yaml",
                        "data.train=x"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "model.encoder=FILE" in r.stderr
