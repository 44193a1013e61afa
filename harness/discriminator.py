"""The optional patch discriminator (loss.disc_weight > 0), as one hook: latent-diffusion's
LPIPSWithDiscriminator split into the generator's term and the discriminator's own update.

- `on_loss`: the generator's side, -mean D(recon), scaled by loss.disc_weight and, when adaptive, by
  |grad of the reconstruction part| / |grad of this one| at the decoder's last layer (the
  reconstruction part is latent-diffusion's nll: recon + perceptual, under the learned variance),
  so neither side drowns the other whatever their scales. D runs unwrapped and frozen there: no
  gradient reaches it, and DDP sees one forward and one backward of D per micro-batch.
- `after_backward`: D on real inputs and the detached reconstructions, in one DDP forward, each
  batch with its own normalisation statistics (as the generator's pass sees the fakes alone),
  plus LeCAM's regulariser against EMAs of the mean logits when loss.lecam_weight > 0.
- `after_step`: D's optimizer step, skipped with the autoencoder's step when that was not finite,
  or when D's own gradients are not (all-reduced: every rank agrees).

Why D is not given to accelerate: accelerate gives DeepSpeed one model, and has one fp16 loss
scaler for all its optimizers (a D overflow would skip the autoencoder's step and move its scale).
So D lives beside whatever runs the autoencoder: fp32 weights, torch DDP when there is more than
one process (under DeepSpeed too, whose process group is torch.distributed's), a plain AdamW, its
own `torch.amp.GradScaler` (enabled under fp16, as LlamaGen does), and autocast to the run's
precision. Accumulation is D's own `no_sync` (accelerate skips no_sync under ZeRO-2/3).

Checkpoint layout: D, its optimizer, its scaler and the LeCAM EMAs are one accelerate custom object
(`DiscriminatorState`), registered after the scheduler and the EMA; D's shape is recorded in
trainer_state.json (`disc`) and must match at resume. Checkpoints of the earlier layout (D as
accelerate's model_1/optimizer_1) are refused in one line.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.distributed as tdist

from harness.checkpoint import ResumeError
from harness.config import Config, ConfigError
from harness.engine import DeferredSkips, place_steps, step_unless
from harness.hooks import Hook
from models.discriminator import D_LOSSES, PatchDiscriminator, last_decoder_layer, lecam_reg

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def refuse_unsupported(cfg: Config, *, device: torch.device, world_size: int) -> None:
    """What cannot run with a discriminator, in one line (before any work)."""
    if cfg.loss.disc_weight <= 0:
        return
    if cfg.loss.disc_norm == "sync_batch" and world_size > 1 and device.type == "cpu":
        raise ConfigError("loss.disc_norm=sync_batch: torch's SyncBatchNorm runs on GPUs only; on CPU use "
                          "loss.disc_norm=batch (per rank) or group")


def check_fits(cfg: Config) -> None:
    """A discriminator too deep for the images would fail at loss.disc_start, maybe days in: try a
    one-channel one (the patch grid depends on the layers alone) on one image now, on the CPU."""
    c, size = cfg.loss, cfg.data.image_size
    if c.disc_weight <= 0:
        return
    disc = PatchDiscriminator(cfg.model.out_ch, 1, c.disc_layers, norm="group" if c.disc_norm == "group" else "batch")
    disc.eval()
    try:
        with torch.no_grad():
            disc(torch.zeros(1, cfg.model.out_ch, size, size))
    except RuntimeError as e:
        if "size" not in str(e):  # only "the input is smaller than the kernel" is the config's fault
            raise
        raise ConfigError(f"loss.disc_layers: {c.disc_layers} layers do not fit {size}px images "
                          f"(the patches shrink below the kernel); use fewer") from None


def layout(cfg: Config) -> dict | None:
    c = cfg.loss
    if c.disc_weight <= 0:
        return None
    # sync_batch and batch hold the same tensors: a run may switch between them at resume
    norm = "group" if c.disc_norm == "group" else "batch"
    return {"layers": c.disc_layers, "channels": c.disc_channels, "norm": norm}


def check_resume_layout(path: Path, state: dict, cfg: Config) -> None:
    """A checkpoint with a D resumes only with the same D; one without, only without."""
    if any((path / f).is_file() for f in ("model_1.safetensors", "pytorch_model_1.bin")):
        raise ResumeError(f"cannot resume {path}: its discriminator was saved as accelerate's model_1 (an earlier "
                          "layout); resume it with that version, or start a new run from it with train.init_from")
    saved = state.get("disc") is not None
    if saved != (cfg.loss.disc_weight > 0):
        raise ResumeError(f"cannot resume {path}: it was trained {'with' if saved else 'without'} a "
                          f"discriminator and this run sets loss.disc_weight={cfg.loss.disc_weight}; keep "
                          f"it {'> 0' if saved else '0'} to resume, or start a new run with train.init_from")
    if saved and state.get("disc") != layout(cfg):
        raise ResumeError(f"cannot resume {path}: its discriminator was built as {state.get('disc')} and this run "
                          f"asks for {layout(cfg)}; keep loss.disc_layers/disc_channels/disc_norm to resume")


class DiscriminatorState:
    """D's weights, optimizer, loss scaler and LeCAM EMAs as one accelerate custom object."""

    def __init__(self, hook: DiscriminatorHook):
        self.hook = hook

    def state_dict(self) -> dict:
        h = self.hook
        return {"model": h.module.state_dict(), "optimizer": h.optimizer.state_dict(), "scaler": h.scaler.state_dict(),
                "lecam_ema": h.lecam_ema.clone()}

    def load_state_dict(self, state: dict) -> None:
        h = self.hook
        h.module.load_state_dict(state["model"])
        h.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:  # empty when it was saved disabled
            h.scaler.load_state_dict(state["scaler"])
        h.lecam_ema.copy_(state["lecam_ema"])


class DiscriminatorHook(Hook):
    def __init__(self, trainer):
        cfg, self.cfg, self.trainer_cfg = trainer.cfg, trainer.cfg.loss, trainer.cfg
        device = trainer.device
        with torch.random.fork_rng(devices=[]):  # the autoencoder's random stream stays as without D
            torch.manual_seed(cfg.train.seed + 1)
            norm = "group" if self.cfg.disc_norm == "group" else "batch"
            disc = PatchDiscriminator(cfg.model.out_ch, self.cfg.disc_channels, self.cfg.disc_layers, norm=norm)
        distributed = tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1
        if self.cfg.disc_norm == "sync_batch" and distributed:
            disc = torch.nn.SyncBatchNorm.convert_sync_batchnorm(disc)
        self.module = disc.to(device)
        self.disc = self.module
        if distributed:
            ids = [device.index] if device.type == "cuda" else None
            self.disc = torch.nn.parallel.DistributedDataParallel(self.module, device_ids=ids)
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=self.lr(cfg), betas=(0.5, 0.9),
                                           weight_decay=0.0, fused=cfg.optim.fused or None)
        # With the autoencoder's step deferred (optim.fused, no loss scaler) D's step is too: its fused
        # AdamW skips on the device, and its skips are counted there and read at the log (settle).
        self.deferred = getattr(trainer.engine, "deferred", False)
        self.skips = DeferredSkips()
        precision = trainer.accelerator.mixed_precision
        self.amp_dtype = AMP_DTYPES.get(precision)
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.lecam_ema = torch.zeros(2, device=device)  # EMAs of the mean real and fake logits (all ranks)
        self.last_layer = last_decoder_layer(trainer.engine.unwrapped())
        self.ae_scaler = trainer.engine.scaler  # accelerate's fp16 scaler of the autoencoder, or None
        # After the scheduler (0) and the EMA (1, when on): custom object 1 or 2.
        trainer.accelerator.register_for_checkpointing(DiscriminatorState(self))

    @staticmethod
    def lr(cfg: Config) -> float:
        return cfg.loss.disc_lr or cfg.optim.lr

    def autocast(self):
        """D's forward in the run's precision (its weights stay fp32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.amp_dtype)

    def judging(self, trainer) -> bool:
        return trainer.step >= self.cfg.disc_start

    def after_resume(self, trainer) -> None:
        for group in self.optimizer.param_groups:  # the configured learning rate and fused flag win over the
            group["lr"] = self.lr(trainer.cfg)      # saved ones (optim.fused: its skips need a fused AdamW)
            group["fused"] = trainer.cfg.optim.fused or None
        place_steps(self.optimizer)

    def on_loss(self, trainer, x, out, losses, stats) -> None:
        if not self.judging(trainer):
            return
        self.module.requires_grad_(False)
        try:
            with self.autocast():
                g_loss = -self.module(out.recon.float()).float().mean()
        finally:
            self.module.requires_grad_(True)
        weight = torch.ones((), device=out.recon.device)
        if self.cfg.disc_adaptive:
            weight = self.adaptive_weight(losses.rec if losses.rec is not None else losses.total, g_loss)
        term = self.cfg.disc_weight * weight * g_loss
        losses.total = losses.total + term
        stats.add_judged("loss/adv", term)
        stats.add_judged("disc/adaptive_weight", weight)

    def adaptive_weight(self, rec: torch.Tensor, g_loss: torch.Tensor) -> torch.Tensor:
        """|grad rec| / (|grad g_loss| + 1e-4) at the decoder's last layer, clamped to [0, loss.disc_adaptive_max].
        Under fp16 both losses are multiplied by the autoencoder's loss scale first (the ratio is the
        same, 1e-4 scaled too), so small gradients do not underflow in fp16 activations."""
        s = self.ae_scaler.get_scale() if self.ae_scaler is not None and self.ae_scaler.is_enabled() else 1.0
        (g_rec,) = torch.autograd.grad(rec * s, self.last_layer, retain_graph=True)
        (g_adv,) = torch.autograd.grad(g_loss * s, self.last_layer, retain_graph=True)
        weight = g_rec.float().norm() / (g_adv.float().norm() + 1e-4 * s)
        return weight.clamp(0.0, self.cfg.disc_adaptive_max).detach()

    def after_backward(self, trainer, x, out, stats) -> None:
        if not self.judging(trainer):
            return
        # Accumulation: D's gradients are all-reduced only on the micro-batch that steps (no_sync
        # must hold over D's forward too: DDP decides at forward time).
        ddp = isinstance(self.disc, torch.nn.parallel.DistributedDataParallel)
        sync = trainer.accelerator.sync_gradients or not ddp
        with contextlib.nullcontext() if sync else self.disc.no_sync():
            with self.autocast():
                real, fake = self.disc(x.float(), out.recon.detach().float())
            real, fake = real.float(), fake.float()
            d_loss = D_LOSSES[self.cfg.disc_loss](real, fake)
            if self.cfg.lecam_weight > 0:
                reg = lecam_reg(real, fake, self.lecam_ema[0], self.lecam_ema[1])
                d_loss = d_loss + self.cfg.lecam_weight * reg
                stats.add_judged("disc/lecam", reg)
                self._update_lecam(trainer, real, fake)
            self.scaler.scale(d_loss / trainer.cfg.train.grad_accum).backward()
        stats.judged_micro += 1
        stats.add_judged("disc/loss", d_loss)
        stats.add_judged("disc/logits_real", real.mean())
        stats.add_judged("disc/logits_fake", fake.mean())

    def _update_lecam(self, trainer, real: torch.Tensor, fake: torch.Tensor) -> None:
        """EMAs of the mean logits over all ranks (one all-reduce), so every rank holds the same
        anchors and the one rank 0 checkpoints resumes them exactly."""
        # Summed in float64 on the device (no host read), as the float32 means were summed before.
        means = torch.stack([real.detach().mean(), fake.detach().mean()]).double()
        if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
            tdist.all_reduce(means)
        means = means.float() / trainer.world.world_size
        # A non-finite logit anywhere (a NaN reconstruction: a step the autoencoder skips) is left out:
        # folded in, it would make both anchors NaN for good and every later D step non-finite.
        ema = self.lecam_ema * self.cfg.lecam_decay + means * (1 - self.cfg.lecam_decay)
        self.lecam_ema.copy_(torch.where(torch.isfinite(means).all(), ema, self.lecam_ema))

    def after_step(self, trainer, outcome, stats) -> None:
        if not self.judging(trainer):
            return
        clip = trainer.cfg.optim.grad_clip or float("inf")
        if self.deferred and outcome.deferred:
            return self._step_on_device(outcome, clip)
        self.scaler.unscale_(self.optimizer)
        norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip))
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        if outcome.applied and (math.isfinite(norm) or self.scaler.is_enabled()):
            self.scaler.step(self.optimizer)  # skips the step itself on inf/nan under fp16
        elif outcome.applied:
            trainer.totals["nonfinite_disc_steps"] += 1
            trainer.log.info(f"step {trainer.step + 1}: non-finite discriminator gradients, its step skipped")
        self.scaler.update()
        if scale_before is not None and self.scaler.get_scale() < scale_before:
            trainer.totals["disc_overflow_steps"] += 1
        self.optimizer.zero_grad(set_to_none=True)

    def _step_on_device(self, outcome, clip: float) -> None:
        """D's step when the autoencoder's was decided on the device: no value read back. It steps
        where the autoencoder's step was applied and D's gradients are finite (else its fused AdamW
        leaves weights, moments and step count as they were)."""
        finite = torch.isfinite(torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip))
        step_unless(self.optimizer, ~(finite & outcome.finite))
        self.optimizer.zero_grad(set_to_none=True)
        self.skips.add(finite | ~outcome.finite)  # a skip of D's own: the autoencoder's step was applied

    def settle(self, trainer) -> None:
        skipped, _, _ = self.skips.read()
        if skipped:
            trainer.totals["nonfinite_disc_steps"] += skipped
            trainer.log.info(f"steps to {trainer.step}: {skipped} non-finite discriminator step(s) skipped")

    def state(self) -> dict:
        return {"disc": layout(self.trainer_cfg)}
