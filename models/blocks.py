"""Building blocks of the latent-diffusion autoencoders, written with einops.

Axis letters used in the patterns:
    b batch, c channels, h height, w width, n tokens (= h * w), e condition-embedding width.

Every residual and attention block derives from `Checkpointed`: with `grad_checkpointing` on it
recomputes itself in the backward pass instead of keeping its activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from models import cpu_kernels


def exists(x) -> bool:
    return x is not None


def default(x, d):
    return x if exists(x) else d


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------


def _fp16_active(t: torch.Tensor) -> bool:
    """True when `t` is fp16 or fp16 autocast is on for its device (bf16 has fp32's range: no need)."""
    device = t.device.type
    if t.dtype == torch.float16:
        return True
    # meta tensors (shape inference, FLOP counting) have no autocast state to ask for
    return (
        torch.amp.is_autocast_available(device)
        and torch.is_autocast_enabled(device)
        and torch.get_autocast_dtype(device) == torch.float16
    )


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm whose statistics are computed in fp32 whenever it runs in fp16.

    The variance sums squares: activations of a few hundred (well inside fp16) square past 65504, a
    known NaN source of the latent-diffusion / SD VAE decoder in fp16. Kernels that happen to
    accumulate in fp32 are not relied on: under fp16 (autocast, DeepSpeed fp16, `.half()`) the norm
    runs in fp32 by construction and returns the input's dtype. Parameter names are nn.GroupNorm's.
    """

    def forward(self, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
        """The norm, followed by SiLU with `silu=True`: one fused kernel for a channels_last fp32 CPU tensor
        (models/cpu_kernels.py), called inside this module so that ZeRO-3 has gathered its parameters."""
        if not _fp16_active(x):
            if silu:
                return cpu_kernels.group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps)
            return super().forward(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            weight, bias = (p.float() if exists(p) else None for p in (self.weight, self.bias))
            y = F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)
        return F.silu(y) if silu else y


def Normalize(in_channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm as latent-diffusion uses it (32 groups, eps 1e-6, affine; fp32 statistics under fp16)."""
    if in_channels % num_groups:
        raise ValueError(f"GroupNorm: {in_channels} channels are not divisible into {num_groups} groups")
    return GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


class AdaGroupNorm(nn.Module):
    """GroupNorm whose output is scaled and shifted per sample by a condition embedding (FiLM).

    The scale/shift projection starts at zero, so a freshly built conditional block computes exactly
    what the unconditional one does, and the condition is learnt as a correction on top.
    """

    def __init__(self, channels: int, cond_dim: int, num_groups: int = 32):
        super().__init__()
        self.norm = Normalize(channels, num_groups)
        self.to_scale_shift = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * channels))
        nn.init.zeros_(self.to_scale_shift[-1].weight)
        nn.init.zeros_(self.to_scale_shift[-1].bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = rearrange(self.to_scale_shift(emb), "b (two c) -> two b c 1 1", two=2)
        return self.norm(x) * (1 + scale) + shift


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing
# ---------------------------------------------------------------------------------------------


class Checkpointed(nn.Module):
    """A block whose `_forward` is recomputed in backward when `grad_checkpointing` is set.

    Non-reentrant checkpointing: it works with DDP and ZeRO-3 (submodules are still called through
    their hooks during recomputation) and keeps dropout masks identical (the RNG state is replayed).
    Only while training with grad enabled: in eval or under no_grad there is nothing to save.
    """

    grad_checkpointing: bool = False

    def forward(self, *args):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, *args, use_reentrant=False)
        return self._forward(*args)

    def _forward(self, *args):
        raise NotImplementedError


def set_gradient_checkpointing(module: nn.Module, enabled: bool) -> None:
    """Turn recomputation on or off for every `Checkpointed` block under `module`."""
    for m in module.modules():
        if isinstance(m, Checkpointed):
            m.grad_checkpointing = enabled


# ---------------------------------------------------------------------------------------------
# Residual block
# ---------------------------------------------------------------------------------------------


class ResnetBlock(Checkpointed):
    """Pre-norm residual block of latent diffusion, without a timestep embedding.

    With `cond_dim > 0` both norms become `AdaGroupNorm` and `forward(x, emb)` takes the condition
    embedding `b e`; otherwise `emb` is ignored. A channel change goes through a 1x1 `nin_shortcut`
    (or a 3x3 `conv_shortcut` with `conv_shortcut=True`), as in latent diffusion.
    """

    takes_cond = True

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        conv_shortcut: bool = False,
        dropout: float = 0.0,
        num_groups: int = 32,
        cond_dim: int = 0,
    ):
        super().__init__()
        out_channels = default(out_channels, in_channels)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.cond_dim = cond_dim
        if cond_dim:
            self.norm1 = AdaGroupNorm(in_channels, cond_dim, num_groups)
            self.norm2 = AdaGroupNorm(out_channels, cond_dim, num_groups)
        else:
            self.norm1 = Normalize(in_channels, num_groups)
            self.norm2 = Normalize(out_channels, num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.use_conv_shortcut = conv_shortcut
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
            else:
                self.nin_shortcut = Conv1x1(in_channels, out_channels)

    def _norm_silu(self, norm: nn.Module, h: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        if self.cond_dim:
            if not exists(emb):
                raise ValueError("ResnetBlock: built with cond_dim > 0 but called without a condition embedding")
            return F.silu(norm(h, emb))
        return norm(h, silu=True)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(self._norm_silu(self.norm1, x, emb))
        h = self.conv2(self.dropout(self._norm_silu(self.norm2, h, emb)))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


class Conv1x1(nn.Conv2d):
    """A 1x1 conv (latent diffusion's weight shape o i 1 1) run as a matmul over the channels, on a view of
    the input in either memory format, the output in the input's format: a channels_last input is one
    (b h w) x c matrix, a contiguous one b matrices c x (h w). On CPU the conv library's 1x1 path was up
    to 2x slower than the matmul with two threads (equal with one). Still the module called, so ZeRO-3
    gathers its weight as for nn.Conv2d."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return super().forward(x)
        w = self.weight.flatten(1)  # o i
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return F.linear(x.permute(0, 2, 3, 1), w, self.bias).permute(0, 3, 1, 2)
        b, _, h, w_ = x.shape
        x = x.flatten(2)  # b i (h w): a view of a contiguous input
        if self.bias is None:
            y = torch.matmul(w, x)
        else:
            y = torch.baddbmm(self.bias[None, :, None], w.expand(b, *w.shape), x)
        return y.view(b, self.out_channels, h, w_)


class AttnBlock(Checkpointed):
    """Single-head spatial self-attention with a residual (latent diffusion's "vanilla" block)."""

    def __init__(self, *, in_channels: int, num_groups: int = 32):
        super().__init__()
        self.norm = Normalize(in_channels, num_groups)
        self.q = Conv1x1(in_channels, in_channels)
        self.k = Conv1x1(in_channels, in_channels)
        self.v = Conv1x1(in_channels, in_channels)
        self.proj_out = Conv1x1(in_channels, in_channels)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # Token-major memory (channels_last): q, k and v are then matmuls on it, each already in the
        # b 1 (h w) c layout attention wants (views, not three copies), and so is the output for proj_out.
        h_ = self.norm(x).contiguous(memory_format=torch.channels_last)
        h, w = h_.shape[-2:]
        q, k, v = (rearrange(f(h_), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))
        if _fp16_active(q):
            # Scores q.k of activations in the hundreds pass 65504 and softmax over thousands of tokens
            # loses fp16's range: latent-diffusion users saw NaNs here under fp16. The attention runs in
            # fp32 whatever kernel SDPA picks (not all accumulate in fp32); the 1x1 convs stay fp16.
            dtype = q.dtype
            with torch.autocast(device_type=q.device.type, enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w)
        return x + self.proj_out(out)


class LinearAttnBlock(Checkpointed):
    """Linear attention (softmax over keys along tokens), single head of width `in_channels`.

    Latent diffusion's LinAttnBlock has neither a norm nor a residual; both are added here so the
    block starts near the identity like every other block of the network.
    """

    def __init__(self, *, in_channels: int, num_groups: int = 32):
        super().__init__()
        self.norm = Normalize(in_channels, num_groups)
        self.to_qkv = Conv1x1(in_channels, 3 * in_channels, bias=False)
        self.to_out = Conv1x1(in_channels, in_channels)

    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # Not softmax(q k^T) v, so scaled_dot_product_attention does not apply; each einsum runs as one bmm.
        k = k.float().softmax(dim=-1).to(v.dtype)
        context = einsum(k, v, "b d n, b e n -> b d e")
        return einsum(context, q, "b d e, b d n -> b e n")

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        q, k, v = rearrange(self.to_qkv(self.norm(x)), "b (three c) h w -> three b c (h w)", three=3)
        if _fp16_active(v):
            # The sums over n tokens (context) and c channels (out) overflow fp16 like the softmax: all fp32.
            with torch.autocast(device_type=x.device.type, enabled=False):
                out = self._attend(q.float(), k.float(), v.float()).to(v.dtype)
        else:
            out = self._attend(q, k, v)
        return x + self.to_out(rearrange(out, "b c (h w) -> b c h w", h=h, w=w))


def make_attn(in_channels: int, attn_type: str = "vanilla", num_groups: int = 32) -> nn.Module:
    """Attention block by name: vanilla | linear | none (identity)."""
    if attn_type == "vanilla":
        return AttnBlock(in_channels=in_channels, num_groups=num_groups)
    if attn_type == "linear":
        return LinearAttnBlock(in_channels=in_channels, num_groups=num_groups)
    if attn_type == "none":
        return nn.Identity()
    raise ValueError(f"attn_type: {attn_type!r} is not one of vanilla, linear, none")


# ---------------------------------------------------------------------------------------------
# Resampling
# ---------------------------------------------------------------------------------------------


class Downsample(nn.Module):
    """Halve h and w: a 3x3 stride-2 conv after padding right/bottom by one (latent diffusion's
    asymmetric padding, so even sizes halve exactly), or 2x2 average pooling without a conv."""

    def __init__(self, *, in_channels: int, with_conv: bool = True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class NearestUpConv2d(nn.Conv2d):
    """A 3x3 conv (padding 1) applied to the 2x nearest-upsampled input, computed without upsampling.

    Each output pixel (2i+a, 2j+b) sees only input rows i-1..i (a=0) or i..i+1 (a=1), and likewise
    columns, with the 3x3 taps that land on the same input pixel summed: along each axis, phase 0 takes
    (w0, w1+w2) at offsets (-1, 0) and phase 1 (w0+w1, w2) at (0, +1). So one 2x2 conv with the four
    phases as output groups, then interleaving, gives the same result (to float rounding) with 16
    instead of 36 multiply-adds per input pixel and no 4x upsampled tensor: 1.6x faster forward +
    backward on CPU. The parameter is the plain 3x3 weight (latent diffusion's `up.*.upsample.conv`),
    and this is the module called, so ZeRO-3 gathers it as it would for nn.Conv2d.
    Axis letters: p, q the row and column phases; o output and i input channels.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        rows = torch.stack([torch.stack([w[:, :, 0], w[:, :, 1] + w[:, :, 2]], 2),
                            torch.stack([w[:, :, 0] + w[:, :, 1], w[:, :, 2]], 2)])  # p o i 2 kw
        k = torch.stack([torch.stack([rows[..., 0], rows[..., 1] + rows[..., 2]], -1),
                         torch.stack([rows[..., 0] + rows[..., 1], rows[..., 2]], -1)])  # q p o i 2 2
        k = rearrange(k, "q p o i kh kw -> (p q o) i kh kw")
        bias = self.bias.repeat(4) if exists(self.bias) else None
        y = F.conv2d(x, k, bias, padding=1)  # b (p q o) h+1 w+1; phase p starts at padded row p
        # Interleaving the four phase windows is one copy through one strided view, and its backward one
        # copy into a zeroed y (slicing four windows cost four zeroed copies of y).
        return _Interleave.apply(y, self.out_channels, x.is_contiguous(memory_format=torch.channels_last)
                                 and not x.is_contiguous())


def _phase_windows(y: torch.Tensor, o: int) -> torch.Tensor:
    """The four phase windows of y (b (p q o) h+1 w+1) as one strided view b o h p w q: element
    (b, o, i, p, j, q) sits at y[b, (2p + q) o, i + p, j + q], an offset linear in p and q, in either
    memory format. The windows never overlap (each phase has its own channels)."""
    return _windows_of(y, y.shape, y.stride(), o)


def _windows_of(base: torch.Tensor, shape, strides, o: int) -> torch.Tensor:
    """`_phase_windows` of the b c h+1 w+1 tensor of `shape` and `strides` that `base` (offset 0) holds:
    one as_strided of the base itself (torch.compile cannot functionalize a mutation through two)."""
    b, _, h1, w1 = shape
    sb, sc, sh, sw = strides
    return base.as_strided((b, o, h1 - 1, 2, w1 - 1, 2), (sb, sc, sh, 2 * o * sc + sh, sw, o * sc + sw))


def _interleave(y: torch.Tensor, o: int, channels_last: bool) -> torch.Tensor:
    """The phase windows of y interleaved into a new b o 2h 2w tensor (channels_last memory or contiguous):
    one copy, through one strided view of each."""
    b, _, h1, w1 = y.shape
    out = torch.empty((b, o, 2 * (h1 - 1), 2 * (w1 - 1)), dtype=y.dtype, device=y.device,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    rearrange(out, "b o (h p) (w q) -> b o h p w q", p=2, q=2).copy_(_phase_windows(y, o))
    return out


class _Interleave(torch.autograd.Function):
    """`_interleave` with its backward written out: one copy of the gradient into the same windows of a
    zeroed y. (Autograd's own backward of the strided view was that copy for contiguous y, but an
    index_add_ over every element for channels_last y.) torch.func's vmap gets a rule generated from these
    (jacrev works); no forward-mode derivative (a custom jvp would make torch.compile break its graph here)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(y: torch.Tensor, o: int, channels_last: bool) -> torch.Tensor:
        return _interleave(y, o, channels_last)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        y, o, channels_last = inputs
        ctx.o, ctx.y_shape = o, y.shape
        ctx.y_format = torch.channels_last if y.is_contiguous(memory_format=torch.channels_last) \
            and not y.is_contiguous() else torch.contiguous_format

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # zeros in y's layout (new_zeros: a batched tensor under torch.func.vmap, as jacrev needs)
        b, c, h, w = ctx.y_shape
        if ctx.y_format is torch.channels_last:
            base = grad.new_zeros((b, h, w, c))
            gy, strides = base.permute(0, 3, 1, 2), (h * w * c, 1, w * c, c)
        else:
            base = gy = grad.new_zeros(ctx.y_shape)
            strides = (c * h * w, h * w, w, 1)
        _windows_of(base, ctx.y_shape, strides, ctx.o).copy_(
            rearrange(grad, "b o (h p) (w q) -> b o h p w q", p=2, q=2))
        return gy, None, None


class Upsample(nn.Module):
    """Double h and w by nearest-neighbour upsampling, then (optionally) a 3x3 conv (fused: see
    `NearestUpConv2d`)."""

    def __init__(self, *, in_channels: int, with_conv: bool = True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = NearestUpConv2d(in_channels, in_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(x)
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
