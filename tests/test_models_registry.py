"""The registry of model kinds: lookup, one-line errors, registering a kind that is not an autoencoder,
and each kind's own answers (settings checks, DeepSpeed refusals, the keys it reads)."""

import dataclasses

import pytest
import torch
from torch import nn

import models
from harness.config import ConfigError, ModelConfig, load_config
from models import ModelConfigError, build_model, check_config, deepspeed_unsupported, kinds, model_class, register
from models.registry import _KINDS


def test_the_three_autoencoder_kinds_are_registered():
    assert kinds()[:3] == ["kl", "vq", "fsq"]
    assert [model_class(k).__name__ for k in ("kl", "vq", "fsq")] == ["AutoencoderKL", "VQAutoencoder", "VQAutoencoder"]


@pytest.mark.parametrize(
    "kind, message",
    [
        ("vqgan", "model.kind: 'vqgan' is not allowed; choose one of 'kl' | 'vq' | 'fsq'"),
        ("kll", "model.kind: 'kll' is not allowed; did you mean 'kl'? choose one of 'kl' | 'vq' | 'fsq'"),
    ],
)
def test_unknown_kind_is_one_line_listing_the_kinds(kind, message):
    with pytest.raises(ModelConfigError) as e:
        build_model(ModelConfig(kind=kind))
    assert str(e.value).startswith(message)
    with pytest.raises(ConfigError) as e:  # the harness says the same, as its own config error
        load_config([], ["data.train=x", f"model.kind={kind}"])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


class Toy(nn.Module):
    """A kind without encode/decode: the registry only needs from_config."""

    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Linear(width, 2)

    @classmethod
    def from_config(cls, m):
        return cls(m.ch)


@pytest.fixture
def toy_kind():
    register("toy", Toy)
    yield "toy"
    del _KINDS["toy"]


def test_a_kind_that_is_not_an_autoencoder_registers_builds_and_validates(toy_kind):
    assert "toy" in kinds()
    cfg = load_config([], ["data.train=x", "model.kind=toy", "model.ch=5"])  # no check_config: nothing to check
    model = build_model(cfg.model)
    assert isinstance(model, Toy) and model.net.in_features == 5
    assert deepspeed_unsupported(cfg.model) is None
    listed = r"^model.kind: 'tooy' is not allowed; did you mean 'toy'\? choose one of 'kl' \| .* \| 'toy'$"
    with pytest.raises(ConfigError, match=listed):
        load_config([], ["data.train=x", "model.kind=tooy"])


def test_register_refuses_a_taken_kind_and_a_class_without_from_config(toy_kind):
    register("toy", Toy)  # the same class again is harmless
    with pytest.raises(ValueError, match="already taken by Toy"):
        register("toy", type("OtherToy", (Toy,), {}))
    with pytest.raises(TypeError, match="Linear has no from_config"):
        register("linear", nn.Linear)
    assert register("decorated")(Toy) is Toy  # the decorator form
    del _KINDS["decorated"]


def test_deepspeed_refusal_comes_from_the_model_class():
    why = deepspeed_unsupported(ModelConfig(kind="vq", vq_decay=0.0))
    assert why.startswith("model.vq_decay=0 (a codebook trained by gradient) does not work under DeepSpeed")
    assert "\n" not in why
    assert deepspeed_unsupported(ModelConfig(kind="vq")) is None
    assert deepspeed_unsupported(ModelConfig(kind="fsq", vq_decay=0.0)) is None
    assert deepspeed_unsupported(ModelConfig(kind="kl")) is None


def test_config_keys_are_schema_keys_and_every_key_is_read():
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    read = set()
    for kind in kinds():
        keys = set(model_class(kind).config_keys)
        assert keys <= fields, keys - fields
        read |= keys
    assert fields - read == {"kind"}


@pytest.mark.parametrize(
    "settings, image_size, message",
    [
        (dict(attn_resolutions=[12], resolution=32, ch_mult=[1, 2]), 32, "model.attn_resolutions: 12 is not a feature"),
        (dict(ch_mult=[1, 2, 2, 2]), 30, "data.image_size: 30 is not divisible by 8"),
        (dict(ch=48), 64, "model.norm_groups: 48 channels"),
        (dict(condition="class"), 64, "model.num_classes: model.condition=class needs"),
        (dict(kind="vq", vq_decay=1.0), 64, "model.vq_decay: 1.0 would freeze"),
        (dict(kind="fsq", fsq_levels=[8, 1]), 64, "model.fsq_levels: need a non-empty list"),
        (dict(kind="fsq", fsq_levels=[1024, 1024, 2]), 64, "model.fsq_levels: [1024, 1024, 2] make 2097152 codes, "
         "over 1048576"),  # was an overflow traceback inside the step (or an out-of-memory that blamed the batch)
        (dict(arch="spec"), 64, "model.encoder: missing"),
        (dict(arch="spec", kind="vq", encoder=["C2d_3_8_3_2_1"], decoder=["C2d_4_3_3_1_1"]), 16,
         "model.encoder: output (8, 8, 8) has 8 channels but the quantizer needs 4"),
    ],
)
def test_one_copy_of_each_check_the_harness_only_converts(settings, image_size, message):
    with pytest.raises(ModelConfigError) as model_error:
        check_config(ModelConfig(**settings), image_size)
    assert str(model_error.value).startswith(message)
    overrides = [f"model.{k}={v}".replace("'", "") for k, v in settings.items()]
    with pytest.raises(ConfigError) as config_error:
        load_config([], ["data.train=x", f"data.image_size={image_size}", *overrides])
    assert str(config_error.value) == str(model_error.value)


def test_check_config_fills_in_what_is_derived(tmp_path):
    m = ModelConfig(ch=32, ch_mult=[1, 2], attn_resolutions=[16])
    check_config(m, 32)
    assert m.resolution == 32  # attention sizes refer to the training size
    (tmp_path / "net.yaml").write_text("encoder: [C2d_3_8_3_2_1]\ndecoder: [UpS_2, C2d_4_3_3_1_1]\n")
    m = ModelConfig(arch="spec", encoder=str(tmp_path / "net.yaml"), decoder=str(tmp_path / "net.yaml"))
    check_config(m, 16)
    assert m.encoder == ["C2d_3_8_3_2_1"] and m.decoder == ["UpS_2", "C2d_4_3_3_1_1"]  # the file read once
    assert build_model(m)(torch.randn(1, 3, 16, 16)).recon.shape == (1, 3, 16, 16)


def test_models_errors_are_value_errors_not_the_harness_one():
    assert issubclass(ModelConfigError, ValueError) and not issubclass(ModelConfigError, ConfigError)
    assert models.ModelConfigError is ModelConfigError


def test_every_registered_autoencoder_kind_goes_through_the_interface_tests():
    from test_models_kinds import KINDS

    tested = {settings.get("kind", "kl") for settings in KINDS.values()}
    autoencoders = {k for k in kinds() if issubclass(model_class(k), models.Autoencoder)}
    assert autoencoders == tested, "add the new kind to KINDS in tests/test_models_kinds.py"
