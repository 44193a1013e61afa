"""LPIPS with the VGG16 backbone (Zhang et al. 2018, the `lpips` package's `LPIPS(net='vgg')`, v0.1),
in plain torch so that it runs without torchvision and loads the user's own weight files offline.

    d(x, y) = sum over the 5 taps t of  mean over (h, w) of  lin_t( (n(f_t(x')) - n(f_t(y')))^2 )

x' = (x - shift) / scale is LPIPS's input scaling, f_t are VGG16's features after relu1_2, relu2_2,
relu3_3, relu4_3 and relu5_3, n() unit-normalises along channels at each position, and lin_t is a
learned 1x1 conv to one channel with non-negative weights.

Weights: the backbone is torchvision's VGG16 `features` with torchvision's parameter names
(`features.0.weight` ... `features.28.bias`; `vgg16-397923af.pth`, found by path or in the
torch hub cache), the heads are the `lpips` package's `weights/v0.1/vgg.pth` (`lin0.model.1.weight`
... `lin4.model.1.weight`), by path or from the installed package, found without importing it.
Equality with the `lpips` package is shown by tests/test_lpips.py against golden values made by
tests/reference/make_lpips_golden.py.

Inputs are images in [-1, 1] (LPIPS's own convention and the harness's), any size >= 16 px.
The network is frozen: no gradients to its parameters, always in eval mode.

Axis letters: b batch, c channels, h height, w width.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from einops import reduce
from torch import nn

from models.weights import (
    WeightsNotFoundError,
    check_keys,
    find_weights,
    hub_checkpoint_dirs,
    installed_package_file,
    read_state_dict,
)

VGG16_FILE = "vgg16-397923af.pth"
MIN_SIZE = 16  # relu5_3 comes after four 2x poolings: 1x1 at 16 px
LIN_RELATIVE = "weights/v0.1/vgg.pth"
# VGG16's conv widths, "M" a 2x2 max pool (torchvision's cfg "D").
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
# Indices in `features` after which LPIPS taps: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
TAPS = (3, 8, 15, 22, 29)
TAP_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS's ScalingLayer: ImageNet mean/std expressed for inputs in [-1, 1].
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def vgg16_features() -> nn.Sequential:
    """torchvision's `vgg16().features` up to relu5_3 (its final max pool has no weights and LPIPS never
    uses it), so the parameter names are torchvision's."""
    layers, c_in = [], 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c_in, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            c_in = v
    return nn.Sequential(*layers)


class NetLin(nn.Module):
    """LPIPS's NetLinLayer: a bias-free 1x1 conv to one channel. Slot 0 holds the package's Dropout,
    which is inactive in eval mode (this network is always in eval mode), so the names match the
    package's files (`lin0.model.1.weight`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def normalize_channels(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit length along channels at every position (LPIPS's normalize_tensor, same eps)."""
    return f / (torch.sqrt(torch.sum(f**2, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """The LPIPS(vgg) distance; `forward(x, y)` -> (b,) distances for images in [-1, 1].

    Build it random with `LPIPS()` and load with `load_weights`, or use `LPIPS.from_files`.
    """

    def __init__(self):
        super().__init__()
        self.features = vgg16_features()
        for i, c in enumerate(TAP_CHANNELS):
            self.add_module(f"lin{i}", NetLin(c))
        self.freeze()

    def freeze(self) -> LPIPS:
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> LPIPS:
        """Always eval: a reference network's behaviour never depends on the caller's mode."""
        return super().train(False)

    @property
    def lins(self) -> list[NetLin]:
        return [getattr(self, f"lin{i}") for i in range(len(TAP_CHANNELS))]

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five unnormalised VGG16 feature maps of scaled inputs."""
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                out.append(x)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"LPIPS: both images need the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        if min(x.shape[-2:]) < MIN_SIZE:
            raise ValueError(f"LPIPS: images of {x.shape[-2]}x{x.shape[-1]} px are too small; VGG16's four poolings "
                             f"need at least {MIN_SIZE} px a side")
        # Created per call (not buffers): the module holds no state besides its weights.
        shift = torch.tensor(SHIFT, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        scale = torch.tensor(SCALE, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        b = x.shape[0]
        # One backbone pass over both images (half the launches of two passes).
        feats = self.taps((torch.cat([x, y]) - shift) / scale)
        total = 0
        for f, lin in zip(feats, self.lins):
            fx, fy = normalize_channels(f[:b]), normalize_channels(f[b:])
            total = total + reduce(lin((fx - fy) ** 2), "b 1 h w -> b", "mean")
        return total

    # -- weights ------------------------------------------------------------------------------

    def load_weights(self, vgg: str | os.PathLike | None = None, lin: str | os.PathLike | None = None) -> LPIPS:
        """Load the backbone from `vgg` (else vgg16-397923af.pth from the torch hub cache) and the heads
        from `lin` (else the installed lpips package's weights/v0.1/vgg.pth)."""
        vgg_path = find_vgg16(vgg)
        state = read_state_dict("LPIPS VGG16 weights", vgg_path)
        feats = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        expected = self.features.state_dict()
        check_keys("LPIPS VGG16 weights", vgg_path, {f"features.{k}": v for k, v in expected.items()},
                   {f"features.{k}": v for k, v in feats.items()})
        self.features.load_state_dict({k: feats[k] for k in expected})
        lin_path = find_lpips_lin(lin)
        self.load_lin_state(read_state_dict("LPIPS linear heads", lin_path), lin_path)
        return self

    def load_lin_state(self, state: dict[str, torch.Tensor], path: Path | str = "<state dict>") -> None:
        expected = {k: v for k, v in self.state_dict().items() if k.startswith("lin")}
        check_keys("LPIPS linear heads", Path(path), expected, state)
        for k in expected:  # LPIPS trains its heads clamped at >= 0: a negative one rewards distance
            if (state[k] < 0).any():
                raise WeightsNotFoundError(f"LPIPS linear heads: {path}: {k} has negative weights; LPIPS's heads "
                                           "are non-negative (is this lpips/weights/v0.1/vgg.pth?)")
        self.load_state_dict({k: state[k] for k in expected}, strict=False)

    @classmethod
    def from_files(cls, vgg: str | os.PathLike | None = None, lin: str | os.PathLike | None = None,
                   device: str | torch.device = "cpu") -> LPIPS:
        with torch.device("meta"):  # no random init that the weights overwrite anyway
            net = cls()
        net = net.to_empty(device="cpu").load_weights(vgg, lin)
        return net.to(device).freeze()


def find_vgg16(path: str | os.PathLike | None = None) -> Path:
    """torchvision's VGG16 state dict: `path` when given, else in the torch hub checkpoint cache."""
    return find_weights("LPIPS VGG16 weights", path, VGG16_FILE, hub_checkpoint_dirs(),
                        hint=" (give the path of torchvision's vgg16-397923af.pth)")


def find_lpips_lin(path: str | os.PathLike | None = None) -> Path:
    """The LPIPS v0.1 VGG linear heads: `path` when given, else the installed lpips package's file."""
    if path:
        return find_weights("LPIPS linear heads", path, "vgg.pth")
    found, looked = installed_package_file("lpips", LIN_RELATIVE)
    if found is None:
        raise WeightsNotFoundError(f"LPIPS linear heads: {LIN_RELATIVE} not found; looked in {', '.join(looked)} "
                                   "(pip install lpips, or give the path of lpips/weights/v0.1/vgg.pth)")
    return found
