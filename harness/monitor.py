"""What the run shows while it trains: scalars to TensorBoard and the text log, and image grids.

`StepStats` collects one logging interval (micro-batches, loss terms, data wait, gradient norms);
`Monitor.scalars` reduces it over ranks with one all-reduce and writes it; `Monitor.images` draws
the grids (inputs above reconstructions, prior samples, one row per class, latent interpolations).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass, field

import torch

from harness import grids
from harness.data import fixed_batch, to_model_input
from harness.dist import all_reduce_sum
from harness.metrics import psnr, ssim
from harness.tracking import Tracker
from models import NoPriorError


@dataclass
class StepStats:
    """One logging interval. `means` are averaged over the micro-batches; `judged` (the
    discriminator's numbers) over the micro-batches it judged, from loss.disc_start on."""

    micro: int = 0
    judged_micro: int = 0
    steps_taken: int | torch.Tensor = 0  # tensors after deferred steps (harness/engine.py): read at the log
    bad: int = 0
    bad_error: str = ""
    data_wait: float = 0.0
    grad_norm: float | torch.Tensor = 0.0
    means: dict[str, torch.Tensor] = field(default_factory=dict)
    judged: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, name: str, value: torch.Tensor) -> None:
        v = value.detach().float()
        self.means[name] = self.means[name] + v if name in self.means else v

    def add_judged(self, name: str, value: torch.Tensor) -> None:
        v = value.detach().float()
        self.judged[name] = self.judged[name] + v if name in self.judged else v

    def averages(self) -> dict[str, float]:
        micro, judged = max(self.micro, 1), max(self.judged_micro, 1)
        out = {k: float(v) / micro for k, v in self.means.items()}
        out.update({k: float(v) / judged for k, v in self.judged.items()})
        return dict(sorted(out.items()))


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def precision_notes(t) -> list[str]:
    """What the accelerate config could not ask for, said at start (the run goes on): a DeepSpeed yaml
    cannot carry a precision, so `train.mixed_precision=auto` trains in fp32 there unless told."""
    a = t.accelerator
    if (a.distributed_type.value == "DEEPSPEED" and a.mixed_precision == "no" and t.device.type == "cuda"
            and t.cfg.train.mixed_precision == "auto"):
        return ["training in fp32 under DeepSpeed: train.mixed_precision=auto takes the precision from "
                "accelerate, and a DeepSpeed yaml cannot set one; set train.mixed_precision=bf16 (or "
                "`accelerate launch --mixed_precision bf16`)"]
    return []


class Monitor:
    def __init__(self, trainer):
        self.t = trainer
        cfg = trainer.cfg
        self.tracker = Tracker(trainer.run_dir, trainer.world.is_main, start_step=trainer.step,
                               on_error=trainer.log.info)
        self.grid_batch = None
        if trainer.task.draws_images:
            self.grid_batch = fixed_batch(cfg.data.val or cfg.data.train, cfg.log.num_images, cfg.data.image_size,
                                          cfg=cfg)

    def start_message(self) -> None:
        t = self.t
        a, info = t.accelerator, t.loader.info
        t.log.info(
            f"{'resuming from ' + str(t.start.resume_from) if t.start.resume_from else 'starting'} at step "
            f"{t.step}/{t.cfg.train.max_steps}: {t.num_params / 1e6:.2f}M parameters, "
            f"{t.world.world_size} process(es) ({a.distributed_type.value}, {a.mixed_precision}), "
            f"{'NHWC' if t.channels_last else 'NCHW'} batches, "
            f"{info.num_samples} samples in {info.num_shards} shard(s), {t.loader.batches_per_epoch} "
            f"batches/epoch/rank, run folder {t.run_dir}")
        if (line := t.task.describe()) is not None:
            t.log.info(line)
        for note in precision_notes(t):
            t.log.info(f"note: {note}")
        for note in t.loader.split_notes():
            t.log.info(f"note: {note}")

    def scalars(self, stats: StepStats, elapsed: float, bar) -> float:
        """Reduce, write and show one interval; returns the mean total loss over all ranks."""
        t, cfg = self.t, self.t.cfg
        local = stats.averages()
        names = list(local)
        # One all-reduce for everything: means of the terms, sums of the counts.
        counts = [stats.bad, stats.data_wait, float(stats.grad_norm), float(stats.steps_taken)]
        reduced = all_reduce_sum([*local.values(), *counts], t.device)
        n = t.world.world_size
        values = {k: v / n for k, v in zip(names, reduced[: len(names)], strict=True)}
        bad, wait, grad_norm, taken = reduced[len(names):]
        t.totals["bad_samples"] += bad
        global_batch = cfg.train.batch_size * cfg.train.grad_accum * n
        steps = stats.micro / cfg.train.grad_accum
        values.update({
            "train/lr": t.scheduler.get_last_lr()[0],
            "train/grad_norm": grad_norm / max(taken, 1),
            "train/images_per_s": global_batch * steps / max(elapsed, 1e-9),
            "train/data_wait_share": wait / n / max(elapsed, 1e-9),
            "train/bad_samples": t.totals["bad_samples"],
            "train/nonfinite_steps": t.totals["nonfinite_steps"],
            "train/overflow_steps": t.totals["overflow_steps"],
            "train/samples_seen": t.samples_seen,
            # passes over an epoch's samples (data.epoch_samples or the set), as seen by every rank together:
            # continuous across a resume on another process count or batch size (a step count is not)
            "train/epoch": t.samples_seen / (t.loader.batches_per_epoch * t.world.world_size * cfg.train.batch_size),
            "system/peak_memory_gib": peak_memory_gib(t.device),
        })
        for name in ("disc_overflow_steps", "nonfinite_disc_steps"):  # the discriminator's own skips, once any
            if name in t.totals:
                values[f"disc/{name}"] = t.totals[name]
        self.tracker.scalars(values, t.step)
        loss = values.get("loss/total", float("nan"))
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{values['train/images_per_s']:.0f}", refresh=False)
        t.log.file_only(f"step {t.step} " + " ".join(f"{k}={v:.5g}" for k, v in values.items()))
        if bad:
            t.log.info(f"{int(bad)} bad samples skipped in the last {cfg.log.every_steps} steps "
                       f"({t.totals['bad_samples']:.0f} in total); last: {stats.bad_error or '?'}")
        return loss

    @torch.no_grad()
    def images(self) -> None:
        """Runs on every rank (under ZeRO-3 a forward gathers parameters collectively); only the
        main process writes. Fixed inputs and a fixed seed make grids comparable across steps."""
        if hasattr(self.t.task, "images"):  # a task that draws its own grids (a prior: decoded samples)
            self.t.task.images(self.t, self.tracker)
            return
        if self.grid_batch is None:
            return
        t, c = self.t, self.t.cfg
        model = t.engine.unwrapped()
        was_training = model.training
        model.eval()
        step, n, size, seed = t.step, c.log.num_images, c.data.image_size, c.train.seed
        x = to_model_input(self.grid_batch["image"], t.device)
        n = len(x)  # log.num_images, or fewer when the grid's shards hold fewer (a small data.val)
        cond = t.condition(self.grid_batch)
        # A module DeepSpeed cast to bf16/fp16 gets autocast here, so fp32 noise (prior samples) fits it.
        low = t.engine.input_dtype != torch.float32
        with torch.autocast(t.device.type, dtype=t.engine.input_dtype) if low else t.accelerator.autocast():
            rows = [r.float() for r in grids.reconstruction_rows(model, x, cond)]
            self.tracker.grid("reconstruction", rows, step)
            self.tracker.scalars({"eval/grid_psnr": float(psnr(*rows)), "eval/grid_ssim": float(ssim(*rows))}, step)
            try:
                samples = model.sample(n, size, cond=cond, generator=grids.generator(t.device, seed))
                self.tracker.grid("prior_samples", [samples], step)
                conds = grids.class_conditions(model.condition, c.model.num_classes, c.log.class_rows, n, t.device)
                if conds is not None:
                    self.tracker.grid("class_samples", grids.class_rows(model, size, conds, n, seed), step)
            except NoPriorError:
                pass  # a VQ model without a learned prior: reconstructions and interpolations only
            rows = grids.interpolation_rows(model, x, cond, n, c.log.interpolation_rows)
            if rows:
                self.tracker.grid("interpolation", rows, step)
        self.tracker.flush()
        model.train(was_training)

    def close(self) -> None:
        self.tracker.close()
