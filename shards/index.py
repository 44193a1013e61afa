"""The index file every shard set carries: `<out>/index.json`.

This is a contract between the builders in `shards/` and the training pipeline in `harness/`:

    {
      "format": "vae-harness-shards/1",
      "source": {"kind": "demo" | "folder" | "imagenet" | "coco", "path": "...", ...},
      "num_samples": 1234,                       # total over all shards
      "shards": [{"name": "000000.tar", "num_samples": 100, "bytes": 123456}, ...],
      "classes": ["n01440764", ...],             # names for the `cls` index ([] = unlabelled)
      "label_names": ["person", ...],            # names for multi-hot `json.labels` ([] = none)
      "image_policy": "original" | "max_side=256,quality=90",
      "created": "2026-11-23T10:00:00Z",
      # optional, written by `python -m shards` builders:
      "num_bad": 3,                              # inputs skipped (listed in bad_files.txt)
      "class_counts": [1300, ...],               # samples per entry of `classes`
      "label_counts": [2693, ...],               # samples carrying each entry of `label_names`
      "class_descriptions": ["tench, Tinca tinca", ...]  # human-readable class names, when known
    }

Shards are `<out>/000000.tar, 000001.tar, ...`; a sample holds `__key__`, the image as
`jpg`/`jpeg`/`png`/`webp`, optional `cls` (decimal class index as text), optional `json`
(`labels`: multi-hot indices into `label_names`, captions, size, source id) and optional `txt`.
`labels` is the sparse form of a multi-hot vector: the sorted list of indices that are on
(`[0, 56]` = label_names[0] and label_names[56]); a reader builds the dense 0/1 vector of
length `len(label_names)` from it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from shards.atomic import write_atomic

INDEX_NAME = "index.json"
FORMAT = "vae-harness-shards/1"


def write_index(out: str | Path, *, source: dict, shards: list[dict], classes: list[str] = (),
                label_names: list[str] = (), image_policy: str = "original", **extra) -> dict:
    """Write `out/index.json` atomically (shards.atomic: a crash never leaves half an index) and return it.

    `extra` adds optional fields (see the module docstring); readers must ignore fields they do not know.
    """
    index = {
        "format": FORMAT,
        "source": source,
        "num_samples": sum(s["num_samples"] for s in shards),
        "shards": shards,
        "classes": list(classes),
        "label_names": list(label_names),
        "image_policy": image_policy,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }
    write_atomic(Path(out) / INDEX_NAME, json.dumps(index, indent=1))
    return index


def read_index(folder: str | Path) -> dict | None:
    """The index of a shard folder, or None when it has none.

    A malformed index (empty, not JSON, not our format) is a ValueError whose one-line message
    names the file.
    """
    path = Path(folder) / INDEX_NAME
    if not path.is_file():
        return None
    try:
        text = path.read_text()
        if not text.strip():
            raise ValueError(f"{path}: empty file (a write cut short?)")
        index = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({' '.join(str(e).split())})") from None
    except RecursionError:  # '[' * 100000: nested past what the parser can hold
        raise ValueError(f"{path}: not a {FORMAT} index (JSON nested too deep to read)") from None
    if not isinstance(index, dict):
        raise ValueError(f"{path}: not a {FORMAT} index (a JSON {type(index).__name__}, not an object)")
    if index.get("format") != FORMAT or not isinstance(index.get("shards"), list):
        raise ValueError(f"{path}: not a {FORMAT} index (format={index.get('format')!r})")
    _check_fields(index, path)
    return index


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _name(value) -> bool:
    return isinstance(value, str)


def _check_fields(index: dict, path: Path) -> None:
    """The types the readers rely on (counts are non-negative integers, names are strings): a
    hand-edited or foreign index is refused here in one line naming the file and the field, not met
    later as a TypeError in training or a count blamed on data.epoch_samples."""

    def bad(field: str, value, want: str):
        text = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        got = text if isinstance(value, int) and not isinstance(value, bool) else f"{text} ({type(value).__name__})"
        raise ValueError(f"{path}: field {field!r} must be {want}, got {got}")

    if not _count(index.get("num_samples")):
        bad("num_samples", index.get("num_samples"), "a non-negative integer")
    for i, shard in enumerate(index["shards"]):
        if not isinstance(shard, dict):
            bad(f"shards[{i}]", shard, "an object with name and num_samples")
        name = shard.get("name")
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
            bad(f"shards[{i}].name", name, "the name of a file in the index's folder")
        if not _count(shard.get("num_samples")):
            bad(f"shards[{i}].num_samples", shard.get("num_samples"), "a non-negative integer")
        if "bytes" in shard and not _count(shard["bytes"]):
            bad(f"shards[{i}].bytes", shard["bytes"], "a non-negative integer")
    names = [s["name"] for s in index["shards"]]
    if len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"{path}: field 'shards' names {twice!r} twice (its samples would be read twice)")
    total = sum(s["num_samples"] for s in index["shards"])
    if index["num_samples"] != total:
        raise ValueError(f"{path}: field 'num_samples' is {index['num_samples']}, but its shards' num_samples add "
                         f"up to {total} (an index edited by hand?)")
    for field, ok, want in [("classes", _name, "a string"), ("label_names", _name, "a string"),
                            ("class_descriptions", _name, "a string"),
                            ("class_counts", _count, "a non-negative integer"),
                            ("label_counts", _count, "a non-negative integer")]:
        value = index.get(field, [])
        if not isinstance(value, list):
            bad(field, value, f"a list (of {want.partition(' ')[2]}s)")
        for j, v in enumerate(value):
            if not ok(v):
                bad(f"{field}[{j}]", v, want)
    if "num_bad" in index and not _count(index["num_bad"]):
        bad("num_bad", index["num_bad"], "a non-negative integer")
