"""Validation during training (eval.every_steps on data.val) and the best checkpoint.

Every rank evaluates its share of the first `eval.samples` held-out samples (center crop,
posterior mean, the EMA weights when train.ema_decay > 0) with harness/evaluation.py, the code
`launch/evaluate.py` runs, and the sums are all-reduced: 2 ranks report what 1 does. The model is
evaluated as a plain copy on every rank (weights gathered once, collectively under ZeRO-3), so
ranks with different numbers of batches never wait for each other inside a forward.

The best step by `eval.best_metric` is kept as `checkpoints/best`: a symlink, replaced atomically
(os.replace of a new link), to `checkpoints/best-step_N`, a hard-linked copy of step_N that pruning
never touches (it matches no `step_N`). The best value is trainer state: a resumed run goes on
comparing against it, as long as it is a yardstick for this run's numbers: measured by the same
eval.best_metric on the same images (data.val, eval.samples, data.image_size) with the same weights
(EMA or trained), which the best records (`measured_on`). A best measured otherwise is said at the
resume and compared with no more; `best` names it until the next validation sets a new one. A best
that is no longer part of the run (a step after the resumed one, or one whose copy and step_N are
both gone) is dropped at start-up, said in one line; a copy of an abandoned step is set aside as
`abandoned-best-step_N`, like the abandoned checkpoints, never deleted.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as tdist

from harness import checkpoint as ckpt
from harness import scale
from harness.config import IMAGE_CHANNELS, Config, ConfigError
from harness.data import eval_batches, unread_note
from harness.dist import all_reduce_sum
from harness.evaluation import BASIC, Evaluator, better, fid_net, perception_fd_net
from models.registry import build_model
from shards.atomic import fsync_dir, fsync_tree, temp_path

BEST_NAME = "best"


def lpips_net(cfg: Config, device):
    from models.lpips import LPIPS

    vgg, lin = getattr(cfg.loss, "lpips_vgg", "") or None, getattr(cfg.loss, "lpips_lin", "") or None
    return LPIPS.from_files(vgg, lin, device=device)


def reference_nets(cfg: Config, device) -> tuple[list, object, torch.nn.Module]:
    """The networks validation measures with (FID Inception, perception net: feature nets; LPIPS) and
    the plain model copy it evaluates, made once at start-up, before the run folder is touched: a bad
    path or eval.best_metric stops the run before any work, leaving nothing behind."""
    e, nets = cfg.eval, []
    try:
        if e.fid_weights:
            nets.append(fid_net(e.fid_weights, device))
        if e.fd_net:
            nets.append(perception_fd_net(e.fd_net, device))
        lpips = lpips_net(cfg, device) if e.lpips else None
    except (ValueError, OSError) as err:
        raise ConfigError(f"eval: {err}") from None
    copy = build_model(cfg.model).to(device).eval()  # the weights come from the run at each validation
    names = {*BASIC, *model_terms(copy, cfg.data.image_size, device), *(n.name for n in nets),
             *(("lpips",) if lpips else ())}
    if e.best_metric and e.best_metric not in names:
        raise ConfigError(f"eval.best_metric: {e.best_metric!r} is not measured by this run (model.kind="
                          f"{cfg.model.kind}); choose one of {', '.join(sorted(names))} (or '' for none)")
    return nets, lpips, copy


@torch.no_grad()
def model_terms(model, image_size: int, device) -> list[str]:
    """The model's own loss terms, which validation reports beside the image metrics (val/kl, val/vq;
    none for FSQ): asked of the model itself, by one forward of a blank image, so that a kind (or a
    setting) that makes other terms needs no list here."""
    x = torch.zeros(1, IMAGE_CHANNELS, image_size, image_size, device=device)
    return list(model(x, cond=None, sample_posterior=False).losses)


class Validator:
    def __init__(self, trainer, refs: tuple[list, object, torch.nn.Module] | None):
        """`refs`: reference_nets; None when the run does not validate, and then the validator only keeps
        the best that earlier runs measured: carried in each checkpoint, and `best` reconciled at a resume
        (a best on an abandoned branch is dropped whether or not this run validates)."""
        self.cfg = trainer.cfg
        self.device, self.world = trainer.device, trainer.world
        self.active = refs is not None
        self.nets, self.lpips, self.copy = refs if refs is not None else ([], None, None)
        self.best: dict | None = None  # {"metric", "value", "step", "measured_on": measured_on()}
        # The step whose validation a stop signal skipped or cut short (its checkpoint carries it): the
        # resumed run validates it before training on (Trainer.owed_validation).
        self.owed: int | None = None
        self.unread_said = False

    def measured_on(self) -> dict:
        """What a validation number depends on besides the weights' step: another value of any of these
        makes a best no yardstick for this run's validations."""
        c = self.cfg
        return {"data.val": c.data.val if isinstance(c.data.val, str) else list(c.data.val),
                "eval.samples": c.eval.samples, "data.image_size": c.data.image_size,
                "ema_weights": bool(c.eval.ema and c.train.ema_decay > 0)}  # as _load_weights chooses

    def _changed(self, best: dict) -> list[str]:
        """How `best` was measured otherwise than this run measures (a checkpoint older than `measured_on`:
        taken as the same)."""
        then, now = best.get("measured_on", self.measured_on()), self.measured_on()
        changed = [f"{k} {then.get(k)!r} -> {v!r}" for k, v in now.items() if then.get(k) != v]
        if best.get("metric") != self.cfg.eval.best_metric:
            changed.insert(0, f"eval.best_metric {best.get('metric')!r} -> {self.cfg.eval.best_metric!r}")
        return changed

    @torch.no_grad()
    def _load_weights(self, trainer) -> None:
        ema = next((h.ema for h in trainer.hooks if hasattr(h, "ema")), None) if self.cfg.eval.ema else None
        with scale.full_parameters(trainer.engine.model):  # collective under ZeRO-3: every rank enters
            state = {k: v.detach().float() for k, v in trainer.engine.unwrapped().state_dict().items()}
        if ema is not None:
            state.update(ema.shadow)
        # Only the model's own tensors: the run may train more (a learned loss variance).
        self.copy.load_state_dict({k: state[k] for k in self.copy.state_dict()})

    def run(self, trainer, stop=None) -> dict | None:
        """Validate now; log `val/*`; returns the metrics. With the loop's StopFlag `stop`, a stop signal
        ends this rank's share at the next batch (a big data.val can take longer than SLURM's warning
        before the kill), and then every rank returns None, nothing logged: the ranks agree in one
        all-reduce, which each makes once per validation whatever its batch count."""
        cfg, w = self.cfg, trainer.world
        self._load_weights(trainer)
        loader, sources = eval_batches(cfg.data.val, image_size=cfg.data.image_size,
                                       batch_size=cfg.eval.batch_size or cfg.train.batch_size,
                                       num_workers=min(1, cfg.data.num_workers), max_samples=cfg.eval.samples,
                                       rank=w.rank, world_size=w.world_size,
                                       names=trainer.task.cond_key is not None)  # checked at start (trainer)
        if not self.unread_said:  # once a run: the later held-out sources eval.samples never reaches
            self.unread_said = True
            if note := unread_note(sources, cfg.eval.samples):
                trainer.log.info(f"note: validation: {note}")
        classes = sources[0].classes if trainer.task.cond_key == "cls" else []
        quantizer = getattr(self.copy, "quantizer", None)
        ev = Evaluator(device=self.device, class_names=classes[: cfg.model.num_classes], lpips=self.lpips,
                       feature_nets=self.nets, codebook_size=getattr(quantizer, "codebook_size", 0))
        # (the vote lags a step behind the signal: it may be here already, and then no batch is read)
        cut = stop is not None and stop.requested
        batches = iter(loader) if not cut else None
        try:
            # in fp32 whatever the training precision: the numbers launch/evaluate.py gives
            for batch in batches if batches is not None else ():
                ev.update(self.copy, batch, trainer.task.cond_key)
                ckpt._pause("validating")  # signal tests hold here, between two batches
                if cut := stop is not None and stop.requested:
                    break
        finally:
            del batches  # the reader's worker ends now, not at the next collection
        if stop is not None and (all_reduce_sum([float(cut)], self.device)[0] if w.world_size > 1 else cut):
            trainer.log.info(f"validation at step {trainer.step} stopped by the signal, nothing measured: the "
                             "resumed run validates this step first")
            return None
        result = ev.result(distributed=True)
        if not result["samples"]:  # every rank knows: the count is all-reduced
            trainer.log.info(f"validation at step {trainer.step}: data.val ({cfg.data.val}) gave no readable "
                             "sample (bad or empty shards); nothing measured, no best")
            return {}
        # A diverged model or a tiny data.val is no reason to stop training: a note, and the metrics that
        # could be formed. Every rank has the same all-reduced counts, so none raises or skips alone.
        if bad := result["nonfinite_samples"]:
            trainer.log.info(f"note: validation at step {trainer.step}: {bad} of {result['samples']} reconstructions "
                             "are not finite (NaN or inf): the model diverged; they are left out of every metric")
        for note in ev.notes:
            trainer.log.info(f"note: validation at step {trainer.step}: {note}")
        shown = {f"val/{k}": v for k, v in result.items() if not k.startswith("psnr_class/")}
        per_class = [k for k in result if k.startswith("psnr_class/")][: cfg.log.class_rows]
        shown.update({f"val/{k}": result[k] for k in per_class})
        trainer.monitor.tracker.scalars(shown, trainer.step)
        trainer.log.file_only(f"val step {trainer.step} " + " ".join(f"{k}={v:.10g}" for k, v in shown.items()))
        trainer.log.info(f"validation at step {trainer.step} on {result['samples']} samples: "
                         + " ".join(f"{k}={v:.4g}" for k, v in result.items()
                                    if k in ("psnr", "ssim", "lpips", "rfid") or k.startswith("fd_")))
        return result

    def improved(self, result: dict, step: int) -> bool:
        metric = self.cfg.eval.best_metric
        if not metric or metric not in result or result.get("nonfinite_samples"):
            return False  # (a model that gives NaN on some images is no best, whatever the rest measure)
        # A best by another metric, or measured on other images or weights (changed at a resume), is no
        # yardstick for this one.
        old = self.best["value"] if self.best and not self._changed(self.best) else None
        if better(metric, result[metric], old):
            self.best = {"metric": metric, "value": result[metric], "step": step, "measured_on": self.measured_on()}
            return True
        return False

    def keep_best(self, checkpoint: Path, is_main: bool, log=None) -> Path | None:
        """Make `checkpoints/best` name a hard-linked copy of `checkpoint` (main process). A failure
        (a full disk under the copy fallback) is one log line, not the end of rank 0 alone while the
        others wait in the next collective: `best` keeps naming the previous complete copy."""
        if not is_main:
            return None
        try:
            return self._keep_best(checkpoint)
        except OSError as e:
            if log is not None:
                log.info(f"note: could not copy {checkpoint.name} as checkpoints/{BEST_NAME} ({e}); "
                         f"it still names the previous best")
            return None

    def _keep_best(self, checkpoint: Path) -> Path:
        root = checkpoint.parent
        final = root / f"best-{checkpoint.name}"
        tmp = root / f".tmp-best-{checkpoint.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(checkpoint, tmp, copy_function=_link_or_copy)
        fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        ckpt._pause("best")  # crash tests hold here: the copy is complete, `best` still names the old one
        self._link(root, final)
        for old in root.glob("best-step_*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def reconcile(self, root: Path, step: int, log) -> None:
        """At start-up (every rank; after a resume to `step`, or at 0): make `best` name the step the
        trainer state calls best, or nothing. A kill between a best copy's rename and the link's
        replacement leaves a newer complete copy that the resumed state already counts as best; one
        before the rename leaves nothing (the copy was a .tmp-*, cleaned). A best that is not part of the
        run any more (after `step`: an abandoned branch; or its copy and step_N both gone) is dropped, so
        that later validations are not measured against a step nobody can load. Rank 0 looks at the
        folder and tells the others: every rank must hold the same best (a new one is a collective save)."""
        # the note to log; whether the best is dropped; an error rank 0 met (raised on every rank)
        said = [None, False, None]
        if self.world.is_main:
            try:
                said[0], said[1] = self._reconcile(root, step)
            except OSError as e:
                said[2] = f"cannot set checkpoints/{BEST_NAME} in {root}: {e}"
        if self.world.world_size > 1:
            tdist.broadcast_object_list(said, src=0)
        if said[2] is not None:
            raise OSError(said[2])
        if said[0] is not None:
            log.info(said[0])
        if said[1]:
            self.best = None
        elif self.active and self.best is not None and self.cfg.eval.best_metric and (
                changed := self._changed(self.best)):
            b = self.best
            log.info(f"note: the best ({b['metric']} {b['value']:.4g} at step {b['step']}) was measured otherwise "
                     f"({', '.join(changed)}): it is no yardstick any more; checkpoints/best names it until the next "
                     "validation sets a new best")

    def _reconcile(self, root: Path, step: int) -> tuple[str | None, bool]:
        """Main process: `best` made to name the state's best. Returns the note to log (None: nothing to
        say) and whether the best is dropped (or a `best` that names no best of this run is)."""
        best, named = self.best, root / BEST_NAME
        link = os.readlink(named) if named.is_symlink() else None
        keep, why = None, None
        if best is not None:
            n = best["step"]
            if n > step:
                why = f"step {n} comes after the resumed step {step} (an abandoned branch)"
            elif ckpt.is_complete(root / f"best-step_{n}"):
                keep = root / f"best-step_{n}"
            elif ckpt.is_complete(root / f"step_{n}"):
                keep = root / f"step_{n}"  # the copy was not made yet (killed before its rename)
            else:
                why = f"neither checkpoints/best-step_{n} nor step_{n} exists any more"
        copies = [p for p in root.glob("best-step_*") if p != keep and _step_of(p) is not None]
        if keep is None and link is None and not copies:
            return None, False  # nothing is best and nothing names a best: a new run, or none measured yet
        if keep is None and link is not None:
            named.unlink()  # first: `best` never names a copy that is being moved
            fsync_dir(root)
        # A copy of a step after `step` is an abandoned branch's, and with no best kept every copy is one
        # that this run does not count: set aside, never deleted. Older ones beside a kept best were
        # superseded by it (a kill before they were removed).
        aside = [(p.name, _set_aside(p).name) for p in sorted(copies, key=_step_of)
                 if keep is None or _step_of(p) > step]
        if keep is not None:
            if keep.name.startswith("step_"):
                self._keep_best(keep)  # copies, links, removes the superseded copies
            else:
                self._link(root, keep)
                for old in root.glob("best-step_*"):
                    if old != keep:
                        shutil.rmtree(old, ignore_errors=True)
            if not aside:
                return None, False
            return (f"note: the best (step {best['step']}) is kept; an abandoned branch's best copy "
                    + "; ".join(f"{old} kept as {new}" for old, new in aside)), False
        if best is not None:
            head = f"the best ({best['metric']} {best['value']:.4g} at step {best['step']}) is not part of this run " \
                   f"any more: {why}"
        else:
            head = f"this run (at step {step}) has no best measured yet" + (f", but checkpoints/best named {link}"
                                                                             if link else "")
        said = [f"{old} kept as {new}" for old, new in aside] + (["checkpoints/best removed"] if link else [])
        return f"note: {head}; {'; '.join([*said, 'the next validation sets a new best'])}", True

    @staticmethod
    def _link(root: Path, target: Path) -> None:
        link = temp_path(root / BEST_NAME)
        os.symlink(target.name, link)
        os.replace(link, root / BEST_NAME)  # atomic: `best` names a complete copy at every moment
        fsync_dir(root)

    def state(self) -> dict:
        return {"best": self.best, "validation_owed": self.owed}


def _step_of(copy: Path) -> int | None:
    """N of a `best-step_N` copy (None: a name we never write)."""
    m = re.fullmatch(r"best-step_(\d+)", copy.name)
    return int(m.group(1)) if m else None


def _set_aside(copy: Path) -> Path:
    """`best-step_N` -> `abandoned-best-step_N` (`.2`, `.3`, ... beside an earlier one), as
    CheckpointManager.set_aside_newer names abandoned checkpoints: kept, matched by no pattern we prune."""
    target, k = copy.parent / f"abandoned-{copy.name}", 2
    while os.path.lexists(target):
        target, k = copy.parent / f"abandoned-{copy.name}.{k}", k + 1
    os.rename(copy, target)
    fsync_dir(copy.parent)
    return target


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # same filesystem: no bytes copied, and pruning step_N leaves this copy whole
    except OSError:
        shutil.copy2(src, dst)
