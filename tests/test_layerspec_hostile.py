"""Layer-spec mistakes a reviewer found: each is one line naming the item (or the argument), never a
traceback, and the dry-run command line agrees with what training accepts."""

import subprocess
import sys
from pathlib import Path

import pytest

from harness.config import ConfigError, load_config
from models.layerspec import SpecError, check_autoencoder, main, parse_item, split_at_latent

ROOT = Path(__file__).resolve().parents[1]
SPEC = ["model.arch=spec", "data.image_size=16", "data.train=x"]


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


# ----------------------------------------------------------------- 6. the command line


GROUPS = '["C2d_3_8_4_2_1","VAERB_8_8","Latent","CT2d_4_3_4_2_1"]'


def test_cli_checks_norm_groups_as_training_does(capsys):
    with pytest.raises(ConfigError, match=r'^model\.encoder: item 2 "VAERB_8_8": 8 channels are not divisible into '
                                          r"model\.norm_groups=32 groups"):
        load_config([], [*SPEC, f"model.encoder={GROUPS}"])
    rc, out, err = cli(capsys, GROUPS, "--image-size", "16")
    assert rc == 1 and "ok" not in out
    assert err.strip() == 'error: encoder: item 2 "VAERB_8_8": 8 channels are not divisible into ' \
                          "model.norm_groups=32 groups"
    rc, out, err = cli(capsys, GROUPS, "--image-size", "16", "--norm-groups", "4")
    assert rc == 0 and "ok: latent (4, 8, 8)" in out
    load_config([], [*SPEC, f"model.encoder={GROUPS}", "model.norm_groups=4"])  # and training agrees
    rc, out, err = cli(capsys, '["C2d_3_8_4_2_1","VAERB_8_8"]', "--image-size", "16")  # one side only
    assert rc == 1 and "model.norm_groups=32" in err


@pytest.mark.parametrize("argv, says", [
    (["[C2d_3_8_4_2_1]", "--image-size", "16"], "error: SPEC '[C2d_3_8_4_2_1]': not a valid JSON list"),
    (['["C2d_3_8_4_2_1"]', "[CT2d", "--image-size", "16"], "error: DECODER '[CT2d': not a valid JSON list"),
    ([GROUPS, "--image-size", "0"], "error: --image-size 0: must be a positive whole number"),
    ([GROUPS, "--norm-groups", "0"], "error: --norm-groups 0: must be a positive whole number"),
    ([GROUPS, "--in-channels", "-1"], "error: --in-channels -1: must be a positive whole number"),
])
def test_cli_usage_mistakes_exit_2_in_one_line(capsys, argv, says):
    rc, out, err = cli(capsys, *argv)
    assert rc == 2 and err.startswith(says) and len(err.strip().splitlines()) == 1, err


def test_cli_script_exit_codes():
    def run(*argv):
        return subprocess.run([sys.executable, "launch/layerspec.py", *argv], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    r = run("[C2d", "--image-size", "16")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "SPEC" in r.stderr
    r = run(GROUPS, "--image-size", "16")
    assert r.returncode == 1 and "norm_groups=32" in r.stderr


# ----------------------------------------------------------------- 7. a misspelt Latent marker


@pytest.mark.parametrize("marker, says", [
    ("latent", r'item 2 "latent": unknown layer "latent"; did you mean "Latent"\?'),
    ("Latent_4", r'item 2 "Latent_4": Latent takes no arguments and no repetition'),
])
def test_a_misspelt_latent_marker_is_named_not_a_missing_decoder(marker, says):
    with pytest.raises(SpecError, match="^encoder: " + says):
        split_at_latent(["C2d_3_8_4_2_1", marker, "CT2d_4_3_4_2_1"])
    with pytest.raises(ConfigError, match=r"^model\.encoder: " + says):
        load_config([], [*SPEC, f"model.encoder=[C2d_3_8_4_2_1, {marker}, CT2d_4_3_4_2_1]"])


def test_a_missing_decoder_is_still_said():
    with pytest.raises(SpecError, match="^decoder: missing"):
        split_at_latent(["C2d_3_8_4_2_1", "ReLU"])


# ----------------------------------------------------------------- 8, 10. numbers


@pytest.mark.parametrize("token, says", [
    ("²*ReLU", "repetition must be a positive whole number"),
    ("٣*ReLU", "repetition must be a positive whole number"),  # Arabic-Indic 3: int() reads it, we do not
    ("C2d_٣_8_3_1_1", "Conv2d needs a whole number for in; got '٣'"),
    ("LReLU_1e300", r"LeakyReLU slope must be in \[0, 1000\); got 1e300"),
    ("LReLU_inf", r"LeakyReLU slope must be in \[0, 1000\); got inf"),
    ("LReLU_nan", r"LeakyReLU slope must be in \[0, 1000\); got nan"),
])
def test_numbers_are_ascii_and_bounded(token, says):
    with pytest.raises(SpecError, match=says):
        parse_item(1, token)


def test_a_large_sane_slope_still_parses():
    assert parse_item(1, "LReLU_0.2").args == (0.2,) and parse_item(1, " 2 *ReLU").count == 2


# ----------------------------------------------------------------- 11. VAEA without attention


def test_vaea_with_attention_off_needs_no_norm_groups():
    spec = ["C2d_3_7_4_2_1", "VAEA_7", "C2d_7_8_3_1_1", "Latent", "CT2d_4_3_4_2_1"]
    with pytest.raises(SpecError, match='item 2 "VAEA_7": 7 channels are not divisible'):
        check_autoencoder(spec, image_size=16, num_groups=32)
    check_autoencoder(spec, image_size=16, num_groups=32, attn_type="none")
    cfg = load_config([], [*SPEC, f"model.encoder={spec}".replace("'", ""), "model.attn_type=none"])
    import torch

    from models import build_model

    out = build_model(cfg.model)(torch.zeros(1, 3, 16, 16))
    assert out.recon.shape == (1, 3, 16, 16)
    with pytest.raises(ConfigError, match='item 2 "VAEA_7": 7 channels'):  # attention on: refused as before
        load_config([], [*SPEC, f"model.encoder={spec}".replace("'", "")])


# ----------------------------------------------------------------- 2. an unreadable spec file


def test_an_unreadable_spec_file_is_one_line():
    from models.layerspec import read_spec_file

    with pytest.raises(SpecError, match=r"^/proc/self/mem: cannot read the layer spec file \(Input/output error\)"):
        read_spec_file("/proc/self/mem")
    with pytest.raises(SpecError, match="cannot read the layer spec file .File name too long"):
        read_spec_file("a" * 5000 + ".json")
