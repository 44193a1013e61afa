"""Make tests/reference/fid_golden.safetensors with the `pytorch-fid` package itself (run once, by hand).

pytorch-fid needs torchvision, which does not import beside the project's CPU torch, so this runs in
a separate venv:

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 lpips pytorch-fid safetensors
    /tmp/refvenv/bin/python tests/reference/make_fid_golden.py

It builds pytorch-fid's `InceptionV3([3])` unchanged, except that the download inside
`fid_inception_v3()` is replaced by the deterministic recipe of tests/reference/recipe.py (filled
under the weight file's own names), runs four 64x64 images through it (resized to 299 inside) and
stores the images (uint8), their pool3 features and the recipe's checksum; and it records
`calculate_frechet_distance` (mean and `np.cov` as pytorch-fid's `calculate_activation_statistics`)
on the recipe's feature sets. tests/test_fid.py rebuilds the same network and compares.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import pytorch_fid.inception as pfi  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pytorch_fid.fid_score import calculate_frechet_distance  # noqa: E402
from recipe import SEED_INCEPTION, checksum, feature_sets, fill, shapes_of  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

OUT = HERE / "fid_golden.safetensors"
RECIPE: dict[str, torch.Tensor] = {}


def recipe_instead_of_download(url, *args, **kwargs):
    """Stands in for `load_state_dict_from_url` inside `fid_inception_v3()`: the caller's local
    `inception` (the FID network just built) gives the names and shapes, the recipe the values."""
    inception = sys._getframe(1).f_locals["inception"]
    state = inception.state_dict()
    RECIPE.update(fill(shapes_of(state), SEED_INCEPTION))
    return {k: RECIPE.get(k, v) for k, v in state.items()}  # num_batches_tracked stays as built


def images(g: torch.Generator, n: int, size: int = 64) -> torch.Tensor:
    low = torch.rand(n, 3, 6, 6, generator=g, dtype=torch.float64)
    x = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    x = x + 0.1 * torch.randn(n, 3, size, size, generator=g, dtype=torch.float64)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def main() -> None:
    torch.set_grad_enabled(False)
    pfi.load_state_dict_from_url = recipe_instead_of_download
    model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    assert RECIPE, "fid_inception_v3() did not ask for its weights"

    img = images(torch.Generator().manual_seed(7), 4)
    feats = model(img.float() / 255)[0]
    assert feats.shape == (4, 2048, 1, 1), feats.shape
    feats = feats.reshape(4, 2048)

    golden = {"images": img.contiguous(), "pool3": feats.contiguous()}
    for i, (a, b) in enumerate(feature_sets()):
        a, b = a.numpy(), b.numpy()
        mu1, s1 = np.mean(a, axis=0), np.cov(a, rowvar=False)
        mu2, s2 = np.mean(b, axis=0), np.cov(b, rowvar=False)
        golden[f"fd{i}"] = torch.tensor([calculate_frechet_distance(mu1, s1, mu2, s2)], dtype=torch.float64)
    meta = {
        "inception_checksum": checksum(RECIPE), "torch": torch.__version__,
        "pytorch_fid": importlib.metadata.version("pytorch-fid"), "made_by": "tests/reference/make_fid_golden.py",
    }
    save_file(golden, str(OUT), metadata=meta)
    print(f"{OUT}: {OUT.stat().st_size} bytes; pool3 mean {feats.mean():.4f} std {feats.std():.4f}; "
          f"fd {[golden[f'fd{i}'].item() for i in range(3)]}; {meta}")


if __name__ == "__main__":
    main()
