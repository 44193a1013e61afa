"""The optional patch discriminator of latent-diffusion / taming-transformers autoencoders.

A PatchGAN (pix2pix's NLayerDiscriminator): strided 4x4 convolutions, each followed by a
normalisation and LeakyReLU(0.2), ending in one logit per overlapping patch (70x70 pixels at 3
layers), so the adversarial loss judges local texture, which L1/L2 and perceptual losses leave blurry.
The normalisation is BatchNorm (pix2pix's; `torch.nn.SyncBatchNorm.convert_sync_batchnorm` turns it
into batch statistics over all ranks, same parameter names) or GroupNorm (no batch statistics: each
image is judged on its own, whatever the batch or the number of ranks).

LeCAM regularisation (Tseng et al. 2021) keeps D's logits near an EMA of the other side's:
relu(real - ema_fake)^2 + relu(ema_real - fake)^2, which bounds D under little data.
"""

from __future__ import annotations

import math

import torch
from torch import nn

NORMS = ("batch", "group")


class PatchDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"PatchDiscriminator: norm must be one of {NORMS}, got {norm!r}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < num_layers else 1  # the last hidden layer keeps the resolution
            layers += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                       _norm(norm, channels * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(_init)

    def forward(self, *images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Images in [-1, 1], `b c h w` -> patch logits `b 1 h' w'`. Several batches (real, fake)
        are judged one after the other in one call: each has its own BatchNorm statistics, as when
        D judges the fakes alone for the generator, and DDP still sees a single forward."""
        out = tuple(self.main(x) for x in images)
        return out[0] if len(out) == 1 else out


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(math.gcd(32, channels), channels)  # 32 groups where the width allows


def _init(m: nn.Module) -> None:
    """pix2pix's initialisation: N(0, 0.02) convolutions, N(1, 0.02) normalisation scales."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.relu(1.0 - logits_real).mean() + torch.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (nn.functional.softplus(-logits_real).mean() + nn.functional.softplus(logits_fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def lecam_reg(logits_real: torch.Tensor, logits_fake: torch.Tensor, ema_real: torch.Tensor,
              ema_fake: torch.Tensor) -> torch.Tensor:
    """LeCAM (Tseng et al. 2021): mean relu(real - ema_fake)^2 + mean relu(ema_real - fake)^2."""
    return torch.relu(logits_real - ema_fake).pow(2).mean() + torch.relu(ema_real - logits_fake).pow(2).mean()


def last_decoder_layer(model: nn.Module) -> nn.Parameter:
    """The weight of the decoder's last layer with one (the output convolution of an `ldm` or a
    layer-spec decoder): where the adaptive weight compares the two gradients."""
    # ds_shape: under DeepSpeed ZeRO-3 a parameter is a flat partition outside forward; its real shape is kept there
    weights = [p for name, p in model.named_parameters()
               if name.startswith("decoder.") and len(getattr(p, "ds_shape", p.shape)) >= 2]
    if not weights:
        raise ValueError("loss.disc_adaptive needs a decoder with a weight layer (model.decoder...)")
    return weights[-1]
