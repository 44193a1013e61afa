"""Validation during training (eval.every_steps on data.val) and the best checkpoint.

Every rank evaluates its share of the first `eval.samples` held-out samples (center crop,
posterior mean, the EMA weights when train.ema_decay > 0) with harness/evaluation.py, the code
`launch/evaluate.py` runs, and the sums are all-reduced: 2 ranks report what 1 does. The model is
evaluated as a plain copy on every rank (weights gathered once, collectively under ZeRO-3), so
ranks with different numbers of batches never wait for each other inside a forward.

The best step by `eval.best_metric` is kept as `checkpoints/best`: a symlink, replaced atomically
(os.replace of a new link), to `checkpoints/best-step_N`, a hard-linked copy of step_N that pruning
never touches (it matches no `step_N`). The best value is trainer state: a resumed run goes on
comparing against it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from harness import checkpoint as ckpt
from harness import scale
from harness.config import Config, ConfigError
from harness.data import eval_batches
from harness.evaluation import Evaluator, better, fid_net, perception_fd_net
from models.registry import build_model
from shards.atomic import fsync_dir, fsync_tree, temp_path

BEST_NAME = "best"


def lpips_net(cfg: Config, device):
    from models.lpips import LPIPS

    vgg, lin = getattr(cfg.loss, "lpips_vgg", "") or None, getattr(cfg.loss, "lpips_lin", "") or None
    return LPIPS.from_files(vgg, lin, device=device)


def reference_nets(cfg: Config, device) -> tuple[list, object]:
    """The networks validation measures with (FID Inception, perception net: feature nets; LPIPS), read
    once at start-up, before the run folder is touched: a bad path or eval.best_metric stops the run
    before any work, leaving nothing behind."""
    e, nets = cfg.eval, []
    try:
        if e.fid_weights:
            nets.append(fid_net(e.fid_weights, device))
        if e.fd_net:
            nets.append(perception_fd_net(e.fd_net, device))
        lpips = lpips_net(cfg, device) if e.lpips else None
    except (ValueError, OSError) as err:
        raise ConfigError(f"eval: {err}") from None
    names = {"psnr", "ssim", "l1", "mse", *(n.name for n in nets), *(("lpips",) if lpips else ())}
    if e.best_metric and e.best_metric not in names and not e.best_metric.startswith(("kl", "vq")):
        raise ConfigError(f"eval.best_metric: {e.best_metric!r} is not measured by this run; choose one of "
                          f"{', '.join(sorted(names))} (or '' for none)")
    return nets, lpips


class Validator:
    def __init__(self, trainer, nets: tuple[list, object]):
        self.cfg = cfg = trainer.cfg
        self.device = trainer.device
        self.nets, self.lpips = nets
        self.copy = build_model(cfg.model).to(self.device).eval()  # the weights come from the run at each validation
        self.best: dict | None = None  # {"metric", "value", "step"}

    @torch.no_grad()
    def _load_weights(self, trainer) -> None:
        ema = next((h.ema for h in trainer.hooks if hasattr(h, "ema")), None) if self.cfg.eval.ema else None
        with scale.full_parameters(trainer.engine.model):  # collective under ZeRO-3: every rank enters
            state = {k: v.detach().float() for k, v in trainer.engine.unwrapped().state_dict().items()}
        if ema is not None:
            state.update(ema.shadow)
        # Only the model's own tensors: the run may train more (a learned loss variance).
        self.copy.load_state_dict({k: state[k] for k in self.copy.state_dict()})

    def run(self, trainer) -> dict:
        """Validate now; log `val/*`; returns the metrics."""
        cfg, w = self.cfg, trainer.world
        self._load_weights(trainer)
        loader, sources = eval_batches(cfg.data.val, image_size=cfg.data.image_size,
                                       batch_size=cfg.eval.batch_size or cfg.train.batch_size,
                                       num_workers=min(1, cfg.data.num_workers), max_samples=cfg.eval.samples,
                                       rank=w.rank, world_size=w.world_size,
                                       names=trainer.task.cond_key is not None)  # checked at start (trainer)
        classes = sources[0].classes if trainer.task.cond_key == "cls" else []
        quantizer = getattr(self.copy, "quantizer", None)
        ev = Evaluator(device=self.device, class_names=classes[: cfg.model.num_classes], lpips=self.lpips,
                       feature_nets=self.nets, codebook_size=getattr(quantizer, "codebook_size", 0))
        for batch in loader:  # in fp32 whatever the training precision: the numbers launch/evaluate.py gives
            ev.update(self.copy, batch, trainer.task.cond_key)
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
        # A best by another metric (eval.best_metric changed at resume) is no yardstick for this one.
        old = self.best["value"] if self.best and self.best.get("metric") == metric else None
        if better(metric, result[metric], old):
            self.best = {"metric": metric, "value": result[metric], "step": step}
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

    def reconcile(self, root: Path, is_main: bool) -> None:
        """At start-up (after resume): make `best` name the step the trainer state calls best. A kill
        between a best copy's rename and the link's replacement leaves a newer complete copy that the
        resumed state already counts as best; one before the rename leaves nothing (the copy was a
        .tmp-*, cleaned). Copies nobody names go."""
        if not is_main or not root.is_dir():
            return
        if self.best is not None:
            copy, step = root / f"best-step_{self.best['step']}", root / f"step_{self.best['step']}"
            if ckpt.is_complete(copy):
                self._link(root, copy)
            elif ckpt.is_complete(step):
                self._keep_best(step)
        named = root / BEST_NAME
        keep = os.readlink(named) if named.is_symlink() else None
        for old in root.glob("best-step_*"):
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def _link(root: Path, target: Path) -> None:
        link = temp_path(root / BEST_NAME)
        os.symlink(target.name, link)
        os.replace(link, root / BEST_NAME)  # atomic: `best` names a complete copy at every moment
        fsync_dir(root)

    def state(self) -> dict:
        return {"best": self.best}


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # same filesystem: no bytes copied, and pruning step_N leaves this copy whole
    except OSError:
        shutil.copy2(src, dst)
