"""Resolve what `data.train` / `data.val` name into concrete shard lists with sample counts.

A source is a brace pattern (`dir/{000000..000009}.tar`), a folder of shards, or a list of those.
Counts and class names come from the folder's `index.json` (written by `python -m shards`).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand

from shards.index import read_index


class DataSourceError(ValueError):
    """A user error in the data sources: one line naming the source and the problem."""


@dataclass
class ShardSource:
    urls: list[str]
    num_samples: int | None  # None = unknown (no index); the caller needs data.num_samples then
    weight: float = 1.0
    classes: list[str] = field(default_factory=list)
    label_names: list[str] = field(default_factory=list)
    spec: str = ""


def _from_folder(folder: Path, spec: str) -> ShardSource:
    index = read_index(folder)
    if index is not None:
        urls = [str(folder / s["name"]) for s in index["shards"]]
        return ShardSource(urls, index["num_samples"], classes=index.get("classes", []),
                           label_names=index.get("label_names", []), spec=spec)
    urls = sorted(glob.glob(str(folder / "*.tar")))
    if not urls:
        raise DataSourceError(f"{spec}: folder holds no .tar shards")
    return ShardSource(urls, None, spec=spec)


def _from_pattern(pattern: str) -> ShardSource:
    urls = list(braceexpand.braceexpand(pattern))
    missing = [u for u in urls if "://" not in u and not os.path.exists(u)]
    if missing:
        raise DataSourceError(f"{pattern}: {len(missing)} of {len(urls)} shards do not exist (first: {missing[0]})")
    # A pattern inside a folder with an index takes its counts for the shards it names.
    folder = Path(urls[0]).parent
    index = read_index(folder) if "://" not in urls[0] else None
    num, classes, labels = None, [], []
    if index is not None:
        counts = {str(folder / s["name"]): s["num_samples"] for s in index["shards"]}
        if all(u in counts for u in urls):
            num = sum(counts[u] for u in urls)
        classes, labels = index.get("classes", []), index.get("label_names", [])
    return ShardSource(urls, num, classes=classes, label_names=labels, spec=pattern)


def resolve_sources(spec: str | list[str]) -> list[ShardSource]:
    """Turn `data.train`-style input into sources; raises DataSourceError on anything missing."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    sources = []
    for s in specs:
        if not s:
            continue
        path = Path(s)
        if path.is_dir():
            sources.append(_from_folder(path, s))
        elif "{" in s or "://" in s or s.endswith(".tar"):
            sources.append(_from_pattern(s))
        else:
            raise DataSourceError(f"{s}: not a folder of shards or a .tar pattern (does it exist?)")
    if not sources:
        raise DataSourceError("no data sources given")
    return sources
