"""The training loop: steps, not epochs.

Each step reads top to bottom: next batch -> forward/backward (accumulate) -> clip -> step ->
EMA -> log -> images -> checkpoint -> stop check. Everything that changes during training is
checkpointed state (model, optimizer, scheduler, scaler, EMA, RNG via accelerate; step, samples
seen, data seed, config hash in trainer_state.json), so `--resume latest` continues exactly.
"""

from __future__ import annotations

import math
import resource
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as tdist
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from harness import checkpoint as ckpt
from harness import grids, scale
from harness.config import Config, ConfigError, section_hash, to_dict
from harness.data import TrainLoader, fixed_batch, to_model_input
from harness.dist import RankLogger, world
from harness.ema import EMA
from harness.inference import LoadError, init_weights, weights_source
from harness.losses import AutoencoderLoss
from harness.metrics import psnr, ssim
from harness.signals import EXIT_PREEMPTED, StopFlag
from harness.tracking import Tracker
from models import NoPriorError, build_model
from models.discriminator import D_LOSSES, PatchDiscriminator, last_decoder_layer


# DDP on CPU warns that the gradient of a 1x1 conv has strides (C, 1, C, C) where its bucket view
# has (C, 1, 1, 1). Both are contiguous layouts (size-1 dims have arbitrary strides): no copy is
# wrong or slow, so the warning is only noise on every rank.
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


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


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Trainer:
    def __init__(self, cfg: Config, resume: str | None = None):
        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        if scale.using_deepspeed() and cfg.model.kind == "vq" and cfg.model.vq_decay == 0:
            raise ConfigError("model.vq_decay=0 (a codebook trained by gradient) does not work under DeepSpeed: its "
                              "first-batch init and dead-code restarts edit the weights outside the optimizer, and "
                              "DeepSpeed's own fp32 copy overwrites them; use the EMA codebook (vq_decay 0.99)")
        if cfg.loss.disc_weight > 0 and scale.using_deepspeed():
            raise ConfigError("loss.disc_weight > 0 (a patch discriminator) runs under DDP or in one process, not "
                              "DeepSpeed: accelerate gives DeepSpeed one model; use launch/accelerate/multi_gpu.yaml "
                              "(or cpu2.yaml), or set loss.disc_weight=0")
        mixed = None if cfg.train.mixed_precision == "auto" else cfg.train.mixed_precision
        self.accelerator = Accelerator(gradient_accumulation_steps=cfg.train.grad_accum, mixed_precision=mixed,
                                       **scale.accelerator_kwargs())
        scale.check_world(self.accelerator)
        self.world = world()  # from torch.distributed, now that accelerate has set it up
        self.device = self.accelerator.device
        if cfg.loss.disc_weight > 0 and self.accelerator.mixed_precision == "fp16":
            raise ConfigError("loss.disc_weight > 0 with fp16: one loss scaler for two optimizers is not supported "
                              "here; use bf16 (train.mixed_precision=bf16) or fp32")
        # Files the loss reads (a perception net) are checked first: a bad path stops the run
        # before anything is written. The loss module is never prepared: nothing in it trains.
        self.loss_fn = AutoencoderLoss(cfg.loss).to(self.device)
        self._check_loss_fits_model()
        self.log = RankLogger(self.world.is_main, self.run_dir / "train.log")
        self.ckpt = ckpt.CheckpointManager(self.run_dir, cfg.checkpoint.keep_last, self.accelerator, self.world.is_main)

        # Where do we start? Decided before anything is written into the run folder.
        self.resume_from = ckpt.resolve(self.run_dir, resume)
        if resume is None and ckpt.list_checkpoints(self.run_dir):
            raise ckpt.ResumeError(f"run.dir {self.run_dir} already has checkpoints: pass --resume latest to continue "
                                   f"it, or choose another run.dir")
        self.model_hash = section_hash(cfg.model)
        self.load_from = self.resume_from  # a universal copy when the process count changed under ZeRO
        if self.resume_from is not None and self._check_resumable(self.resume_from):
            self.load_from = self._universal_copy(self.resume_from)

        set_seed(cfg.train.seed)  # identical initial weights on every rank
        model = build_model(cfg.model)
        self.num_params = sum(p.numel() for p in model.parameters())
        if cfg.train.init_from and self.resume_from is None:  # before prepare: every rank, whole tensors
            n, source = init_weights(model, self._init_source(cfg.train.init_from))
            self.log.info(f"initialised {n} tensors from {source}")
        elif cfg.train.init_from:
            self.log.info(f"train.init_from ignored: resuming from {self.resume_from}")
        o = cfg.optim
        optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        self.base_optimizer = optimizer  # under ZeRO it steps this rank's partition only (see launch/benchmark.py)
        # The scheduler stays outside prepare(): accelerate would step it once per process.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        # DeepSpeed does accumulation and clipping itself; our loader is not prepared, so the
        # micro batch must be told to it (a no-op without DeepSpeed).
        scale.configure_deepspeed(self.accelerator, micro_batch=cfg.train.batch_size,
                                  grad_accum=cfg.train.grad_accum, grad_clip=cfg.optim.grad_clip)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.deepspeed = scale.deepspeed_engine(self.model) is not None
        self.input_dtype = scale.input_dtype(self.model)  # DeepSpeed bf16/fp16 casts the module, no autocast
        self.accelerator.register_for_checkpointing(self.scheduler)
        self.disc = self.disc_optimizer = self.last_layer = None
        if cfg.loss.disc_weight > 0:  # prepared after the autoencoder: model_1 / optimizer_1 in checkpoints
            with torch.random.fork_rng(devices=[]):  # the autoencoder's random stream stays as without D
                torch.manual_seed(cfg.train.seed + 1)
                disc = PatchDiscriminator(cfg.model.out_ch, cfg.loss.disc_channels, cfg.loss.disc_layers)
            d_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.loss.disc_lr or o.lr, betas=(0.5, 0.9), weight_decay=0.0)
            self.disc, self.disc_optimizer = self.accelerator.prepare(disc, d_opt)
            self.last_layer = last_decoder_layer(self.accelerator.unwrap_model(self.model))
            self._check_disc_fits(cfg)
        self.trained_models = [m for m in (self.model, self.disc) if m is not None]  # accumulate() keeps both in no_sync
        self.ema = None
        if cfg.train.ema_decay > 0:
            with scale.full_parameters(self.model):  # collective under ZeRO-3
                self.ema = EMA(self.accelerator.unwrap_model(self.model), cfg.train.ema_decay)
            self.accelerator.register_for_checkpointing(self.ema)

        self.loader = TrainLoader(cfg.data, rank=self.world.rank, world_size=self.world.world_size,
                                  batch_size=cfg.train.batch_size, pin_memory=self.device.type == "cuda")
        self.cond_key = {"class": "cls", "multilabel": "labels"}.get(getattr(model, "condition", None))
        self._check_data_fits_model()

        self.step = 0
        self.samples_seen = 0
        self.nonfinite_in_a_row = 0
        self.totals = defaultdict(float)  # nonfinite_steps, bad_samples over the whole run
        if self.resume_from is not None:
            self.accelerator.load_state(str(self.load_from))
            if self.disc_optimizer is not None:  # the configured learning rate wins over the saved one
                for group in self.disc_optimizer.param_groups:
                    group["lr"] = cfg.loss.disc_lr or cfg.optim.lr
            if self.load_from != self.resume_from:
                with scale.full_parameters(self.model):
                    scale.load_universal_buffers(self.accelerator.unwrap_model(self.model), self.load_from)
            state = ckpt.read_state(self.resume_from)
            if not (self.load_from / f"random_states_{self.world.rank}.pkl").is_file():
                set_seed(cfg.train.seed + self.world.rank + 7919 * state["step"])  # a rank the checkpoint did not have
            norms = self._state_norms()
            self.log.file_only("state at resume: " + " ".join(f"{k}={v:.10g}" for k, v in norms.items()))
            self.step, self.samples_seen = state["step"], state["samples_seen"]
            self.totals.update(state.get("totals", {}))
            self._warn_if_data_differs(state)
            self._warn_if_loss_files_differ(state)
        else:
            set_seed(cfg.train.seed + self.world.rank)  # posterior noise differs per rank
        self.ckpt.clean_stale()
        if self.resume_from is not None:
            for p in self.ckpt.set_aside_newer(self.resume_from, self.step):
                self.log.info(f"note: resumed from an older checkpoint; the newer {p.name[len('abandoned-'):]} "
                              f"is kept as {p} and no longer resumed or pruned")

        self.tracker = Tracker(self.run_dir, self.world.is_main)
        self.config_yaml = yaml.safe_dump(to_dict(cfg), sort_keys=False)
        if self.world.is_main:
            (self.run_dir / "config.yaml").write_text(self.config_yaml)
            self.tracker.text("config", f"```\n{self.config_yaml}\n```")
        self.grid_batch = fixed_batch(cfg.data.val or cfg.data.train, cfg.log.num_images, cfg.data.image_size)
        self.log.info(
            f"{'resuming from ' + str(self.resume_from) if self.resume_from else 'starting'} at step {self.step}/"
            f"{cfg.train.max_steps}: {self.num_params / 1e6:.2f}M parameters, {self.world.world_size} process(es) "
            f"({self.accelerator.distributed_type.value}, {self.accelerator.mixed_precision}), "
            f"{self.loader.info.num_samples} samples in {self.loader.info.num_shards} shard(s), "
            f"{self.loader.batches_per_epoch} batches/epoch/rank, run folder {self.run_dir}"
        )
        if self.loss_fn.perception is not None:
            info = self.loss_fn.perception.info
            acc = info.get("accuracy")
            acc = f"{acc:.3f}" if isinstance(acc, (int, float)) else "?"
            self.log.info(f"perceptual loss: frozen net {cfg.loss.perceptual_net} ({len(info.get('classes', []))} "
                          f"classes, accuracy {acc} on {info.get('accuracy_on', '?')} at {info.get('image_size', '?')} px)")
        if self.loader.sample_split:
            self.log.info(f"note: fewer shards than ranks ({self.loader.info.num_shards} < {self.world.world_size}): "
                          "every rank reads all shards and keeps 1/world_size of the samples; make more shards")

    # ----------------------------------------------------------------------------------------- checks

    def _check_resumable(self, path: Path) -> bool:
        """Refuse what cannot resume (one line why); True when a ZeRO checkpoint must first become universal."""
        state = ckpt.read_state(path)
        saved_ds, now_ds = scale.is_deepspeed_checkpoint(path), scale.using_deepspeed()
        if saved_ds != now_ds:
            how = ("a DeepSpeed accelerate config (launch/accelerate/zero*.yaml)" if saved_ds else
                   "a non-DeepSpeed accelerate config (cpu2.yaml, multi_gpu.yaml, ...)")
            raise ckpt.ResumeError(f"cannot resume {path}: it was written {'with' if saved_ds else 'without'} DeepSpeed; "
                                   f"resume it under {how}, or start a new run from its weights "
                                   "(python launch/export.py)")
        if state.get("model_hash") != self.model_hash:
            saved = yaml.safe_load((path / ckpt.CONFIG_NAME).read_text()).get("model", {})
            now = to_dict(self.cfg.model)
            diff = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now if saved.get(k) != now[k]]
            raise ckpt.ResumeError(f"cannot resume {path}: the model config differs ({'; '.join(diff) or 'hash mismatch'})")
        saved_ema = (path / "custom_checkpoint_1.pkl").is_file()
        if saved_ema != (self.cfg.train.ema_decay > 0):  # the scheduler is custom object 0, the EMA 1
            had = yaml.safe_load((path / ckpt.CONFIG_NAME).read_text()).get("train", {}).get("ema_decay", 0)
            raise ckpt.ResumeError(f"cannot resume {path}: it was trained {'with' if saved_ema else 'without'} an EMA of "
                                   f"the weights (train.ema_decay={had}) and this run asks for train.ema_decay="
                                   f"{self.cfg.train.ema_decay}; keep it {'on' if saved_ema else 'off'} to resume")
        saved_disc = any((path / f).is_file() for f in ("model_1.safetensors", "pytorch_model_1.bin"))
        if saved_disc != (self.cfg.loss.disc_weight > 0):
            raise ckpt.ResumeError(f"cannot resume {path}: it was trained {'with' if saved_disc else 'without'} a "
                                   f"discriminator and this run sets loss.disc_weight={self.cfg.loss.disc_weight}; keep "
                                   f"it {'> 0' if saved_disc else '0'} to resume, or start a new run with train.init_from")
        if saved_disc and state.get("disc") != self._disc_layout():
            raise ckpt.ResumeError(f"cannot resume {path}: its discriminator was built as {state.get('disc')} and this run "
                                   f"asks for {self._disc_layout()}; keep loss.disc_layers/disc_channels to resume")
        shards = scale.zero_partitions(path)
        return bool(shards) and shards != self.world.world_size

    def _disc_layout(self) -> dict | None:
        c = self.cfg.loss
        return {"layers": c.disc_layers, "channels": c.disc_channels} if c.disc_weight > 0 else None

    def _universal_copy(self, path: Path) -> Path:
        """Resume a ZeRO checkpoint on another process count: convert it (rank 0) into DeepSpeed's
        universal format under checkpoints/.tmp-universal-*, which the engine then re-partitions.
        Removed after loading (clean_stale) like any other temporary folder."""
        shards = scale.zero_partitions(path)
        dest = self.run_dir / "checkpoints" / f".tmp-universal-{path.name}"
        error = [None]
        if self.world.is_main:
            self.log.info(f"{path} was saved by {shards} ranks, resuming on {self.world.world_size}: "
                          f"converting it to a DeepSpeed universal checkpoint in {dest}")
            try:
                scale.to_universal(path, dest)
            except Exception as e:  # noqa: BLE001 -- every rank must hear of it, or the others wait forever
                error[0] = f"{type(e).__name__}: {e}" if not isinstance(e, RuntimeError) else str(e)
        if self.world.world_size > 1:
            tdist.broadcast_object_list(error, src=0)  # also the barrier: the copy is complete
        if error[0]:
            raise ckpt.ResumeError(f"cannot resume {path} on {self.world.world_size} process(es): {error[0]}")
        self.accelerator.state.deepspeed_plugin.deepspeed_config.setdefault("checkpoint", {})["load_universal"] = True
        return dest

    def _state_norms(self) -> dict:
        """L2 norms of all weights, buffers (codebooks, BatchNorm statistics) and Adam's second moments,
        whole over all ranks. Logged at resume: a resume on another process count must find the
        same numbers as one on the same count."""
        with scale.full_parameters(self.model):  # collective under ZeRO-3
            weights = sum(float(p.detach().double().pow(2).sum()) for p in self.model.parameters())
        buffers = sum(float(b.double().pow(2).sum()) for b in self.model.buffers() if b.is_floating_point())
        engine = scale.deepspeed_engine(self.model)
        base = getattr(engine.optimizer, "optimizer", engine.optimizer) if engine is not None else self.base_optimizer
        moments = sum(float(s["exp_avg_sq"].double().pow(2).sum()) for s in base.state.values() if "exp_avg_sq" in s)
        if engine is not None and engine.zero_optimization():  # each rank holds its partition of the state
            moments = self._all_ranks([moments])[0]
        return {"weights_norm": math.sqrt(weights), "buffers_norm": math.sqrt(buffers), "adam_v_norm": math.sqrt(moments)}

    def _warn_if_data_differs(self, state: dict) -> None:
        now = self._data_layout()
        then = state.get("data_layout", {})
        changed = [f"{k} {then.get(k)} -> {v}" for k, v in now.items() if then.get(k) != v]
        if changed:
            self.log.info(f"note: data layout changed since the checkpoint ({', '.join(changed)}): training goes on "
                          "with a deterministic but different sample order than an uninterrupted run")

    def _check_data_fits_model(self) -> None:
        info, num = self.loader.info, self.cfg.model.num_classes
        if self.cond_key == "cls":
            if not info.classes:
                raise ConfigError("model.condition: class conditioning needs shards with class labels (index.json classes)")
            if len(info.classes) > num:
                raise ConfigError(f"model.num_classes: the shards have {len(info.classes)} classes, more than {num}")
        if self.cond_key == "labels":
            if not info.label_names:
                raise ConfigError("model.condition: multilabel conditioning needs shards with json labels (index.json label_names)")
            if len(info.label_names) != num:
                raise ConfigError(f"model.num_classes: the shards have {len(info.label_names)} labels "
                                  f"({', '.join(info.label_names[:3])}, ...); set model.num_classes={len(info.label_names)}")

    def _check_loss_fits_model(self) -> None:
        p = self.loss_fn.perception
        if p is not None and p.in_channels != self.cfg.model.out_ch:
            raise ConfigError(f"loss.perceptual_net: the network reads {p.in_channels}-channel images but the model "
                              f"makes {self.cfg.model.out_ch} (model.out_ch)")

    def _warn_if_loss_files_differ(self, state: dict) -> None:
        then, now = state.get("loss_files", {}), self.loss_fn.fingerprint()
        changed = [k for k in now if k in then and then[k] != now[k]]
        if changed:
            self.log.info(f"note: {', '.join(f'loss.{k}' for k in changed)} is not the file this run was trained with "
                          "(its contents changed): the loss differs from before the checkpoint")

    def _data_layout(self) -> dict:
        c = self.cfg
        return {"world_size": self.world.world_size, "batch_size": c.train.batch_size, "grad_accum": c.train.grad_accum,
                "num_workers": c.data.num_workers, "seed": c.data.seed, "batches_per_epoch": self.loader.batches_per_epoch}

    # ----------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "data_seed": self.cfg.data.seed,
            "data_layout": self._data_layout(),
            "model_hash": self.model_hash,
            "disc": self._disc_layout(),
            "loss_files": self.loss_fn.fingerprint(),
            "totals": dict(self.totals),
            "time": time.time(),
        }

    def save(self) -> None:
        t0 = time.perf_counter()
        path = self.ckpt.save(self.step, self.state_dict(), self.config_yaml)
        self.log.info(f"checkpoint {path} ({time.perf_counter() - t0:.1f}s)")

    # ----------------------------------------------------------------------------------------- loop

    def _condition(self, batch: dict):
        return batch[self.cond_key].to(self.device, non_blocking=True) if self.cond_key else None

    def _check_disc_fits(self, cfg: Config) -> None:
        """A discriminator too deep for the images would fail at loss.disc_start, maybe days in: try it now."""
        disc = self.accelerator.unwrap_model(self.disc)
        size = cfg.data.image_size
        disc.eval()
        try:
            with torch.no_grad():
                disc(torch.zeros(1, cfg.model.out_ch, size, size, device=self.device))
        except RuntimeError as e:
            if "size" not in str(e):  # only "the input is smaller than the kernel" is the config's fault
                raise
            raise ConfigError(f"loss.disc_layers: {cfg.loss.disc_layers} layers do not fit {size}px images "
                              f"(the patches shrink below the kernel); use fewer") from None
        finally:
            disc.train()

    def _add_adversarial_term(self, recon: torch.Tensor, losses, acc: dict) -> None:
        """The generator's side (latent-diffusion's LPIPSWithDiscriminator): -mean D(recon), scaled
        by loss.disc_weight and, when adaptive, by |grad of the other terms| / |grad of this one| at
        the decoder's last layer, so neither side drowns the other whatever their scales.

        D runs unwrapped and frozen: no gradient reaches it from here, and DDP sees one forward and
        one backward of it per step, in _discriminator_step."""
        cfg = self.cfg.loss
        disc = self.accelerator.unwrap_model(self.disc)
        disc.requires_grad_(False)
        try:
            g_loss = -disc(recon).float().mean()
        finally:
            disc.requires_grad_(True)
        weight = torch.ones((), device=recon.device)
        if cfg.disc_adaptive:
            (g_rec,) = torch.autograd.grad(losses.total, self.last_layer, retain_graph=True)
            (g_adv,) = torch.autograd.grad(g_loss, self.last_layer, retain_graph=True)
            weight = (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach()
        term = cfg.disc_weight * weight * g_loss
        losses.terms["adv"] = term
        losses.total = losses.total + term
        acc["disc/adaptive_weight"] += weight.float()

    def _discriminator_step(self, x: torch.Tensor, recon: torch.Tensor, finite: bool, acc: dict) -> None:
        """One update of D on real inputs and the (detached) reconstructions: one DDP forward, each
        batch with its own BatchNorm statistics (as the generator's pass sees the fakes alone).
        Skipped with the autoencoder's step when that was not finite, or when D's own gradients
        are not (all-reduced: every rank agrees)."""
        real, fake = (t.float() for t in self.disc(x.to(self.input_dtype), recon))
        d_loss = D_LOSSES[self.cfg.loss.disc_loss](real, fake)
        self.accelerator.backward(d_loss)
        if self.accelerator.sync_gradients:
            clip = self.cfg.optim.grad_clip or float("inf")
            norm = float(self.accelerator.clip_grad_norm_(self.disc.parameters(), clip))
            if finite and math.isfinite(norm):
                self.disc_optimizer.step()
            elif finite:
                self.totals["nonfinite_disc_steps"] += 1
                self.log.info(f"step {self.step + 1}: non-finite discriminator gradients, its step skipped")
        self.disc_optimizer.zero_grad(set_to_none=True)
        acc["judged"] += 1
        acc["disc/loss"] += d_loss.detach()
        acc["disc/logits_real"] += real.detach().mean()
        acc["disc/logits_fake"] += fake.detach().mean()

    def _init_source(self, path: str) -> Path:
        """The main rank resolves train.init_from (a run that is still training may write a newer
        checkpoint between two ranks' looks) and tells the others; or tells them why it cannot."""
        found = [None, None]
        if self.world.is_main:
            try:
                found[0] = str(weights_source(path))
            except LoadError as e:
                found[1] = f"train.init_from: {e}"
        if self.world.world_size > 1:
            tdist.broadcast_object_list(found, src=0)
        if found[1]:
            raise LoadError(found[1])
        return Path(found[0])

    def _all_ranks(self, values: list[float], op=tdist.ReduceOp.SUM) -> list[float]:
        if self.world.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        tdist.all_reduce(t, op=op)
        return t.tolist()

    def train_step(self, batches, stop: StopFlag, acc: dict) -> bool:
        """One optimizer step over `grad_accum` micro-batches. Returns whether any rank asked to stop.

        Non-finite values are caught at the gradient norm, not at the loss: gradients are
        all-reduced, so every rank sees the same norm and takes the same branch without another
        collective (a NaN loss on one rank makes NaN gradients everywhere). With fp16 loss
        scaling, an overflow is the scaler's business: it skips the step and lowers the scale.
        Under DeepSpeed the optimizer steps inside `backward`, so there the loss is checked
        before it (one all-reduce per micro-batch) and DeepSpeed counts its own fp16 overflows."""
        cfg = self.cfg
        scaler = self.accelerator.scaler
        finite, overflow = True, False
        skipped_before = scale.skipped_steps(self.model)
        for _ in range(cfg.train.grad_accum):
            t0 = time.perf_counter()
            batch = next(batches)
            acc["data_wait"] += time.perf_counter() - t0
            acc["bad"] += batch["bad"]
            if batch["bad"]:
                acc["bad_error"] = batch["bad_error"]
            x = to_model_input(batch["image"], self.device)
            with self.accelerator.accumulate(*self.trained_models):
                out = self.model(x.to(self.input_dtype), cond=self._condition(batch))
                losses = self.loss_fn(x, out)
                if self.deepspeed:
                    finite &= self._all_ranks([float(not torch.isfinite(losses.total))])[0] == 0
                    if finite:
                        self.accelerator.backward(losses.total)  # DeepSpeed clips and steps at the boundary
                        if self.accelerator.sync_gradients:
                            norm = self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
                            acc["grad_norm"] += float(norm) if norm is not None and math.isfinite(norm) else 0.0
                else:
                    judged = self.disc is not None and self.step >= cfg.loss.disc_start
                    if judged:
                        self._add_adversarial_term(out.recon, losses, acc)
                    self.accelerator.backward(losses.total)
                    if self.accelerator.sync_gradients:
                        clip = cfg.optim.grad_clip or float("inf")  # inf: measure the norm, change nothing
                        norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), clip))
                        finite = math.isfinite(norm)
                        if finite or scaler is not None:
                            self.optimizer.step()
                            overflow = self.optimizer.step_was_skipped
                        if finite:
                            acc["grad_norm"] += norm
                    self.optimizer.zero_grad(set_to_none=True)
                    if judged:
                        self._discriminator_step(x, out.recon.detach(), finite, acc)
            for k, v in losses.terms.items():
                acc[f"loss/{k}"] += v.detach()
            acc["loss/total"] += losses.total.detach()
            for k, v in out.metrics.items():
                acc[f"model/{k}"] += v.detach().float()
            acc["micro"] += 1
        if self.deepspeed:
            overflow = scale.skipped_steps(self.model) > skipped_before
            if not finite and cfg.train.grad_accum > 1:
                # Micro-batches before the bad one already left gradients in the engine, and its
                # zero_grad is a no-op: clear them through its optimizer (works under ZeRO-1/3;
                # under ZeRO-2 they may carry into the next step, noted in the README).
                try:
                    self.model.optimizer.zero_grad(set_to_none=True)
                except Exception:  # noqa: BLE001 - best effort: DeepSpeed's optimizers differ by stage
                    pass
        # With a scaler, non-finite gradients are overflows until the scale has collapsed below 1.
        diverged = not finite and (scaler is None or scaler.get_scale() < 1.0)
        if overflow:
            self.totals["overflow_steps"] += 1
        if diverged:
            self.nonfinite_in_a_row += 1
            self.totals["nonfinite_steps"] += 1
            self.log.info(f"step {self.step + 1}: non-finite loss or gradients, step skipped "
                          f"({self.nonfinite_in_a_row} in a row)")
            if self.nonfinite_in_a_row >= cfg.train.max_nonfinite:
                raise TrainingError(f"loss was not finite for {self.nonfinite_in_a_row} steps in a row "
                                    "(train.max_nonfinite): lower optim.lr, enable optim.grad_clip or check the data")
        else:
            self.nonfinite_in_a_row = 0
        if finite and not overflow:
            acc["steps_taken"] += 1
            if self.ema is not None:
                with scale.full_parameters(self.model):  # collective under ZeRO-3: every rank enters
                    self.ema.update(self.accelerator.unwrap_model(self.model))
        self.scheduler.step()
        # All ranks stop at the same step: a checkpoint is collective.
        return self._all_ranks([float(stop.requested)])[0] > 0

    def train(self) -> int:
        """Run to `train.max_steps`; returns the process exit code (EXIT_PREEMPTED after a signal)."""
        cfg = self.cfg
        stop = StopFlag().install()
        batches = self.loader.batches(self.step * cfg.train.grad_accum)
        global_batch = cfg.train.batch_size * cfg.train.grad_accum * self.world.world_size
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, disable=not (self.world.is_main and cfg.log.progress),
                   dynamic_ncols=True, desc="train")
        acc, t_log, exit_code, saved_at, first_step = defaultdict(float), time.perf_counter(), 0, self.step, self.step
        self.model.train()
        try:
            while self.step < cfg.train.max_steps:
                stop_now = self.train_step(batches, stop, acc)
                self.step += 1
                self.samples_seen += global_batch
                bar.update(1)
                if self.step % cfg.log.every_steps == 0 or stop_now or self.step == cfg.train.max_steps:
                    self._log_scalars(acc, time.perf_counter() - t_log, global_batch, bar)
                    acc, t_log = defaultdict(float), time.perf_counter()
                if cfg.log.images_every_steps and self.step % cfg.log.images_every_steps == 0:
                    self.log_images()
                every = cfg.checkpoint.every_steps
                if (every and self.step % every == 0) or stop_now:
                    self.save()
                    saved_at = self.step
                if stop_now:
                    self.log.info(f"stop requested by signal: checkpoint at step {self.step} saved, exiting with {EXIT_PREEMPTED}")
                    exit_code = EXIT_PREEMPTED
                    break
                if cfg.train.stop_after_steps and self.step - first_step >= cfg.train.stop_after_steps:
                    if saved_at != self.step:
                        self.save()
                    self.log.info(f"train.stop_after_steps={cfg.train.stop_after_steps} reached at step {self.step}")
                    break
            else:
                if saved_at != self.step:
                    self.save()
                if not (cfg.log.images_every_steps and self.step % cfg.log.images_every_steps == 0):
                    self.log_images()
                self.log.info(f"done: {self.step} steps, {self.samples_seen} samples; "
                              f"tensorboard --logdir {self.run_dir / 'tb'}")
        finally:
            stop.restore()
            bar.close()
            self.tracker.close()
        return exit_code

    # ----------------------------------------------------------------------------------------- logging

    def _log_scalars(self, acc: dict, elapsed: float, global_batch: int, bar) -> None:
        micro = max(acc["micro"], 1)
        names = sorted(k for k in acc if k.startswith(("loss/", "model/", "disc/")))
        judged = max(acc["judged"], 1)  # the discriminator's numbers: over the micro-steps it judged (from disc_start)
        local = [float(acc[k]) / (judged if k.startswith("disc/") or k == "loss/adv" else micro) for k in names]
        steps = micro / self.cfg.train.grad_accum
        # One all-reduce for everything: means of the terms, sums of the counts.
        reduced = self._all_ranks(local + [acc["bad"], acc["data_wait"], acc["grad_norm"], acc["steps_taken"]])
        n = self.world.world_size
        values = {k: v / n for k, v in zip(names, reduced[: len(names)])}
        bad, wait, grad_norm, taken = reduced[len(names):]
        self.totals["bad_samples"] += bad
        values.update({
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/grad_norm": grad_norm / max(taken, 1),
            "train/images_per_s": global_batch * steps / max(elapsed, 1e-9),
            "train/data_wait_share": wait / n / max(elapsed, 1e-9),
            "train/bad_samples": self.totals["bad_samples"],
            "train/nonfinite_steps": self.totals["nonfinite_steps"],
            "train/overflow_steps": self.totals["overflow_steps"],
            "train/samples_seen": self.samples_seen,
            "train/epoch": self.step * self.cfg.train.grad_accum / self.loader.batches_per_epoch,
            "system/peak_memory_gib": _peak_memory_gib(self.device),
        })
        self.tracker.scalars(values, self.step)
        loss = values.get("loss/total", float("nan"))
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{values['train/images_per_s']:.0f}", refresh=False)
        self.log.file_only(f"step {self.step} " + " ".join(f"{k}={v:.5g}" for k, v in values.items()))
        if bad:
            self.log.info(f"{int(bad)} bad samples skipped in the last {self.cfg.log.every_steps} steps "
                          f"({self.totals['bad_samples']:.0f} in total); last: {acc.get('bad_error', '?')}")
        self._check_bad_share()

    def _check_bad_share(self) -> None:
        bad = self.totals["bad_samples"]
        good = self.samples_seen
        d = self.cfg.data
        if bad > d.min_bad_samples and bad / (bad + good) > d.max_bad_fraction:
            raise TrainingError(f"{bad:.0f} bad samples out of {bad + good:.0f} read exceed data.max_bad_fraction="
                                f"{d.max_bad_fraction}: check the shards with `python -m shards verify`")

    @torch.no_grad()
    def log_images(self) -> None:
        """Inputs above reconstructions, prior samples, one row per class, latent interpolations.

        Runs on every rank (under ZeRO-3 a forward gathers parameters collectively); only the main
        process writes. Fixed inputs and a fixed seed make grids comparable across steps."""
        if self.grid_batch is None:
            return
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        c, step = self.cfg, self.step
        n, size, seed = c.log.num_images, c.data.image_size, c.train.seed
        x = to_model_input(self.grid_batch["image"], self.device)
        cond = self._condition(self.grid_batch)
        # A module DeepSpeed cast to bf16/fp16 gets autocast here, so fp32 noise (prior samples) fits it.
        low = self.input_dtype != torch.float32
        with torch.autocast(self.device.type, dtype=self.input_dtype) if low else self.accelerator.autocast():
            rows = [r.float() for r in grids.reconstruction_rows(model, x, cond)]
            self.tracker.grid("reconstruction", rows, step)
            self.tracker.scalars({"eval/grid_psnr": float(psnr(*rows)), "eval/grid_ssim": float(ssim(*rows))}, step)
            try:
                samples = model.sample(n, size, cond=cond, generator=grids.generator(self.device, seed))
                self.tracker.grid("prior_samples", [samples], step)
                conds = grids.class_conditions(model.condition, c.model.num_classes, c.log.class_rows, n, self.device)
                if conds is not None:
                    self.tracker.grid("class_samples", grids.class_rows(model, size, conds, n, seed), step)
            except NoPriorError:
                pass  # a VQ model without a learned prior: reconstructions and interpolations only
            rows = grids.interpolation_rows(model, x, cond, n, c.log.interpolation_rows)
            if rows:
                self.tracker.grid("interpolation", rows, step)
        self.tracker.flush()
        model.train(was_training)
