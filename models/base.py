"""The one interface every autoencoder speaks, so the harness never asks which kind it holds.

Tensors: images are `b c h w` floats in [-1, 1]; a condition is `b` class indices (long) or a
`b k` multi-hot float vector, or None for unconditional models.

Besides the tensor interface, a model class answers for its own settings (what models/registry.py
calls on the class registered for a `model.kind`): `from_config` builds it from a `ModelConfig`,
`check_config` validates that config before any work, `batch_problem` says why it cannot train on
so few images per rank, `deepspeed_unsupported` says why a setting cannot train under DeepSpeed,
`config_keys` names the `model.*` keys the class reads.
Config mistakes raise `ModelConfigError`; `models` never imports the harness that turns them into
its own config error.
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
    posterior: the latent's distribution, where there is one (KL free bits read its channels).
    """

    recon: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    latent: torch.Tensor | None = None
    posterior: object | None = None


class ModelConfigError(ValueError):
    """A model setting that cannot work. The message is one line that starts with the key path it
    names (`model.ch_mult: ...`; `data.image_size: ...` for the image side a model is checked at)."""


class Autoencoder(nn.Module):
    """Base class: encode / decode / forward / sample, plus what the harness may ask of a model."""

    #: None, "class" (index condition) or "multilabel" (multi-hot condition).
    condition: str | None = None

    #: The `model.*` keys this class reads besides `kind` (documentation; a test holds it to the schema).
    config_keys: tuple[str, ...] = ()

    # --- the class side: settings ---------------------------------------------------------------

    @classmethod
    def from_config(cls, m) -> Autoencoder:
        """Build from a `ModelConfig` `m` (harness/config.py holds the schema; keys stay flat)."""
        raise NotImplementedError

    @classmethod
    def check_config(cls, m, image_size: int) -> None:
        """Raise `ModelConfigError` for a setting of `m` that cannot build or train at square images of
        side `image_size`; may fill in what the config leaves to be derived. Nothing is allocated."""

    @classmethod
    def batch_problem(cls, m, image_size: int, batch_size: int) -> str | None:
        """Why a checked `m` cannot train on micro-batches of `batch_size` images per rank (one line
        naming the key; a BatchNorm that would see one value per channel), or None."""
        return None

    @classmethod
    def deepspeed_unsupported(cls, m) -> str | None:
        """Why `m` cannot train under DeepSpeed (one line naming the key), or None."""
        return None

    # --- the instance side: tensors -----------------------------------------------------------

    def encode(self, x: torch.Tensor, cond: torch.Tensor | None = None):
        raise NotImplementedError

    def decode(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor | None = None, sample_posterior: bool = True
    ) -> AutoencoderOutput:
        raise NotImplementedError

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """The `(c, h, w)` latent for a square image of side `image_size`."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(
        self, n: int, image_size: int, cond: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Decode `n` draws from the prior. Models without a usable prior raise `NoPriorError`."""
        raise NotImplementedError


class NoPriorError(RuntimeError):
    """Raised by `sample` when a model has no prior to draw from (a VQ-VAE without a learned prior)."""
