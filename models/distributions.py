"""The diagonal Gaussian posterior of a KL autoencoder.

Axis letters: b batch, c channels (or features of a flat latent), ... any trailing latent axes.
"""

from __future__ import annotations

import torch


class DiagonalGaussianDistribution:
    """N(mean, exp(logvar)) per latent element, from encoder moments `b (2 c) ...`.

    The first half of axis 1 is the mean, the second the log-variance, which is clamped to
    [-30, 20] as in latent diffusion. Everything is kept in fp32: exp(logvar) overflows fp16 once
    logvar exceeds about 11, and the KL sums over every latent element.

    deterministic=True makes it a point mass at the mean (std 0, KL 0): a plain autoencoder.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        if parameters.shape[1] % 2:
            raise ValueError(
                f"DiagonalGaussianDistribution: axis 1 must hold mean and logvar halves; got {parameters.shape[1]}"
            )
        self.parameters = parameters.float()
        self.mean, self.logvar = torch.chunk(self.parameters, 2, dim=1)
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    @property
    def _latent_dims(self) -> list[int]:
        return list(range(1, self.mean.ndim))

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps, eps ~ N(0, 1) drawn from `generator` (on its own device) if given."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other) per sample, summed over every latent element: shape `b`.

        other=None means the standard normal prior.
        """
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=self._latent_dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=self._latent_dims,
        )

    def nll(self, sample: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of `sample` per sample, summed over latent elements: shape `b`."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        log_two_pi = torch.log(torch.tensor(2.0 * torch.pi, device=self.mean.device))
        sq = (sample.float() - self.mean).pow(2)
        return 0.5 * torch.sum(log_two_pi + self.logvar + sq / self.var, dim=self._latent_dims)
