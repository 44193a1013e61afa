"""The KL (Gaussian) autoencoder of latent diffusion, written with einops.

Axis letters: b batch, c channels, h height, w width, e condition-embedding width.

Parameter names follow latent diffusion's `Encoder` / `Decoder` / `AutoencoderKL` (conv_in,
down.<i>.block.<j>, mid.attn_1, quant_conv, ...) and kl-f8 built here has its 83.65M parameters,
so its weights should load with `load_state_dict(strict=False)` once its `loss.*` (LPIPS and
discriminator) entries are dropped -- not yet tried against a real checkpoint file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.base import AutoencoderOutput
from models.blocks import Downsample, Normalize, ResnetBlock, Upsample, exists, make_attn
from models.common import LatentAutoencoder, build_backbone
from models.conditioning import ConditionEmbedding, concat_condition
from models.distributions import DiagonalGaussianDistribution

# ---------------------------------------------------------------------------------------------
# Encoder / decoder
# ---------------------------------------------------------------------------------------------


def attn_levels(attn_resolutions, resolution: int | None, num_levels: int) -> set[int]:
    """Resolution levels (0 = full size) whose feature size is listed in `attn_resolutions`.

    Attention is placed per level at build time, as latent diffusion does, so a model trained at one
    size keeps using its trained attention blocks when run at another. `resolution` is the image size
    the sizes refer to; it is only needed when `attn_resolutions` is not empty.
    """
    if not attn_resolutions:
        return set()
    if not resolution:
        raise ValueError("attn_resolutions needs the image resolution they refer to (model.resolution)")
    sizes = [resolution // 2**i for i in range(num_levels)]
    for r in attn_resolutions:
        if r not in sizes:
            raise ValueError(
                f"attn_resolutions: {r} is not a feature size of this model at resolution {resolution}; "
                f"its sizes are {', '.join(map(str, sizes))}"
            )
    return {i for i, s in enumerate(sizes) if s in attn_resolutions}


class Encoder(nn.Module):
    """Image `b in_channels h w` -> moments `b (2 z_channels) h/f w/f` (f = 2^(len(ch_mult)-1)).

    cond_dim > 0: a condition embedding `b e` enters as `e` extra input channels of conv_in.
    """

    def __init__(
        self,
        *,
        ch: int = 128,
        ch_mult=(1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_resolutions=(),
        resolution: int | None = None,
        in_channels: int = 3,
        z_channels: int = 4,
        double_z: bool = True,
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        attn_type: str = "vanilla",
        num_groups: int = 32,
        cond_dim: int = 0,
    ):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.out_channels = 2 * z_channels if double_z else z_channels
        self.cond_dim = cond_dim
        levels = attn_levels(attn_resolutions, resolution, self.num_resolutions)
        block = dict(dropout=dropout, num_groups=num_groups)

        self.conv_in = nn.Conv2d(in_channels + cond_dim, ch, 3, 1, 1)
        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            down = nn.Module()
            down.block, down.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                down.block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, **block))
                block_in = block_out
                if i_level in levels:
                    down.attn.append(make_attn(block_in, attn_type, num_groups))
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(in_channels=block_in, with_conv=resamp_with_conv)
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, **block)
        self.mid.attn_1 = make_attn(block_in, attn_type, num_groups)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, **block)
        self.norm_out = Normalize(block_in, num_groups)
        self.conv_out = nn.Conv2d(block_in, self.out_channels, 3, 1, 1)

    def out_shape(self, image_size: int) -> tuple[int, int, int]:
        """Moments shape `(c, h, w)` for a square image of side `image_size` (each level halves, rounding down)."""
        size = image_size
        for _ in range(self.num_resolutions - 1):
            size //= 2
        return (self.out_channels, size, size)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv_in(concat_condition(x, emb if self.cond_dim else None))
        for i_level, down in enumerate(self.down):
            for i_block in range(self.num_res_blocks):
                h = down.block[i_block](h)
                if len(down.attn):
                    h = down.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent `b z_channels h w` -> image `b out_ch (h*f) (w*f)`.

    cond_dim > 0: the condition embedding enters as extra input channels of conv_in and through
    adaptive GroupNorm in every residual block (see `AdaGroupNorm`): extra input channels alone fade
    through a deep decoder, while a per-block scale/shift reaches every resolution for the price of
    one small linear map per norm. FiLM on GroupNorm rather than BatchNorm because GroupNorm's
    statistics are per sample, so the condition of one sample never leaks into another.
    """

    def __init__(
        self,
        *,
        ch: int = 128,
        out_ch: int = 3,
        ch_mult=(1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_resolutions=(),
        resolution: int | None = None,
        z_channels: int = 4,
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        attn_type: str = "vanilla",
        num_groups: int = 32,
        cond_dim: int = 0,
        tanh_out: bool = False,
    ):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.cond_dim = cond_dim
        self.tanh_out = tanh_out
        levels = attn_levels(attn_resolutions, resolution, self.num_resolutions)
        block = dict(dropout=dropout, num_groups=num_groups, cond_dim=cond_dim)

        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels + cond_dim, block_in, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, **block)
        self.mid.attn_1 = make_attn(block_in, attn_type, num_groups)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, **block)

        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[i_level]
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                up.block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, **block))
                block_in = block_out
                if i_level in levels:
                    up.attn.append(make_attn(block_in, attn_type, num_groups))
            if i_level != 0:
                up.upsample = Upsample(in_channels=block_in, with_conv=resamp_with_conv)
            self.up.insert(0, up)  # keep up[i] = level i, as in latent diffusion's checkpoints

        self.norm_out = Normalize(block_in, num_groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, 1, 1)

    def forward(self, z: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        emb = emb if self.cond_dim else None
        h = self.conv_in(concat_condition(z, emb))
        h = self.mid.block_1(h, emb)
        h = self.mid.block_2(self.mid.attn_1(h), emb)
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = up.block[i_block](h, emb)
                if len(up.attn):
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h


# ---------------------------------------------------------------------------------------------
# The autoencoder
# ---------------------------------------------------------------------------------------------


class AutoencoderKL(LatentAutoencoder):
    """Gaussian VAE: encoder -> quant_conv -> diagonal Gaussian posterior -> post_quant_conv -> decoder.

    KL scale (explicit, as latent diffusion): `losses["kl"]` is the KL to N(0, I) *summed* over every
    latent element (c, h, w) of a sample and *averaged* over the batch. Its weight (`loss.kl_weight`)
    is therefore relative to a pixel loss averaged over elements: the 1e-6 of latent diffusion.
    metrics: posterior_std (mean std of the posterior), latent_std (std of the latent decoded;
    latent diffusion scales latents by its inverse).

    `encode` returns the latent tensor the decoder reads (the posterior mean, or a draw with
    sample_posterior=True); `posterior(x)` returns the distribution itself.
    With double_z=False the encoder emits the latent directly: a plain autoencoder with KL 0.
    A condition (see `ConditionEmbedding`) reaches encoder and decoder; `cond=None` on a
    conditional model means the null (unconditioned) embedding.
    """

    def __init__(
        self,
        *,
        encoder: nn.Module,
        decoder: nn.Module,
        quant_conv: nn.Module | None = None,
        post_quant_conv: nn.Module | None = None,
        embed_dim: int = 4,
        double_z: bool = True,
        cond_embed: ConditionEmbedding | None = None,
        gradient_checkpointing: bool = False,
    ):
        super().__init__(
            encoder=encoder,
            decoder=decoder,
            quant_conv=quant_conv,
            post_quant_conv=post_quant_conv,
            cond_embed=cond_embed,
            gradient_checkpointing=gradient_checkpointing,
        )
        self.embed_dim = embed_dim
        self.double_z = double_z

    # --- the interface ------------------------------------------------------------------------

    def _posterior(self, x: torch.Tensor, emb: torch.Tensor | None) -> DiagonalGaussianDistribution:
        h = self._encode_features(x, emb)
        if not self.double_z:
            h = torch.cat([h, torch.zeros_like(h)], dim=1)
        return DiagonalGaussianDistribution(h, deterministic=not self.double_z)

    def posterior(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> DiagonalGaussianDistribution:
        return self._posterior(x, self.embed(cond, x.shape[0]))

    def encode(
        self,
        x: torch.Tensor,
        cond: torch.Tensor | None = None,
        sample_posterior: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The latent the decoder reads: the posterior mean (default) or a draw from it."""
        posterior = self.posterior(x, cond)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return z.to(x.dtype)

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor | None = None, sample_posterior: bool = True
    ) -> AutoencoderOutput:
        # One embedding (and one condition-dropout draw) for encoder and decoder alike.
        emb = self.embed(cond, x.shape[0], drop=self.training)
        posterior = self._posterior(x, emb)
        z = posterior.sample() if sample_posterior else posterior.mode()
        recon = self._decode(z, emb)
        kl = posterior.kl().mean()
        metrics = {"posterior_std": posterior.std.mean().detach(), "latent_std": z.detach().std()}
        return AutoencoderOutput(recon=recon, losses={"kl": kl}, metrics=metrics, latent=z)

    def latent_shape(self, image_size: int) -> tuple[int, ...]:
        shape = list(super().latent_shape(image_size))
        if self.double_z:
            shape[0] //= 2
        return tuple(shape)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        image_size: int,
        cond: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Decode `n` latents drawn from N(0, I) (on the generator's device, then moved).

        cond: `n` class indices (-1 = unconditioned) or `n k` multi-hot rows; None = unconditioned.
        """
        self._check_sample_cond(n, cond)
        noise_device = generator.device if exists(generator) else self._device
        z = torch.randn((n, *self.latent_shape(image_size)), generator=generator, device=noise_device)
        return self.decode(z.to(self._device), cond)

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg) -> AutoencoderKL:
        """Build from a `ModelConfig` (harness.config): arch ldm or spec, conditioned or not."""
        parts = build_backbone(cfg, latent_dim=cfg.embed_dim, gaussian=cfg.double_z)
        return cls(
            encoder=parts.encoder,
            decoder=parts.decoder,
            quant_conv=parts.quant_conv,
            post_quant_conv=parts.post_quant_conv,
            embed_dim=cfg.embed_dim,
            double_z=cfg.double_z,
            cond_embed=parts.cond_embed,
            gradient_checkpointing=cfg.gradient_checkpointing,
        )
