"""The perception network of the perceptual loss, and the distance over its features.

Nothing can be downloaded here (no VGG / LPIPS weights), so the project trains its own: a small
conv classifier (`PerceptionNet`) trained on the same shards with their `cls` labels by
`launch/train_perception.py`. Its intermediate features then define an LPIPS-like distance
(`PerceptualDistance`, Zhang et al. 2018 with uniform instead of learned layer weights):

    d(x, y) = sum over stages s of  mean over (h, w) of  sum over c of  (f_s(x) - f_s(y))^2

where f_s are stage-s features unit-normalised along the channel axis at every position (as
LPIPS does), so each stage contributes a number in [0, 4] and no stage dominates by scale.

Inputs are images in [-1, 1], like everything else the harness feeds a model. The network is
fully convolutional with a global pool, so it runs at any resolution, also one it was not
trained at (features are most meaningful near the training resolution).

Its file (safetensors: weights + `PerceptionArch` + info) is read and written by
harness/perception_file.py: this module holds the plain modules only.

Axis letters: b batch, c channels, h height, w width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from einops import reduce
from torch import nn


@dataclass
class PerceptionArch:
    """What builds a `PerceptionNet` (stored in the file next to the weights)."""

    in_channels: int = 3
    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    num_classes: int = 10
    norm_groups: int = 8

    def __post_init__(self):
        # Checked here, where a file's metadata becomes an architecture: a float, a string or a zero
        # would otherwise surface later as a TypeError or ZeroDivisionError deep inside nn.Conv2d.
        for name in ("in_channels", "num_classes", "norm_groups"):
            if not _positive_int(getattr(self, name)):
                raise ValueError(f"perception net: {name} must be a positive integer, got {getattr(self, name)!r}")
        if not (isinstance(self.channels, (list, tuple)) and self.channels
                and all(_positive_int(c) for c in self.channels)):
            raise ValueError(f"perception net: channels must be a non-empty list of positive integers, "
                             f"got {self.channels!r}")
        self.channels = list(self.channels)
        if bad := [c for c in self.channels if c % self.norm_groups]:
            raise ValueError(f"perception net: {bad[0]} channels are not divisible into {self.norm_groups} "
                             f"GroupNorm groups")


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------


class ConvStage(nn.Sequential):
    """conv3x3 (stride 1 or 2) -> GN -> SiLU -> conv3x3 -> GN -> SiLU."""

    def __init__(self, c_in: int, c_out: int, *, stride: int, groups: int):
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
            nn.GroupNorm(groups, c_out),
            nn.SiLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1),
            nn.GroupNorm(groups, c_out),
            nn.SiLU(),
        )


class PerceptionNet(nn.Module):
    """A small classifier: one stage per entry of `channels` (the first at full resolution, each
    later one halving it), a global average pool and a linear head."""

    def __init__(self, *, in_channels: int = 3, channels: list[int] = (32, 64, 128, 256), num_classes: int = 10,
                 norm_groups: int = 8):
        super().__init__()
        self.arch = PerceptionArch(in_channels, channels, num_classes, norm_groups)  # checks every value
        widths = [in_channels, *channels]
        self.stages = nn.ModuleList(
            ConvStage(c_in, c_out, stride=1 if i == 0 else 2, groups=norm_groups)
            for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:]))
        )
        self.head = nn.Linear(channels[-1], num_classes)

    @property
    def in_channels(self) -> int:
        return self.arch.in_channels

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every stage, `b c h w` each, coarser with each stage."""
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits `b n` for images in [-1, 1]."""
        pooled = reduce(self.features(x)[-1], "b c h w -> b c", "mean")
        return self.head(pooled)


# ---------------------------------------------------------------------------------------------
# The distance
# ---------------------------------------------------------------------------------------------


def _unit(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit length along channels at every position (LPIPS' normalize_tensor)."""
    return f / (reduce(f.pow(2), "b c h w -> b 1 h w", "sum").sqrt() + eps)


def feature_distance(fx: list[torch.Tensor], fy: list[torch.Tensor]) -> torch.Tensor:
    """Per-image distance `b` between two lists of stage features (see the module docstring)."""
    total = 0.0
    for a, b in zip(fx, fy):
        sq = reduce((_unit(a) - _unit(b)).pow(2), "b c h w -> b h w", "sum")
        total = total + reduce(sq, "b h w -> b", "mean")
    return total


class PerceptualDistance(nn.Module):
    """A frozen `PerceptionNet` and the LPIPS-like distance over its features.

    Frozen means: no parameter requires grad (so no optimizer can hold it and no gradient is
    kept for it, while gradients still flow through it into the reconstruction), and it stays
    in eval mode even when a parent module is put into train mode.
    """

    def __init__(self, net: PerceptionNet, info: dict | None = None):
        super().__init__()
        self.net = net.requires_grad_(False)
        self.info = info or {}
        self.eval()

    @property
    def in_channels(self) -> int:
        return self.net.in_channels

    def train(self, mode: bool = True) -> PerceptualDistance:
        return super().train(False)

    def forward(self, recon: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Distance of `recon` from `target` (both `b c h w` in [-1, 1]); gradients flow into `recon` only."""
        with torch.no_grad():  # the target needs no graph: only its features are compared against
            fy = self.net.features(target.float())
        d = feature_distance(self.net.features(recon.float()), fy)
        return d.mean() if reduction == "mean" else d

