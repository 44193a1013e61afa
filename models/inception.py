"""The FID Inception network: pytorch-fid's `InceptionV3([3])` built on `fid_inception_v3()`, in plain torch
(no torchvision), returning the 2048-d pool3 features that the Frechet Inception Distance compares.

It is torchvision's Inception v3 with the four blocks that the TensorFlow FID graph computes
differently (pytorch-fid's FIDInceptionA / C / E_1 / E_2):
- A, C and E_1 average-pool their pool branch without counting the zero padding
  (`count_include_pad=False`), as TensorFlow does;
- E_2 (Mixed_7c) max-pools its pool branch instead of averaging (a bug in the TF graph that the
  published FID numbers carry, so every FID implementation keeps it).
Inputs in [0, 1] are resized to 299x299 (bilinear, align_corners=False) and then mapped to [-1, 1],
in that order, as pytorch-fid does.

Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (the TF FID graph converted), read
from a path the user gives; parameter names are that file's (`Conv2d_1a_3x3.conv.weight`,
`Mixed_5b.branch_pool.bn.running_var`, ...). Its 1008-way `fc` is not needed for features and is
ignored. Equality with pytorch-fid is shown by tests/test_fid.py against golden values made by
tests/reference/make_fid_golden.py.

The network is frozen: no gradients, always in eval mode (BatchNorm uses the running statistics).

Axis letters: b batch, c channels, h height, w width.
"""

from __future__ import annotations

import os
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from models.weights import (
    WeightsNotFoundError,
    check_keys,
    find_weights,
    read_state_dict,
)

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
FEATURE_DIM = 2048


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, as the TF graph) -> ReLU."""

    def __init__(self, c_in: int, c_out: int, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


# The pool branches of the FID blocks (see the module docstring for why they differ).
_avg_pool_no_pad = partial(F.avg_pool2d, kernel_size=3, stride=1, padding=1, count_include_pad=False)
_max_pool_same = partial(F.max_pool2d, kernel_size=3, stride=1, padding=1)


class FIDInceptionA(nn.Module):
    """Mixed_5b/c/d: 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avgpool->1x1."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_no_pad(x)),
        ], dim=1)


class InceptionB(nn.Module):
    """Mixed_6a (grid reduction 35 -> 17): 3x3/2 | 1x1->3x3->3x3/2 | maxpool/2."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], dim=1)


class FIDInceptionC(nn.Module):
    """Mixed_6b/c/d/e: 1x1 | factorised 7x7 | double factorised 7x7 | avgpool->1x1."""

    def __init__(self, c_in: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        row, col = {"kernel_size": (1, 7), "padding": (0, 3)}, {"kernel_size": (7, 1), "padding": (3, 0)}
        self.branch1x1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dbl = x
        for i in range(1, 6):
            dbl = getattr(self, f"branch7x7dbl_{i}")(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_avg_pool_no_pad(x)),
        ], dim=1)


class InceptionD(nn.Module):
    """Mixed_7a (grid reduction 17 -> 8): 1x1->3x3/2 | 1x1->1x7->7x1->3x3/2 | maxpool/2."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class FIDInceptionE(nn.Module):
    """Mixed_7b (`max_pool=False`, pytorch-fid's FIDInceptionE_1) and Mixed_7c (`max_pool=True`,
    FIDInceptionE_2): 1x1 | 1x1->(1x3, 3x1) | 1x1->3x3->(1x3, 3x1) | pool->1x1."""

    def __init__(self, c_in: int, max_pool: bool):
        super().__init__()
        row, col = {"kernel_size": (1, 3), "padding": (0, 1)}, {"kernel_size": (3, 1), "padding": (1, 0)}
        self.pool = _max_pool_same if max_pool else _avg_pool_no_pad
        self.branch1x1 = BasicConv2d(c_in, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, **row)
        self.branch3x3_2b = BasicConv2d(384, 384, **col)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, **row)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, **col)
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(self.pool(x)),
        ], dim=1)


class FIDInception(nn.Module):
    """pool3 features of the FID Inception; `forward(x)` takes images in [-1, 1] (the harness's range),
    `pool3(x)` images in [0, 1] (pytorch-fid's); both return (b, 2048)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.freeze()

    def freeze(self) -> FIDInception:
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> FIDInception:
        """Always eval: BatchNorm must use the file's running statistics, whatever the caller's mode."""
        return super().train(False)

    def pool3(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return rearrange(F.adaptive_avg_pool2d(x, 1), "b c 1 1 -> b c")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool3((x + 1) / 2)

    # -- weights ------------------------------------------------------------------------------

    def load_weights(self, path: str | os.PathLike) -> FIDInception:
        """Read pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or any state dict with its names)."""
        what = "FID Inception weights"
        if not path:
            raise WeightsNotFoundError(f"{what}: no path given (give the path of pytorch-fid's {INCEPTION_FILE})")
        file = find_weights(what, path, INCEPTION_FILE, hint=f" (give the path of pytorch-fid's {INCEPTION_FILE})")
        state = read_state_dict(what, file)
        # num_batches_tracked only counts training steps: the converted TF weights need not carry it.
        expected = {k: v for k, v in self.state_dict().items() if not k.endswith("num_batches_tracked")}
        check_keys(what, file, expected, state)
        self.load_state_dict({k: state[k] for k in expected}, strict=False)
        return self

    @classmethod
    def from_file(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> FIDInception:
        with torch.device("meta"):  # no random init that the weights overwrite anyway
            net = cls()
        net = net.to_empty(device="cpu")
        for m in net.modules():  # to_empty leaves the step counters as garbage
            if isinstance(m, nn.BatchNorm2d):
                m.num_batches_tracked.zero_()
        return net.load_weights(path).to(device).freeze()
