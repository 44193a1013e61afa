"""SSIM and PSNR (harness/metrics.py) against properties and an independent numpy SSIM."""

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from harness.metrics import psnr, ssim


def ssim_numpy(a: np.ndarray, b: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """Wang et al. SSIM of two `c h w` images in [0, 1]: explicit 2-d Gaussian windows, valid
    positions only, mean over channels and positions (written without the code under test)."""
    t = np.arange(size) - (size - 1) / 2
    g = np.exp(-(t**2) / (2 * sigma**2))
    win = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    maps = []
    for ac, bc in zip(a.astype(np.float64), b.astype(np.float64)):
        wa, wb = sliding_window_view(ac, (size, size)), sliding_window_view(bc, (size, size))
        mean = lambda v: (v * win).sum((-1, -2))  # noqa: E731
        mu_a, mu_b = mean(wa), mean(wb)
        var_a, var_b = mean(wa * wa) - mu_a**2, mean(wb * wb) - mu_b**2
        cov = mean(wa * wb) - mu_a * mu_b
        maps.append(((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)))
    return float(np.mean(maps))


def smooth_images(n=2, c=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, size // 4, size // 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def test_identical_images_have_ssim_one():
    x = smooth_images()
    assert torch.allclose(ssim(x, x), torch.tensor(1.0), atol=1e-6)
    assert torch.allclose(ssim(x, x, reduction="none"), torch.ones(2), atol=1e-6)


def test_constant_images_match_the_closed_form():
    # Constant images: zero variances, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) with a, b in [0, 1].
    a, b = 0.2, 0.7
    x = torch.full((1, 3, 16, 16), 2 * a - 1)
    y = torch.full((1, 3, 16, 16), 2 * b - 1)
    c1 = 0.01**2
    assert ssim(x, y).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)


def test_matches_numpy_reference():
    x = smooth_images(n=2, size=32, seed=1)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    y = (x + 0.2 * noise).clamp(-1, 1)
    per_image = ssim(x, y, reduction="none")
    for i in range(2):
        ref = ssim_numpy(((x[i] + 1) / 2).numpy(), ((y[i] + 1) / 2).numpy())
        assert per_image[i].item() == pytest.approx(ref, abs=1e-5)
        assert 0.05 < ref < 0.95  # a case where the numbers mean something
    assert ssim(x, y).item() == pytest.approx(per_image.mean().item(), abs=1e-7)


def test_small_images_use_a_smaller_window():
    x = smooth_images(n=1, size=8, seed=3)
    y = x.flip(-1)
    ref = ssim_numpy(((x[0] + 1) / 2).numpy(), ((y[0] + 1) / 2).numpy(), size=7)
    assert ssim(x, y).item() == pytest.approx(ref, abs=1e-5)


def test_ssim_decreases_with_noise_and_psnr_too():
    x = smooth_images(n=4, seed=4)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    levels = [0.02, 0.05, 0.1, 0.2, 0.4]
    s = [ssim(x, x + a * noise).item() for a in levels]
    p = [psnr(x, x + a * noise).item() for a in levels]
    assert all(s0 > s1 for s0, s1 in zip(s, s[1:])), s
    assert all(p0 > p1 for p0, p1 in zip(p, p[1:])), p
    assert s[0] > 0.9 and s[-1] < 0.5


def test_ssim_is_differentiable_and_ascent_improves_it():
    x = smooth_images(n=2, seed=6)
    y = (x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(7))).requires_grad_(True)
    opt = torch.optim.Adam([y], lr=0.02)
    start = ssim(x, y).item()
    for _ in range(30):
        opt.zero_grad()
        (1 - ssim(x, y)).backward()
        assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
        opt.step()
    assert ssim(x, y).item() > start + 0.2


def test_psnr_known_value():
    x = torch.zeros(2, 3, 8, 8)
    y = torch.full_like(x, 0.2)  # 0.1 apart in [0, 1] -> mse 0.01 -> 20 dB
    assert psnr(x, y).item() == pytest.approx(20.0, abs=1e-4)
    assert psnr(x, y, reduction="none").shape == (2,)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="b c h w"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(ValueError, match="reduction"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), reduction="sum")


def test_interpolation_ends_decode_with_their_own_condition():
    """A conditional model's interpolation: the last frame is image B decoded with B's class (it was
    decoded with A's); multi-hot labels are blended along the path."""
    import torch

    from harness.grids import interpolation_rows

    class Recorder:
        def encode(self, x, cond=None):
            return x

        def decode(self, z, cond=None):
            self.cond = cond
            return z

    model, x = Recorder(), torch.zeros(4, 1)
    interpolation_rows(model, x, torch.tensor([3, 7, 1, 2]), steps=5, rows=2)
    assert model.cond.tolist() == [3, 3, 7, 7, 7, 1, 1, 2, 2, 2]
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    interpolation_rows(model, x[:2], labels, steps=3, rows=1)
    assert model.cond.tolist() == [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
