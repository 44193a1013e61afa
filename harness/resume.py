"""Where a run starts: fresh, from `train.init_from` weights, or resumed from a checkpoint.

`plan()` decides before anything is written into the run folder (and refuses, in one line, what
cannot resume: another backend, another model, EMA or discriminator switched on or off); when a
ZeRO checkpoint meets another process count it becomes a DeepSpeed universal copy first.
`restore()` loads the state once the model, optimizer and hooks exist.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as tdist
from accelerate.utils import set_seed

from harness import checkpoint as ckpt
from harness import discriminator, scale
from harness.config import model_keys_not_read, to_dict
from harness.dist import all_reduce_sum
from harness.engine import place_steps
from harness.hooks import check_ema_matches
from harness.inference import LoadError, weights_source
from harness.signals import PREEMPTED_MARK

# model.* keys that no parameter depends on: a resume follows the config for them (a note in the log)
# prior_vq: where the frozen VQ model is read from (its weights are checked by their digest, noted when they
# differ): a prior may follow its VQ model to an export after the run that held it pruned the step
FOLLOWED_MODEL_KEYS = frozenset({"gradient_checkpointing", "dropout", "prior_dropout", "prior_vq"})


@dataclass
class Start:
    resume_from: Path | None  # the checkpoint resumed (None: a new run)
    load_from: Path | None  # what is loaded: the same, or its universal copy under ZeRO on another count


def plan(trainer, resume: str | None) -> Start:
    run_dir, world = trainer.run_dir, trainer.world
    resume_from = resolve_on_main(run_dir, resume, world, trainer.log)
    if resume is None and ckpt.list_checkpoints(run_dir):
        raise ckpt.ResumeError(f"run.dir {run_dir} already has checkpoints: pass --resume latest to continue "
                               f"it, or choose another run.dir")
    if resume_from is None:
        if resume == "latest":  # a requeued job's first start, or a mistyped run.dir: either way, said
            trainer.log.info(f"note: --resume latest: no checkpoint in {run_dir} yet, starting a new run")
        return Start(None, None)
    own = run_dir / "checkpoints"
    if resume != "latest" and not ckpt.of_run(resume_from, run_dir) and (mine := ckpt.list_checkpoints(run_dir)):
        # Another run's checkpoint into a folder with checkpoints of its own: its steps would land on
        # this run's (a step_N replaced, a later `--resume latest` picking the other branch).
        names = ", ".join(p.name for _, p in mine[-2:])
        raise ckpt.ResumeError(f"cannot resume {resume_from} in run.dir {run_dir}: that folder has checkpoints of "
                               f"its own ({names}); continue another run's checkpoint in a new run.dir, or "
                               f"--resume latest (or a path under {own}) to continue this one")
    check_resumable(trainer, resume_from)
    if (why := zero_conversion(trainer, resume_from)) is not None:
        return Start(resume_from, universal_copy(run_dir, resume_from, world, trainer.log, trainer.accelerator, why))
    return Start(resume_from, resume_from)


def resolve_on_main(run_dir: Path, resume: str | None, world, log) -> Path | None:
    """Rank 0 finds the checkpoint, verifies its manifest and runs the weights-only unpickler over
    its pickled files (reading it once, not once per rank), then tells the others: the path, or
    the one line why not."""
    found = [None, None]
    if world.is_main:
        try:
            path = ckpt.resolve(run_dir, resume, say=log.info)
            if path is not None:
                ckpt.check_pickles(path)
            found[0] = None if path is None else str(path)
        except ckpt.ResumeError as e:
            found[1] = str(e)
    if world.world_size > 1:
        tdist.broadcast_object_list(found, src=0)
    if found[1]:
        raise ckpt.ResumeError(found[1])
    return None if found[0] is None else Path(found[0])


def check_resumable(trainer, path: Path) -> bool:
    """Refuse what cannot resume (one line why); True when a ZeRO checkpoint must first become universal
    (zero_conversion says why)."""
    cfg = trainer.cfg
    state = ckpt.read_state(path)
    saved_ds, now_ds = scale.is_deepspeed_checkpoint(path), scale.using_deepspeed()
    if saved_ds != now_ds:
        how = ("a DeepSpeed accelerate config (launch/accelerate/zero*.yaml)" if saved_ds else
               "a non-DeepSpeed accelerate config (cpu2.yaml, multi_gpu.yaml, ...)")
        raise ckpt.ResumeError(f"cannot resume {path}: it was written {'with' if saved_ds else 'without'} DeepSpeed; "
                               f"resume it under {how}, or start a new run from its weights "
                               "(python launch/export.py)")
    saved_cfg = ckpt.read_config(path)
    if state.get("model_hash") != trainer.model_hash:
        # A key the checkpoint's config does not have was added to the schema since: at its default
        # it changes nothing, so an older run still resumes. Keys that change no parameter (how
        # backward recomputes, dropout rates) may change, said in the log. Any other difference is refused.
        saved = saved_cfg.get("model") if isinstance(saved_cfg.get("model"), dict) else {}
        now, default = to_dict(cfg.model), to_dict(type(cfg.model)())
        changed = [k for k in now if (saved[k] != now[k] if k in saved else now[k] != default[k])]
        followed = FOLLOWED_MODEL_KEYS | model_keys_not_read(cfg.model)  # kind and arch themselves: in `diff`
        diff = [f"{k}: {saved.get(k, default[k])!r} -> {now[k]!r}" for k in changed if k not in followed]
        if diff or not saved:
            raise ckpt.ResumeError(f"cannot resume {path}: the model config differs "
                                   f"({'; '.join(diff) or 'hash mismatch'})")
        for k in changed:
            trainer.log.info(f"note: model.{k} follows the config at this resume: {saved.get(k, default[k])!r} -> "
                             f"{now[k]!r} (no parameter depends on it{'' if k in FOLLOWED_MODEL_KEYS else ': unread'})")
    saved_loss = saved_cfg.get("loss") if isinstance(saved_cfg.get("loss"), dict) else {}
    if bool(saved_loss.get("learned_logvar", False)) != cfg.loss.learned_logvar:
        was = bool(saved_loss.get("learned_logvar", False))
        raise ckpt.ResumeError(f"cannot resume {path}: loss.learned_logvar was {str(was).lower()}, now "
                               f"{str(cfg.loss.learned_logvar).lower()} (the learned log-variance is a trained "
                               f"parameter of the run): keep loss.learned_logvar={str(was).lower()}, or start a new "
                               "run from its weights (train.init_from)")
    check_ema_matches(path, cfg.train.ema_decay)
    discriminator.check_resume_layout(path, state, cfg)
    return zero_conversion(trainer, path) is not None


def zero_conversion(trainer, path: Path) -> str | None:
    """Why a ZeRO checkpoint must go through DeepSpeed's universal format to load here (another process
    count, another precision: the engine looks for files named otherwise), or None; a ZeRO stage 3
    checkpoint under stage 1/2 (or the reverse) is refused: its weights are laid out otherwise even there."""
    layout = scale.zero_layout(path)
    if layout is None:
        return None
    stage3, bf16 = layout
    plugin = trainer.accelerator.state.deepspeed_plugin
    stage = int(plugin.zero_stage) if plugin is not None else None
    if stage is not None and stage3 != (stage == 3):
        was = "3" if stage3 else "1 or 2"
        config = "launch/accelerate/zero3.yaml" if stage3 else "launch/accelerate/zero2.yaml (or zero1.yaml)"
        raise ckpt.ResumeError(f"cannot resume {path}: it was saved under ZeRO stage {was}, this run is ZeRO stage "
                               f"{stage}; resume it under {config}, or start a new run from its weights "
                               f"(train.init_from={path})")
    shards = scale.zero_partitions(path)
    if shards != trainer.world.world_size:
        return f"saved by {shards} ranks, resuming on {trainer.world.world_size}"
    now_bf16 = trainer.accelerator.mixed_precision == "bf16"
    if bf16 != now_bf16:
        return f"saved {'in bf16' if bf16 else 'without bf16'}, resuming {'in bf16' if now_bf16 else 'without it'}"
    return None


def universal_copy(run_dir: Path, path: Path, world, log, accelerator, why: str) -> Path:
    """Resume a ZeRO checkpoint on another process count: convert it (rank 0) into DeepSpeed's
    universal format under checkpoints/.tmp-universal-*, which the engine then re-partitions.
    Removed after loading (clean_stale) like any other temporary folder."""
    dest = run_dir / "checkpoints" / f".tmp-universal-{path.name}"
    error = [None]
    if world.is_main:
        log.info(f"{path} was {why}: converting it to a DeepSpeed universal checkpoint in {dest}")
        try:
            scale.to_universal(path, dest)
        except Exception as e:  # noqa: BLE001 -- every rank must hear of it, or the others wait forever
            error[0] = f"{type(e).__name__}: {e}" if not isinstance(e, RuntimeError) else str(e)
    if world.world_size > 1:
        tdist.broadcast_object_list(error, src=0)  # also the barrier: the copy is complete
    if error[0]:
        raise ckpt.ResumeError(f"cannot resume {path} on {world.world_size} process(es): {error[0]}")
    accelerator.state.deepspeed_plugin.deepspeed_config.setdefault("checkpoint", {})["load_universal"] = True
    return dest


def init_source(path: str, world) -> Path:
    """The main rank resolves train.init_from (a run that is still training may write a newer
    checkpoint between two ranks' looks) and tells the others; or tells them why it cannot."""
    found = [None, None]
    if world.is_main:
        try:
            found[0] = str(weights_source(path))
        except LoadError as e:
            found[1] = f"train.init_from: {e}"
    if world.world_size > 1:
        tdist.broadcast_object_list(found, src=0)
    if found[1]:
        raise LoadError(found[1])
    return Path(found[0])


def begin(trainer, start: Start) -> None:
    """Restore the checkpoint (or seed a new run), then tidy the run folder (main process)."""
    if start.resume_from is not None:
        try:
            state = restore(trainer, start)
        except BaseException:
            if start.load_from != start.resume_from and trainer.world.is_main:  # a universal copy: its size is
                shutil.rmtree(start.load_from, ignore_errors=True)            # the weights and Adam state's
            raise
        trainer.step, trainer.samples_seen = state["step"], state["samples_seen"]
        trainer.totals.update(state.get("totals", {}))
        # (a checkpoint of a run that did not validate, written before runs carried the best, has no "best":
        # the copy `best` names says what it was, and reconcile below checks it against the resumed step)
        trainer.validator.best = state["best"] if "best" in state else best_named(trainer.run_dir / "checkpoints")
        trainer.validator.owed = state.get("validation_owed")  # a stop skipped it: validated first (trainer)
    else:
        set_seed(trainer.cfg.train.seed + trainer.world.rank)  # posterior noise differs per rank
    trainer.ckpt.clean_stale()
    if trainer.world.is_main:  # says how the last start ended: this one has not
        (trainer.run_dir / PREEMPTED_MARK).unlink(missing_ok=True)
    # every rank, validating or not: a best that is dropped there is dropped on all
    trainer.validator.reconcile(trainer.run_dir / "checkpoints", trainer.step, trainer.log)
    if start.resume_from is not None:
        for p in trainer.ckpt.set_aside_newer(start.resume_from, trainer.step):
            name = p.name[len("abandoned-"):].split(".")[0]
            trainer.log.info(f"note: resumed from an older checkpoint; the newer {name} "
                             f"is kept as {p} and no longer resumed or pruned")


def restore(trainer, start: Start) -> dict:
    """Load model, optimizer, scheduler, scaler, EMA, RNG (accelerate) and return the trainer state."""
    accelerator, world = trainer.accelerator, trainer.world
    # accelerate and DeepSpeed would unpickle the scheduler, EMA and ZeRO shards with weights_only=False.
    with ckpt.weights_only_loads(start.load_from) as refused:
        accelerator.load_state(str(start.load_from))
        if start.load_from != start.resume_from:
            with scale.full_parameters(trainer.engine.model):
                scale.load_universal_buffers(trainer.engine.unwrapped(), start.load_from)
    if refused:  # accelerate swallows errors while loading the RNG states
        raise ckpt.ResumeError(f"cannot resume {start.load_from}: {refused[0]}")
    saved_lr = float(trainer.scheduler.get_last_lr()[0])  # the checkpoint's schedule at its step
    _follow_configured_lr(trainer)
    _note_schedule_change(trainer, saved_lr)
    _follow_configured_adamw(trainer)
    for hook in trainer.hooks:
        hook.after_resume(trainer)
    state = ckpt.read_state(start.resume_from)
    # accelerate restores its micro-step count, and its accumulation boundary is `count % grad_accum == 0`:
    # with another train.grad_accum the boundary fell mid-step (the optimizer stepped on no step, or D's
    # replicas were synced on the wrong micro-batch). Counted in this run's micro-steps from here on.
    accelerator.step = state["step"] * trainer.cfg.train.grad_accum
    if not (start.load_from / f"random_states_{world.rank}.pkl").is_file():
        # a rank the checkpoint did not have (numpy takes seeds below 2^32: a long run's step would pass it)
        set_seed((trainer.cfg.train.seed + world.rank + 7919 * state["step"]) % 2**32)
    norms = state_norms(trainer)
    trainer.log.file_only("state at resume: " + " ".join(f"{k}={v:.10g}" for k, v in norms.items()))
    _warn_if_changed(trainer, state)
    _note_loss_changes(trainer, start.resume_from)
    return state


INIT_ONLY = ("logvar_init",)  # loss keys read only when a run starts: a resume takes the learned value


def _note_loss_changes(trainer, checkpoint: Path) -> None:
    """A resume may change the objective on purpose (a KL weight raised, a term added); said, key by key,
    against the checkpoint's own config.yaml. A key an older config lacks stood at its default there
    (the code before it behaved so: loss.disc_adaptive_max was a fixed 1e4)."""
    import dataclasses

    import yaml

    from harness.config import LossConfig

    try:
        saved = yaml.safe_load((checkpoint / "config.yaml").read_text()).get("loss") or {}
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return  # no readable config there (the manifest checked what is): nothing to compare with
    then = {**dataclasses.asdict(LossConfig()), **saved}
    now = to_dict(trainer.cfg)["loss"]
    changed = [f"loss.{k} {then[k]!r} -> {v!r}" for k, v in now.items()
               if k in then and then[k] != v and k not in INIT_ONLY]
    if changed:
        trainer.log.info(f"note: the loss differs from the checkpoint's ({', '.join(changed)}): used from here on")
    if unused := [f"loss.{k} {then[k]!r} -> {now[k]!r}" for k in INIT_ONLY if k in then and then[k] != now.get(k)]:
        trainer.log.info(f"note: {', '.join(unused)}: a starting value, not used by a resumed run (the checkpoint's "
                         "learned value goes on)")


def _follow_configured_lr(trainer) -> None:
    """A resume may change optim.lr on purpose (a lower peak for the rest of a run); the restored
    scheduler keeps the peak it was saved with, so the change would be ignored without a word. The
    schedule's shape (warmup, cosine, floor) is read from the config anyway; here its peak follows too."""
    sched, lr = trainer.scheduler, trainer.cfg.optim.lr
    before = sched.base_lrs[0]
    if all(b == lr for b in sched.base_lrs):
        return
    sched.base_lrs = [lr] * len(sched.base_lrs)
    for group, factor in zip(sched.optimizer.param_groups, (f(sched.last_epoch) for f in sched.lr_lambdas),
                             strict=True):
        group["initial_lr"], group["lr"] = lr, lr * factor
    sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]  # what get_last_lr() (train/lr) reports
    trainer.log.info(f"note: optim.lr is {lr:g}, the checkpoint's was {before:g}: the schedule goes on from step "
                     f"{sched.last_epoch} with the new peak (lr now {sched._last_lr[0]:.4g})")


def _note_schedule_change(trainer, saved_lr: float) -> None:
    """The schedule's shape is read from the config (train.max_steps, optim.warmup_steps, optim.schedule,
    optim.min_lr_ratio), so a resume that changes one moves the learning rate, maybe by 10x at once:
    said, with both values (an optim.lr change is said by _follow_configured_lr)."""
    sched, cfg = trainer.scheduler, trainer.cfg
    step = sched.last_epoch
    if step >= cfg.train.max_steps:
        trainer.log.info(f"note: the checkpoint is at step {step} and train.max_steps={cfg.train.max_steps}: "
                         "nothing is left to train (raise train.max_steps to go on)")
        return
    if sched.base_lrs[0] != cfg.optim.lr:
        return
    now = sched.base_lrs[0] * sched.lr_lambdas[0](step)
    if abs(now - saved_lr) <= 1e-6 * max(abs(now), abs(saved_lr)):
        return
    trainer.log.info(f"note: the learning-rate schedule differs from the checkpoint's (train.max_steps, "
                     f"optim.warmup_steps, optim.schedule or optim.min_lr_ratio changed): at step {step} it gives "
                     f"{now:.4g}, the checkpoint's gave {saved_lr:.4g}; the new schedule is used from here on")


def best_named(root: Path) -> dict | None:
    """The best that the copy `checkpoints/best` names recorded of itself (None: no such copy)."""
    try:
        if (root / "best").is_symlink() and ckpt.is_complete(root / "best"):
            best = ckpt.read_state(root / "best").get("best")
            return best if isinstance(best, dict) and isinstance(best.get("step"), int) else None
    except (OSError, ValueError):
        pass
    return None


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return str(list(value))
    return str(bool(value)).lower() if value is None or isinstance(value, bool) else f"{value:g}"


def _follow_configured_adamw(trainer) -> None:
    """Loading an optimizer's state brings back the betas, eps, weight decay and fused flag it was saved
    with, so a resume that changes them in the config (which config.yaml then records) would be ignored
    without a word (and a fused flag brought back off under a step that defers its skips to a fused
    AdamW failed at the first step): they follow the config too, said once."""
    o = trainer.cfg.optim
    want = {"betas": tuple(o.betas), "eps": o.eps, "weight_decay": o.weight_decay, "fused": o.fused or None}
    groups = trainer.scheduler.optimizer.param_groups
    want = {k: v for k, v in want.items() if all(k in g for g in groups)}  # every torch/DeepSpeed Adam has them
    was = {k: groups[0][k] for k, v in want.items()
           if any((tuple(g[k]) if k == "betas" else (g[k] or None) if k == "fused" else g[k]) != v for g in groups)}
    if not was:
        return
    for group in groups:
        group.update(want)
    if "fused" in was:
        place_steps(trainer.scheduler.optimizer)
    said = ", ".join(f"optim.{k} is {_show(want[k])} (the checkpoint's {_show(v)})" for k, v in was.items())
    trainer.log.info(f"note: {said}: used from here on")


def state_norms(trainer) -> dict:
    """L2 norms of all weights, buffers (codebooks, BatchNorm statistics) and Adam's second moments,
    whole over all ranks. Logged at resume: a resume on another process count must find the
    same numbers as one on the same count."""
    model = trainer.engine.model
    with scale.full_parameters(model):  # collective under ZeRO-3
        weights = sum(float(p.detach().double().pow(2).sum()) for p in model.parameters())
    buffers = sum(float(b.double().pow(2).sum()) for b in model.buffers() if b.is_floating_point())
    engine = scale.deepspeed_engine(model)
    base = getattr(engine.optimizer, "optimizer", engine.optimizer) if engine is not None else trainer.base_optimizer
    moments = sum(float(s["exp_avg_sq"].double().pow(2).sum()) for s in base.state.values() if "exp_avg_sq" in s)
    if engine is not None and engine.zero_optimization():  # each rank holds its partition of the state
        moments = all_reduce_sum([moments], trainer.device)[0]
    return {"weights_norm": math.sqrt(weights), "buffers_norm": math.sqrt(buffers), "adam_v_norm": math.sqrt(moments)}


def _warn_if_changed(trainer, state: dict) -> None:
    now, then = trainer.data_layout(), state.get("data_layout", {})
    # (an older checkpoint has fewer keys; the image size and the mixture get notes of their own)
    changed = [f"{k} {then[k]} -> {v}" for k, v in now.items()
               if k in then and then[k] != v and k not in ("image_size", "sources", "stream")]
    if then and then.get("stream", 1) != now.get("stream", 1):
        changed.append(f"the stream's seeds and epoch starts (harness/data.py, version {then.get('stream', 1)} -> "
                       f"{now.get('stream', 1)})")
    if changed:
        trainer.log.info(f"note: data layout changed since the checkpoint ({', '.join(changed)}): training goes on "
                         "with a deterministic but different sample order than an uninterrupted run")
    if "sources" in then and then["sources"] != now["sources"]:
        trainer.log.info(f"note: the data.train mixture differs from the checkpoint's: was "
                         f"{data_mixture(then['sources'])}; now {data_mixture(now['sources'])}: the new shares are "
                         "drawn from here on")
    if "image_size" in then and then["image_size"] != now["image_size"]:
        trainer.log.info(f"note: data.image_size is {now['image_size']}, the checkpoint trained at "
                         f"{then['image_size']} px: the model goes on at the new size")
    then, now = state.get("loss_files", {}), trainer.task.fingerprint()
    changed = [k for k in now if k in then and then[k] != now[k]]
    if changed:
        keys = ", ".join("model.prior_vq" if k == "prior_vq" else f"loss.{k}" for k in changed)  # the prior's VQ model
        trainer.log.info(f"note: {keys} is not the file this run was trained with "
                         "(its contents changed): the loss differs from before the checkpoint")


def data_mixture(sources: list[dict]) -> str:
    """`spec weight W (N samples, S%)` per source: the shares the loader draws samples in (weight over all weights)."""
    total = sum(s["weight"] for s in sources) or 1.0
    return ", ".join(f"{s['spec']} weight {s['weight']:g} ({s['samples']} samples, {100 * s['weight'] / total:.3g}%)"
                     for s in sources)
