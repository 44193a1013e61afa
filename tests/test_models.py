"""Blocks, the Gaussian posterior and the KL autoencoder: shapes, numerics, gradients, checkpointing."""

import pytest
import torch
import torch.nn.functional as F

from harness.config import ConfigError, ModelConfig, load_config
from models import ModelConfigError, build_model
from models import blocks as B
from models.autoencoder_kl import AutoencoderKL
from models.distributions import DiagonalGaussianDistribution
from models.ldm import Decoder, Encoder

TINY = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, embed_dim=4)


def tiny_kl(**kw) -> AutoencoderKL:
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**TINY, **kw}))


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


def test_resnet_block_shapes_and_shortcuts():
    x = torch.randn(2, 32, 8, 8)
    assert B.ResnetBlock(in_channels=32)(x).shape == (2, 32, 8, 8)
    nin = B.ResnetBlock(in_channels=32, out_channels=64)
    conv = B.ResnetBlock(in_channels=32, out_channels=64, conv_shortcut=True)
    assert nin(x).shape == conv(x).shape == (2, 64, 8, 8)
    assert nin.nin_shortcut.kernel_size == (1, 1) and conv.conv_shortcut.kernel_size == (3, 3)


def test_conditional_resnet_block_starts_as_unconditional():
    torch.manual_seed(0)
    plain = B.ResnetBlock(in_channels=32, out_channels=64)
    cond = B.ResnetBlock(in_channels=32, out_channels=64, cond_dim=8)
    cond.load_state_dict(plain.state_dict(), strict=False)
    for name in ("norm1", "norm2"):
        getattr(cond, name).norm.load_state_dict(getattr(plain, name).state_dict())
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 8)
    assert torch.allclose(cond(x, emb), plain(x), atol=1e-6)
    with pytest.raises(ValueError, match="without a condition"):
        cond(x)


def test_normalize_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="not divisible"):
        B.Normalize(48, 32)


def test_attn_block_matches_naive_attention():
    torch.manual_seed(0)
    blk = B.AttnBlock(in_channels=32)
    x = torch.randn(2, 32, 4, 5)
    h = blk.norm(x)
    q, k, v = (f(h).flatten(2) for f in (blk.q, blk.k, blk.v))  # b c n
    attn = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / 32**0.5, dim=-1)
    out = torch.einsum("bij,bcj->bci", attn, v).reshape(2, 32, 4, 5)
    assert torch.allclose(blk(x), x + blk.proj_out(out), atol=1e-5)


def test_attn_block_upcasts_under_fp16_autocast(monkeypatch):
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        seen.append(q.dtype)
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(B.F, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    blk = B.AttnBlock(in_channels=32)
    x = torch.randn(1, 32, 8, 8)
    ref = blk(x)
    with torch.autocast("cpu", dtype=torch.float16):
        out = blk(x)
    assert seen == [torch.float32, torch.float32]
    assert torch.isfinite(out).all() and torch.allclose(out.float(), ref, atol=2e-2)


def test_linear_attention_and_resampling_shapes():
    x = torch.randn(2, 32, 7, 9)
    assert B.LinearAttnBlock(in_channels=32)(x).shape == x.shape
    assert isinstance(B.make_attn(32, "none"), torch.nn.Identity)
    with pytest.raises(ValueError, match="attn_type"):
        B.make_attn(32, "flash")
    for with_conv in (True, False):
        assert B.Downsample(in_channels=32, with_conv=with_conv)(x).shape == (2, 32, 3, 4)
        assert B.Upsample(in_channels=32, with_conv=with_conv)(x).shape == (2, 32, 14, 18)


# ---------------------------------------------------------------------------------------------
# Posterior
# ---------------------------------------------------------------------------------------------


def test_gaussian_kl_sample_mode_clamp():
    torch.manual_seed(0)
    params = torch.randn(3, 8, 4, 4)
    d = DiagonalGaussianDistribution(params)
    mean, logvar = params[:, :4], params[:, 4:]
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)
    ).sum(dim=(1, 2, 3))
    assert d.kl().shape == (3,) and torch.allclose(d.kl(), ref, atol=1e-5)
    assert torch.allclose(d.kl(d), torch.zeros(3), atol=1e-6)
    assert torch.equal(d.mode(), mean)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(d.sample(g1), d.sample(g2)) and not torch.equal(d.sample(), d.mode())
    big = DiagonalGaussianDistribution(torch.cat([torch.zeros(1, 2), torch.tensor([[-100.0, 100.0]])], 1))
    assert big.logvar.tolist() == [[-30.0, 20.0]]
    det = DiagonalGaussianDistribution(params, deterministic=True)
    assert torch.equal(det.kl(), torch.zeros(3)) and torch.equal(det.sample(), mean)
    flat = DiagonalGaussianDistribution(torch.randn(2, 10))  # a fully-connected latent
    assert flat.kl().shape == (2,) and flat.sample().shape == (2, 5)


def test_gaussian_is_fp32_under_half_inputs():
    d = DiagonalGaussianDistribution(torch.full((1, 2, 1, 1), 15.0, dtype=torch.float16))
    assert d.var.dtype == torch.float32 and torch.isfinite(d.kl()).all()


# ---------------------------------------------------------------------------------------------
# AutoencoderKL
# ---------------------------------------------------------------------------------------------


def test_kl_forward_shapes_losses_backward():
    model = tiny_kl()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.recon.shape == x.shape
    assert out.latent.shape == (2, *model.latent_shape(32)) == (2, 4, 16, 16)
    assert set(out.losses) == {"kl"} and out.losses["kl"].ndim == 0
    assert set(out.metrics) == {"posterior_std", "latent_std"}
    (out.recon.abs().mean() + out.losses["kl"]).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_kl_loss_is_batch_mean_of_summed_kl():
    model = tiny_kl().eval()
    x = torch.randn(3, 3, 32, 32)
    post = model.posterior(x)
    assert torch.allclose(model(x).losses["kl"], post.kl().sum() / 3)


def test_kl_encode_decode_sample():
    model = tiny_kl().eval()
    x = torch.randn(2, 3, 32, 32)
    z = model.encode(x)
    assert torch.equal(z, model.posterior(x).mode())
    assert model.decode(z).shape == x.shape
    assert torch.allclose(model(x, sample_posterior=False).recon, model.decode(z), atol=1e-6)
    s1 = model.sample(5, 32, generator=torch.Generator().manual_seed(0))
    s2 = model.sample(5, 32, generator=torch.Generator().manual_seed(0))
    assert s1.shape == (5, 3, 32, 32) and torch.equal(s1, s2)
    assert model.sample(1, 64).shape == (1, 3, 64, 64)  # resolution-free


def test_kl_state_dict_round_trip_and_ldm_names():
    a = tiny_kl(attn_resolutions=[16], resolution=32)
    torch.manual_seed(1)
    b = build_model(ModelConfig(**TINY, attn_resolutions=[16], resolution=32))
    x = torch.randn(2, 3, 32, 32)
    a.eval(), b.eval()
    assert not torch.allclose(a(x, sample_posterior=False).recon, b(x, sample_posterior=False).recon)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x, sample_posterior=False).recon, b(x, sample_posterior=False).recon)
    keys = set(a.state_dict())
    for k in (
        "encoder.conv_in.weight",
        "encoder.down.0.block.0.norm1.weight",
        "encoder.down.1.attn.0.q.weight",
        "encoder.down.0.downsample.conv.weight",
        "encoder.mid.attn_1.proj_out.weight",
        "decoder.up.0.block.0.nin_shortcut.weight",
        "decoder.up.1.upsample.conv.weight",
        "decoder.up.1.attn.1.k.weight",
        "quant_conv.weight",
        "post_quant_conv.weight",
    ):
        assert k in keys, k


def test_attention_levels_and_errors():
    m = tiny_kl(attn_resolutions=[32], resolution=32)
    assert len(m.encoder.down[0].attn) == 1 and len(m.encoder.down[1].attn) == 0
    assert len(tiny_kl(attn_type="none").encoder.down[0].attn) == 0
    assert isinstance(tiny_kl(attn_type="linear").encoder.mid.attn_1, B.LinearAttnBlock)
    with pytest.raises(ModelConfigError, match="attn_resolutions: 12 is not a feature size"):
        tiny_kl(attn_resolutions=[12], resolution=32)


def test_deterministic_autoencoder_has_zero_kl():
    model = tiny_kl(double_z=False)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.losses["kl"].item() == 0.0 and out.latent.shape == (2, 4, 16, 16)
    x = torch.ones(1, 3, 32, 32)
    assert torch.equal(model.encode(x), model.encode(x, sample_posterior=True))


def test_config_places_attention_and_checks_groups():
    base = ["data.train=x", "data.image_size=32", "model.ch_mult=[1,2]"]
    cfg = load_config([], base + ["model.ch=32", "model.attn_resolutions=[16]"])
    assert cfg.model.resolution == 32
    assert len(build_model(cfg.model).decoder.up[1].attn) == 3
    with pytest.raises(ConfigError, match="model.attn_resolutions: 12"):
        load_config([], base + ["model.attn_resolutions=[12]"])
    with pytest.raises(ConfigError, match="model.norm_groups"):
        load_config([], ["data.train=x", "model.ch=48"])


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing
# ---------------------------------------------------------------------------------------------


def _grads(model, x, seed=0):
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(x)
    (out.recon.square().mean() + out.losses["kl"]).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attn_type", ["vanilla", "linear"])
def test_checkpointing_equals_plain_gradients(attn_type):
    # Dropout on: recomputation must replay the same masks.
    plain = tiny_kl(dropout=0.1, attn_type=attn_type, attn_resolutions=[16], resolution=32).train()
    kw = dict(dropout=0.1, attn_type=attn_type, attn_resolutions=[16], resolution=32)
    ckpt = tiny_kl(**kw, gradient_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    ckpt.decoder.mid.block_1.conv1.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 3, 32, 32)
    g_plain, g_ckpt = _grads(plain, x), _grads(ckpt, x)
    assert len(calls) == 2  # forward + recomputation in backward: checkpointing really happened
    for n in g_plain:
        assert torch.allclose(g_plain[n], g_ckpt[n], rtol=1e-4, atol=1e-6), n
    calls.clear()
    with torch.no_grad():
        ckpt(x)
    ckpt.eval()(x).losses["kl"].backward()
    assert len(calls) == 2  # no recomputation under no_grad or in eval


def test_checkpointing_toggle():
    m = tiny_kl()
    assert not m.encoder.mid.block_1.grad_checkpointing
    m.gradient_checkpointing = True
    assert all(b.grad_checkpointing for b in m.modules() if isinstance(b, B.Checkpointed))


def test_encoder_decoder_standalone_shapes():
    enc = Encoder(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=3)
    dec = Decoder(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=3, tanh_out=True)
    h = enc(torch.randn(1, 3, 32, 32))
    assert h.shape == (1, *enc.out_shape(32)) == (1, 6, 8, 8)
    y = dec(h[:, :3])
    assert y.shape == (1, 3, 32, 32) and y.abs().max() <= 1
