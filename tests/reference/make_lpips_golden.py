"""Make tests/reference/lpips_golden.safetensors with the `lpips` package itself (run once, by hand).

The lpips package needs torchvision, which does not import beside the project's CPU torch, so this
runs in a separate venv:

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 lpips pytorch-fid safetensors
    /tmp/refvenv/bin/python tests/reference/make_lpips_golden.py

It builds `lpips.LPIPS(net='vgg', pnet_rand=True)` (nothing downloaded), overwrites every VGG16 tensor
and the five linear heads with the deterministic recipe of tests/reference/recipe.py (under
torchvision's names: LPIPS's `net.sliceK.N` is `features.N`), runs three image pairs through it and
stores the inputs (uint8), the linear heads, the distances (total and per layer) and the recipe's
checksum. tests/test_lpips.py rebuilds the same backbone and compares.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import lpips  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from recipe import SEED_LIN, SEED_VGG, checksum, fill, shapes_of  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

OUT = HERE / "lpips_golden.safetensors"


def torchvision_names(net: lpips.LPIPS) -> dict[str, torch.Tensor]:
    """The backbone's parameters under torchvision's `features.N` names (LPIPS keeps each layer's
    original index N inside its slices)."""
    out = {}
    for k in range(1, 6):
        for idx, module in getattr(net.net, f"slice{k}")._modules.items():
            for pname, p in module.named_parameters(recurse=False):
                out[f"features.{idx}.{pname}"] = p
    return out


def images(g: torch.Generator, n: int, size: int = 64) -> torch.Tensor:
    """Smooth random colour fields with some texture, uint8 (n, 3, size, size)."""
    low = torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)
    x = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    x = x + 0.3 * torch.randn(n, 3, size, size, generator=g, dtype=torch.float64)
    return ((x.clamp(-2, 2) + 2) / 4 * 255).round().to(torch.uint8)


def main() -> None:
    torch.set_grad_enabled(False)
    net = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    backbone = torchvision_names(net)
    assert sorted(backbone) == sorted(f"features.{i}.{p}" for i in range(29) if i in
                                      (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28) for p in ("weight", "bias"))
    vgg = fill(shapes_of(backbone), SEED_VGG)
    for name, p in backbone.items():
        p.copy_(vgg[name])
    lin_names = {f"lin{i}.model.1.weight": net.lins[i].model[1].weight for i in range(5)}
    lin = fill(shapes_of(lin_names), SEED_LIN)
    for name, p in lin_names.items():
        p.copy_(lin[name])

    g = torch.Generator().manual_seed(5)
    img0 = images(g, 3)
    # pair 0: mild noise, pair 1: a stronger change, pair 2: an unrelated image
    noise = torch.randn(3, 3, 64, 64, generator=g, dtype=torch.float64)
    img1 = torch.stack([
        (img0[0].double() + 6 * noise[0]).clamp(0, 255).round().to(torch.uint8),
        (img0[1].double() * 0.7 + 30 * noise[1]).clamp(0, 255).round().to(torch.uint8),
        images(g, 1)[0],
    ])
    x0, x1 = img0.float() / 127.5 - 1, img1.float() / 127.5 - 1
    total, per_layer = net(x0, x1, retPerLayer=True)
    golden = {
        "img0": img0.contiguous(), "img1": img1.contiguous(),
        "distance": total.reshape(-1).contiguous(),
        "per_layer": torch.stack([r.reshape(-1) for r in per_layer]).contiguous(),
        **{k: v.contiguous() for k, v in lin.items()},
    }
    meta = {
        "vgg_checksum": checksum(vgg), "lin_checksum": checksum(lin),
        "torch": torch.__version__, "lpips": importlib.metadata.version("lpips"),
        "made_by": "tests/reference/make_lpips_golden.py",
    }
    save_file(golden, str(OUT), metadata=meta)
    print(f"{OUT}: {OUT.stat().st_size} bytes; distances {total.reshape(-1).tolist()}; {meta}")


if __name__ == "__main__":
    main()
