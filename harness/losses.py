"""The training objective: pixel reconstruction, the harness's own terms, and the model's terms.

One weighting rule for every term: term `name` counts `cfg.loss.<name>_weight` times. A model's
`forward` returns its unweighted terms by name (`kl`, `vq`, ...), so adding a term to a model needs
no glue here beyond a config field. The harness adds, each only when its weight is > 0 (a term
with weight 0 is not computed at all):

    recon       |recon - x| (l1) or (recon - x)^2 (l2), mean        loss.recon_weight
    ssim        1 - SSIM(recon, x)                                  loss.ssim_weight
    tv          total variation of recon (mean |neighbour diff|)    loss.tv_weight
    sparsity    mean |z| of the latent the decoder read (L1)        loss.sparsity_weight
    perceptual  LPIPS-like distance from a frozen perception net    loss.perceptual_weight
                (loss.perceptual: net = our own, lpips = LPIPS(vgg))

`LossTerms` keeps every term (weighted) for logging (`loss/<name>`) and their sum for backward.

The perception network (models/perception.py, trained by launch/train_perception.py) lives inside
this module: it is frozen, never given to the optimizer or to `accelerator.prepare`, and never part
of a checkpoint (the run's config names its file, which is read again on resume).
So does LPIPS(vgg) (models/lpips.py) with `loss.perceptual=lpips`: it holds no buffers and runs in
the reconstruction's dtype (autocast for fp16/bf16), again in fp32 when that result is not finite.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from harness import metrics
from models.base import AutoencoderOutput

# The harness's own terms, in the order they are computed and logged (after recon).
HARNESS_TERMS = ("ssim", "tv", "sparsity", "perceptual")


@dataclass
class LossTerms:
    total: torch.Tensor
    terms: dict[str, torch.Tensor]  # weighted, detached-for-logging copies are made by the caller


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation of `b c h w` images: mean |vertical neighbour difference| plus
    mean |horizontal neighbour difference|."""
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    return dh + dw


class AutoencoderLoss(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.enabled = [name for name in HARNESS_TERMS if self.weight(name) > 0]
        self.perception = None
        self.lpips = None  # LPIPS(vgg) with loss.perceptual=lpips, frozen like the perception net
        self._files = {}
        if "perceptual" in self.enabled and cfg.perceptual == "lpips":
            self.lpips, files = load_lpips(cfg.lpips_vgg, cfg.lpips_lin)
            self._files.update({key: file_digest(path) for key, path in files.items()})
        elif "perceptual" in self.enabled:
            self.perception = load_perceptual(cfg.perceptual_net)
            self._files["perceptual_net"] = hashlib.sha256(Path(cfg.perceptual_net).read_bytes()).hexdigest()[:16]

    def weight(self, name: str) -> float:
        try:
            return getattr(self.cfg, f"{name}_weight")
        except AttributeError:
            raise AttributeError(f"model returned loss term {name!r} but LossConfig has no {name}_weight") from None

    def fingerprint(self) -> dict[str, str]:
        """Short sha256 of the files the loss read (to notice a perception net replaced between resumes)."""
        return dict(self._files)

    # --- the harness's terms, unweighted ------------------------------------------------------

    def ssim(self, x: torch.Tensor, out: AutoencoderOutput) -> torch.Tensor:
        return 1 - metrics.ssim(out.recon, x)

    def tv(self, x: torch.Tensor, out: AutoencoderOutput) -> torch.Tensor:
        return total_variation(out.recon.float())

    def sparsity(self, x: torch.Tensor, out: AutoencoderOutput) -> torch.Tensor:
        if out.latent is None:
            raise ValueError("loss.sparsity_weight > 0 but the model returned no latent (AutoencoderOutput.latent)")
        return out.latent.float().abs().mean()

    def perceptual(self, x: torch.Tensor, out: AutoencoderOutput) -> torch.Tensor:
        if self.lpips is not None:
            return lpips_distance(self.lpips, out.recon, x)
        return self.perception(out.recon, x)

    def forward(self, x: torch.Tensor, out: AutoencoderOutput) -> LossTerms:
        recon = out.recon.float()
        x = x.float()
        if self.cfg.recon == "l1":
            pixel = (recon - x).abs().mean()
        else:
            pixel = F.mse_loss(recon, x)
        terms = {"recon": self.cfg.recon_weight * pixel}
        for name in self.enabled:
            terms[name] = self.weight(name) * getattr(self, name)(x, out)
        for name, value in out.losses.items():
            if name in terms:
                raise ValueError(f"model returned loss term {name!r}, a name the harness uses for its own term")
            terms[name] = self.weight(name) * value.float()
        total = torch.stack(list(terms.values())).sum()
        return LossTerms(total, terms)


def load_perceptual(path: str):
    """The frozen perceptual distance from `loss.perceptual_net`; a bad file is a one-line ConfigError."""
    from harness.config import ConfigError
    from harness.perception_file import PerceptionFileError, load_distance

    if not path:
        raise ConfigError("loss.perceptual_net: loss.perceptual_weight > 0 needs the file written by "
                          "launch/train_perception.py (perception.safetensors)")
    try:
        return load_distance(path)
    except PerceptionFileError as e:
        raise ConfigError(f"loss.perceptual_net: {e}; train one with `python launch/train_perception.py "
                          f"--data SHARDS --out DIR` or set loss.perceptual_weight=0") from None


def load_lpips(vgg: str, lin: str):
    """LPIPS(vgg) from `loss.lpips_vgg` / `loss.lpips_lin` (or the torch hub cache / the installed lpips
    package), frozen; and the files it read. A missing or bad file is a one-line ConfigError."""
    from harness.config import ConfigError
    from models.lpips import LPIPS, find_lpips_lin, find_vgg16
    from models.weights import WeightsNotFoundError

    try:
        files = {"lpips_vgg": find_vgg16(vgg or None), "lpips_lin": find_lpips_lin(lin or None)}
        return LPIPS.from_files(files["lpips_vgg"], files["lpips_lin"]), files
    except WeightsNotFoundError as e:
        key = "loss.lpips_vgg" if str(e).startswith("LPIPS VGG16") else "loss.lpips_lin"
        raise ConfigError(f"{key}: {e}; or set loss.perceptual=net / loss.perceptual_weight=0") from None


def lpips_distance(net: torch.nn.Module, recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean LPIPS(recon, x), computed in recon's dtype (fp16/bf16 under autocast, whatever the outer
    context) and again in fp32 if that result is not finite (fp16 overflow in the VGG features)."""
    low = recon.dtype in (torch.float16, torch.bfloat16)
    with torch.autocast(recon.device.type, dtype=recon.dtype if low else torch.bfloat16, enabled=low):
        d = net(recon, x.to(recon.dtype))
    if not torch.isfinite(d).all():
        with torch.autocast(recon.device.type, enabled=False):
            d = net(recon.float(), x.float())
    return d.float().mean()


def file_digest(path) -> str:
    """Short sha256 of a file, read in chunks (torchvision's VGG16 file is 528 MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:16]
