"""Quantizers: lookup, losses, EMA, first-batch init, dead-code restarts, FSQ, and a real 2-rank
gloo run whose codebooks must stay bitwise identical."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.quantizers import FSQ, VectorQuantizer, kmeans


def vectors(n=64, d=4, seed=0, offset=0.0):
    return torch.randn(n, d, 1, 1, generator=torch.Generator().manual_seed(seed)) + offset  # `b d h w`, h=w=1


# ---------------------------------------------------------------------------------------------
# Vector quantizer
# ---------------------------------------------------------------------------------------------


def test_lookup_is_the_nearest_code_and_straight_through():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=4, codebook_size=16, init="none").eval()
    z = torch.randn(3, 4, 5, 6, requires_grad=True)
    out = vq(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.equal(out.indices.reshape(-1), torch.cdist(flat, vq.embed).argmin(-1))
    assert out.indices.shape == (3, 5, 6) and out.quantized.shape == z.shape
    assert torch.allclose(out.quantized, vq.indices_to_codes(out.indices), atol=1e-6)
    out.quantized.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # straight-through: identity gradient


def test_beta_weights_the_encoder_term_not_the_codebook_term():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=4, codebook_size=8, beta=0.25, decay=0.0, init="none", restart_after=0).train()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = vq(z)
    q = vq.indices_to_codes(out.indices).detach()
    n = z.numel()
    out.loss.backward()
    assert torch.allclose(z.grad, 0.25 * 2 * (z - q).detach() / n, atol=1e-7)  # beta on the commitment
    per_vector = (2 * (q - z) / n).detach().permute(0, 2, 3, 1).reshape(-1, 4)
    expected = torch.zeros_like(vq.embed).index_add_(0, out.indices.reshape(-1), per_vector)
    assert torch.allclose(vq.embed.grad, expected, atol=1e-7)  # weight 1 on the codebook term


def test_ema_update_follows_the_formula():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=4, codebook_size=8, decay=0.9, eps=1e-5, init="none", restart_after=0).train()
    before_size, before_sum, before_embed = vq.cluster_size.clone(), vq.embed_sum.clone(), vq.embed.clone()
    z = vectors(32)
    out = vq(z)
    idx = out.indices.reshape(-1)
    x = z.reshape(32, 4)
    bins = torch.bincount(idx, minlength=8).float()
    size = 0.9 * before_size + 0.1 * bins
    sums = 0.9 * before_sum + 0.1 * torch.zeros(8, 4).index_add_(0, idx, x)
    smoothed = (size + 1e-5) / (size.sum() + 8e-5) * size.sum()
    assert torch.allclose(vq.cluster_size, size) and torch.allclose(vq.embed, sums / smoothed[:, None], atol=1e-6)
    assert torch.allclose(out.loss, 0.25 * (x - before_embed[idx]).pow(2).mean())  # EMA: only beta * commitment


def test_codebook_moves_only_in_training_forwards_with_grad():
    vq = VectorQuantizer(dim=4, codebook_size=8, restart_after=1)
    start = vq.embed.clone()
    vq.eval()(vectors())
    with torch.no_grad():
        vq.train()(vectors())
    assert torch.equal(vq.embed, start) and not vq.initted
    vq.train()(vectors())
    assert not torch.equal(vq.embed, start) and vq.initted


@pytest.mark.parametrize("init", ["kmeans", "random"])
def test_first_batch_init(init):
    torch.manual_seed(0)
    data = torch.cat([vectors(20, seed=s, offset=10.0 * s) * 0.1 for s in range(4)])  # 4 tight clusters
    vq = VectorQuantizer(dim=4, codebook_size=4, init=init, restart_after=0, decay=0.5).train()
    vq(data)
    assert vq.initted
    nearest = torch.cdist(vq.embed, data.reshape(-1, 4)).min(-1).values
    assert nearest.max() < 1.0  # every code sits on the data
    if init == "kmeans":  # k-means++ seeding finds the four clusters
        centres = torch.stack([data[20 * s : 20 * s + 20].reshape(20, 4).mean(0) for s in range(4)])
        assert torch.cdist(centres, vq.embed).min(-1).values.max() < 0.5


def test_kmeans_with_fewer_points_than_codes():
    x = torch.randn(5, 3)
    c = kmeans(x, 8, iters=2)
    assert c.shape == (8, 3) and torch.isfinite(c).all()
    assert torch.cdist(x, c).min(-1).values.max() == 0  # every point is a centre; the rest repeat points
    assert torch.cdist(c, x).min(-1).values.max() == 0


def test_kmeans_seeds_a_huge_codebook_at_once(monkeypatch):
    """2^20 codes from a first batch of 2048 vectors: D^2 seeding drew one code at a time (2^20 draws,
    minutes on a CPU) to end where every point is a centre anyway: no sequential draw is made now."""
    def one_at_a_time(*_, **__):
        raise AssertionError("sequential D^2 draws for more codes than points")

    monkeypatch.setattr(torch, "multinomial", one_at_a_time)
    assert kmeans(torch.randn(2048, 4), 1 << 20).shape == (1 << 20, 4)


def test_dead_codes_are_restarted_from_encoder_outputs():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=4, codebook_size=32, init="random", restart_after=2).train()
    z = vectors(8)  # 8 vectors: most of 32 codes go unused
    counted = 0
    for _ in range(3):
        out = vq(z)
        counted += int(out.metrics["dead_restarts"])
    assert int(vq.restarts) > 0 and counted == int(vq.restarts)
    flat = z.reshape(8, 4)
    assert torch.cdist(vq.embed, flat).min(-1).values.max() < 1e-2  # every code sits on an input (EMA drift aside)
    assert 0 < out.metrics["codes_used"] <= 8 / 32 and 1 <= out.metrics["perplexity"] <= 8


def test_cosine_codebook_stays_normalised():
    vq = VectorQuantizer(dim=4, codebook_size=8, cosine=True, restart_after=1).train()
    for s in range(3):
        out = vq(vectors(seed=s) * 5)
    assert torch.allclose(vq.embed.norm(dim=-1), torch.ones(8), atol=1e-5)
    assert torch.allclose(out.quantized.norm(dim=1), torch.ones(64, 1, 1), atol=1e-5)


def test_quantizer_runs_in_fp32_under_autocast():
    vq = VectorQuantizer(dim=4, codebook_size=8).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(vectors().to(torch.bfloat16))
    assert out.quantized.dtype == torch.bfloat16 and vq.embed.dtype == torch.float32 and out.loss.dtype == torch.float32


def test_ema_statistics_stay_fp32_when_the_model_is_cast():
    vq = VectorQuantizer(dim=4, codebook_size=8, restart_after=1).to(torch.bfloat16).train()
    assert vq.embed.dtype == vq.cluster_size.dtype == vq.embed_sum.dtype == torch.float32
    for s in range(3):
        out = vq(vectors(4, seed=s).to(torch.bfloat16))  # 4 vectors, 8 codes: restarts
    assert out.quantized.dtype == torch.bfloat16 and int(vq.restarts) > 0
    grad = VectorQuantizer(dim=4, codebook_size=8, decay=0.0, restart_after=1).to(torch.bfloat16).train()
    for s in range(3):
        grad(vectors(4, seed=s).to(torch.bfloat16))
    assert grad.embed.dtype == torch.bfloat16 and int(grad.restarts) > 0


def _state(vq):
    return {k: v.detach().clone() for k, v in [*vq.named_buffers(), *vq.named_parameters()]}


@pytest.mark.parametrize("kw", [dict(), dict(cosine=True), dict(decay=0.0)], ids=["ema", "cosine", "grad"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_a_non_finite_batch_leaves_the_codebook_alone(kw, bad):
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=4, codebook_size=16, init="random", restart_after=1, **kw).train()
    vq(vectors(8))  # init; 8 vectors, 16 codes: restart_after=1 would restart codes on every forward
    before = _state(vq)
    z = vectors(8, seed=1)
    z[3, 2] = bad  # a single bad value
    out = vq(z)
    after = _state(vq)
    for k in before:
        assert torch.equal(before[k], after[k]), k
        assert not after[k].is_floating_point() or torch.isfinite(after[k]).all(), k
    assert int(out.metrics["dead_restarts"]) == 0 and not torch.isfinite(out.loss)  # the trainer sees it
    out = vq(vectors(8, seed=2))
    assert torch.isfinite(out.loss) and int(out.metrics["dead_restarts"]) > 0  # training goes on


def test_a_non_finite_first_batch_defers_the_init():
    vq = VectorQuantizer(dim=4, codebook_size=8, init="kmeans").train()
    start = vq.embed.clone()
    z = vectors(32)
    z[0, 0] = float("inf")
    vq(z)
    assert not vq.initted and torch.equal(vq.embed, start)
    out = vq(vectors(32, seed=1))
    assert vq.initted and torch.isfinite(vq.embed).all() and torch.isfinite(out.loss)


# ---------------------------------------------------------------------------------------------
# FSQ
# ---------------------------------------------------------------------------------------------


def test_fsq_grid_indices_and_gradient():
    fsq = FSQ(levels=(8, 5, 3))
    assert fsq.codebook_size == 120 and fsq.dim == 3
    z = (torch.randn(4, 3, 6, 6) * 3).requires_grad_()
    out = fsq(z)
    for c, n in enumerate((8, 5, 3)):
        values = torch.unique(out.quantized[:, c].detach())
        half = n // 2
        allowed = (torch.arange(n) - half) / half
        assert len(values) <= n and all(torch.isclose(v, allowed).any() for v in values)
    assert out.indices.shape == (4, 6, 6) and int(out.indices.max()) < 120 and int(out.indices.min()) >= 0
    assert torch.equal(fsq.indices_to_codes(out.indices), out.quantized.detach())
    all_codes = fsq.indices_to_codes(torch.arange(120)[:, None, None])
    assert len({tuple(c.flatten().tolist()) for c in all_codes}) == 120  # every index is a distinct code
    out.quantized.sum().backward()
    assert z.grad.abs().sum() > 0 and out.loss is None
    with pytest.raises(ValueError, match="levels must be integers >= 2"):
        FSQ(levels=(4, 1))


# ---------------------------------------------------------------------------------------------
# Two gloo ranks, different data, one codebook
# ---------------------------------------------------------------------------------------------

VARIANTS = {
    "ema": dict(init="kmeans"),
    "ema_cosine": dict(init="kmeans", cosine=True),
    "grad": dict(init="random", decay=0.0),  # init and restarts synced; the gradients are DDP's job
    "no_sync": dict(init="kmeans", sync=False),  # the control: must diverge
    "ema_inf": dict(init="kmeans"),  # rank 1 alone gets an inf (POISONED): both ranks must skip
}
POISONED = {"ema_inf": (0, 3)}  # variant -> steps at which rank 1's batch holds an inf (0: before init)


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = {}
        for name, kw in VARIANTS.items():
            torch.manual_seed(100 + rank)  # every rank starts from a different random codebook
            vq = VectorQuantizer(dim=4, codebook_size=32, restart_after=2, **kw).train()
            snapshots, states = [], [{k: v.clone() for k, v in vq.named_buffers()}]
            for step in range(6):
                # 8 vectors per rank and step, from a rank-specific distribution: many dead codes.
                z = torch.randn(2, 4, 2, 2) * 0.5 + rank + 0.1 * step
                if rank == 1 and step in POISONED.get(name, ()):
                    z[1, 2, 0, 1] = float("inf")
                vq(z.requires_grad_())
                snapshots.append(vq.embed.detach().clone())
                states.append({k: v.clone() for k, v in vq.named_buffers()})
            result[name] = {
                "states": states,
                "first": snapshots[0],
                "embed": vq.embed.detach().clone(),
                "buffers": {k: v.clone() for k, v in vq.named_buffers()},
                "restarts": int(vq.restarts),
            }
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_codebooks_identical_across_two_gloo_ranks(tmp_path):
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name in ("ema", "ema_cosine", "grad", "ema_inf"):
        a, b = r0[name], r1[name]
        assert torch.equal(a["embed"], b["embed"]), name
        for k in a["buffers"]:
            assert torch.equal(a["buffers"][k], b["buffers"][k]), (name, k)
        assert not torch.equal(a["first"], a["embed"]), name  # the codebook did change while training
        assert a["restarts"] > 0, name  # the restart broadcast ran
    assert not torch.equal(r0["no_sync"]["embed"], r1["no_sync"]["embed"])
    # One rank's inf: every rank skipped that step (rank 0's clean batch too), none deadlocked.
    for r in (r0, r1):
        states = r["ema_inf"]["states"]
        for step in POISONED["ema_inf"]:
            for k in states[step]:
                assert torch.equal(states[step][k], states[step + 1][k]), (step, k)
        assert all(torch.isfinite(v).all() for v in states[-1].values() if v.is_floating_point())
        assert not states[1]["initted"] and states[2]["initted"]  # init deferred to the first clean step
