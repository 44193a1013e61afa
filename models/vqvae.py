"""The quantized autoencoders: model.kind=vq (VQ-VAE, a learnt codebook) and model.kind=fsq (a
fixed scalar grid), one class told apart by its quantizer.

Axis letters: b batch, d latent dimension, h height, w width.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from models.base import AutoencoderOutput, ModelConfigError, NoPriorError
from models.common import LatentAutoencoder, build_backbone
from models.conditioning import ConditionEmbedding
from models.quantizers import FSQ, QuantizerOutput, VectorQuantizer

MAX_CODES = 2**20  # as model.vq_codebook_size (harness/config.py): FSQ's implicit codebook, counted every step


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

    def encode_unquantized(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The latent before quantization: what diffusers' `VQModel.encode` and latent-diffusion's
        `VQModelInterface.encode` return, so what a diffusion model on them trains on (their decode
        quantizes)."""
        return self._encode_features(x, self.embed(cond, x.shape[0]))

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

    # --- settings ------------------------------------------------------------------------------

    config_keys = (
        *LatentAutoencoder.config_keys, "embed_dim", "vq_codebook_size", "vq_beta", "vq_decay", "vq_eps", "vq_cosine",
        "vq_init", "vq_restart_after", "fsq_levels",
    )  # fmt: skip

    @classmethod
    def latent_layout(cls, m) -> tuple[bool, int | None]:
        return False, (len(m.fsq_levels) if m.kind == "fsq" else m.embed_dim)

    @classmethod
    def check_config(cls, m, image_size: int) -> None:
        if m.kind == "vq" and m.vq_decay >= 1.0:
            raise ModelConfigError(
                f"model.vq_decay: {m.vq_decay} would freeze the codebook; must be < 1 (0 = by gradient)"
            )
        if m.kind == "fsq" and (not m.fsq_levels or any(n < 2 for n in m.fsq_levels)):
            raise ModelConfigError(f"model.fsq_levels: need a non-empty list of integers >= 2; got {m.fsq_levels}")
        if m.kind == "fsq" and math.prod(m.fsq_levels) > MAX_CODES:  # the implicit codebook is counted every step
            raise ModelConfigError(f"model.fsq_levels: {m.fsq_levels} make {math.prod(m.fsq_levels)} codes, over "
                                   f"{MAX_CODES} (2^20); fewer or smaller levels")
        super().check_config(m, image_size)

    @classmethod
    def deepspeed_unsupported(cls, m) -> str | None:
        if m.kind == "vq" and m.vq_decay == 0:
            return (
                "model.vq_decay=0 (a codebook trained by gradient) does not work under DeepSpeed: its "
                "first-batch init and dead-code restarts edit the weights outside the optimizer, and "
                "DeepSpeed's own fp32 copy overwrites them; use the EMA codebook (vq_decay 0.99)"
            )
        return None

    @classmethod
    def from_config(cls, m) -> VQAutoencoder:
        """Build from a `ModelConfig` with kind vq or fsq (arch ldm or spec)."""
        try:
            if m.kind == "fsq":
                quantizer = FSQ(levels=tuple(m.fsq_levels))
            else:
                quantizer = VectorQuantizer(
                    dim=m.embed_dim,
                    codebook_size=m.vq_codebook_size,
                    beta=m.vq_beta,
                    decay=m.vq_decay,
                    eps=m.vq_eps,
                    cosine=m.vq_cosine,
                    init=m.vq_init,
                    restart_after=m.vq_restart_after,
                )
        except ValueError as e:
            raise ModelConfigError(f"model.{'fsq_levels' if m.kind == 'fsq' else 'vq'}: {e}") from None
        parts = build_backbone(m, latent_dim=quantizer.dim, gaussian=False)
        return cls(
            encoder=parts.encoder,
            decoder=parts.decoder,
            quantizer=quantizer,
            quant_conv=parts.quant_conv,
            post_quant_conv=parts.post_quant_conv,
            cond_embed=parts.cond_embed,
            gradient_checkpointing=m.gradient_checkpointing,
        )
