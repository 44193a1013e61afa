"""Every model kind through the one interface: shapes, backward, state dicts, checkpointing, sampling."""

import pytest
import torch

from harness.config import ModelConfig
from models import NoPriorError, build_model

S = 16  # image side: small keeps the whole parametrized file at a few seconds on 2 cores
LDM = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, embed_dim=4, attn_resolutions=[8], resolution=S)
SPEC = dict(
    arch="spec",
    encoder=["C2d_3_32_3_1_1", "VAERB_32_32", "Down_32", "VAEA_32", "VAERB_32_32", "C2d_32_8_3_1_1"],
    decoder=["C2d_4_32_3_1_1", "VAERB_32_32", "VAEA_32", "Up_32", "VAERB_32_32", "C2d_32_3_3_1_1"],
)
KINDS = {
    "kl": dict(LDM),
    "kl_spec": dict(SPEC),
    "kl_class": dict(LDM, condition="class", num_classes=5, cond_dim=16),
    "kl_multilabel": dict(LDM, condition="multilabel", num_classes=80, cond_dim=16),
    "kl_spec_class": dict(SPEC, condition="class", num_classes=5, cond_dim=16),
    "vq": dict(LDM, kind="vq", vq_codebook_size=64),
    "vq_grad_cosine": dict(LDM, kind="vq", vq_codebook_size=64, vq_decay=0.0, vq_cosine=True, vq_init="random"),
    # vq with a spec: the encoder output is quantized as is (8 channels = the codebook dimension)
    "vq_spec": dict(SPEC, kind="vq", vq_codebook_size=64, embed_dim=8,
                    decoder=["C2d_8_32_3_1_1", *SPEC["decoder"][1:]]),
    "fsq": dict(LDM, kind="fsq", fsq_levels=[5, 5, 4]),
}
LOSSES = {"kl": {"kl"}, "vq": {"vq"}, "fsq": set()}
METRICS = {"kl": {"posterior_std", "latent_std"}, "vq": {"perplexity", "codes_used", "dead_restarts"},
           "fsq": {"perplexity", "codes_used"}}  # fmt: skip


def make(name, seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(ModelConfig(**{**KINDS[name], **kw}))


def cond_for(model, n):
    if model.condition == "class":
        return torch.arange(n) % model.cond_embed.num_classes
    if model.condition == "multilabel":
        return (torch.rand(n, model.cond_embed.num_classes, generator=torch.Generator().manual_seed(n)) < 0.1).float()
    return None


def batch(n=2, seed=1):
    return torch.randn(n, 3, S, S, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", KINDS)
def test_shapes_losses_metrics_backward(name):
    model = make(name).train()
    x = batch()
    out = model(x, cond=cond_for(model, 2))
    kind = KINDS[name].get("kind", "kl")
    assert out.recon.shape == x.shape
    assert out.latent.shape == (2, *model.latent_shape(S))
    assert set(out.losses) == LOSSES[kind] and set(out.metrics) == METRICS[kind]
    assert all(v.ndim == 0 and torch.isfinite(v) for v in [*out.losses.values(), *out.metrics.values()])
    (out.recon.square().mean() + sum(out.losses.values(), torch.zeros(()))).backward()
    # Every parameter is in the graph (DDP needs no find_unused_parameters); all but the null
    # condition, unused by this batch, get a non-zero gradient.
    assert all(p.grad is not None for p in model.parameters())
    zero = [n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0 and n != "cond_embed.null"]
    assert not zero, zero
    assert model.decode(model.encode(x, cond_for(model, 2)), cond_for(model, 2)).shape == x.shape


@pytest.mark.parametrize("name", KINDS)
def test_state_dict_round_trip(name):
    a = make(name, seed=0).train()
    a(batch(), cond=cond_for(a, 2))  # one training forward: initialises a VQ codebook
    b = make(name, seed=1)
    x, c = batch(seed=2), cond_for(a, 2)
    a.eval(), b.eval()
    assert not torch.allclose(a(x, cond=c, sample_posterior=False).recon, b(x, cond=c, sample_posterior=False).recon)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x, cond=c, sample_posterior=False).recon, b(x, cond=c, sample_posterior=False).recon)


@pytest.mark.parametrize("name", KINDS)
def test_checkpointing_equals_plain_gradients(name):
    plain = make(name, dropout=0.1).train()
    ckpt = make(name, dropout=0.1, gradient_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = batch()
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(3)  # same dropout masks, condition dropout and codebook init
        out = model(x, cond=cond_for(model, 2))
        (out.recon.square().mean() + sum(out.losses.values(), torch.zeros(()))).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6), n
    for n, buf in plain.named_buffers():
        assert torch.equal(buf, dict(ckpt.named_buffers())[n]), n  # a recomputation never touches the codebook


@pytest.mark.parametrize("name", KINDS)
def test_sample(name):
    model = make(name).eval()
    if KINDS[name].get("kind", "kl") != "kl":
        with pytest.raises(NoPriorError, match="no prior"):
            model.sample(4, S)
        return
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    cond = cond_for(model, 7)
    s = model.sample(7, S, cond=cond, generator=g())
    assert s.shape == (7, 3, S, S) and torch.equal(s, model.sample(7, S, cond=cond, generator=g()))
    if model.condition:
        assert model.sample(3, S, generator=g()).shape == (3, 3, S, S)  # unconditioned samples
        with pytest.raises(ValueError, match="cond has 7 rows but n=5"):
            model.sample(5, S, cond=cond)


@pytest.mark.parametrize("name", ["kl_class", "kl_multilabel", "kl_spec_class"])
def test_condition_matters_and_dropout_gives_the_null_condition(name):
    model = make(name, cond_dropout=1.0).eval()
    x = batch(4)
    c = cond_for(model, 4)
    other = c.roll(1, 0) if model.condition == "class" else 1.0 - c
    null = model(x, cond=None, sample_posterior=False).recon
    recon = lambda cond: model(x, cond=cond, sample_posterior=False).recon  # noqa: E731
    assert not torch.allclose(recon(c), recon(other))
    model.train()  # condition dropout only while training; 1.0 drops every sample
    assert torch.allclose(model(x, cond=c, sample_posterior=False).recon, null, atol=1e-6)
    if model.condition == "class":
        model.eval()
        mixed = torch.tensor([-1, 1, -1, 2])  # -1 = unconditioned, per sample
        out = model(x, cond=mixed, sample_posterior=False).recon
        assert torch.allclose(out[0], null[0], atol=1e-6) and not torch.allclose(out[1], null[1])


def test_condition_errors_and_unconditional_models_ignore_cond():
    model = make("kl_class").eval()
    with pytest.raises(ValueError, match="integer class indices"):
        model(batch(), cond=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="class index 5 >= model.num_classes=5"):
        model(batch(), cond=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"\(b, 80\) multi-hot"):
        make("kl_multilabel")(batch(), cond=torch.zeros(2, 10))
    plain = make("kl").eval()
    x = batch()
    with_cond = plain(x, cond=torch.tensor([1, 2]), sample_posterior=False).recon
    assert torch.equal(with_cond, plain(x, sample_posterior=False).recon)


@pytest.mark.parametrize("name", ["kl", "kl_multilabel", "kl_spec_class", "vq", "vq_grad_cosine", "fsq"])
def test_runs_cast_to_bf16_without_autocast(name):
    # DeepSpeed's bf16 mode casts the whole module and feeds bf16 inputs: fp32 latents (posterior,
    # quantizer) must be cast back before the decoder.
    model = make(name).to(torch.bfloat16).train()
    x = batch().to(torch.bfloat16)
    out = model(x, cond=cond_for(model, 2))
    assert out.recon.dtype == torch.bfloat16 and torch.isfinite(out.recon.float()).all()
    (out.recon.float().square().mean() + sum(out.losses.values(), torch.zeros(()))).backward()
