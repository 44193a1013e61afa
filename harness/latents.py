"""Latent statistics for the next stage: what a diffusion model trained on our latents needs.

Diffusion training normalises latents as `(z - shift_factor) * scaling_factor` (diffusers'
config keys; SD and SDXL use a scale only, SD3 and FLUX both). Here, over N training images:

- KL models: the latent diffusion draws is z = mean + std * eps. Its moments follow from the
  posterior without drawing: E[z] = E[mean], E[z^2] = E[mean^2] + E[std^2], so the numbers are
  exact for the posterior and the same on every run. VQ models: the latent before quantization,
  which diffusers' VQModel.encode and latent-diffusion's VQModelInterface.encode hand a diffusion
  model (their decode quantizes it); FSQ models: the quantized codes.
- per channel c: latents_mean[c], latents_std[c]; over all channels: shift_factor = the mean,
  scaling_factor = 1 / the std (about the mean), so the normalised latent has mean 0 and std 1.

Sums are kept in float64 and all-reduced when several ranks share the images (each rank its
share: harness.data.eval_batches), so N images on 8 ranks give the numbers of N images on one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from einops import reduce

from harness.dist import all_reduce_sum


@dataclass
class LatentStats:
    num_images: int
    latents_mean: list[float]   # per channel
    latents_std: list[float]    # per channel
    shift_factor: float         # mean over every latent element
    scaling_factor: float       # 1 / std over every latent element

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        fmt = lambda xs: "[" + ", ".join(f"{x:.4f}" for x in xs) + "]"  # noqa: E731
        return (f"latent statistics over {self.num_images} images: scaling_factor={self.scaling_factor:.5f} "
                f"shift_factor={self.shift_factor:.5f} latents_mean={fmt(self.latents_mean)} "
                f"latents_std={fmt(self.latents_std)}")


class LatentMoments:
    """Running float64 sums per latent channel: count, sum of z, sum of z^2 (in expectation)."""

    def __init__(self):
        self.images = 0
        self.n = self.s1 = self.s2 = None

    @torch.no_grad()
    def update(self, mean: torch.Tensor, var: torch.Tensor | None = None) -> None:
        """mean: the latent (KL: the posterior mean) `b c ...`; var: the posterior variance, or None."""
        mean = mean.double()
        sq = mean.pow(2) if var is None else mean.pow(2) + var.double()
        s1, s2 = reduce(mean, "b c ... -> c", "sum"), reduce(sq, "b c ... -> c", "sum")
        n = torch.full_like(s1, mean.numel() / mean.shape[1])
        if self.n is None:
            self.n, self.s1, self.s2 = n, s1, s2
        else:
            self.n, self.s1, self.s2 = self.n + n, self.s1 + s1, self.s2 + s2
        self.images += mean.shape[0]

    def sums(self, channels: int) -> dict:
        """This process's totals as plain floats (JSON keeps a float64 exactly): images, n, s1, s2."""
        zero = [0.0] * channels
        return {"images": self.images, **{k: getattr(self, k).cpu().tolist() if getattr(self, k) is not None else zero
                                          for k in ("n", "s1", "s2")}}

    def result(self, channels: int) -> LatentStats:
        """Totals over every rank (a collective: every rank must call it, also one that saw no image)."""
        mine = self.sums(channels)
        total = all_reduce_sum([float(mine["images"]), *mine["n"], *mine["s1"], *mine["s2"]])
        n, s1, s2 = torch.tensor(total[1:], dtype=torch.float64).view(3, channels)
        return stats_from_sums(int(total[0]), n, s1, s2)


def stats_from_sums(images: int, n: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor) -> LatentStats:
    """LatentStats from per-channel float64 totals: element count n, sum of z, sum of z^2."""
    n, s1, s2 = (torch.as_tensor(t, dtype=torch.float64) for t in (n, s1, s2))
    if images == 0:
        raise ValueError("latent statistics: no image was read")
    if not all(bool(torch.isfinite(t).all()) for t in (n, s1, s2)):
        raise ValueError("latent statistics: the model's latents are not finite (NaN or inf): it diverged, or its "
                         "weights are broken; use an earlier checkpoint")
    mean_c = s1 / n
    var_c = (s2 / n - mean_c.pow(2)).clamp_min(0)
    mean = float(s1.sum() / n.sum())
    var = max(float(s2.sum() / n.sum()) - mean**2, 0.0)
    if var == 0.0:
        raise ValueError("latent statistics: the latents are constant (std 0): no scaling_factor")
    return LatentStats(images, mean_c.tolist(), var_c.sqrt().tolist(), mean, 1.0 / math.sqrt(var))


@torch.no_grad()
def latent_stats(model, batches, *, image_size: int, device, cond_key: str | None = None) -> LatentStats:
    """Statistics of `model`'s latents over `batches` (dicts with `image`, from eval_batches) of
    `image_size` pixels; totals over every rank."""
    from harness.data import to_model_input

    moments = LatentMoments()
    model.eval()
    for batch in batches:
        if batch["image"] is None:
            continue
        x = to_model_input(batch["image"], device)
        cond = batch[cond_key].to(device) if cond_key else None
        if hasattr(model, "posterior"):
            post = model.posterior(x, cond)
            moments.update(post.mean, post.var)
        elif hasattr(model, "encode_unquantized") and model.kind == "vq":
            moments.update(model.encode_unquantized(x, cond).float())
        else:
            moments.update(model.encode(x, cond).float())
    return moments.result(model.latent_shape(image_size)[0])
