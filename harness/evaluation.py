"""Reconstruction metrics over held-out shards, the same code for `launch/evaluate.py` and for
validation during training (eval.every_steps), so the two cannot disagree.

Every number is a float64 sum over images (and per class, and codebook counts, and the feature
statistics of the Frechet distances) that adds across batches and across ranks with one
all-reduce; means are formed at the end. So validation on N ranks equals validation on one.

    psnr, ssim, l1, mse          per image, then mean (reconstruction clamped to [-1, 1])
    <model terms>                the model's own unweighted terms (kl, vq, ...), per image mean
    psnr_class/<name>            PSNR per class of a class-conditional model
    codebook_perplexity, _used   code use of a VQ/FSQ model over the whole set
    lpips                        LPIPS(vgg) (models/lpips.py), when its weights are given
    rfid                         FID of reconstructions against the inputs (or --ref-stats), with
                                 the FID Inception network (models/inception.py)
    fd_<net>                     the same Frechet distance in the feature space of our own
                                 perception network (a perception.safetensors): never called FID
    samples, bad_samples         images reconstructed; samples the loader could not read
    nonfinite_samples            reconstructions with a NaN or inf (a diverged model): counted, and
                                 left out of every metric above, so one of them cannot turn a mean
                                 into NaN or stop the pass; the caller decides what that means

A metric that cannot be formed is left out of the result, never NaN (which JSON cannot hold): a
Frechet distance of fewer than 2 images, a model term that was never finite, the image metrics when
no reconstruction was finite (nonfinite_samples says that). `notes` says why for the first two, in
one line each, the same on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from einops import reduce

from harness.data import to_model_input
from harness.dist import all_reduce_sum
from harness.fid import FeatureStats, Gaussian, frechet_distance
from harness.metrics import psnr, ssim

BASIC = ("psnr", "ssim", "l1", "mse")
HIGHER_IS_BETTER = {"psnr", "ssim"}


@dataclass
class FeatureNet:
    """A frozen network whose features a Frechet distance is measured in: `name` is the metric."""

    name: str
    features: callable  # images in [-1, 1] -> (b, d)
    dim: int


def fid_net(path: str, device) -> FeatureNet:
    from models.inception import FIDInception

    net = FIDInception.from_file(path, device=device)
    return FeatureNet("rfid", net, 2048)


def perception_fd_net(path: str, device) -> FeatureNet:
    """`fd_<stem>` over the globally pooled last-stage features of a perception network file."""
    from harness.perception_file import load_perception

    net, _ = load_perception(path, device=device)
    net.requires_grad_(False).eval()

    def features(x: torch.Tensor) -> torch.Tensor:
        return reduce(net.features(x)[-1].float(), "b c h w -> b c", "mean")

    name = "fd_" + Path(path).stem.replace("-", "_")
    return FeatureNet(name, features, net.arch.channels[-1])


class Evaluator:
    """Accumulate over batches (`update`), then `result()` (all-reduced over ranks when asked)."""

    def __init__(self, *, device, class_names: list[str] = (), lpips=None, feature_nets: list[FeatureNet] = (),
                 ref_stats: dict[str, Gaussian] | None = None, codebook_size: int = 0):
        self.device = device
        self.class_names = list(class_names)
        self.lpips = lpips
        self.feature_nets = list(feature_nets)
        self.ref_stats = ref_stats or {}
        self.sums: dict[str, float] = dict.fromkeys((*BASIC, *(("lpips",) if lpips is not None else ())), 0.0)
        self.model_terms: dict[str, float] = {}
        self.term_skipped: dict[str, float] = {}  # images whose batch gave the term as NaN or inf
        self.n = self.bad = self.nonfinite = 0
        self.notes: list[str] = []  # why a metric is left out of the last result()
        self.class_psnr = torch.zeros(len(self.class_names), dtype=torch.float64)
        self.class_count = torch.zeros(len(self.class_names), dtype=torch.float64)
        self.codes = torch.zeros(codebook_size, dtype=torch.float64) if codebook_size else None
        self.real = {f.name: FeatureStats(f.dim, device) for f in self.feature_nets if f.name not in self.ref_stats}
        self.fake = {f.name: FeatureStats(f.dim, device) for f in self.feature_nets}

    @torch.no_grad()
    def update(self, model, batch: dict, cond_key: str | None) -> None:
        self.bad += batch["bad"]
        if batch["image"] is None:
            return
        x = to_model_input(batch["image"], self.device)
        cond = batch[cond_key].to(self.device) if cond_key else None
        out = model(x, cond=cond, sample_posterior=False)
        b = x.shape[0]
        self.n += b
        for k, v in out.losses.items():  # batch means: a non-finite one is skipped with its images
            v = float(v)
            self.model_terms[k] = self.model_terms.get(k, 0.0) + (v * b if math.isfinite(v) else 0.0)
            self.term_skipped[k] = self.term_skipped.get(k, 0.0) + (0.0 if math.isfinite(v) else b)
        for f in self.feature_nets:  # the inputs' statistics do not depend on what the model made of them
            if f.name in self.real:
                self.real[f.name].update(f.features(x))
        recon = out.recon.float()
        finite = torch.isfinite(recon).flatten(1).all(1)  # before the clamp, which makes inf a plain +-1
        if not finite.all():
            self.nonfinite += int((~finite).sum())
            x, recon = x[finite], recon[finite]
            cond = cond[finite] if cond is not None else None
            if not len(x):
                return
        keep = finite.cpu()
        recon = recon.clamp(-1, 1)
        b = x.shape[0]
        per_psnr = psnr(x, recon, reduction="none").double()
        self.sums["psnr"] += float(per_psnr.sum())
        self.sums["ssim"] += float(ssim(x, recon, reduction="none").sum())
        self.sums["l1"] += float((recon - x).abs().flatten(1).mean(1).sum())
        self.sums["mse"] += float((recon - x).pow(2).flatten(1).mean(1).sum())
        if self.lpips is not None:
            self.sums["lpips"] += float(self.lpips(recon, x).sum())
        if self.class_names and cond_key == "cls":
            cls = batch["cls"][keep].clamp(0, len(self.class_names) - 1)
            self.class_psnr.index_add_(0, cls, per_psnr.cpu())
            self.class_count.index_add_(0, cls, torch.ones(b, dtype=torch.float64))
        if self.codes is not None and hasattr(model, "encode_indices"):
            idx = model.encode_indices(x, cond).flatten().cpu()
            self.codes += torch.bincount(idx, minlength=len(self.codes)).double()
        for f in self.feature_nets:
            self.fake[f.name].update(f.features(recon))

    def result(self, *, distributed: bool = False) -> dict:
        """Means over every image all ranks saw (one all-reduce of the sums when `distributed`)."""
        terms = sorted(self.model_terms)
        if distributed and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # Every rank must sum the same terms; rank 0 reads sample 0, so it has them if anyone does.
            names = [terms]
            torch.distributed.broadcast_object_list(names, src=0)
            terms = names[0]
        flat = [self.n, self.bad, self.nonfinite, *self.sums.values(), *(self.model_terms.get(k, 0.0) for k in terms),
                *(self.term_skipped.get(k, 0.0) for k in terms)]
        if distributed:
            flat = all_reduce_sum(flat, self.device)
            self.class_psnr, self.class_count = _reduce_tensor(self.class_psnr, self.device), _reduce_tensor(
                self.class_count, self.device)
            if self.codes is not None:
                self.codes = _reduce_tensor(self.codes, self.device)
            for stats in (*self.real.values(), *self.fake.values()):
                stats.all_reduce()
        n, bad, nonfinite = (int(v) for v in flat[:3])
        out = {"samples": n, "bad_samples": bad, "nonfinite_samples": nonfinite}
        self.notes = []
        if n == 0:
            return out
        values, measured = flat[3:], n - nonfinite
        if measured:
            out.update({k: v / measured for k, v in zip(self.sums, values[: len(self.sums)], strict=True)})
        term_sums, skipped = values[len(self.sums): len(self.sums) + len(terms)], values[len(self.sums) + len(terms):]
        for k, total, left in zip(terms, term_sums, skipped, strict=True):
            if left:
                self.notes.append(f"{k}: not finite (NaN or inf) for {int(left)} of {n} images; "
                                  + (f"its mean is over the other {n - int(left)}" if left < n else "left out"))
            if left < n:
                out[k] = total / (n - left)
        for i, name in enumerate(self.class_names):
            if self.class_count[i] > 0:
                out[f"psnr_class/{name}"] = float(self.class_psnr[i] / self.class_count[i])
        if self.codes is not None and self.codes.sum() > 0:
            p = self.codes / self.codes.sum()
            out["codebook_perplexity"] = math.exp(-float((p[p > 0] * p[p > 0].log()).sum()))
            out["codebook_used"] = float((self.codes > 0).double().mean())
        for f in self.feature_nets:
            count = self.fake[f.name].count  # all-reduced above: every rank leaves out the same
            if count < 2:  # a covariance needs two images
                read = f"{count} of the {n} reconstructions {'was' if count == 1 else 'were'} finite" if nonfinite \
                    else f"{count} {'was' if count == 1 else 'were'} read"
                self.notes.append(f"{f.name} left out: a Frechet distance needs at least 2 images, {read}")
                continue
            real = self.ref_stats.get(f.name) or self.real[f.name].gaussian()
            out[f.name] = frechet_distance(real, self.fake[f.name].gaussian())
        return out

    def real_stats(self) -> dict[str, Gaussian]:
        """The statistics of the real images (to save and reuse with --ref-stats)."""
        return {name: s.gaussian() for name, s in self.real.items()}


def _reduce_tensor(t: torch.Tensor, device) -> torch.Tensor:
    return torch.tensor(all_reduce_sum(t.tolist(), device), dtype=torch.float64) if len(t) else t


def better(metric: str, new: float, old: float | None) -> bool:
    if old is None or math.isnan(old):
        return not math.isnan(new)
    return new > old if metric in HIGHER_IS_BETTER else new < old
