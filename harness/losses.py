"""The training objective: pixel reconstruction plus the model's own weighted terms.

A model's `forward` returns its unweighted terms by name (`kl`, `vq`, ...); the weight of term
`name` is `cfg.loss.<name>_weight`, so adding a term to a model needs no glue here beyond a
config field. `LossTerms` keeps every term (weighted) for logging and their sum for backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.base import AutoencoderOutput


@dataclass
class LossTerms:
    total: torch.Tensor
    terms: dict[str, torch.Tensor]  # weighted, detached-for-logging copies are made by the caller


class AutoencoderLoss(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def weight(self, name: str) -> float:
        try:
            return getattr(self.cfg, f"{name}_weight")
        except AttributeError:
            raise AttributeError(f"model returned loss term {name!r} but LossConfig has no {name}_weight") from None

    def forward(self, x: torch.Tensor, out: AutoencoderOutput) -> LossTerms:
        recon = out.recon.float()
        x = x.float()
        if self.cfg.recon == "l1":
            pixel = (recon - x).abs().mean()
        else:
            pixel = F.mse_loss(recon, x)
        terms = {"recon": self.cfg.recon_weight * pixel}
        for name, value in out.losses.items():
            terms[name] = self.weight(name) * value.float()
        total = torch.stack(list(terms.values())).sum()
        return LossTerms(total, terms)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean PSNR in dB of images in [-1, 1]."""
    mse = ((x.float() - y.float()) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1.0 / mse)).mean()
