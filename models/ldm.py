"""arch=ldm: latent diffusion's convolutional `Encoder` / `Decoder`, written with einops.

Axis letters: b batch, c channels, h height, w width, e condition-embedding width.

Parameter names follow latent diffusion's `Encoder` / `Decoder` (conv_in, down.<i>.block.<j>,
mid.attn_1, up.<i>.upsample, ...) so its checkpoints load by name. `check_ldm_config` holds the
rules a `ModelConfig` with arch=ldm must meet; the modules themselves raise the same errors.
"""

from __future__ import annotations

import torch
from torch import nn

from models.base import ModelConfigError
from models.blocks import Downsample, Normalize, ResnetBlock, Upsample, make_attn
from models.conditioning import concat_condition


def attn_levels(attn_resolutions, resolution: int | None, num_levels: int) -> set[int]:
    """Resolution levels (0 = full size) whose feature size is listed in `attn_resolutions`.

    Attention is placed per level at build time, as latent diffusion does, so a model trained at one
    size keeps using its trained attention blocks when run at another. `resolution` is the image size
    the sizes refer to; it is only needed when `attn_resolutions` is not empty.
    """
    if not attn_resolutions:
        return set()
    if not resolution:
        raise ModelConfigError("model.resolution: model.attn_resolutions needs the image resolution its sizes refer to")
    sizes = [resolution // 2**i for i in range(num_levels)]
    for r in attn_resolutions:
        if r not in sizes:
            raise ModelConfigError(
                f"model.attn_resolutions: {r} is not a feature size at resolution {resolution}; "
                f"the sizes are {', '.join(map(str, sizes))}"
            )
    return {i for i, s in enumerate(sizes) if s in attn_resolutions}


def check_ldm_config(m, image_size: int) -> None:
    """The arch=ldm rules for a `ModelConfig` at training side `image_size` (the harness's
    data.image_size): one-line `ModelConfigError`s naming the key. Fills in `model.resolution`
    (0 = image_size) when attention is placed by feature size."""
    if not m.ch_mult or any(c < 1 for c in m.ch_mult):
        raise ModelConfigError(f"model.ch_mult: need a non-empty list of positive integers; got {m.ch_mult}")
    factor = 2 ** (len(m.ch_mult) - 1)
    if image_size % factor:
        raise ModelConfigError(
            f"data.image_size: {image_size} is not divisible by {factor}, "
            f"the downsampling factor of model.ch_mult={m.ch_mult}"
        )
    for i, mult in enumerate(m.ch_mult):
        if (m.ch * mult) % m.norm_groups:
            raise ModelConfigError(
                f"model.norm_groups: {m.ch * mult} channels (model.ch * ch_mult[{i}]) are not divisible "
                f"into {m.norm_groups} groups"
            )
    if m.attn_resolutions and not m.resolution:
        m.resolution = image_size
    attn_levels(m.attn_resolutions, m.resolution, len(m.ch_mult))


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
        return self.conv_out(self.norm_out(h, silu=True))


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
        h = self.conv_out(self.norm_out(h, silu=True))
        return torch.tanh(h) if self.tanh_out else h
