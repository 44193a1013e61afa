"""What every latent kind (kl, vq, fsq) shares: the encoder/decoder built from the config (the
latent-diffusion `Encoder`/`Decoder` or layer specs, conditioned or not), the checks of those
settings, and a base class that owns the condition embedding and the gradient-checkpointing switch.

Axis letters: b batch, c channels, h height, w width, e condition-embedding width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.base import Autoencoder, ModelConfigError
from models.blocks import Conv1x1, exists, set_gradient_checkpointing
from models.conditioning import ConditionEmbedding
from models.layerspec import (
    LATENT,
    AutoencoderShapes,
    BuildContext,
    ShapeError,
    SpecError,
    SpecNet,
    batchnorm_problem,
    check_autoencoder,
    check_condition_input,
    load_spec,
    parse_spec,
    read_spec_file,
    spec_side,
    split_at_latent,
)
from models.ldm import Decoder, Encoder, check_ldm_config


class LatentAutoencoder(Autoencoder):
    """Encoder -> [quant_conv] -> latent -> [post_quant_conv] -> decoder, with an optional condition.

    Subclasses define what sits between quant_conv and post_quant_conv (a Gaussian, a quantizer).
    A condition passed to an unconditional model is ignored, so the harness can always pass the
    batch's labels.
    """

    def __init__(
        self,
        *,
        encoder: nn.Module,
        decoder: nn.Module,
        quant_conv: nn.Module | None = None,
        post_quant_conv: nn.Module | None = None,
        cond_embed: ConditionEmbedding | None = None,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.quant_conv, self.post_quant_conv = quant_conv, post_quant_conv
        self.cond_embed = cond_embed
        self.condition = cond_embed.kind if exists(cond_embed) else None
        self.gradient_checkpointing = gradient_checkpointing

    @property
    def gradient_checkpointing(self) -> bool:
        return self._gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        self._gradient_checkpointing = bool(enabled)
        set_gradient_checkpointing(self, bool(enabled))

    def embed(self, cond: torch.Tensor | None, batch: int, drop: bool = False) -> torch.Tensor | None:
        """The condition embedding `b e` (None for an unconditional model)."""
        if not exists(self.cond_embed):
            return None
        return self.cond_embed(cond, batch, drop=drop)

    def _encode_features(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        h = self.encoder(x, emb)
        return self.quant_conv(h) if exists(self.quant_conv) else h

    def _decode(self, z: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        z = z.to(self._dtype)  # latents may be fp32; a bf16/fp16 model without autocast needs its own dtype
        if exists(self.post_quant_conv):
            z = self.post_quant_conv(z)
        return self.decoder(z, emb)

    def decode(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self._decode(z, self.embed(cond, z.shape[0]))

    def latent_shape(self, image_size: int) -> tuple[int, ...]:
        shape = list(self.encoder.out_shape(image_size))
        if exists(self.quant_conv):
            shape[0] = self.quant_conv.out_channels
        return tuple(shape)

    def _check_sample_cond(self, n: int, cond: torch.Tensor | None) -> None:
        if exists(cond) and exists(self.cond_embed) and cond.shape[0] != n:
            raise ValueError(f"sample: cond has {cond.shape[0]} rows but n={n} samples were asked for")

    @property
    def _device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.decoder.parameters()).dtype

    # --- settings ------------------------------------------------------------------------------

    config_keys = (
        "arch", "encoder", "decoder", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks", "attn_resolutions",
        "resolution", "z_channels", "attn_type", "norm_groups", "dropout", "resamp_with_conv", "gradient_checkpointing",
        "condition", "num_classes", "cond_dim", "cond_dropout",
    )  # fmt: skip

    @classmethod
    def latent_layout(cls, m) -> tuple[bool, int | None]:
        """(gaussian, dim) for a `ModelConfig`: whether the encoder emits mean and log-variance halves,
        and the channels of the latent the decoder reads (None = whatever a spec encoder emits)."""
        raise NotImplementedError

    @classmethod
    def check_config(cls, m, image_size: int) -> None:
        """The condition and the encoder/decoder (arch ldm or spec) at `image_size`. A subclass checks
        its latent's own keys first, then calls this."""
        check_backbone(m, image_size, *cls.latent_layout(m))

    @classmethod
    def batch_problem(cls, m, image_size: int, batch_size: int) -> str | None:
        """Why `m` (checked) cannot train on `batch_size` images per rank: a spec BatchNorm item that
        would see one value per channel. None for arch ldm (GroupNorm only)."""
        if m.arch != "spec":
            return None
        why = batchnorm_problem(spec_shapes(m, image_size, *cls.latent_layout(m)), batch_size)
        return None if why is None else str(_spec_error(SpecError(why), "encoder"))


# ---------------------------------------------------------------------------------------------
# Construction from a ModelConfig
# ---------------------------------------------------------------------------------------------


@dataclass
class Backbone:
    encoder: nn.Module
    decoder: nn.Module
    quant_conv: nn.Module | None
    post_quant_conv: nn.Module | None
    cond_embed: ConditionEmbedding | None


def check_backbone(m, image_size: int, gaussian: bool, latent_dim: int | None) -> None:
    """`ModelConfigError` for a condition, ldm or spec setting of `m` that cannot build at `image_size`."""
    if m.condition != "none" and m.num_classes < 1:
        raise ModelConfigError(f"model.num_classes: model.condition={m.condition} needs the number of classes (>= 1)")
    if m.arch == "ldm":
        check_ldm_config(m, image_size)
    elif m.arch == "spec":
        check_spec_config(m, image_size, gaussian=gaussian, latent_dim=latent_dim)
    else:
        raise ModelConfigError(f"model.arch: {m.arch!r} is not one of ldm, spec")


def check_spec_config(m, image_size: int, *, gaussian: bool, latent_dim: int | None) -> None:
    """Parse the layer specs and dry-run them at `image_size`: the first layer that does not fit, an
    encoder/decoder pair that does not meet at the latent, a decoder whose output is not the image or a
    first layer a condition cannot enter is a `ModelConfigError` here, before any work.

    A spec file is read once, here: the config (and so the run folder, checkpoints and model hash)
    then holds the layers themselves, so an edited file cannot silently change a resumed model.
    """
    enc, dec = _load_specs(m)
    spec_shapes(m, image_size, gaussian, latent_dim, specs=(enc, dec))
    if m.condition != "none":
        encoder, decoder = split_at_latent(enc, dec)
        for side, spec in (("encoder", encoder), (spec_side(decoder, "decoder"), decoder)):
            try:
                check_condition_input([it for it in parse_spec(spec) if it.name != LATENT])
            except SpecError as e:
                raise _spec_error(e, side) from None
    m.encoder = list(enc)
    if dec is not None:
        m.decoder = list(dec)


def spec_shapes(m, image_size: int, gaussian: bool, latent_dim: int | None,
                specs: tuple[list, list | None] | None = None) -> AutoencoderShapes:
    """The dry run of `m`'s encoder and decoder specs at `image_size`; a `ModelConfigError` naming the
    first item that does not fit."""
    enc, dec = specs or _load_specs(m)
    try:
        return check_autoencoder(
            enc,
            dec,
            image_size=image_size,
            in_channels=m.in_channels,
            out_channels=m.out_ch,
            latent="gaussian" if gaussian else "plain",
            latent_dim=latent_dim,
            num_groups=m.norm_groups,
            attn_type=m.attn_type,
        )
    except SpecError as e:
        where = f" (at data.image_size={image_size})" if isinstance(e, ShapeError) else ""
        raise _spec_error(e, "encoder", where) from None


def _load_specs(m) -> tuple[list, list | None]:
    """model.encoder and model.decoder as layer lists (read from their files when paths). With no
    model.decoder, a model.encoder file holding a mapping gives its `decoder` list too."""
    if not m.encoder:
        raise ModelConfigError("model.encoder: missing; arch=spec needs a list of layer strings or a .json/.yaml path")
    side = "encoder"
    try:
        enc = load_spec(m.encoder, "encoder")
        side = "decoder"
        if m.decoder:
            return enc, load_spec(m.decoder, "decoder")
        if isinstance(m.encoder, str) and isinstance(data := read_spec_file(m.encoder)[1], dict) and "decoder" in data:
            return enc, load_spec(m.encoder, "decoder")
        return enc, None
    except SpecError as e:
        raise _spec_error(e, side) from None


def _spec_error(e: SpecError, side: str, where: str = "") -> ModelConfigError:
    """`model.<side>: ...` for a spec error; one that names its own side ("decoder: ...") keeps it."""
    msg = str(e)
    if msg.startswith(("encoder: ", "decoder: ")):
        side, msg = msg.split(": ", 1)
    return ModelConfigError(f"model.{side}: {msg}{where}")


def build_backbone(m, *, latent_dim: int, gaussian: bool) -> Backbone:
    """Encoder, decoder, 1x1 latent projections and condition embedding for a `ModelConfig` `m`.

    latent_dim: channels of the latent the decoder reads (embed_dim, or the FSQ dimension).
    gaussian: the encoder emits mean and log-variance (2 * latent channels).
    Config mistakes raise `ModelConfigError` naming the key (`check_config` finds them earlier).
    """
    cond_embed = None
    cond_dim = 0
    if m.condition != "none":
        try:
            cond_embed = ConditionEmbedding(
                kind=m.condition, num_classes=m.num_classes, dim=m.cond_dim, dropout=m.cond_dropout
            )
        except ValueError as e:
            raise ModelConfigError(f"model.num_classes: {e}") from None
        cond_dim = m.cond_dim

    if m.arch == "ldm":
        common = dict(
            ch=m.ch,
            ch_mult=tuple(m.ch_mult),
            num_res_blocks=m.num_res_blocks,
            attn_resolutions=tuple(m.attn_resolutions),
            resolution=m.resolution or None,
            z_channels=m.z_channels,
            dropout=m.dropout,
            resamp_with_conv=m.resamp_with_conv,
            attn_type=m.attn_type,
            num_groups=m.norm_groups,
            cond_dim=cond_dim,
        )
        try:
            encoder = Encoder(in_channels=m.in_channels, double_z=gaussian, **common)
            decoder = Decoder(out_ch=m.out_ch, **common)
        except ModelConfigError:
            raise
        except ValueError as e:  # a block's own check, e.g. channels not divisible into norm_groups
            raise ModelConfigError(f"model: {e}") from None
        moments = 2 if gaussian else 1
        return Backbone(
            encoder=encoder,
            decoder=decoder,
            quant_conv=Conv1x1(moments * m.z_channels, moments * latent_dim),
            post_quant_conv=Conv1x1(latent_dim, m.z_channels),
            cond_embed=cond_embed,
        )

    if m.arch != "spec":
        raise ModelConfigError(f"model.arch: {m.arch!r} is not one of ldm, spec")
    enc, dec = _load_specs(m)
    try:
        enc, dec = split_at_latent(enc, dec)
    except SpecError as e:
        raise _spec_error(e, "encoder") from None
    ctx = dict(dropout=m.dropout, attn_type=m.attn_type, num_groups=m.norm_groups, resamp_with_conv=m.resamp_with_conv)
    try:
        side = "encoder"
        encoder = SpecNet(enc, in_channels=m.in_channels, cond_in=cond_dim, ctx=BuildContext(**ctx))
        side = spec_side(dec, "decoder")  # "encoder" when the decoder follows Latent there
        decoder = SpecNet(dec, cond_in=cond_dim, ctx=BuildContext(**ctx, cond_dim=cond_dim))
    except SpecError as e:
        raise _spec_error(e, side) from None
    return Backbone(encoder=encoder, decoder=decoder, quant_conv=None, post_quant_conv=None, cond_embed=cond_embed)
