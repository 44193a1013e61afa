"""The layer-spec language: parsing, errors, dry runs, the shipped specs, the command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.config import ConfigError, ModelConfig, load_config
from models import ModelConfigError, build_model
from models import layerspec as L

BASIC = "launch/configs/specs/basic.json"
USER_ENCODER = ["C2d_3_128_3_1_1", "2*VAERB_128_128", "C2d_128_128_3_4_0", "VAERB_128_256", "VAERB_256_256",
                "C2d_256_256_3_4_0", "3*VAERB_256_256", "VAEA_256", "VAERB_256_256", "GN_32_256", "SiLU",
                "C2d_256_8_3_1_1", "C2d_8_8_1_1_0"]  # fmt: skip
USER_DECODER = ["C2d_4_4_1_1_0", "C2d_4_512_3_1_1", "VAERB_512_512", "VAEA_512", "4*VAERB_512_512", "UpS_4",
                "C2d_512_512_3_1_1", "VAERB_512_256", "2*VAERB_256_256", "UpS_4", "C2d_256_256_3_1_1",
                "VAERB_256_128", "2*VAERB_128_128", "GN_32_128", "SiLU", "C2d_128_3_3_1_1"]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The user's basic spec
# ---------------------------------------------------------------------------------------------


def test_shipped_basic_spec_is_the_users_spec_exactly():
    assert L.load_spec(BASIC, "encoder") == USER_ENCODER
    assert L.load_spec(BASIC, "decoder") == USER_DECODER


def test_user_basic_spec_pairs_up_with_a_4x16x16_latent_at_256():
    shapes = L.check_autoencoder(USER_ENCODER, USER_DECODER, image_size=256)
    assert shapes.encoder.out_shape == (8, 16, 16)  # 8 = mean | log-variance of 4 channels
    assert shapes.latent == (4, 16, 16) and shapes.decoder.in_shape == (4, 16, 16)
    assert shapes.decoder.out_shape == (3, 256, 256)
    assert L.check_autoencoder(USER_ENCODER, USER_DECODER, image_size=64).latent == (4, 4, 4)
    with pytest.raises(L.ShapeError, match=r"decoder: output \(3, 240, 240\) does not match the image"):
        L.check_autoencoder(USER_ENCODER, USER_DECODER, image_size=250)


def test_user_basic_spec_builds_and_runs():
    cfg = load_config(["launch/configs/spec_basic.yaml"], ["data.train=x", "data.image_size=32"])
    model = build_model(cfg.model)
    assert model.latent_shape(32) == (4, 2, 2) and model.latent_shape(256) == (4, 16, 16)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
    assert out.recon.shape == (1, 3, 32, 32) and out.latent.shape == (1, 4, 2, 2)


# ---------------------------------------------------------------------------------------------
# Parse errors: one line naming the item (from 1, as written), the token and what was expected
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, message",
    [
        (["C2d_3_128_3_1_1", "2*VAERB_128_128", "C2d_128_128_3"],
         'item 3 "C2d_128_128_3": Conv2d needs in,out,kernel,stride,padding; got 3 numbers'),
        (["SiLU", "C2D_3_8_3_1_1"], 'item 2 "C2D_3_8_3_1_1": unknown layer "C2D"; did you mean "C2d"?'),
        (["Conv_3_8"], 'item 1 "Conv_3_8": unknown layer "Conv"'),
        (["C2d_3_x_3_1_1"], "item 1 \"C2d_3_x_3_1_1\": Conv2d needs a whole number for out; got 'x'"),
        (["0*SiLU"], 'item 1 "0\\*SiLU": repetition must be a positive whole number'),
        (["99999999*SiLU"], 'item 1 "99999999\\*SiLU": 99999999 repetitions, more than 1000'),  # built for minutes
        (["C2d_3_99999999_3_1_1"], "Conv2d out must be at most 1048576; got 99999999"),  # the OOM killer, silently
        (["SiLU_3"], 'item 1 "SiLU_3": SiLU takes no arguments; got 1'),
        (["GN_32_100"], 'item 1 "GN_32_100": GroupNorm needs channels divisible by groups'),
        (["Drop_1.5"], r'item 1 "Drop_1.5": Dropout p must be in \[0, 1\); got 1.5'),
        (["LReLU"], 'item 1 "LReLU": LeakyReLU needs slope; got 0 numbers'),
        (["UpS_2_cubic"], "Upsample mode must be one of nearest, bilinear, bicubic; got 'cubic'"),
        (["C2d_3_8_0_1_1"], 'item 1 "C2d_3_8_0_1_1": Conv2d kernel must be >= 1; got 0'),
        (["Unflat_3"], r'item 1 "Unflat_3": Unflatten needs c,size\[,size\]\[,size\]; got 1 number$'),
        (["CT2d_8_8_4_2_1_2"], "output_padding must be smaller than stride; 2 >= 2"),
        (["SiLU", 7], 'item 2 \\(7\\): a layer must be a string'),
        ([], "the layer spec is empty"),
        ("C2d_3_8_3_1_1", "a layer spec must be a list of strings"),
    ],
)
def test_malformed_specs(spec, message):
    with pytest.raises(L.SpecError, match=message) as e:
        L.parse_spec(spec)
    assert "\n" not in str(e.value)


def test_latent_marker_rules():
    enc, dec = L.split_at_latent(["C2d_3_8_3_2_1", "Latent", "UpS_2", "C2d_4_3_3_1_1"])
    assert enc == ["C2d_3_8_3_2_1"] and dec == ["UpS_2", "C2d_4_3_3_1_1"]
    assert L.split_at_latent(["C2d_3_8_3_2_1", "Latent"], ["UpS_2"]) == (["C2d_3_8_3_2_1"], ["UpS_2"])
    with pytest.raises(L.SpecError, match="Latent appears 2 times"):
        L.split_at_latent(["Latent", "SiLU", "Latent"])
    with pytest.raises(L.SpecError, match="belongs in the encoder"):
        L.split_at_latent(["SiLU"], ["Latent", "SiLU"])
    with pytest.raises(L.SpecError, match="use one or the other"):
        L.split_at_latent(["SiLU", "Latent", "SiLU"], ["SiLU"])
    with pytest.raises(L.SpecError, match="decoder: missing"):
        L.split_at_latent(["SiLU"])
    with pytest.raises(L.SpecError, match=r'encoder: item 2 "2 \* Latent": Latent takes no repetition'):
        L.split_at_latent(["SiLU", "2 * Latent", "SiLU"])


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------

EVERY_TOKEN = [
    "C2d_3_32_3_1_1", "2*VAERB_32_32", "VAEA_32", "GN_8_32", "LReLU_0.2", "Drop_0.1", "MaxP_2", "Down_32",
    "BN2d_32", "GELU", "Up_32", "UpS_2_bilinear", "CT2d_32_16_4_2_1", "ReLU", "MaxP_4", "Flat", "Lin_1024_48",
    "BN1d_48", "Unflat_3_16", "C1d_3_4_3_1_1", "Flat", "Unflat_1_4_4_4", "C3d_1_2_3_1_1", "Flat", "Lin_128_10",
    "Sigmoid", "Tanh", "SiLU",
]  # fmt: skip


def test_every_token_builds_and_its_dry_run_matches_the_real_shapes():
    run = L.dry_run(EVERY_TOKEN, (3, 16, 16))
    net = L.SpecNet(EVERY_TOKEN, ctx=L.BuildContext(num_groups=8, attn_type="linear")).eval()
    x = torch.randn(2, 3, 16, 16)
    layers = iter(net.layers)
    for item, s_in, s_out in run.rows:
        assert tuple(x.shape[1:]) == s_in, item.label
        for _ in range(item.count):
            x = next(layers)(x)
        assert tuple(x.shape[1:]) == s_out, item.label
    assert run.out_shape == (10,) and net.infer((3, 16, 16)) == (10,)


@pytest.mark.parametrize(
    "spec, in_shape, message",
    [
        (["C2d_3_8_3_1_1", "VAERB_16_16"], (3, 8, 8),
         r'item 2 "VAERB_16_16": input \(8, 8, 8\) does not fit ResnetBlock: expects 16 channels, gets 8'),
        (["Lin_10_4"], (3, 8, 8), "needs flat features"),
        (["Flat", "Unflat_5_2_3"], (3, 8, 8), r"expects 5x2x3 = 30 features, gets 192"),
        (["C2d_3_8_3_1_1", "3*C2d_8_8_3_2_0"], (3, 8, 8),
         r'item 2 "3\*C2d_8_8_3_2_0" \(copy 3 of 3\): input \(8, 1, 1\)'),
        (["UpS_2_bilinear"], (12,), "for bilinear upsampling"),
        (["C1d_3_4_3_1_1"], (3, 8, 8), r"needs a 1-d input \(c, l\)"),
    ],
)
def test_dry_run_names_the_first_item_that_does_not_fit(spec, in_shape, message):
    with pytest.raises(L.ShapeError, match=message):
        L.dry_run(spec, in_shape)


def test_quantizer_dimension_and_odd_moments_are_checked():
    with pytest.raises(L.ShapeError, match="has 4 channels but the quantizer needs 3"):
        L.check_autoencoder(["C2d_3_4_3_2_1"], ["Up_4"], image_size=8, latent="plain", latent_dim=3)
    with pytest.raises(L.ShapeError, match="cannot be split into mean and log-variance"):
        L.check_autoencoder(["C2d_3_5_3_2_1"], ["Up_4"], image_size=8)


# ---------------------------------------------------------------------------------------------
# Files, config, command line
# ---------------------------------------------------------------------------------------------


def test_spec_files_json_and_yaml(tmp_path):
    (tmp_path / "enc.json").write_text(json.dumps(["C2d_3_8_3_2_1"]))
    (tmp_path / "ae.yaml").write_text("encoder: [C2d_3_8_3_2_1]\ndecoder: [Up_4, C2d_4_3_3_1_1]\n")
    (tmp_path / "bad.json").write_text("[C2d")
    assert L.load_spec(str(tmp_path / "enc.json")) == ["C2d_3_8_3_2_1"]
    assert L.load_spec(str(tmp_path / "ae.yaml"), "decoder") == ["Up_4", "C2d_4_3_3_1_1"]
    with pytest.raises(L.SpecError, match="not valid JSON"):
        L.load_spec(str(tmp_path / "bad.json"))
    (tmp_path / "only.yaml").write_text("encoder: [SiLU]\n")
    with pytest.raises(L.SpecError, match="has no 'decoder' list"):
        L.load_spec(str(tmp_path / "only.yaml"), "decoder")
    with pytest.raises(L.SpecError, match="neither a list of layer strings nor an existing"):
        L.load_spec("no/such/spec.yaml")


def test_inline_spec_from_the_command_line_and_config_errors():
    base = ["data.train=x", "data.image_size=16", "model.arch=spec"]
    cfg = load_config([], base + ["model.encoder=[C2d_3_8_3_2_1, Latent, UpS_2, C2d_4_3_3_1_1]"])
    model = build_model(cfg.model)
    assert model(torch.randn(2, 3, 16, 16)).recon.shape == (2, 3, 16, 16)
    with pytest.raises(ConfigError, match=r'^model.encoder: item 1 "C2d_3_8_3": Conv2d needs'):
        load_config([], base + ["model.encoder=[C2d_3_8_3, Latent, SiLU]"])
    with pytest.raises(ConfigError, match=r"^model.decoder: item 1 .* expects 8 channels, gets 4 .*data.image_size=16"):
        load_config([], base + ["model.encoder=[C2d_3_8_3_2_1]", "model.decoder=[C2d_8_3_3_1_1]"])
    with pytest.raises(ConfigError, match="^model.encoder: missing"):
        load_config([], base)
    # The condition enters the first layer, which must take extra inputs.
    with pytest.raises(ModelConfigError, match="must be C1d, C2d, C3d, CT2d, Lin"):
        build_model(ModelConfig(arch="spec", encoder=["Flat", "Latent", "SiLU"], condition="class", num_classes=3))
    cond = ["model.condition=class", "model.num_classes=3"]  # the config check finds it before any build
    with pytest.raises(ConfigError, match=r'^model.encoder: item 1 "SiLU": a condition enters .* must be C1d, C2d'):
        load_config([], base + cond + ["model.encoder=[SiLU, C2d_3_8_3_2_1, Latent, UpS_2, C2d_4_3_3_1_1]"])
    with pytest.raises(ConfigError, match=r'^model.encoder: item 3 "SiLU": a condition enters .* must be C1d, C2d'):
        load_config([], base + cond + ["model.encoder=[C2d_3_8_3_2_1, Latent, SiLU, UpS_2, C2d_4_3_3_1_1]"])
    ok = load_config([], base + cond + ["model.encoder=[C2d_3_8_3_2_1, Latent, C2d_4_12_3_1_1, UpS_2, C2d_12_3_3_1_1]"])
    assert build_model(ok.model)(torch.randn(2, 3, 16, 16), cond=torch.tensor([0, 2])).recon.shape == (2, 3, 16, 16)


@pytest.mark.parametrize(
    "encoder, message",
    [
        ("[C2d_3_8_3_2_1, Latent, UpS_2, C2d_5_3_3_1_1]",
         r'^model.encoder: item 4 "C2d_5_3_3_1_1": input \(4, 16, 16\) does not fit Conv2d: expects 5 channels'),
        ("[C2d_3_8_3_2_1, Latent, UpS_2, C2d_4_3_3]", r'^model.encoder: item 4 "C2d_4_3_3": Conv2d needs'),
        ("[C2d_3_8_3_2_1, Latent, UpS_2, VAERB_4_6, C2d_6_3_3_1_1]",
         r'^model.encoder: item 4 "VAERB_4_6": 4 channels are not divisible'),
        ("[C2d_3_8_3_2_1, Latent, UpS_2]",
         r"^model.encoder: the layers after Latent: output \(4, 16, 16\) does not match"),
        ("[C2d_3_8_3_2_1, 2*Latent, UpS_2, C2d_4_3_3_1_1]",
         r'^model.encoder: item 2 "2\*Latent": Latent takes no repetition'),
    ],
)
def test_errors_after_latent_name_the_item_as_written(encoder, message):
    base = ["data.train=x", "data.image_size=16", "model.arch=spec"]
    with pytest.raises(ConfigError, match=message) as e:
        load_config([], base + [f"model.encoder={encoder}"])
    assert "\n" not in str(e.value)


def test_build_model_names_decoder_items_by_their_place_in_the_encoder_list():
    with pytest.raises(ModelConfigError, match=r'^model.encoder: item 4 "C2d_4_3_3": Conv2d needs'):
        build_model(ModelConfig(arch="spec", encoder=["C2d_3_8_3_2_1", "Latent", "UpS_2", "C2d_4_3_3"]))
    with pytest.raises(ModelConfigError, match=r'^model.encoder: item 2 "2\*Latent"'):
        build_model(ModelConfig(arch="spec", encoder=["C2d_3_8_3_2_1", "2*Latent", "UpS_2", "C2d_4_3_3_1_1"]))
    # A separate decoder list still counts from its own first item.
    with pytest.raises(ModelConfigError, match=r'^model.decoder: item 2 "C2d_4_3_3": Conv2d needs'):
        build_model(ModelConfig(arch="spec", encoder=["C2d_3_8_3_2_1"], decoder=["UpS_2", "C2d_4_3_3"]))


def test_command_line_dry_run(capsys):
    assert L.main([BASIC, "--image-size", "256"]) == 0
    out = capsys.readouterr().out
    assert "latent (4, 16, 16)" in out and "pair up" in out
    assert L.main(["C2d_3_8_3_2_1,SiLU,C2d_16_4_1_1_0", "--image-size", "32"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: item 3 "C2d_16_4_1_1_0": input (8, 16, 16) does not fit Conv2d') and "\n" not in err
    assert L.main(["--tokens"]) == 0 and "VAERB" in capsys.readouterr().out


def test_the_command_as_documented_prints_only_its_report():
    """`python launch/layerspec.py SPEC` (the README's command): the report on stdout, nothing on stderr
    (`python -m models.layerspec` has runpy warn that the package imported the module already)."""
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "launch/layerspec.py"), BASIC, "--image-size", "64"],
                       capture_output=True, text=True, cwd=root, timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "ok: latent (4, 4, 4) at 64x64" in r.stdout and "usage: python launch/layerspec.py" not in r.stdout
    r = subprocess.run([sys.executable, str(root / "launch/layerspec.py"), "--help"], capture_output=True, text=True,
                       cwd=root, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("usage: python launch/layerspec.py") and r.stderr == ""
