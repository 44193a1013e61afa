"""What every latent kind (kl, vq, fsq) shares: the encoder/decoder built from the config (the
latent-diffusion `Encoder`/`Decoder` or layer specs, conditioned or not) and a base class that
owns the condition embedding and the gradient-checkpointing switch.

Axis letters: b batch, c channels, h height, w width, e condition-embedding width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.base import Autoencoder
from models.blocks import exists, set_gradient_checkpointing
from models.conditioning import ConditionEmbedding


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


def build_backbone(cfg, *, latent_dim: int, gaussian: bool) -> Backbone:
    """Encoder, decoder, 1x1 latent projections and condition embedding for a `ModelConfig`.

    latent_dim: channels of the latent the decoder reads (embed_dim, or the FSQ dimension).
    gaussian: the encoder emits mean and log-variance (2 * latent channels).
    Config mistakes raise `ConfigError` naming the key.
    """
    from harness.config import ConfigError
    from models.autoencoder_kl import Decoder, Encoder
    from models.layerspec import BuildContext, SpecError, SpecNet, load_spec, spec_side, split_at_latent

    cond_embed = None
    cond_dim = 0
    if cfg.condition != "none":
        try:
            cond_embed = ConditionEmbedding(
                kind=cfg.condition, num_classes=cfg.num_classes, dim=cfg.cond_dim, dropout=cfg.cond_dropout
            )
        except ValueError as e:
            raise ConfigError(f"model.num_classes: {e}") from None
        cond_dim = cfg.cond_dim

    if cfg.arch == "ldm":
        common = dict(
            ch=cfg.ch,
            ch_mult=tuple(cfg.ch_mult),
            num_res_blocks=cfg.num_res_blocks,
            attn_resolutions=tuple(cfg.attn_resolutions),
            resolution=cfg.resolution or None,
            z_channels=cfg.z_channels,
            dropout=cfg.dropout,
            resamp_with_conv=cfg.resamp_with_conv,
            attn_type=cfg.attn_type,
            num_groups=cfg.norm_groups,
            cond_dim=cond_dim,
        )
        try:
            encoder = Encoder(in_channels=cfg.in_channels, double_z=gaussian, **common)
            decoder = Decoder(out_ch=cfg.out_ch, **common)
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
        moments = 2 if gaussian else 1
        return Backbone(
            encoder=encoder,
            decoder=decoder,
            quant_conv=nn.Conv2d(moments * cfg.z_channels, moments * latent_dim, 1),
            post_quant_conv=nn.Conv2d(latent_dim, cfg.z_channels, 1),
            cond_embed=cond_embed,
        )

    if cfg.arch != "spec":
        raise ConfigError(f"model.arch: {cfg.arch!r} is not one of ldm, spec")
    if not cfg.encoder:
        raise ConfigError("model.encoder: missing; arch=spec needs a list of layer strings or a .json/.yaml path")
    side = "encoder"
    try:
        enc = load_spec(cfg.encoder, "encoder")
        side = "decoder"
        dec = load_spec(cfg.decoder, "decoder") if cfg.decoder else None
        enc, dec = split_at_latent(enc, dec)
    except SpecError as e:
        msg = str(e)
        if msg.startswith(("encoder: ", "decoder: ")):
            side, msg = msg.split(": ", 1)
        raise ConfigError(f"model.{side}: {msg}") from None
    ctx = dict(
        dropout=cfg.dropout, attn_type=cfg.attn_type, num_groups=cfg.norm_groups, resamp_with_conv=cfg.resamp_with_conv
    )
    try:
        side = "encoder"
        encoder = SpecNet(enc, in_channels=cfg.in_channels, cond_in=cond_dim, ctx=BuildContext(**ctx))
        side = spec_side(dec, "decoder")  # "encoder" when the decoder follows Latent there
        decoder = SpecNet(dec, cond_in=cond_dim, ctx=BuildContext(**ctx, cond_dim=cond_dim))
    except SpecError as e:
        raise ConfigError(f"model.{side}: {e}") from None
    return Backbone(encoder=encoder, decoder=decoder, quant_conv=None, post_quant_conv=None, cond_embed=cond_embed)
