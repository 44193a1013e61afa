"""The training objective: pixel reconstruction, the harness's own terms, and the model's terms.

One weighting rule for every term: term `name` counts `cfg.loss.<name>_weight` times. A model's
`forward` returns its unweighted terms by name (`kl`, `vq`, ...), so adding a term to a model needs
no glue here beyond a config field. The harness adds, each only when its weight is > 0 (a term
with weight 0 is not computed at all):

    recon       |recon - x| (l1), (recon - x)^2 (l2), mean;         loss.recon_weight
                or BCE of (recon + 1) / 2 against (x + 1) / 2 (bce)
    ssim        1 - SSIM(recon, x)                                  loss.ssim_weight
    msssim      1 - MS-SSIM(recon, x)                               loss.msssim_weight
    tv          total variation of recon (mean |neighbour diff|)    loss.tv_weight
    sparsity    mean |z| of the latent the decoder read (L1)        loss.sparsity_weight
    perceptual  LPIPS-like distance from a frozen perception net    loss.perceptual_weight
                (loss.perceptual: net = our own, lpips = LPIPS(vgg))

`LossTerms` keeps every term (weighted) for logging (`loss/<name>`) and their sum for backward.

The model's `kl` term is weighted by `loss.kl_weight` times a warm-up factor (`loss.kl_anneal_steps`,
linear from 0, optionally cyclical) and, with `loss.kl_free_bits`, is the sum over latent channels of
max(free_bits, that channel's KL) (Kingma et al. 2016), so no channel is pushed below the floor.

With `loss.learned_logvar` (latent-diffusion's LPIPSWithDiscriminator) the reconstruction part,
rec = recon + perceptual, enters as the NLL of a Laplace/Gaussian likelihood with one learned scale:

    nll = rec / exp(logvar) + logvar          logged as loss/nll, and logvar as loss/logvar

`recon` and `perceptual` are then logged as they are but reach the total only through `nll`.
latent-diffusion sums per-pixel terms over pixels; our terms are means over pixels, which divides
its whole loss by C*H*W: the same optimum and the same adversarial term, but its KL weight 1e-6 is
1e-6 / (C*H*W) here, and so is the clamp of its adaptive weight, 1e4 (loss.disc_adaptive_max;
launch/configs/recipe_ldm.yaml). taming-transformers averages, as we do: its 1e4 is the default.
`logvar` is the parameter `loss.logvar` of the model itself (the key latent-diffusion's checkpoints
use): in the optimizer, in checkpoints, under ZeRO-3 partitioned and gathered by its own forward;
loading weights for use drops `loss.*`.

The perception network (models/perception.py, trained by launch/train_perception.py) lives inside
this module: it is frozen, never given to the optimizer or to `accelerator.prepare`, and never part
of a checkpoint (the run's config names its file, which is read again on resume).
So does LPIPS(vgg) (models/lpips.py) with `loss.perceptual=lpips`: it holds no buffers and runs in
the reconstruction's dtype (autocast for fp16/bf16), again in fp32 when that result is not finite.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import reduce

from harness import metrics
from models.base import AutoencoderOutput

# The harness's own terms, in the order they are computed and logged (after recon).
HARNESS_TERMS = ("ssim", "msssim", "tv", "sparsity", "perceptual")
# The terms that form the reconstruction part (latent-diffusion's rec_loss): put under the learned
# variance, and what the adaptive discriminator weight compares the adversarial gradient with.
REC_TERMS = ("recon", "perceptual")
BCE_EPS = 1e-3  # probabilities are clamped to [eps, 1 - eps]: |log| <= 6.9
MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, five scales


@dataclass
class LossTerms:
    total: torch.Tensor
    terms: dict[str, torch.Tensor]  # weighted, detached-for-logging copies are made by the caller
    rec: torch.Tensor | None = None  # the reconstruction part (NLL with learned_logvar); None: use total


class LearnedLogVariance(torch.nn.Module):
    """latent-diffusion's `logvar`: one learned scalar, nll = rec / exp(logvar) + logvar. Its optimum
    is logvar = log(rec): the reconstruction's weight adapts to its own size during training."""

    def __init__(self, init: float = 0.0):
        super().__init__()
        # Shape (1,), not latent-diffusion's (): DeepSpeed cannot broadcast or partition a 0-d parameter.
        self.logvar = torch.nn.Parameter(torch.full((1,), float(init)))

    def forward(self, rec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Called as a module (not by reading .logvar): under ZeRO-3 its forward hook gathers the parameter.
        logvar = self.logvar.float().squeeze(0)
        return rec / torch.exp(logvar) + logvar, logvar


def attach(model: torch.nn.Module, task, step: Callable[[], int]) -> None:
    """Bind what the loss needs from training, after the model is built and before its optimizer:
    the learned log-variance as the model's submodule `loss` (so it trains, is checkpointed and
    resumes with the model), and `step()`, the optimizer steps done, for KL annealing."""
    from harness.config import ConfigError

    loss_fn = getattr(task, "loss_fn", None)
    if not isinstance(loss_fn, AutoencoderLoss):
        if task.cfg.loss.learned_logvar:
            raise ConfigError(f"loss.learned_logvar: model.kind={task.cfg.model.kind} has no reconstruction to weigh")
        return
    cfg = loss_fn.cfg
    loss_fn.step = step
    if cfg.kl_free_bits > 0 and not getattr(model, "double_z", False):
        raise ConfigError("loss.kl_free_bits: needs a Gaussian posterior (model.kind=kl with model.double_z=true)")
    if cfg.learned_logvar:
        if hasattr(model, "loss"):
            raise ConfigError("loss.learned_logvar: the model already has an attribute `loss`")
        model.add_module("loss", LearnedLogVariance(cfg.logvar_init))
        loss_fn.variance = model.loss


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
        self.variance: LearnedLogVariance | None = None  # bound by attach() with loss.learned_logvar
        self.step: Callable[[], int] = lambda: 0  # optimizer steps done, bound by attach()
        self._files = {}
        if "perceptual" in self.enabled and cfg.perceptual == "lpips":
            self.lpips, files = load_lpips(cfg.lpips_vgg, cfg.lpips_lin)
            self._files.update({key: file_digest(path) for key, path in files.items()})
        elif "perceptual" in self.enabled:
            self.perception = load_perceptual(cfg.perceptual_net)
            from harness.perception_file import perception_path

            self._files["perceptual_net"] = file_digest(perception_path(cfg.perceptual_net))

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

    def msssim(self, x: torch.Tensor, out: AutoencoderOutput) -> torch.Tensor:
        return 1 - ms_ssim(out.recon, x)

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

    def pixel(self, recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.recon == "l1":
            return (recon - x).abs().mean()
        if self.cfg.recon == "l2":
            return F.mse_loss(recon, x)
        return bce(recon, x)

    # --- the model's terms: KL schedule and free bits ------------------------------------------

    def kl_factor(self) -> float:
        """The KL warm-up: step / kl_anneal_steps, capped at 1 (restarting every kl_anneal_cycle steps)."""
        steps, cycle = self.cfg.kl_anneal_steps, self.cfg.kl_anneal_cycle
        if not steps:
            return 1.0
        step = self.step() % cycle if cycle else self.step()
        return min(1.0, step / steps)

    def model_term(self, name: str, value: torch.Tensor, out: AutoencoderOutput) -> torch.Tensor:
        weight = self.weight(name)
        if name != "kl":
            return weight * value.float()
        if self.cfg.kl_free_bits > 0:
            value = free_bits_kl(getattr(out, "posterior", None), self.cfg.kl_free_bits)
        return weight * self.kl_factor() * value.float()

    def forward(self, x: torch.Tensor, out: AutoencoderOutput) -> LossTerms:
        recon = out.recon.float()
        x = x.float()
        terms = {"recon": self.cfg.recon_weight * self.pixel(recon, x)}
        for name in self.enabled:
            terms[name] = self.weight(name) * getattr(self, name)(x, out)
        for name, value in out.losses.items():
            if name in terms:
                raise ValueError(f"model returned loss term {name!r}, a name the harness uses for its own term")
            terms[name] = self.model_term(name, value, out)
        rec = torch.stack([terms[n] for n in REC_TERMS if n in terms]).sum()
        rest = [v for n, v in terms.items() if n not in REC_TERMS]
        if self.variance is not None:
            rec, logvar = self.variance(rec)
            # a copy: the parameter itself changes in place at the optimizer step, before logging
            terms["nll"], terms["logvar"] = rec, logvar.detach().clone()
        total = torch.stack([rec, *rest]).sum()
        return LossTerms(total, terms, rec)


def bce(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of images in [-1, 1] mapped to [0, 1]: the reconstruction read as the
    probability p = (recon + 1) / 2 of a pixel being on. The decoder's output is not squashed, so p
    is clamped to [eps, 1 - eps] straight-through: the value is clamped, the gradient still pulls a
    pixel outside [0, 1] back (a plain clamp would leave it stuck with no gradient)."""
    p = (recon + 1) / 2
    p = p + (p.clamp(BCE_EPS, 1 - BCE_EPS) - p).detach()
    return F.binary_cross_entropy(p, ((x + 1) / 2).clamp(0, 1))


def free_bits_kl(posterior, free_bits: float) -> torch.Tensor:
    """sum over latent channels of max(free_bits, KL of the channel): KL to N(0, I) summed over the
    channel's positions and averaged over the batch (Kingma et al. 2016, "free bits" per group)."""
    if posterior is None:
        raise ValueError("loss.kl_free_bits > 0 but the model returned no posterior (AutoencoderOutput.posterior)")
    kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar)
    per_channel = reduce(reduce(kl, "b c ... -> b c", "sum"), "b c -> c", "mean")
    return per_channel.clamp_min(free_bits).sum()


def ms_ssim_scales(size: int) -> int:
    """Scales of MS-SSIM at `size` px: five, or as many as keep the 11-tap window inside the
    smallest scale (176 px and up: 5; 88: 4; 44: 3; 22: 2; below: 1, plain SSIM)."""
    n = 1
    while n < len(MSSSIM_WEIGHTS) and size // 2**n >= metrics.SSIM_WINDOW:
        n += 1
    return n


def ms_ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Multi-scale SSIM (Wang et al. 2003) of `b c h w` images in [-1, 1], as pytorch-msssim computes
    it: per scale the contrast-structure term cs (the SSIM map without luminance) of 11-tap Gaussian
    windows, 2x average pooling between scales, at the last scale the full SSIM; per channel
    prod_j relu(cs_j)^w_j * relu(ssim_M)^w_M, then the mean. Images under 176 px use fewer scales
    (`ms_ssim_scales`) with the first weights renormalised to sum to 1."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ms_ssim needs two `b c h w` tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    n = ms_ssim_scales(min(x.shape[-2:]))
    weights = torch.tensor(MSSSIM_WEIGHTS[:n], device=x.device)
    weights = weights / weights.sum()
    x, y = (x.float() + 1) / 2, (y.float() + 1) / 2
    values = []
    for j in range(n):
        ssim, cs = _ssim_and_cs(x, y)
        values.append(ssim if j == n - 1 else cs)
        if j < n - 1:
            pad = [s % 2 for s in x.shape[-2:]]
            x, y = F.avg_pool2d(x, 2, padding=pad), F.avg_pool2d(y, 2, padding=pad)
    stacked = torch.stack(values).relu()  # j b c
    per_channel = torch.prod(stacked ** weights[:, None, None], dim=0)
    return per_channel.mean()


def _ssim_and_cs(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean SSIM and mean contrast-structure per image and channel (`b c`) of images in [0, 1]."""
    size = min(metrics.SSIM_WINDOW, *x.shape[-2:])
    size -= 1 - size % 2
    g = metrics.gaussian_window(size, metrics.SSIM_SIGMA, device=x.device)
    c = x.shape[1]
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # b (k c) h w, k = 5
    stack = F.conv2d(stack, g.expand(5 * c, 1, 1, size), groups=5 * c)
    stack = F.conv2d(stack, g.expand(5 * c, 1, 1, size).transpose(-1, -2), groups=5 * c)
    mu_x, mu_y, xx, yy, xy = stack.chunk(5, dim=1)
    c1, c2 = metrics.SSIM_K1**2, metrics.SSIM_K2**2
    cs = (2 * (xy - mu_x * mu_y) + c2) / (xx - mu_x**2 + yy - mu_y**2 + c2)
    ssim = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * cs
    return reduce(ssim, "b c h w -> b c", "mean"), reduce(cs, "b c h w -> b c", "mean")


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
