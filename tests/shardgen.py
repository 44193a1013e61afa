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


def _write_shards(out: Path, num_samples: int, per_shard: int, sample) -> list[dict]:
    """`out/000000.tar ...` holding sample(0), sample(1), ...; the index entries of the shards."""
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for start in range(0, num_samples, per_shard):
        name = f"{len(shards):06d}.tar"
        count = min(per_shard, num_samples - start)
        with wds.TarWriter(str(out / name)) as w:
            for i in range(start, start + count):
                w.write(sample(i))
        shards.append({"name": name, "num_samples": count, "bytes": (out / name).stat().st_size})
    return shards


def make_shards(out: str | Path, num_samples: int = 64, per_shard: int = 16, size: int = 48,
                num_classes: int = 4, label_names: list[str] = ()) -> Path:
    """`out/000000.tar ...` plus index.json; sample i has key `s{i:05d}` and cls i % num_classes."""
    def sample(i: int) -> dict:
        s = {"__key__": f"s{i:05d}", "jpg": image_bytes(i, size), "cls": str(i % num_classes)}
        if label_names:
            s["json"] = json.dumps({"labels": [i % len(label_names)]})
        return s

    out = Path(out)
    shards = _write_shards(out, num_samples, per_shard, sample)
    write_index(out, source={"kind": "test"}, shards=shards, classes=[f"c{i}" for i in range(num_classes)],
                label_names=list(label_names))
    return out


def rename_classes(shards: Path, classes: list[str]) -> None:
    """Give the shards' index.json other class names (the same samples, their cls meaning other classes)."""
    index = json.loads((shards / "index.json").read_text())
    (shards / "index.json").write_text(json.dumps({**index, "classes": classes}))


def colour_image(cls: int, seed: int, size: int = 32) -> np.ndarray:
    """An easy class: the dominant colour (red, green, blue, ...) under random texture and a bar."""
    rng = np.random.default_rng([cls, seed])
    base = np.full(3, 50.0)
    base[cls % 3] = 200.0
    if cls >= 3:  # classes 3.. mix two channels (yellow, cyan, magenta)
        base[(cls + 1) % 3] = 200.0
    arr = base + rng.normal(0, 25, (size, size, 3))
    y0 = int(rng.integers(0, size - 6))
    arr[y0:y0 + 5, :, :] = rng.uniform(0, 255, 3)  # a bar of a random colour at a random height
    return arr.clip(0, 255).astype(np.uint8)


def make_colour_shards(out: str | Path, num_samples: int = 96, per_shard: int = 24, size: int = 32,
                       num_classes: int = 3) -> Path:
    """Shards whose `cls` is easy to learn (the dominant colour): for perception-network tests."""
    def sample(i: int) -> dict:
        buf = io.BytesIO()
        Image.fromarray(colour_image(i % num_classes, i, size)).save(buf, format="PNG")
        return {"__key__": f"c{i:05d}", "png": buf.getvalue(), "cls": str(i % num_classes)}

    out = Path(out)
    shards = _write_shards(out, num_samples, per_shard, sample)
    names = ["red", "green", "blue", "yellow", "cyan", "magenta"]
    write_index(out, source={"kind": "test"}, shards=shards, classes=names[:num_classes])
    return out


def forged_tar_header(name: bytes, size_field: bytes) -> bytes:
    """A ustar header with a valid checksum around any size field (what a forger would write)."""
    h = bytearray(512)
    h[0:len(name)] = name
    h[100:108] = b"0000644\0"
    h[124:136] = size_field
    h[156:157] = b"0"
    h[257:263] = b"ustar\0"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)
