"""The training loop: steps, not epochs.

    train():  (a validation the last start owed) -> while step < max_steps:
                  train_step() -> log -> images -> validation -> checkpoint -> stop check
    train_step():  grad_accum x forward_backward()  ->  optimizer_step()

Everything that differs between backends, models and add-ons lives elsewhere, so this file reads
top to bottom: the DDP / DeepSpeed difference in harness/engine.py, what the model is trained for
(its loss, its data, what it writes at the end) in harness/tasks.py, the EMA and the discriminator
as hooks (harness/hooks.py, harness/discriminator.py), where the run starts (resume, init_from,
the universal ZeRO conversion) in harness/resume.py, scalars and image grids in harness/monitor.py.

Everything that changes during training is checkpointed state (model, optimizer, scheduler,
scaler, EMA, RNG via accelerate; step, samples seen, data seed, config hash in
trainer_state.json), so `--resume latest` continues exactly.
"""

from __future__ import annotations

import math
import shlex
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from harness import checkpoint as ckpt
from harness import discriminator, losses, scale
from harness.config import Config, ConfigError, section_hash, to_dict, unused_settings
from harness.data import (
    STREAM_VERSION,
    DataInfo,
    TrainLoader,
    names_problem,
    refuse_weights,
    to_model_input,
    use_channels_last,
)
from harness.dist import RankLogger, world
from harness.engine import DeferredSkips, StepOutcome, make_engine
from harness.hooks import EMAHook
from harness.inference import init_weights
from harness.monitor import Monitor, StepStats
from harness.resume import begin, data_mixture, init_source, plan
from harness.runlock import hold as hold_run_dir
from harness.signals import EXIT_PREEMPTED, StopFlag, StopVote, mark_preempted
from harness.tasks import make_task
from harness.validation import Validator, reference_nets
from models import cpu_kernels
from models.registry import build_model, deepspeed_unsupported
from shards.sources import resolve_sources

# DDP on CPU warns that the gradient of a 1x1 conv has strides (C, 1, C, C) where its bucket view
# has (C, 1, 1, 1). Both are contiguous layouts (size-1 dims have arbitrary strides): no copy is
# wrong or slow, so the warning is only noise on every rank.
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
# A first step skipped as non-finite is counted and logged already: torch's warning that the scheduler
# stepped before the optimizer says it again, on stderr (set once here, not around every step).
warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()` before")


class TrainingError(RuntimeError):
    """The run cannot go on (too many non-finite losses, too many bad samples): one line why."""


def lr_lambda(cfg) -> callable:
    """Linear warmup to 1, then cosine to `min_lr_ratio` (or constant), as a LambdaLR factor."""
    warmup, total, floor = cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.min_lr_ratio
    cosine = cfg.optim.schedule == "cosine"

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class Trainer:
    def __init__(self, cfg: Config, resume: str | None = None):
        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        self.exit_code: int | None = None  # set when the training loop has ended (train())
        if scale.using_deepspeed() and (why := deepspeed_unsupported(cfg.model)):
            raise ConfigError(why)
        if scale.using_deepspeed() and cfg.optim.fused:
            raise ConfigError("optim.fused=true is for DDP and one process: DeepSpeed steps its own optimizer "
                              "partitions and decides skips on the host; leave it false under DeepSpeed")
        mixed = None if cfg.train.mixed_precision == "auto" else cfg.train.mixed_precision
        self.accelerator = Accelerator(gradient_accumulation_steps=cfg.train.grad_accum, mixed_precision=mixed,
                                       **scale.accelerator_kwargs())
        scale.check_world(self.accelerator)
        self.world = world()  # from torch.distributed, now that accelerate has set it up
        self.device = self.accelerator.device
        scale.set_tf32(self.device, cfg.train.tf32)
        self.channels_last = use_channels_last(cfg.train.channels_last, self.device.type,
                                               self.accelerator.mixed_precision)
        cpu_kernels.set_enabled(cfg.train.cpu_kernels)
        discriminator.refuse_unsupported(cfg, device=self.device, world_size=self.world.world_size)
        self.task = make_task(cfg, self.device)  # refuses a discriminator where the task has no use for one
        discriminator.check_fits(cfg)  # before the run folder: a D too deep would fail at loss.disc_start
        # Not passed through accelerator.prepare(): the loader already splits shards by rank.
        reads = self.task.cond_key or ("cls" if self.task.needs_cls else None)  # what of the shards, by index
        self.loader = TrainLoader(cfg.data, rank=self.world.rank, world_size=self.world.world_size,
                                  batch_size=cfg.train.batch_size, pin_memory=self.device.type == "cuda",
                                  num_classes=cfg.model.num_classes if cfg.model.condition == "class" else 0,
                                  need_cls=self.task.needs_cls, names=reads is not None)
        self.task.check_data(self.loader.info)
        # What the loader mixes, checkpointed in data_layout and said at the start: data.train resolved
        # again (the loader keeps only shard lists and weights; its checks of the names passed already).
        self.mixture = [{"spec": s.spec, "weight": s.weight, "samples": s.num_samples}
                        for s in resolve_sources(cfg.data.train, cfg.data.num_samples, names=False)]
        if cfg.data.val:  # held-out shards the model cannot take: refused now, not at the first validation
            vals = resolve_sources(cfg.data.val, require_count=False, names=reads is not None, needs=reads)
            refuse_weights(vals)  # (also a weighted line inside a list file)
            val = vals[0]
            try:
                self.task.check_data(DataInfo(0, val.classes, val.label_names, len(val.urls)))
                if problem := names_problem(val, self.loader.info, reads):  # named alike in both
                    raise ConfigError(problem)
            except ConfigError as e:  # the task's checks speak of data.train: here it is data.val's shards
                raise ConfigError(f"data.val: {str(e).removeprefix('data.train: ')}") from None
        nets = reference_nets(cfg, self.device) if cfg.eval.every_steps else None  # files named in eval.*
        # One job per run.dir, taken before anything is written (and after what can be refused without it).
        self.run_tag = hold_run_dir(self.run_dir, self.world)
        ckpt._pause("starting")  # signal tests hold here: the run folder is taken, nothing trained
        self.log = RankLogger(self.world.is_main, self.run_dir / "train.log")
        self.ckpt = ckpt.CheckpointManager(self.run_dir, cfg.checkpoint.keep_last, self.accelerator, self.world.is_main,
                                           tag=self.run_tag, say=self.log.info)
        self.model_hash = section_hash(cfg.model)
        self.start = plan(self, resume)  # decided before anything is written into the run folder

        set_seed(cfg.train.seed)  # identical initial weights on every rank
        model = build_model(cfg.model)
        self.num_params = sum(p.numel() for p in model.parameters())
        if cfg.train.init_from and self.start.resume_from is None:  # before prepare: every rank, whole tensors
            n, source = init_weights(model, init_source(cfg.train.init_from, self.world), cfg.model)
            self.log.info(f"initialised {n} tensors from {source}")
        elif cfg.train.init_from:
            self.log.info(f"train.init_from ignored: resuming from {self.start.resume_from}")
        losses.attach(model, self.task, step=lambda: self.step)  # loss.logvar joins the model after init_from
        o = cfg.optim
        optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                      weight_decay=o.weight_decay, fused=o.fused or None)
        self.base_optimizer = optimizer  # under ZeRO it steps this rank's partition only (see launch/benchmark.py)
        # The scheduler stays outside prepare(): accelerate would step it once per process.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        # DeepSpeed does accumulation and clipping itself; our loader is not prepared, so the
        # micro batch must be told to it (a no-op without DeepSpeed).
        scale.configure_deepspeed(self.accelerator, micro_batch=cfg.train.batch_size,
                                  grad_accum=cfg.train.grad_accum, grad_clip=o.grad_clip)
        self.engine = make_engine(self.accelerator, *self.accelerator.prepare(model, optimizer),
                                  grad_clip=o.grad_clip, grad_accum=cfg.train.grad_accum)
        self.accelerator.register_for_checkpointing(self.scheduler)  # custom object 0
        # Hooks, in checkpoint order: the EMA is custom object 1, the discriminator the next one.
        self.hooks = []
        if cfg.train.ema_decay > 0:
            self.hooks.append(EMAHook(self, cfg.train.ema_decay))
        if cfg.loss.disc_weight > 0:
            self.hooks.append(discriminator.DiscriminatorHook(self))
        self.trained = [self.engine.model, *(m for h in self.hooks for m in h.trained_models)]
        self.validator = Validator(self, nets)  # (without validation: it keeps the best earlier runs measured)
        for note in unused_settings(cfg):
            self.log.info(f"note: {note}")

        self.step = self.samples_seen = self.nonfinite_in_a_row = 0
        self.skips = DeferredSkips()
        self.last_loss = float("nan")
        self.totals = defaultdict(float)  # nonfinite_steps, bad_samples over the whole run
        begin(self, self.start)  # restore a checkpoint (or seed a new run), then tidy the run folder
        self.monitor = Monitor(self)
        self.config_yaml = yaml.safe_dump(to_dict(cfg), sort_keys=False)
        if self.world.is_main:
            (self.run_dir / "config.yaml").write_text(self.config_yaml)
            self.monitor.tracker.text("config", f"```\n{self.config_yaml}\n```", self.step)  # as of this (re)start
        self.monitor.start_message()
        if self.device.type == "cpu":  # built (or loaded) by every rank now, not in the first step
            line = cpu_kernels.prepare(say=self.log.info)
            if self.world.is_main:
                self.log.info(line)
            elif "unavailable" in line:  # a rank (another node, another compiler) that differs is said too
                print(f"[rank {self.world.rank}] {line}", file=sys.stderr, flush=True)
        if len(self.mixture) > 1:
            self.log.info(f"data.train mixture of {len(self.mixture)} sources: {data_mixture(self.mixture)}")

    # ----------------------------------------------------------------------------------------- the step

    def condition(self, batch: dict):
        key = self.task.cond_key
        return batch[key].to(self.device, non_blocking=True) if key else None

    def forward_backward(self, batch: dict, stats: StepStats) -> None:
        """One micro-batch: forward, loss (plus what hooks add), backward (accumulated)."""
        x = to_model_input(batch["image"], self.device, self.channels_last)
        out, losses = self.task.forward(self.engine.model, x, batch, self.condition(batch), self.engine.input_dtype)
        for hook in self.hooks:
            hook.on_loss(self, x, out, losses, stats)
        self.engine.backward(losses.total)
        for hook in self.hooks:
            hook.after_backward(self, x, out, stats)
        for k, v in losses.terms.items():
            stats.add(f"loss/{k}", v)
        stats.add("loss/total", losses.total)
        for k, v in out.metrics.items():
            stats.add(f"model/{k}", v)
        stats.micro += 1

    def optimizer_step(self, stats: StepStats) -> StepOutcome:
        """Clip and step (or skip a non-finite step: too many in a row end the run), then hooks."""
        outcome = self.engine.step()
        if outcome.deferred:  # decided on the device: counted there, read at the next log (settle_skips)
            self.skips.add(outcome.finite)
            stats.grad_norm = stats.grad_norm + outcome.grad_norm
            stats.steps_taken = stats.steps_taken + outcome.finite.long()
            self._after_step(outcome, stats)
            return outcome
        scaler = self.engine.scaler
        # With a scaler, non-finite gradients are overflows until the scale has collapsed below 1.
        diverged = not outcome.finite and (scaler is None or scaler.get_scale() < 1.0)
        self.totals["overflow_steps"] += outcome.overflow
        if diverged:
            self.nonfinite_in_a_row += 1
            self.totals["nonfinite_steps"] += 1
            self.log.info(f"step {self.step + 1}: non-finite loss or gradients, step skipped "
                          f"({self.nonfinite_in_a_row} in a row)")
            if self.nonfinite_in_a_row >= self.cfg.train.max_nonfinite:
                raise TrainingError(f"loss was not finite for {self.nonfinite_in_a_row} steps in a row "
                                    f"(train.max_nonfinite): {self._divergence_advice()}")
        else:
            self.nonfinite_in_a_row = 0
        if outcome.grad_norm is not None:
            stats.grad_norm += outcome.grad_norm
        stats.steps_taken += outcome.applied
        self._after_step(outcome, stats)
        return outcome

    def _after_step(self, outcome: StepOutcome, stats: StepStats) -> None:
        for hook in self.hooks:
            hook.after_step(self, outcome, stats)
        self.scheduler.step()

    def settle_skips(self) -> None:
        """Read the device's count of deferred non-finite steps (one host sync, at a log or a save)."""
        for hook in self.hooks:
            hook.settle(self)
        if self.skips.run is None:  # no deferred step yet (or ever: the host decided each step)
            return
        skipped, worst, self.nonfinite_in_a_row = self.skips.read()
        if not skipped:
            return
        self.totals["nonfinite_steps"] += skipped
        self.log.info(f"steps to {self.step}: {skipped} non-finite (loss or gradients) skipped, "
                      f"at most {worst} in a row")
        if worst >= self.cfg.train.max_nonfinite:
            raise TrainingError(f"loss was not finite for {worst} steps in a row (train.max_nonfinite, read at the "
                                f"log): {self._divergence_advice()}")

    def _divergence_advice(self) -> str:
        disc = " (or loss.disc_lr: the discriminator's adversarial term feeds the loss)" \
            if self.cfg.loss.disc_weight > 0 else ""
        return f"lower optim.lr{disc}, enable optim.grad_clip or check the data"

    def train_step(self, batches, stats: StepStats) -> None:
        """One optimizer step over `grad_accum` micro-batches."""
        for _ in range(self.cfg.train.grad_accum):
            t0 = time.perf_counter()
            batch = next(batches)
            stats.data_wait += time.perf_counter() - t0
            stats.bad += batch["bad"]
            if batch["bad"]:
                stats.bad_error = batch["bad_error"]
            with self.accelerator.accumulate(*self.trained):  # no_sync for all trained models but the last
                self.forward_backward(batch, stats)
        self.optimizer_step(stats)

    # ----------------------------------------------------------------------------------------- the loop

    def train(self) -> int:
        """Run to `train.max_steps`; returns the process exit code (EXIT_PREEMPTED after a signal)."""
        cfg = self.cfg
        stop = StopFlag().install()
        vote = StopVote(stop)
        batches = self.loader.batches(self.step * cfg.train.grad_accum)
        global_batch = cfg.train.batch_size * cfg.train.grad_accum * self.world.world_size
        # Into a file (a SLURM job's output) a redraw per step would be ~90 bytes a step: every 30 s there.
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, disable=not (self.world.is_main and cfg.log.progress),
                   dynamic_ncols=True, desc="train", mininterval=0.1 if sys.stderr.isatty() else 30.0)
        stats, t_log, exit_code, saved_at, first_step = StepStats(), time.perf_counter(), 0, self.step, self.step
        images_every = cfg.log.images_every_steps
        self.engine.model.train()
        try:
            cut_first = not self.owed_validation(stop)  # a signal while validating what the last start owed
            stopped, t_log = cut_first, time.perf_counter()  # (that validation is not the steps' time either)
            while not stopped and self.step < cfg.train.max_steps:
                self.train_step(batches, stats)
                stop_now = vote()  # all ranks stop at the same step: a checkpoint is collective
                self.step += 1
                self.samples_seen += global_batch
                bar.update(1)
                if self.step % cfg.log.every_steps == 0 or stop_now or self.step == cfg.train.max_steps:
                    self.settle_skips()
                    self.last_loss = self.monitor.scalars(stats, time.perf_counter() - t_log, bar)
                    self._check_bad_share()
                    stats, t_log = StepStats(), time.perf_counter()
                grid = bool(images_every) and self.step % images_every == 0 and not stop_now  # a signal: save first
                validate = self.validates_at(self.step) and not stop_now  # (a signal: owed to the resumed run)
                save = bool(cfg.checkpoint.every_steps) and self.step % cfg.checkpoint.every_steps == 0 or stop_now
                if self.device.type == "cuda" and (grid or validate or save):
                    torch.cuda.synchronize()  # the queued steps are the steps' time, not the save's
                t_aside = time.perf_counter()  # grids, validation and saves are not training's rate
                if grid:
                    self.monitor.images()
                result = self.validator.run(self, stop) if validate else {}
                stop_now = stop_now or result is None  # a signal cut the validation short: save and stop
                self.validator.owed = self.step if self.validates_at(self.step) and (result is None or not validate) \
                    else None  # carried by this step's checkpoint
                improved = bool(result) and self.validator.improved(result, self.step)
                if save or stop_now or improved:
                    path, saved_at = self.save(), self.step
                    if improved:
                        self.validator.keep_best(path, self.world.is_main, self.log)
                t_log += time.perf_counter() - t_aside  # train/images_per_s, data_wait_share: the steps' own time
                if stop_now:
                    stopped = True
                    break
                if cfg.train.stop_after_steps and self.step - first_step >= cfg.train.stop_after_steps:
                    if saved_at != self.step:
                        self.save()
                    self.log.info(f"train.stop_after_steps={cfg.train.stop_after_steps} reached at step {self.step}")
                    break
            else:
                if not stopped:
                    if saved_at != self.step:
                        self.save()
                    if not (images_every and self.step % images_every == 0):
                        self.monitor.images()
                    self.task.finish(self)
                    self.log.info(f"done: {self.step} steps, {self.samples_seen} samples; "
                                  f"tensorboard --logdir {shlex.quote(str(self.run_dir / 'tb'))}")
            if stopped:
                exit_code = stop.exit_code if stop.requested else EXIT_PREEMPTED  # (another rank's signal)
                done = f"nothing saved ({self.start.resume_from} still owes step {self.step}'s validation)" \
                    if cut_first else \
                    f"checkpoint at step {self.step} saved"
                self.log.info(f"stop requested by signal: {done}, exiting with {exit_code}")
            vote.close()  # every rank left the loop at the same step
            self.exit_code = exit_code  # the run's outcome, whatever a signal while closing would say
            if exit_code == EXIT_PREEMPTED and self.world.is_main:
                mark_preempted(self.run_dir, self.step, stop.signum)
        finally:
            try:  # a stop signal while closing is still the flag's (the start-up handler would call it a
                ckpt._pause("closing")  # stop "while starting", exit 75, and skip the rest of this)
                bar.close()
                self.monitor.close()
                batches.close()  # the loader's workers end here, not at interpreter exit
            finally:
                stop.restore()
        return exit_code

    def validates_at(self, step: int) -> bool:
        return self.validator.active and step % self.cfg.eval.every_steps == 0

    def owed_validation(self, stop: StopFlag) -> bool:
        """Before the first step of a resumed run: the validation that a stop signal skipped or cut short
        at the resumed step, if this run validates at that step; then step N is saved again, owing nothing
        and naming the best as it now stands (the resumed folder's state would bring back the old best at
        the next start). False: a signal stopped it again, nothing saved (the checkpoint still owes it)."""
        owed, self.validator.owed = self.validator.owed, None
        if owed != self.step:
            return True
        if not self.validates_at(self.step):
            self.log.info(f"note: the validation of step {self.step}, which the stop that ended the last start "
                          f"skipped, is not run: this run does not validate at step {self.step} (eval.every_steps="
                          f"{self.cfg.eval.every_steps})")
            return True
        self.log.info(f"validating step {self.step} first: the stop that ended the last start skipped it")
        result = self.validator.run(self, stop)
        if result is None:
            self.validator.owed = self.step
            return False
        improved = self.validator.improved(result, self.step)
        path = self.save()
        if improved:
            self.validator.keep_best(path, self.world.is_main, self.log)
        return True

    def _check_bad_share(self) -> None:
        bad, good, d = self.totals["bad_samples"], self.samples_seen, self.cfg.data
        if bad > d.min_bad_samples and bad / (bad + good) > d.max_bad_fraction:
            raise TrainingError(f"{bad:.0f} bad samples out of {bad + good:.0f} read exceed data.max_bad_fraction="
                                f"{d.max_bad_fraction}: check the shards with `python -m shards verify`")

    # ----------------------------------------------------------------------------------------- state

    def data_layout(self) -> dict:
        c = self.cfg
        return {"world_size": self.world.world_size, "batch_size": c.train.batch_size,
                "grad_accum": c.train.grad_accum, "num_workers": c.data.num_workers, "seed": c.data.seed,
                "batches_per_epoch": self.loader.batches_per_epoch, "image_size": c.data.image_size,
                "shuffle_buffer": c.data.shuffle_buffer, "crop": c.data.crop, "hflip": c.data.hflip,
                "stream": STREAM_VERSION, "sources": self.mixture}

    def state_dict(self) -> dict:
        self.settle_skips()
        state = {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "data_seed": self.cfg.data.seed,
            "data_layout": self.data_layout(),
            "model_hash": self.model_hash,
            "loss_files": self.task.fingerprint(),
            "totals": dict(self.totals),
            "time": time.time(),
        }
        for part in (*self.hooks, self.validator):
            state.update(part.state())
        return state

    def save(self) -> Path:
        t0 = time.perf_counter()
        path = self.ckpt.save(self.step, self.state_dict(), self.config_yaml)
        self.log.info(f"checkpoint {path} ({time.perf_counter() - t0:.1f}s)")
        return path

