"""Frechet distances between two sets of feature vectors (FID when the features are the FID Inception's
pool3, `models.inception.FIDInception`; `fd_<net>` for any other network's features).

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr( (S1 S2)^(1/2) )

with mu the mean and S the unbiased (n - 1) covariance, as pytorch-fid's `calculate_frechet_distance`.

Why it looks like this:
- Statistics are running float64 sums (count, sum, sum of outer products) that add across batches and
  across ranks with one all-reduce, so every rank sees every sample's contribution exactly; mean and
  covariance are formed only at the end. float32 sums over tens of thousands of 2048-d vectors lose
  the digits the trace difference needs.
- tr((S1 S2)^(1/2)) without scipy: with A = S1^(1/2) (symmetric, from an eigendecomposition),
  S1 S2 = A (A S2) has the same eigenvalues as A S2 A, which is symmetric positive semi-definite;
  so the trace is the sum of square roots of `eigvalsh(A S2 A)`, clamped at 0. No complex parts
  and no iteration that may fail to converge, also for the singular covariances of fewer samples
  than dimensions (where scipy's `sqrtm` needs pytorch-fid's eps fallback).

Statistics files (for `--ref-stats`): `.npz` with `mu`, `sigma` (pytorch-fid's `--save-stats` format,
so its precomputed files work) and ours: `n`, `image_size` and `net_digest` (a digest of the feature
network's weights file, a fixed-width string array: np.load reads it without pickle); or `.safetensors`
with the three float64 tensors and `image_size` / `net_digest` in its metadata. Statistics of another
network or image size do not compare, so what a file records is checked by its reader
(launch/evaluate.py); a file that records neither (pytorch-fid's) cannot be checked.
A sigma that is no covariance (not symmetric, or a clearly negative eigenvalue) is refused at load:
the distance would come out as a number, even a negative one, that means nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shards.atomic import atomic_path


class StatsFileError(ValueError):
    """A statistics file is missing or not one we can read: one line why."""


@dataclass
class Gaussian:
    """Mean (d,) and unbiased covariance (d, d) of a feature set, float64, and its sample count."""

    mu: torch.Tensor
    sigma: torch.Tensor
    n: int = 0  # 0: not recorded (pytorch-fid's files)
    image_size: int = 0  # pixels a side of the images the features were taken of; 0: not recorded
    net_digest: str = ""  # harness.losses.file_digest of the feature network's weights file; "": not recorded

    def save(self, path: str | os.PathLike) -> Path:
        return save_stats(self, path)


class FeatureStats:
    """Running float64 sums of feature vectors: count, sum (d,) and sum of outer products (d, d).

    `update` per batch on each rank, `all_reduce()` once (a sum: the ranks' shares add), then `gaussian()`.
    """

    def __init__(self, dim: int, device: str | torch.device = "cpu"):
        self.dim = dim
        self.count = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor) -> FeatureStats:
        """Add a (b, d) batch of feature vectors."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"feature stats: expected (batch, {self.dim}) features, got {tuple(features.shape)}")
        f = features.detach().to(device=self.sum.device, dtype=torch.float64)
        if not torch.isfinite(f).all():
            raise ValueError("feature stats: non-finite feature values")
        self.count += f.shape[0]
        self.sum += f.sum(dim=0)
        self.outer += f.T @ f
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        if other.dim != self.dim:
            raise ValueError(f"feature stats: cannot merge {other.dim}-d into {self.dim}-d statistics")
        self.count += other.count
        self.sum += other.sum.to(self.sum.device)
        self.outer += other.outer.to(self.outer.device)
        return self

    def all_reduce(self, group=None) -> FeatureStats:
        """Sum the statistics over all ranks of torch.distributed (a no-op without a process group).
        One packed float64 tensor: count, sum and outer products in a single collective; counts stay
        exact up to 2^53."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        packed = torch.cat([torch.tensor([float(self.count)], dtype=torch.float64, device=self.sum.device),
                            self.sum, self.outer.reshape(-1)])
        torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.SUM, group=group)
        self.count = int(packed[0].item())
        self.sum.copy_(packed[1:1 + self.dim])
        self.outer.copy_(packed[1 + self.dim:].reshape(self.dim, self.dim))
        return self

    def gaussian(self) -> Gaussian:
        """Mean and unbiased covariance, (outer - n mu mu^T) / (n - 1), symmetrised."""
        if self.count < 2:
            raise ValueError(f"feature stats: need at least 2 samples for a covariance, have {self.count}")
        mu = self.sum / self.count
        sigma = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return Gaussian(mu.cpu(), ((sigma + sigma.T) / 2).cpu(), self.count)


def gaussian_of(features: torch.Tensor) -> Gaussian:
    """Mean and unbiased covariance of one (n, d) feature set (centred in float64 first)."""
    f = features.detach().to(torch.float64).cpu()
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature stats: need (n >= 2, d) features, got {tuple(f.shape)}")
    mu = f.mean(dim=0)
    c = f - mu
    return Gaussian(mu, (c.T @ c) / (f.shape[0] - 1), f.shape[0])


def _drop_null(w: torch.Tensor) -> torch.Tensor:
    """Eigenvalues numerically indistinguishable from 0 (below d * eps * the largest, numpy's matrix_rank
    tolerance) set to 0: their rounding noise, ~1e-16 relative, would otherwise come back as ~1e-8 each
    through the square root, summed over every null direction of a singular covariance."""
    tol = w.shape[0] * torch.finfo(w.dtype).eps * w.abs().max().clamp(min=torch.finfo(w.dtype).tiny)
    return torch.where(w > tol, w, torch.zeros_like(w))


def trace_sqrt_product(sigma1: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """tr((sigma1 sigma2)^(1/2)) for symmetric PSD matrices, through two symmetric eigendecompositions."""
    w, v = torch.linalg.eigh(sigma1)
    a = (v * _drop_null(w).sqrt()) @ v.T  # sigma1^(1/2)
    m = a @ sigma2 @ a
    ev = torch.linalg.eigvalsh((m + m.T) / 2)
    return _drop_null(ev).sqrt().sum()


def frechet_distance(g1: Gaussian, g2: Gaussian) -> float:
    """The Frechet distance between two Gaussians, in float64 on the CPU."""
    mu1, mu2 = (g.mu.detach().to("cpu", torch.float64).reshape(-1) for g in (g1, g2))
    s1, s2 = (g.sigma.detach().to("cpu", torch.float64) for g in (g1, g2))
    d = mu1.shape[0]
    if mu2.shape[0] != d or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"frechet distance: shapes do not match (mu {tuple(mu1.shape)} / {tuple(mu2.shape)}, "
                         f"sigma {tuple(s1.shape)} / {tuple(s2.shape)})")
    if not all(torch.isfinite(t).all() for t in (mu1, mu2, s1, s2)):
        raise ValueError("frechet distance: non-finite statistics")
    diff = mu1 - mu2
    value = diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * trace_sqrt_product(s1, s2)
    return float(value)


# ---------------------------------------------------------------------------------------------
# Statistics files
# ---------------------------------------------------------------------------------------------


def save_stats(g: Gaussian, path: str | os.PathLike) -> Path:
    """Write `mu`, `sigma` (float64) and what is recorded of `n`, `image_size` and `net_digest`: .npz
    (pytorch-fid's layout plus our arrays) or .safetensors (the three numbers in the metadata too)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mu, sigma = g.mu.detach().to("cpu", torch.float64), g.sigma.detach().to("cpu", torch.float64)
    extra = {k: v for k, v in (("n", g.n), ("image_size", g.image_size), ("net_digest", g.net_digest)) if v}
    if path.suffix == ".npz":
        arrays = {"mu": mu.numpy(), "sigma": sigma.numpy()}
        arrays.update({k: np.str_(v) if k == "net_digest" else np.int64(v) for k, v in extra.items()})
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append .npz
            np.savez(f, **arrays)
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_file

        tensors = {"mu": mu.contiguous(), "sigma": sigma.contiguous()}
        if g.n:
            tensors["n"] = torch.tensor([g.n], dtype=torch.int64)
        with atomic_path(path) as tmp:  # readable like the .npz (safetensors makes files 0600), never half written
            save_file(tensors, str(tmp), metadata={"format": "vae-harness-feature-stats/1",
                                                   **{k: str(v) for k, v in extra.items()}})
    else:
        raise StatsFileError(f"{path}: statistics are written as .npz or .safetensors, "
                             f"not {path.suffix or 'no suffix'!r}")
    return path


def load_stats(path: str | os.PathLike) -> Gaussian:
    """Read statistics written by `save_stats` or pytorch-fid's `--save-stats` (.npz with mu, sigma), with
    what they record of n, image size and network digest. Refused in one line: a sigma that is no
    covariance, and a recorded n below 2."""
    path = Path(path)
    if not path.is_file():
        raise StatsFileError(f"{path}: no such statistics file")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            meta = {k: str(arrays.pop(k).reshape(-1)[0]) for k in ("image_size", "net_digest") if k in arrays}
        elif path.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            arrays = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                meta = {k: v for k, v in (f.metadata() or {}).items() if k in ("image_size", "net_digest")}
        else:
            raise StatsFileError(f"{path}: statistics files are .npz or .safetensors, "
                                 f"not {path.suffix or 'no suffix'!r}")
    except StatsFileError:
        raise
    except Exception as e:  # noqa: BLE001 - numpy / safetensors raise their own types for broken files
        raise StatsFileError(f"{path}: not a readable statistics file ({type(e).__name__}: {e})") from None
    if "mu" not in arrays or "sigma" not in arrays:
        names = sorted(arrays)  # a wrong file (a network's weights) may hold hundreds: the first few say enough
        listed = ", ".join(repr(k) for k in names[:5]) + (f", ... {len(names) - 5} more" if len(names) > 5 else "")
        raise StatsFileError(f"{path}: needs arrays 'mu' and 'sigma', has {listed or 'none'}")
    try:
        mu, sigma = (torch.as_tensor(np.asarray(arrays[k])).to(torch.float64) for k in ("mu", "sigma"))
        n = int(np.asarray(arrays["n"]).reshape(-1)[0]) if "n" in arrays else None
    except (TypeError, ValueError, IndexError, RuntimeError) as e:  # strings, or an empty n
        raise StatsFileError(f"{path}: mu, sigma and n must be numbers ({type(e).__name__}: {e})") from None
    mu = mu.reshape(-1)
    if not mu.numel():
        raise StatsFileError(f"{path}: mu is empty")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise StatsFileError(f"{path}: sigma {tuple(sigma.shape)} does not fit mu {tuple(mu.shape)}")
    if not (torch.isfinite(mu).all() and torch.isfinite(sigma).all()):
        raise StatsFileError(f"{path}: mu or sigma holds non-finite values (NaN or inf)")
    if n is not None and n < 2:
        raise StatsFileError(f"{path}: the statistics of {n} image(s): a covariance needs at least 2")
    _check_covariance(path, sigma)
    image_size = meta.get("image_size", "0")
    if not image_size.isdigit():
        raise StatsFileError(f"{path}: image_size {image_size!r} is not a number of pixels")
    return Gaussian(mu, sigma, n or 0, int(image_size), meta.get("net_digest", ""))


def _check_covariance(path: Path, sigma: torch.Tensor) -> None:
    """A covariance is symmetric positive semi-definite. The tolerances pass the rounding of statistics
    summed in float64 (relative 1e-16 and far below), not a matrix that is no covariance: with a
    negative eigenvalue the trace term is no distance (sigma = -I gave an rfid of -1481, which reads
    as a very good score)."""
    scale = float(sigma.abs().max())
    asym = float((sigma - sigma.T).abs().max())
    if asym > 1e-6 * scale:
        raise StatsFileError(f"{path}: sigma is not symmetric (|sigma - sigma^T| up to {asym:.3g}, entries up to "
                             f"{scale:.3g}): not a covariance")
    w = torch.linalg.eigvalsh((sigma + sigma.T) / 2)
    if len(w) and float(w.min()) < -1e-6 * float(w.abs().max()):
        raise StatsFileError(f"{path}: sigma has a negative eigenvalue ({float(w.min()):.3g}, the largest in size is "
                             f"{float(w.abs().max()):.3g}): not a covariance")
