"""Tiny shard sets written directly with webdataset, for tests that must not depend on builders."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from shards.index import write_index


def image_bytes(seed: int, size: int = 48, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, 3)
    yy, xx = np.mgrid[:size, :size]
    arr = (base + 40 * np.sin(xx / (3 + seed % 5)) [..., None] + 30 * np.cos(yy / 4)[..., None]).clip(0, 255)
    img = Image.fromarray(arr.astype(np.uint8), "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def make_shards(out: str | Path, num_samples: int = 64, per_shard: int = 16, size: int = 48,
                num_classes: int = 4, label_names: list[str] = ()) -> Path:
    """`out/000000.tar ...` plus index.json; sample i has key `s{i:05d}` and cls i % num_classes."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for start in range(0, num_samples, per_shard):
        name = f"{len(shards):06d}.tar"
        count = min(per_shard, num_samples - start)
        with wds.TarWriter(str(out / name)) as w:
            for i in range(start, start + count):
                sample = {"__key__": f"s{i:05d}", "jpg": image_bytes(i, size), "cls": str(i % num_classes)}
                if label_names:
                    sample["json"] = json.dumps({"labels": [i % len(label_names)]})
                w.write(sample)
        shards.append({"name": name, "num_samples": count, "bytes": (out / name).stat().st_size})
    write_index(out, source={"kind": "test"}, shards=shards, classes=[f"c{i}" for i in range(num_classes)],
                label_names=list(label_names))
    return out
