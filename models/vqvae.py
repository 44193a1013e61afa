"""The quantized autoencoders: VQ-VAE (a learnt codebook) and FSQ (a fixed scalar grid).

Axis letters: b batch, d latent dimension, h height, w width.
"""

from __future__ import annotations

import torch
from torch import nn

from models.base import AutoencoderOutput, NoPriorError
from models.common import LatentAutoencoder, build_backbone
from models.conditioning import ConditionEmbedding
from models.quantizers import FSQ, QuantizerOutput, VectorQuantizer


class VQAutoencoder(LatentAutoencoder):
    """encoder -> quant_conv -> quantizer -> post_quant_conv -> decoder.

    losses: {"vq": codebook + beta * commitment} for a vector quantizer (weighted by
    `loss.vq_weight`), nothing for FSQ. metrics: perplexity, codes_used (fraction of the codebook
    hit by this batch, all ranks while training), dead_restarts (codes restarted by this step; VQ
    only; the running total is `quantizer.restarts`).
    `encode` returns the quantized latent `b d h w`; `encode_indices` / `decode_indices` work with
    code indices `b h w` (what a prior would model). `sample` raises NoPriorError: there is no
    learnt prior over the codes yet.
    """

    def __init__(
        self,
        *,
        encoder: nn.Module,
        decoder: nn.Module,
        quantizer: VectorQuantizer | FSQ,
        quant_conv: nn.Module | None = None,
        post_quant_conv: nn.Module | None = None,
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
        self.quantizer = quantizer

    @property
    def kind(self) -> str:
        return "fsq" if isinstance(self.quantizer, FSQ) else "vq"

    def quantize(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> QuantizerOutput:
        return self.quantizer(self._encode_features(x, self.embed(cond, x.shape[0])))

    def encode(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The quantized latent `b d h w` the decoder reads."""
        return self.quantize(x, cond).quantized

    def encode_indices(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.quantize(x, cond).indices

    def decode_indices(self, indices: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(self.quantizer.indices_to_codes(indices), cond)

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor | None = None, sample_posterior: bool = True
    ) -> AutoencoderOutput:
        """sample_posterior is accepted for interface compatibility and ignored (the latent is discrete)."""
        emb = self.embed(cond, x.shape[0], drop=self.training)
        q = self.quantizer(self._encode_features(x, emb))
        recon = self._decode(q.quantized, emb)
        losses = {"vq": q.loss} if q.loss is not None else {}
        return AutoencoderOutput(recon=recon, losses=losses, metrics=q.metrics, latent=q.quantized)

    @torch.no_grad()
    def sample(self, n: int, image_size: int, cond=None, generator=None) -> torch.Tensor:
        raise NoPriorError(
            f"model.kind={self.kind} has no prior to sample from: random codes decode to noise. "
            "Train a prior over encode_indices() first; reconstructions (decode(encode(x))) work."
        )

    @classmethod
    def from_config(cls, cfg) -> VQAutoencoder:
        """Build from a `ModelConfig` with kind vq or fsq (arch ldm or spec)."""
        from harness.config import ConfigError

        try:
            if cfg.kind == "fsq":
                quantizer = FSQ(levels=tuple(cfg.fsq_levels))
            else:
                quantizer = VectorQuantizer(
                    dim=cfg.embed_dim,
                    codebook_size=cfg.vq_codebook_size,
                    beta=cfg.vq_beta,
                    decay=cfg.vq_decay,
                    eps=cfg.vq_eps,
                    cosine=cfg.vq_cosine,
                    init=cfg.vq_init,
                    restart_after=cfg.vq_restart_after,
                )
        except ValueError as e:
            raise ConfigError(f"model.{'fsq_levels' if cfg.kind == 'fsq' else 'vq'}: {e}") from None
        parts = build_backbone(cfg, latent_dim=quantizer.dim, gaussian=False)
        return cls(
            encoder=parts.encoder,
            decoder=parts.decoder,
            quantizer=quantizer,
            quant_conv=parts.quant_conv,
            post_quant_conv=parts.post_quant_conv,
            cond_embed=parts.cond_embed,
            gradient_checkpointing=cfg.gradient_checkpointing,
        )
