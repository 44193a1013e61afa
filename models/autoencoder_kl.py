"""The KL (Gaussian) autoencoder of latent diffusion: model.kind=kl.

Axis letters: b batch, c channels, h height, w width, e condition-embedding width.

Parameter names follow latent diffusion's `AutoencoderKL` (encoder.*, decoder.* from models/ldm.py,
quant_conv, post_quant_conv) and kl-f8 built here has its 83.65M parameters, so its weights should
load with `load_state_dict(strict=False)` once its `loss.*` (LPIPS and discriminator) entries are
dropped -- not yet tried against a real checkpoint file.
"""

from __future__ import annotations

import torch
from torch import nn

from models.base import AutoencoderOutput
from models.blocks import exists
from models.common import LatentAutoencoder, build_backbone
from models.conditioning import ConditionEmbedding
from models.distributions import DiagonalGaussianDistribution

# ---------------------------------------------------------------------------------------------
# The autoencoder
# ---------------------------------------------------------------------------------------------


class AutoencoderKL(LatentAutoencoder):
    """Gaussian VAE: encoder -> quant_conv -> diagonal Gaussian posterior -> post_quant_conv -> decoder.

    KL scale (explicit, as latent diffusion): `losses["kl"]` is the KL to N(0, I) *summed* over every
    latent element (c, h, w) of a sample and *averaged* over the batch. Its weight (`loss.kl_weight`)
    is therefore relative to a pixel loss averaged over elements: the 1e-6 of latent diffusion.
    metrics: posterior_std (mean std of the posterior), latent_std (std of the latent decoded;
    latent diffusion scales latents by its inverse).

    `encode` returns the latent tensor the decoder reads (the posterior mean, or a draw with
    sample_posterior=True); `posterior(x)` returns the distribution itself.
    With double_z=False the encoder emits the latent directly: a plain autoencoder with KL 0.
    A condition (see `ConditionEmbedding`) reaches encoder and decoder; `cond=None` on a
    conditional model means the null (unconditioned) embedding.
    """

    def __init__(
        self,
        *,
        encoder: nn.Module,
        decoder: nn.Module,
        quant_conv: nn.Module | None = None,
        post_quant_conv: nn.Module | None = None,
        embed_dim: int = 4,
        double_z: bool = True,
        cond_embed: ConditionEmbedding | None = None,
        gradient_checkpointing: bool = False,
    ):
        super().__init__(
            encoder=encoder,
            decoder=decoder,
            quant_conv=quant_conv,
            post_quant_conv=post_quant_conv,
            cond_embed=cond_embed,
            gradient_checkpointing=gradient_checkpointing,
        )
        self.embed_dim = embed_dim
        self.double_z = double_z

    # --- the interface ------------------------------------------------------------------------

    def _posterior(self, x: torch.Tensor, emb: torch.Tensor | None) -> DiagonalGaussianDistribution:
        h = self._encode_features(x, emb)
        if not self.double_z:
            h = torch.cat([h, torch.zeros_like(h)], dim=1)
        return DiagonalGaussianDistribution(h, deterministic=not self.double_z)

    def posterior(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> DiagonalGaussianDistribution:
        return self._posterior(x, self.embed(cond, x.shape[0]))

    def encode(
        self,
        x: torch.Tensor,
        cond: torch.Tensor | None = None,
        sample_posterior: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The latent the decoder reads: the posterior mean (default) or a draw from it."""
        posterior = self.posterior(x, cond)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return z.to(x.dtype)

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor | None = None, sample_posterior: bool = True
    ) -> AutoencoderOutput:
        # One embedding (and one condition-dropout draw) for encoder and decoder alike.
        emb = self.embed(cond, x.shape[0], drop=self.training)
        posterior = self._posterior(x, emb)
        z = posterior.sample() if sample_posterior else posterior.mode()
        recon = self._decode(z, emb)
        kl = posterior.kl().mean()
        metrics = {"posterior_std": posterior.std.mean().detach(), "latent_std": z.detach().std()}
        return AutoencoderOutput(recon=recon, losses={"kl": kl}, metrics=metrics, latent=z, posterior=posterior)

    def latent_shape(self, image_size: int) -> tuple[int, ...]:
        shape = list(super().latent_shape(image_size))
        if self.double_z:
            shape[0] //= 2
        return tuple(shape)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        image_size: int,
        cond: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Decode `n` latents drawn from N(0, I) (on the generator's device, then moved).

        cond: `n` class indices (-1 = unconditioned) or `n k` multi-hot rows; None = unconditioned.
        """
        self._check_sample_cond(n, cond)
        noise_device = generator.device if exists(generator) else self._device
        z = torch.randn((n, *self.latent_shape(image_size)), generator=generator, device=noise_device)
        return self.decode(z.to(self._device), cond)

    # --- construction -------------------------------------------------------------------------

    config_keys = (*LatentAutoencoder.config_keys, "double_z", "embed_dim")

    @classmethod
    def latent_layout(cls, m) -> tuple[bool, int | None]:
        # A spec encoder has no 1x1 projection: its output width is the latent's, whatever it is.
        return m.double_z, (m.embed_dim if m.arch == "ldm" else None)

    @classmethod
    def from_config(cls, m) -> AutoencoderKL:
        """Build from a `ModelConfig`: arch ldm or spec, conditioned or not."""
        parts = build_backbone(m, latent_dim=m.embed_dim, gaussian=m.double_z)
        return cls(
            encoder=parts.encoder,
            decoder=parts.decoder,
            quant_conv=parts.quant_conv,
            post_quant_conv=parts.post_quant_conv,
            embed_dim=m.embed_dim,
            double_z=m.double_z,
            cond_embed=parts.cond_embed,
            gradient_checkpointing=m.gradient_checkpointing,
        )
