"""The optional patch discriminator (loss.disc_weight > 0), as one hook: latent-diffusion's
LPIPSWithDiscriminator split into the generator's term and the discriminator's own update.

- `on_loss`: the generator's side, -mean D(recon), scaled by loss.disc_weight and, when adaptive, by
  |grad of the other terms| / |grad of this one| at the decoder's last layer, so neither side
  drowns the other whatever their scales. D runs unwrapped and frozen there: no gradient reaches
  it, and DDP sees one forward and one backward of D per micro-batch (in `after_backward`).
- `after_backward`: D on real inputs and the detached reconstructions, in one DDP forward, each
  batch with its own BatchNorm statistics (as the generator's pass sees the fakes alone).
- `after_step`: D's optimizer step, skipped with the autoencoder's step when that was not finite,
  or when D's own gradients are not (all-reduced: every rank agrees).

Checkpoint layout: D is prepared after the autoencoder, so it is accelerate's `model_1` /
`optimizer_1`; its shape is recorded in trainer_state.json (`disc`) and must match at resume.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from harness.checkpoint import ResumeError
from harness.config import Config, ConfigError
from harness.hooks import Hook
from models.discriminator import D_LOSSES, PatchDiscriminator, last_decoder_layer


def refuse_unsupported(cfg: Config, *, deepspeed: bool, mixed_precision: str | None) -> None:
    """What cannot run with a discriminator, in one line (before any work)."""
    if cfg.loss.disc_weight <= 0:
        return
    if deepspeed:
        raise ConfigError("loss.disc_weight > 0 (a patch discriminator) runs under DDP or in one process, not "
                          "DeepSpeed: accelerate gives DeepSpeed one model; use launch/accelerate/multi_gpu.yaml "
                          "(or cpu2.yaml), or set loss.disc_weight=0")
    if mixed_precision == "fp16":
        raise ConfigError("loss.disc_weight > 0 with fp16: one loss scaler for two optimizers is not supported "
                          "here; use bf16 (train.mixed_precision=bf16) or fp32")


def layout(cfg: Config) -> dict | None:
    c = cfg.loss
    return {"layers": c.disc_layers, "channels": c.disc_channels} if c.disc_weight > 0 else None


def check_resume_layout(path: Path, state: dict, cfg: Config) -> None:
    """A checkpoint with a D resumes only with the same D; one without, only without."""
    saved = any((path / f).is_file() for f in ("model_1.safetensors", "pytorch_model_1.bin"))
    if saved != (cfg.loss.disc_weight > 0):
        raise ResumeError(f"cannot resume {path}: it was trained {'with' if saved else 'without'} a "
                          f"discriminator and this run sets loss.disc_weight={cfg.loss.disc_weight}; keep "
                          f"it {'> 0' if saved else '0'} to resume, or start a new run with train.init_from")
    if saved and state.get("disc") != layout(cfg):
        raise ResumeError(f"cannot resume {path}: its discriminator was built as {state.get('disc')} and this run "
                          f"asks for {layout(cfg)}; keep loss.disc_layers/disc_channels to resume")


class DiscriminatorHook(Hook):
    def __init__(self, trainer):
        cfg, self.cfg, self.trainer_cfg = trainer.cfg, trainer.cfg.loss, trainer.cfg
        self.accelerator = trainer.accelerator
        with torch.random.fork_rng(devices=[]):  # the autoencoder's random stream stays as without D
            torch.manual_seed(cfg.train.seed + 1)
            disc = PatchDiscriminator(cfg.model.out_ch, self.cfg.disc_channels, self.cfg.disc_layers)
        opt = torch.optim.AdamW(disc.parameters(), lr=self.lr(cfg), betas=(0.5, 0.9), weight_decay=0.0)
        # Prepared after the autoencoder: model_1 / optimizer_1 in checkpoints.
        self.disc, self.optimizer = self.accelerator.prepare(disc, opt)
        self.trained_models = (self.disc,)
        self.last_layer = last_decoder_layer(trainer.engine.unwrapped())
        self._check_fits(cfg, trainer.device)

    @staticmethod
    def lr(cfg: Config) -> float:
        return cfg.loss.disc_lr or cfg.optim.lr

    def _check_fits(self, cfg: Config, device) -> None:
        """A discriminator too deep for the images would fail at loss.disc_start, maybe days in: try it now."""
        disc = self.accelerator.unwrap_model(self.disc)
        size = cfg.data.image_size
        disc.eval()
        try:
            with torch.no_grad():
                disc(torch.zeros(1, cfg.model.out_ch, size, size, device=device))
        except RuntimeError as e:
            if "size" not in str(e):  # only "the input is smaller than the kernel" is the config's fault
                raise
            raise ConfigError(f"loss.disc_layers: {self.cfg.disc_layers} layers do not fit {size}px images "
                              f"(the patches shrink below the kernel); use fewer") from None
        finally:
            disc.train()

    def judging(self, trainer) -> bool:
        return trainer.step >= self.cfg.disc_start

    def after_resume(self, trainer) -> None:
        for group in self.optimizer.param_groups:  # the configured learning rate wins over the saved one
            group["lr"] = self.lr(trainer.cfg)

    def on_loss(self, trainer, x, out, losses, stats) -> None:
        if not self.judging(trainer):
            return
        disc = self.accelerator.unwrap_model(self.disc)
        disc.requires_grad_(False)
        try:
            g_loss = -disc(out.recon).float().mean()
        finally:
            disc.requires_grad_(True)
        weight = torch.ones((), device=out.recon.device)
        if self.cfg.disc_adaptive:
            (g_rec,) = torch.autograd.grad(losses.total, self.last_layer, retain_graph=True)
            (g_adv,) = torch.autograd.grad(g_loss, self.last_layer, retain_graph=True)
            weight = (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach()
        term = self.cfg.disc_weight * weight * g_loss
        losses.total = losses.total + term
        stats.add_judged("loss/adv", term)
        stats.add_judged("disc/adaptive_weight", weight)

    def after_backward(self, trainer, x, out, stats) -> None:
        if not self.judging(trainer):
            return
        real, fake = (t.float() for t in self.disc(x.to(trainer.engine.input_dtype), out.recon.detach()))
        d_loss = D_LOSSES[self.cfg.disc_loss](real, fake)
        self.accelerator.backward(d_loss)
        stats.judged_micro += 1
        stats.add_judged("disc/loss", d_loss)
        stats.add_judged("disc/logits_real", real.mean())
        stats.add_judged("disc/logits_fake", fake.mean())

    def after_step(self, trainer, outcome, stats) -> None:
        if not self.judging(trainer):
            return
        clip = trainer.cfg.optim.grad_clip or float("inf")
        norm = float(self.accelerator.clip_grad_norm_(self.disc.parameters(), clip))
        if outcome.finite and math.isfinite(norm):
            self.optimizer.step()
        elif outcome.finite:
            trainer.totals["nonfinite_disc_steps"] += 1
            trainer.log.info(f"step {trainer.step + 1}: non-finite discriminator gradients, its step skipped")
        self.optimizer.zero_grad(set_to_none=True)

    def state(self) -> dict:
        return {"disc": layout(self.trainer_cfg)}
