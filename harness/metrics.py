"""Image quality metrics on `b c h w` images in [-1, 1]: PSNR and SSIM.

Both are differentiable (SSIM is also a loss term, `1 - ssim`) and computed in float32 whatever
the input dtype. `reduction="none"` gives one value per image (`b`), `"mean"` their mean.

SSIM follows Wang et al. (2004) as skimage / pytorch-msssim compute it with Gaussian weights:
images mapped to [0, 1] (data range 1), an 11-tap Gaussian window with sigma 1.5 applied per
channel with no padding ("valid": only windows that lie inside the image count),
C1 = (0.01)^2, C2 = (0.03)^2, the SSIM map averaged over channels and positions. Images smaller
than the window get the largest odd window that fits (same sigma).

Axis letters: b batch, c channels, h height, w width, k the five filtered quantities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, reduce

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _reduce(per_image: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_image.mean()
    if reduction == "none":
        return per_image
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def psnr(x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """PSNR in dB of images in [-1, 1] (data range 1 after mapping to [0, 1]); per image, then mean."""
    mse = reduce(((x.float() - y.float()) / 2).pow(2), "b c h w -> b", "mean").clamp_min(1e-10)
    return _reduce(10 * torch.log10(1.0 / mse), reduction)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, device=None) -> torch.Tensor:
    """A normalised 1-d Gaussian of `size` taps (float32)."""
    t = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    reduction: str = "mean",
    window: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
) -> torch.Tensor:
    """Structural similarity of `b c h w` images in [-1, 1]: 1 for identical images, lower is worse."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim needs two `b c h w` tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    h, w = x.shape[-2:]
    size = min(window, h, w)
    size -= 1 - size % 2  # odd, so the window has a centre
    x = (x.float() + 1) / 2
    y = (y.float() + 1) / 2

    # Variances are E[x^2] - E[x]^2, which cancels badly in float32 where an image is flat; the
    # moments are taken of images minus their mean (variances do not change), which keeps the
    # numbers small: flat images come out exact instead of off by up to ~1e-4.
    mx = reduce(x, "b c h w -> b c 1 1", "mean")
    my = reduce(y, "b c h w -> b c 1 1", "mean")
    x, y = x - mx, y - my

    # One grouped conv filters all five quantities of every channel at once; the 2-d Gaussian is
    # separable, so it is a (1 x size) pass followed by a (size x 1) pass.
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # b (k c) h w, k = 5
    g = gaussian_window(size, sigma, device=x.device)
    groups = stack.shape[1]
    stack = F.conv2d(stack, g.expand(groups, 1, 1, size), groups=groups)
    stack = F.conv2d(stack, g.expand(groups, 1, 1, size).transpose(-1, -2), groups=groups)
    mu_x, mu_y, xx, yy, xy = rearrange(stack, "b (k c) h w -> k b c h w", k=5)

    var_x = xx - mu_x**2
    var_y = yy - mu_y**2
    cov = xy - mu_x * mu_y
    mu_x, mu_y = mu_x + mx, mu_y + my
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return _reduce(reduce(ssim_map, "b c h w -> b", "mean"), reduction)
