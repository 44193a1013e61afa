"""Quantizers for VQ autoencoders: a vector quantizer (EMA or gradient-trained codebook) and FSQ.

Axis letters: b batch, d latent/codebook dimension, n flattened latent vectors (b and all
spatial axes packed), k codebook entries, ... any spatial axes of the latent.

Distributed training: with torch.distributed initialized, every statistic that moves the codebook
(EMA cluster sizes and embedding sums) is all-reduced, and the first-batch initialisation and the
dead-code restart samples are broadcast from rank 0, so every rank holds the same codebook after
every step (as lucidrains' vector-quantize-pytorch does). All of it goes through `_sync`.

Non-finite encoder outputs: a batch with an inf or NaN on any rank leaves the codebook untouched on
every rank (no init, no EMA update, no restart, no unused-code counting). Otherwise one bad batch
would put a NaN code into the codebook that argmin then picks for every vector, so it is never
restarted and every later loss is NaN. The trainer still sees the non-finite loss and skips the step.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import pack, rearrange, unpack
from torch import nn


class QuantizerOutput(NamedTuple):
    """quantized: `b d ...` (straight-through: gradients reach the encoder as if it were identity);
    indices: `b ...` code per latent vector; loss: the term to optimise (None for FSQ);
    metrics: detached scalars (perplexity, codes_used, dead_restarts = codes restarted by this
    forward; the running total is the quantizer's `restarts` buffer).

    A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 hooks the tensors a submodule returns (tuples,
    dicts, namedtuples) to gather and release its parameters around backward; tensors inside a
    dataclass are invisible to it and backward fails ("active_backward_submodules is empty")."""

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = {}


def l2norm(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t, p=2, dim=-1)


def _to_vectors(z: torch.Tensor) -> tuple[torch.Tensor, list]:
    """`b d ...` -> `n d` (and what `_from_vectors` needs to undo it)."""
    flat, ps = pack([rearrange(z, "b d ... -> b ... d")], "* d")
    return flat, ps


def _from_vectors(flat: torch.Tensor, ps: list) -> torch.Tensor:
    (z,) = unpack(flat, ps, "* d")
    return rearrange(z, "b ... d -> b d ...")


def _usage_metrics(bins: torch.Tensor) -> dict[str, torch.Tensor]:
    """Perplexity of the code histogram (exp of its entropy: K when uniform, 1 when collapsed) and
    the fraction of codes hit."""
    p = bins / bins.sum().clamp(min=1)
    entropy = -(p * torch.log(p.clamp(min=1e-10))).sum()
    return {"perplexity": entropy.exp().detach(), "codes_used": (bins > 0).float().mean().detach()}


# ---------------------------------------------------------------------------------------------
# The one place that talks to other ranks
# ---------------------------------------------------------------------------------------------


def _sync(tensor: torch.Tensor, op: str, enabled: bool = True) -> torch.Tensor:
    """All-reduce (op="sum") or broadcast from rank 0 (op="broadcast") in place, when distributed.

    Every rank must reach the same `_sync` calls in the same order: they happen only in training
    forwards with grad enabled (see `VectorQuantizer.forward`), which every rank runs.
    """
    if enabled and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if op == "sum":
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        elif op == "broadcast":
            dist.broadcast(tensor, src=0)
        else:
            raise ValueError(f"_sync: unknown op {op!r}")
    return tensor


# ---------------------------------------------------------------------------------------------
# k-means++ seeding
# ---------------------------------------------------------------------------------------------


def kmeans(x: torch.Tensor, k: int, iters: int = 10, cosine: bool = False) -> torch.Tensor:
    """`k d` centres for `n d` points: k-means++ (D^2) seeding, then `iters` Lloyd steps.

    "Lite": one candidate per seeding step (no greedy local trials). With no more points than
    centres, every point is a centre (in random order) and the rest repeat random points: what
    D^2 seeding would end with, without its k sequential draws (a 2^20-code codebook took minutes
    on a CPU) and without Lloyd steps that could not move them. The duplicates are what dead-code
    restarts later replace.
    """
    n = x.shape[0]
    if n <= k:
        extra = torch.randint(n, (k - n,), device=x.device)
        return x[torch.cat([torch.randperm(n, device=x.device), extra])].clone()
    centres = torch.empty(k, x.shape[1], device=x.device, dtype=x.dtype)
    centres[0] = x[torch.randint(n, (1,), device=x.device)]
    d2 = (x - centres[0]).pow(2).sum(-1)
    for i in range(1, k):
        # + tiny: when every point is already a centre the draw becomes uniform instead of failing
        pick = torch.multinomial(d2 + 1e-12, 1)
        centres[i] = x[pick]
        d2 = torch.minimum(d2, (x - centres[i]).pow(2).sum(-1))
    rows = max(1, (1 << 24) // k)  # the n x k distances in blocks of at most 16M: a big codebook fits
    for _ in range(iters):
        assign = torch.cat([torch.cdist(x[i:i + rows], centres).argmin(-1) for i in range(0, n, rows)])
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        new = sums / counts.clamp(min=1)[:, None]
        centres = torch.where(counts[:, None] > 0, new, centres)  # an empty cluster keeps its centre
        if cosine:
            centres = l2norm(centres)
    return centres


# ---------------------------------------------------------------------------------------------
# Vector quantizer
# ---------------------------------------------------------------------------------------------


class VectorQuantizer(nn.Module):
    """Nearest-codebook-vector quantization of `b d ...` latents.

    Loss (VQ-VAE): |sg(z_e) - e|^2 + beta * |z_e - sg(e)|^2 -- beta weights the encoder's
    commitment term, not the codebook term (latent diffusion's `legacy=True` swapped them).
    With an EMA codebook (decay > 0) the first term is replaced by the EMA update and only the
    commitment term remains.

    decay: EMA decay of cluster sizes and embedding sums (0 = codebook trained by gradient).
    eps: Laplace smoothing of the cluster sizes, so an empty cluster never divides by zero.
    cosine: l2-normalise encoder outputs and codes: nearest code by cosine similarity.
    init: "kmeans" | "random" (random first-batch vectors) | "none" (N(0, 1) codes), done on the
        first training forward (broadcast from rank 0 when distributed).
    restart_after: a code that no vector chose for this many training forwards (on any rank) is
        replaced by a random encoder output of the current batch (0 = never). Counted per forward,
        not per optimizer step: with gradient accumulation over A micro-batches that is
        restart_after / A optimizer steps.
    sync: all-reduce / broadcast codebook updates across ranks when torch.distributed is initialized.

    The codebook only moves in training forwards with grad enabled; eval and no_grad forwards
    (grids, evaluation) leave it and every collective alone. Lookups run in fp32.
    """

    def __init__(
        self,
        *,
        dim: int,
        codebook_size: int = 1024,
        beta: float = 0.25,
        decay: float = 0.99,
        eps: float = 1e-5,
        cosine: bool = False,
        init: str = "kmeans",
        kmeans_iters: int = 10,
        restart_after: int = 100,
        sync: bool = True,
    ):
        super().__init__()
        if init not in ("kmeans", "random", "none"):
            raise ValueError(f"VectorQuantizer: init {init!r} is not one of kmeans, random, none")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"VectorQuantizer: decay must be in [0, 1); got {decay}")
        self.dim, self.codebook_size = dim, codebook_size
        self.beta, self.decay, self.eps = beta, decay, eps
        self.cosine, self.init, self.kmeans_iters = cosine, init, kmeans_iters
        self.restart_after, self.sync = restart_after, sync
        self.ema = decay > 0

        embed = torch.randn(codebook_size, dim)
        if cosine:
            embed = l2norm(embed)
        if self.ema:
            self.register_buffer("embed", embed)
            self.register_buffer("cluster_size", torch.ones(codebook_size))
            self.register_buffer("embed_sum", embed.clone())
        else:
            self.embed = nn.Parameter(embed)
        self.register_buffer("initted", torch.tensor(init == "none"))
        self.register_buffer("unused_steps", torch.zeros(codebook_size, dtype=torch.long))
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long))

    _FP32_BUFFERS = ("embed", "cluster_size", "embed_sum")

    def _apply(self, fn, recurse=True):
        # `model.half()` / `.to(bfloat16)` (DeepSpeed's bf16 and fp16 modes cast the whole module)
        # must not leave the EMA statistics in 16 bits: a 0.99 decay needs more mantissa than bf16
        # has. They are cast back to fp32 right away; the lookup runs in fp32 anyway.
        super()._apply(fn, recurse)
        if self.ema:
            for name in self._FP32_BUFFERS:
                buf = self._buffers[name]
                if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
                    self._buffers[name] = buf.float()
        return self

    # --- codebook maintenance (no grad, training only) ------------------------------------------

    @torch.no_grad()
    def _init_codebook(self, x: torch.Tensor) -> None:
        if self.init == "kmeans":
            embed = kmeans(x, self.codebook_size, self.kmeans_iters, self.cosine)
        else:
            embed = x[torch.randint(x.shape[0], (self.codebook_size,), device=x.device)]
        embed = _sync(embed.contiguous(), "broadcast", self.sync)
        self.embed.data.copy_(embed)  # copy_ converts to a bf16/fp16 gradient-trained codebook
        if self.ema:
            self.embed_sum.copy_(embed)
            self.cluster_size.fill_(1.0)
        self.initted.fill_(True)

    @torch.no_grad()
    def _ema_update(self, x: torch.Tensor, idx: torch.Tensor, bins: torch.Tensor) -> None:
        """bins: code counts of this step over all ranks (already reduced)."""
        sums = torch.zeros_like(self.embed_sum).index_add_(0, idx, x)
        _sync(sums, "sum", self.sync)
        self.cluster_size.lerp_(bins, 1 - self.decay)
        self.embed_sum.lerp_(sums, 1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        embed = self.embed_sum / smoothed[:, None]
        self.embed.copy_(l2norm(embed) if self.cosine else embed)

    @torch.no_grad()
    def _restart_dead_codes(self, x: torch.Tensor, bins: torch.Tensor) -> int:
        """Restart codes unused for `restart_after` training forwards; returns how many."""
        self.unused_steps.copy_(torch.where(bins > 0, torch.zeros_like(self.unused_steps), self.unused_steps + 1))
        dead = self.unused_steps >= self.restart_after
        num = int(dead.sum())  # identical on every rank: bins were reduced
        if not num:
            return 0
        samples = x[torch.randint(x.shape[0], (num,), device=x.device)]
        samples = _sync(samples.contiguous(), "broadcast", self.sync)
        self.embed.data[dead] = samples.to(self.embed.dtype)
        if self.ema:
            self.embed_sum[dead] = samples
            self.cluster_size[dead] = 1.0
        self.unused_steps[dead] = 0
        self.restarts += num
        return num

    # --- lookup ---------------------------------------------------------------------------------

    def codebook(self) -> torch.Tensor:
        return l2norm(self.embed) if self.cosine else self.embed

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """`b ...` code indices -> `b d ...` latents."""
        flat, ps = pack([indices], "*")
        codes = F.embedding(flat, self.codebook().float())
        return _from_vectors(codes, ps)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self._quantize(z)

    def _quantize(self, z: torch.Tensor) -> QuantizerOutput:
        x, ps = _to_vectors(z.float())
        if self.cosine:
            x = l2norm(x)
        update = self.training and torch.is_grad_enabled()
        nonfinite = (~torch.isfinite(x.detach())).any().float()[None]  # 1 where this rank's batch is bad
        if update and not bool(self.initted):
            # An extra collective, but only until the codebook is initialised: the decision to skip
            # must be the same on every rank, or one rank would wait alone in the broadcast.
            if not bool(_sync(nonfinite.clone(), "sum", self.sync)):
                self._init_codebook(x.detach())

        codebook = self.codebook().float()
        with torch.no_grad():
            if self.cosine:
                idx = (x @ codebook.t()).argmax(-1)
            else:
                dist2 = x.pow(2).sum(-1, keepdim=True) - 2 * x @ codebook.t() + codebook.pow(2).sum(-1)[None]
                idx = dist2.argmin(-1)
        q = F.embedding(idx, codebook)  # gradient reaches a gradient-trained codebook through here

        commitment = F.mse_loss(x, q.detach())
        loss = self.beta * commitment if self.ema else F.mse_loss(q, x.detach()) + self.beta * commitment

        bins = torch.bincount(idx, minlength=self.codebook_size).float()
        restarted = 0
        if update:
            # The non-finite flag rides on the bins all-reduce, so that every rank takes the same
            # branch below (the EMA sums and restart samples are collectives too) at no extra cost.
            stats = _sync(torch.cat([bins, nonfinite]), "sum", self.sync)
            bins, any_nonfinite = stats[:-1], bool(stats[-1])
            if not any_nonfinite:
                if self.ema:
                    self._ema_update(x.detach(), idx, bins)
                if self.restart_after:
                    restarted = self._restart_dead_codes(x.detach(), bins)

        quantized = x + (q - x).detach()  # straight-through estimator
        # A count per forward (not the running total) so that averaging over a logging interval,
        # as loggers do, gives restarts per step.
        metrics = {**_usage_metrics(bins), "dead_restarts": torch.tensor(float(restarted), device=x.device)}
        (indices,) = unpack(idx, ps, "*")
        return QuantizerOutput(_from_vectors(quantized, ps).to(z.dtype), indices, loss, metrics)


# ---------------------------------------------------------------------------------------------
# Finite scalar quantization
# ---------------------------------------------------------------------------------------------


class FSQ(nn.Module):
    """Finite scalar quantization (Mentzer et al. 2023): each of the d = len(levels) latent channels
    is bounded and rounded to `levels[i]` values in [-1, 1]; the implicit codebook is their product.
    No codebook, no loss, nothing to synchronise; gradients pass by straight-through rounding."""

    def __init__(self, *, levels=(8, 5, 5, 5), eps: float = 1e-3):
        super().__init__()
        if not levels or any(n < 2 for n in levels):
            raise ValueError(f"FSQ: levels must be integers >= 2; got {list(levels)}")
        self.dim = len(levels)
        self.codebook_size = math.prod(levels)
        self.eps = eps
        lv = torch.tensor(list(levels), dtype=torch.long)
        self.register_buffer("levels", lv, persistent=False)
        self.register_buffer("basis", torch.cumprod(torch.tensor([1] + list(levels[:-1])), 0), persistent=False)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash to (-L/2, L/2) per channel; even levels are offset by 1/2 so rounding gives L values."""
        levels = self.levels.float()
        half_l = (levels - 1) * (1 + self.eps) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def _half_width(self) -> torch.Tensor:
        return (self.levels // 2).float()

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """`b ...` code indices -> `b d ...` latents in [-1, 1]."""
        flat, ps = pack([indices], "*")
        digits = (flat[:, None] // self.basis) % self.levels
        return _from_vectors((digits.float() - self._half_width()) / self._half_width(), ps)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with torch.autocast(device_type=z.device.type, enabled=False):
            x, ps = _to_vectors(z.float())
            bounded = self.bound(x)
            q = bounded + (torch.round(bounded) - bounded).detach()  # straight-through rounding
            codes = q / self._half_width()
            with torch.no_grad():
                digits = (q + self._half_width()).round().long()
                idx = (digits * self.basis).sum(-1)
            bins = torch.bincount(idx, minlength=self.codebook_size).float()
            (indices,) = unpack(idx, ps, "*")
            return QuantizerOutput(_from_vectors(codes, ps).to(z.dtype), indices, None, _usage_metrics(bins))
