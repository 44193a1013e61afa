"""The one interface every autoencoder speaks, so the harness never asks which kind it holds.

Tensors: images are `b c h w` floats in [-1, 1]; a condition is `b` class indices (long) or a
`b k` multi-hot float vector, or None for unconditional models.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class AutoencoderOutput:
    """What `forward` returns.

    recon:   the reconstruction, `b c h w`, same range as the input.
    losses:  the model's own *unweighted* scalar loss terms, by name ("kl", "vq", ...). The harness
             weights term `name` with `cfg.loss.<name>_weight` and adds the pixel/perceptual terms.
    metrics: scalars that are logged but not optimised ("perplexity", "codes_used", ...).
    latent:  the latent the decoder read (for sparsity penalties, grids, interpolation).
    """

    recon: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    latent: torch.Tensor | None = None


class Autoencoder(nn.Module):
    """Base class: encode / decode / forward / sample, plus what the harness may ask of a model."""

    #: None, "class" (index condition) or "multilabel" (multi-hot condition).
    condition: str | None = None

    def encode(self, x: torch.Tensor, cond: torch.Tensor | None = None):
        raise NotImplementedError

    def decode(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None, sample_posterior: bool = True) -> AutoencoderOutput:
        raise NotImplementedError

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """The `(c, h, w)` latent for a square image of side `image_size`."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, n: int, image_size: int, cond: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode `n` draws from the prior. Models without a usable prior raise `NoPriorError`."""
        raise NotImplementedError


class NoPriorError(RuntimeError):
    """Raised by `sample` when a model has no prior to draw from (a VQ-VAE without a learned prior)."""
