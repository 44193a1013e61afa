"""Attention and GroupNorm numerics of models/blocks.py: scaled_dot_product_attention computes latent
diffusion's attention, and under fp16 (autocast or half weights) attention scores, softmax and GroupNorm
statistics run in fp32 by construction, on inputs whose squares and products pass fp16's 65504."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.config import ModelConfig
from models import build_model
from models.blocks import AttnBlock, LinearAttnBlock, Normalize, Upsample

FP16_MAX = torch.finfo(torch.float16).max


def randomize(module, seed=0, scale=1.0):
    """Random weights everywhere (GroupNorm affines too, which start at 1 and 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale / max(1, p[0].numel()) ** 0.5)
    return module


def ldm_attention(block, x):
    """latent diffusion's AttnBlock.forward (bmm, c^-0.5, softmax over keys), the math SDPA replaced."""
    h_ = block.norm(x)
    q, k, v = block.q(h_), block.k(h_), block.v(h_)
    b, c, h, w = q.shape
    q = q.reshape(b, c, h * w).permute(0, 2, 1)
    w_ = torch.bmm(q, k.reshape(b, c, h * w)) * (int(c) ** (-0.5))
    w_ = torch.nn.functional.softmax(w_, dim=2)
    h_ = torch.bmm(v.reshape(b, c, h * w), w_.permute(0, 2, 1)).reshape(b, c, h, w)
    return x + block.proj_out(h_)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sdpa_attention_equals_the_latent_diffusion_math(seed):
    torch.manual_seed(seed)  # not whatever the tests before left: a peaked softmax's fp32 error varies with it
    block = randomize(AttnBlock(in_channels=64), scale=2.0)  # peaked softmax: not a near-uniform average
    x = torch.randn(2, 64, 12, 10, requires_grad=True)
    ours, ref = block(x), ldm_attention(block, x)
    assert (ours - ref).abs().max() < 1e-5 * ref.abs().max()
    (g_ours,) = torch.autograd.grad(ours.square().sum(), x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    # two fp32 summation orders through a peaked softmax: ~1e-5 of the largest gradient apart; a wrong
    # scale, mask or transpose is off by the gradient itself
    assert (g_ours - g_ref).abs().max() < 5e-5 * g_ref.abs().max()


@pytest.fixture
def spy(monkeypatch):
    """Dtypes of the tensors GroupNorm and attention hand to their kernels."""
    seen = {"group_norm": [], "sdpa": []}
    gn, sdpa = F.group_norm, F.scaled_dot_product_attention

    def group_norm(x, *a, **k):
        seen["group_norm"].append(x.dtype)
        return gn(x, *a, **k)

    def attention(q, k, v, *a, **kw):
        seen["sdpa"].append(q.dtype)
        return sdpa(q, k, v, *a, **kw)

    monkeypatch.setattr(F, "group_norm", group_norm)
    monkeypatch.setattr(F, "scaled_dot_product_attention", attention)
    return seen


def test_groupnorm_statistics_run_in_fp32_under_fp16(spy):
    norm = randomize(Normalize(64, 32))
    x = torch.randn(2, 64, 8, 8) * 600 + 300  # well inside fp16, but its squares are not
    assert torch.isinf(x.half() * x.half()).any()  # fp16 sums of squares would overflow
    ref = norm(x)
    y = norm.half()(x.half())
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    assert torch.allclose(y.float(), ref, atol=2e-2, rtol=1e-2)
    with torch.autocast("cpu", dtype=torch.float16):
        y = norm.float()(x.half())
    assert torch.isfinite(y).all() and torch.allclose(y.float(), ref, atol=2e-2, rtol=1e-2)
    assert spy["group_norm"][1:] == [torch.float32, torch.float32]  # half module and autocast: fp32 statistics


def test_attention_scores_run_in_fp32_under_fp16(spy):
    block = randomize(AttnBlock(in_channels=64, num_groups=32))
    x = torch.randn(1, 64, 16, 16)
    with torch.no_grad():
        block.q.weight *= 60  # large queries and keys, moderate values: only the scores pass fp16's range
        block.k.weight *= 60
        h_ = block.norm(x)
        q, k = block.q(h_), block.k(h_)
        scores = torch.einsum("bchw,bcij->bhwij", q.half(), k.half())
        ref = block(x)
    assert torch.isinf(scores).any()  # q.k in fp16 passes 65504: a kernel that keeps scores in fp16 gives inf/NaN
    spy["sdpa"].clear()
    with torch.no_grad():
        y_half = block.half()(x.half())
        block.float()
        with torch.autocast("cpu", dtype=torch.float16):
            y_auto = block(x)
    for y in (y_half, y_auto):
        assert torch.isfinite(y).all()
        # fp16 rounding of q and k moves scores of ~3e4 by tens: a few peaked rows flip, the rest agree
        assert (y.float() - ref).abs().mean() < 2e-2 * ref.abs().mean()
    assert spy["sdpa"] == [torch.float32, torch.float32]


def test_linear_attention_products_run_in_fp32_under_fp16(monkeypatch):
    seen, einsum = [], torch.einsum
    monkeypatch.setattr(torch, "einsum", lambda eq, *ops: seen.append([o.dtype for o in ops]) or einsum(eq, *ops))
    block = randomize(LinearAttnBlock(in_channels=64), scale=2.0)
    x = torch.randn(1, 64, 16, 16) * 100
    with torch.no_grad():
        ref = block(x)
        seen.clear()
        y = block.half()(x.half())
    assert seen == [[torch.float32] * 2] * 2  # context (sum over tokens) and output (sum over channels)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    assert (y.float() - ref).abs().max() < 2e-2 * ref.abs().max()


def test_kl_model_stays_finite_under_fp16_autocast(spy):
    """A small KL autoencoder fed large inputs: every GroupNorm input and attention score passes fp16 in its
    squares/products, yet the reconstruction under CPU fp16 autocast is finite and close to fp32."""
    cfg = ModelConfig(
        kind="kl",
        ch=32,
        ch_mult=[1, 2],
        num_res_blocks=1,
        attn_resolutions=[8],
        resolution=16,
        z_channels=4,
        embed_dim=4,
        norm_groups=8,
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    x = torch.randn(2, 3, 16, 16) * 3000
    peaks = []
    hooks = [
        m.register_forward_pre_hook(lambda m, a: peaks.append(a[0].abs().max().item()))
        for m in model.modules()
        if isinstance(m, torch.nn.GroupNorm)
    ]
    with torch.no_grad():
        ref = model.decode(model.encode(x))
        for h in hooks:
            h.remove()
        assert max(peaks) ** 2 > FP16_MAX  # squares of what the norms see overflow fp16
        spy["group_norm"].clear(), spy["sdpa"].clear()
        with torch.autocast("cpu", dtype=torch.float16):
            y = model.decode(model.encode(x))
    assert torch.isfinite(y).all()
    assert (y.float() - ref).abs().max() < 5e-2 * ref.abs().max()
    assert spy["sdpa"] and set(spy["sdpa"]) == {torch.float32}
    assert spy["group_norm"] and set(spy["group_norm"]) == {torch.float32}


def test_fused_upsample_conv_equals_upsample_then_conv():
    """NearestUpConv2d (2x2 phase kernels on the small input) = nearest 2x upsampling + 3x3 conv."""
    up = randomize(Upsample(in_channels=32), scale=2.0)
    x = torch.randn(2, 32, 7, 5, requires_grad=True)
    ours = up(x)
    ref = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), up.conv.weight, up.conv.bias, padding=1)
    assert ours.shape == ref.shape == (2, 32, 14, 10)
    assert (ours - ref).abs().max() < 1e-5 * ref.abs().max()
    g = torch.randn_like(ref)
    grads = [torch.autograd.grad(y, (x, up.conv.weight, up.conv.bias), g) for y in (ours, ref)]
    for a, b in zip(*grads):
        assert (a - b).abs().max() < 1e-5 * b.abs().max()
    assert list(dict(up.named_parameters())) == ["conv.weight", "conv.bias"]  # latent diffusion's names
    xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    y = up.to(memory_format=torch.channels_last)(xc)
    assert y.is_contiguous(memory_format=torch.channels_last) and (y - ref).abs().max() < 1e-5 * ref.abs().max()
    for a, b in zip(torch.autograd.grad(y, (xc, up.conv.weight, up.conv.bias), g), grads[1]):
        assert (a - b).abs().max() < 1e-5 * b.abs().max()


def test_fused_upsample_conv_gradients_are_exact_in_both_memory_formats():
    """The interleave's hand-written backward, checked by finite differences in float64."""
    for fmt in (torch.contiguous_format, torch.channels_last):
        up = randomize(Upsample(in_channels=4), scale=2.0).double().to(memory_format=fmt)
        x = torch.randn(2, 4, 3, 5, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
        assert torch.autograd.gradcheck(up, (x,))


def test_fused_upsample_and_attention_trace_whole_for_torch_compile():
    """No graph break in our hand-written pieces (the interleave's autograd.Function, the 1x1 convs as
    matmuls): torch.compile(fullgraph=True) traces them, equal to eager, in both memory formats."""
    for fmt in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        net = nn.Sequential(Upsample(in_channels=32), AttnBlock(in_channels=32))
        x = torch.randn(2, 32, 6, 4).contiguous(memory_format=fmt).requires_grad_()
        ref = net(x)
        (gref,) = torch.autograd.grad(ref.square().sum(), x)
        y = torch.compile(net, backend="aot_eager", fullgraph=True)(x)
        (g,) = torch.autograd.grad(y.square().sum(), x)
        assert torch.allclose(y, ref, atol=1e-6) and torch.allclose(g, gref, atol=1e-5)


def test_fused_upsample_is_a_plain_function_to_autograd_and_torch_func():
    """Its output is a tensor of its own (a clamp_ or an in-place ReLU after it works in either layout),
    torch.func.jacrev gives the reference's derivatives, and 1x1 convs take empty batches."""
    from models.blocks import Conv1x1

    for fmt in (torch.contiguous_format, torch.channels_last):
        up = randomize(Upsample(in_channels=4), scale=2.0).double()
        x = torch.randn(2, 4, 3, 5, dtype=torch.float64).contiguous(memory_format=fmt)

        def ref(t, up=up):
            return F.conv2d(F.interpolate(t, scale_factor=2.0, mode="nearest"), up.conv.weight, up.conv.bias, padding=1)

        y = up(x.clone().requires_grad_())
        y.clamp_(-1.0, 1.0).sum().backward()
        assert torch.allclose(torch.func.jacrev(up)(x), torch.func.jacrev(ref)(x), atol=1e-12)
    for fmt in (torch.contiguous_format, torch.channels_last):
        assert Conv1x1(3, 5)(torch.randn(0, 3, 4, 4).contiguous(memory_format=fmt)).shape == (0, 5, 4, 4)
