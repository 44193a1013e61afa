"""The deterministic random weights and inputs that the golden files were made with (imports only torch).

The real backbones (VGG16 features 59 MB, FID Inception 95 MB) are too big to commit, and equality
of two implementations needs no trained weights, only the same ones on both sides. So the golden
scripts (run in a venv with the reference packages) and our tests both fill every backbone tensor
from this recipe:

    for i, name in enumerate(sorted(names)):
        g = torch.Generator().manual_seed(seed + i)
        conv weight (4-d)  : randn(shape, float64, g) * sqrt(2 / fan_in)    (He: activations stay O(1))
        linear-head weight : 0.2 * rand(shape, float64, g)                   (non-negative, mean 0.1, as LPIPS's)
        BatchNorm weight   : 1 + 0.1 * randn
        bias / BN bias     : 0.05 * randn
        BN running_mean    : 0.1 * randn
        BN running_var     : 0.75 + 0.5 * rand                                (positive)
        then cast to float32.

Numbers are drawn in float64 and cast: torch's float32 `randn` takes a vectorised (AVX2) path whose
last bits depend on the CPU, the float64 path does not. `checksum()` proves that the two torch
versions (2.14.1 in the reference venv, the project's 2.13) produced the same bits.
"""

from __future__ import annotations

import hashlib
import math

import torch

SEED_VGG = 1_000
SEED_LIN = 2_000
SEED_INCEPTION = 3_000
SEED_FEATURES = 4_000


def draw(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """One tensor of the recipe (see the module docstring)."""
    f64 = {"dtype": torch.float64, "generator": g}
    if name.startswith("lin") and len(shape) == 4:
        t = 0.2 * torch.rand(shape, **f64)
    elif len(shape) == 4:
        t = torch.randn(shape, **f64) * math.sqrt(2.0 / (shape[1] * shape[2] * shape[3]))
    elif name.endswith("running_var"):
        t = 0.75 + 0.5 * torch.rand(shape, **f64)
    elif name.endswith("running_mean"):
        t = 0.1 * torch.randn(shape, **f64)
    elif name.endswith("bias"):
        t = 0.05 * torch.randn(shape, **f64)
    elif name.endswith("weight"):
        t = 1.0 + 0.1 * torch.randn(shape, **f64)
    else:
        raise ValueError(f"recipe: no rule for {name} {shape}")
    return t.float()


def fill(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """name -> tensor for every floating tensor named in `shapes` (num_batches_tracked is skipped)."""
    out = {}
    for i, name in enumerate(sorted(n for n in shapes if not n.endswith("num_batches_tracked"))):
        out[name] = draw(name, tuple(shapes[name]), torch.Generator().manual_seed(seed + i))
    return out


def shapes_of(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def checksum(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the sorted names, shapes and raw bytes (bitwise identity, not closeness)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def feature_sets(seed: int = SEED_FEATURES) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pairs of float64 feature sets (n, d) for the Frechet distance: correlated Gaussians with different
    means and covariances, more samples than dimensions (full-rank covariances), plus one pair with
    fewer samples than dimensions (singular covariances, as with few images and 2048-d features)."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for n1, n2, d in ((400, 300, 16), (500, 500, 64), (40, 50, 96)):
        mix1 = torch.randn(d, d, dtype=torch.float64, generator=g) / math.sqrt(d)
        mix2 = mix1 + 0.3 * torch.randn(d, d, dtype=torch.float64, generator=g) / math.sqrt(d)
        a = torch.randn(n1, d, dtype=torch.float64, generator=g) @ mix1 + 1.0
        b = torch.randn(n2, d, dtype=torch.float64, generator=g) @ mix2 + 1.0
        b += 0.2 * torch.randn(d, dtype=torch.float64, generator=g)
        pairs.append((a, b))
    return pairs
