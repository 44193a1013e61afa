"""Image grids shared by training-time logging and launch/sample.py.

Each function returns a list of rows (`b c h w` tensors in [-1, 1]) for `tracking.make_grid`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.base import Autoencoder


def generator(device, seed: int) -> torch.Generator:
    return torch.Generator(device).manual_seed(seed)


@torch.no_grad()
def reconstruction_rows(model: Autoencoder, x: torch.Tensor, cond=None) -> list[torch.Tensor]:
    """Inputs above their reconstructions (posterior mean, no sampling)."""
    return [x, model(x, cond=cond, sample_posterior=False).recon]


def class_conditions(condition: str | None, num_classes: int, rows: int, per_row: int, device) -> torch.Tensor | None:
    """`rows * per_row` conditions: class c (or label c alone) for row c; None for unconditional models."""
    if not rows or condition not in ("class", "multilabel"):
        return None
    classes = torch.arange(min(rows, num_classes), device=device).repeat_interleave(per_row)
    return classes if condition == "class" else F.one_hot(classes, num_classes).float()


@torch.no_grad()
def class_rows(model: Autoencoder, image_size: int, conds: torch.Tensor, per_row: int, seed: int) -> list[torch.Tensor]:
    """One row of prior samples per class. Raises NoPriorError for models without a prior."""
    samples = model.sample(conds.shape[0], image_size, cond=conds, generator=generator(conds.device, seed))
    return list(samples.split(per_row))


@torch.no_grad()
def interpolation_rows(model: Autoencoder, x: torch.Tensor, cond, steps: int, rows: int) -> list[torch.Tensor]:
    """Decoded straight lines in latent space between pairs of images (x[0]-x[1], x[2]-x[3], ...)."""
    k = min(rows, x.shape[0] // 2)
    if not k:
        return []
    z = model.encode(x[: 2 * k], cond[: 2 * k] if cond is not None else None)
    t = torch.linspace(0, 1, steps, device=z.device, dtype=z.dtype)
    za, zb = z[0::2], z[1::2]
    path = torch.lerp(za[:, None], zb[:, None], t.view(1, steps, *[1] * (z.dim() - 1)))
    frames = model.decode(path.flatten(0, 1), path_condition(cond, k, t))
    return list(frames.split(steps))


def path_condition(cond, k: int, t: torch.Tensor):
    """Each frame's condition along the pairs' paths, so that both ends decode with their own image's: a
    multi-hot label vector (float) is blended like the latent (its embedding is linear in it); a class
    index switches from the first image's to the second's halfway."""
    if cond is None:
        return None
    ca, cb = cond[0 : 2 * k : 2], cond[1 : 2 * k : 2]
    steps = t.shape[0]
    if cond.is_floating_point():
        w = t.to(cond.dtype).view(1, steps, *[1] * (cond.dim() - 1))
        return torch.lerp(ca[:, None], cb[:, None], w).flatten(0, 1)
    second = (t >= 0.5).view(1, steps)
    return torch.where(second.to(cond.device), cb[:, None], ca[:, None]).flatten(0, 1)
