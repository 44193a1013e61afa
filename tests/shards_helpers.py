"""Tiny generated inputs for the shard builder tests (no test reads /work/shared/data)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from shards.check import iter_samples
from shards.index import read_index

ROOT = Path(__file__).resolve().parents[1]


def picture(w: int = 48, h: int = 32, seed: int = 0) -> Image.Image:
    """A small RGB picture with structure (so JPEG sizes and decodes are realistic)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 256, 3)
    a = (base + np.stack([xx * 3, yy * 5, (xx + yy) * 2], -1)) % 256
    return Image.fromarray(a.astype(np.uint8), "RGB")


def save(im: Image.Image, path: Path, fmt: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt, **kw)
    return path


def jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def read_set(out: Path) -> dict[str, dict]:
    """key -> sample (fields as bytes) over the shards the index lists, in order."""
    index = read_index(out)
    assert index is not None, f"{out} has no index.json"
    samples = {}
    for s in index["shards"]:
        n = 0
        for sample in iter_samples(str(out / s["name"])):
            assert sample["__key__"] not in samples
            samples[sample["__key__"]] = sample
            n += 1
        assert n == s["num_samples"]
    assert len(samples) == index["num_samples"]
    return samples


def decode(sample: dict) -> Image.Image:
    ext = next(e for e in ("jpg", "png", "webp") if e in sample)
    im = Image.open(io.BytesIO(sample[ext]))
    im.load()
    return im


def meta(sample: dict) -> dict:
    return json.loads(sample["json"])


def run_cli(*args, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m shards ARGS` in a fresh process, with this checkout first on the path."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "shards", *map(str, args)], capture_output=True, text=True,
                          env=e, timeout=timeout, cwd=str(ROOT))


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def index_without_time(out: Path) -> dict:
    index = read_index(out)
    index.pop("created")
    return index
