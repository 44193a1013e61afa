"""`inspect` (what is in a shard set, at a glance) and `verify` (read and check every sample).

Both take a shard folder (ours with index.json, or img2dataset output) or anything else
`data.train` accepts (a brace pattern, a list file). Shards are read with `tarfile` and grouped
into samples exactly as webdataset does it: members with the same name up to the first dot of the
base name form one sample, extensions lower-cased. `verify` decodes every sample with the training
loader's own `shards.decode.decode_sample` (same boundary, same reasons), so it fails on everything
the loader would skip.
"""

from __future__ import annotations

import io
import os
import random
import re
import statistics
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from shards.build import worker_pool
from shards.decode import MAX_PIXELS, BadData, BadSample, DecodeSpec, guarded, is_data_error, one_line
from shards.index import read_index
from shards.sources import resolve_sources

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def iter_samples(url: str):
    """Samples of one tar as dicts {"__key__": ..., ext: bytes}. Raises tarfile/OSError/BadData on a broken tar.

    Unlike a plain tarfile loop (and webdataset, which stops quietly at a cut), a shard that ends
    without tar's end-of-archive blocks is reported as truncated.
    """
    current: dict | None = None
    with open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tf:
        for m in tf:
            if not m.isfile():
                continue
            match = _KEY_RE.match(m.name)
            if not match:
                continue
            key, ext = match.group(1), match.group(2).lower()
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            current[ext] = tf.extractfile(m).read()
        end = tf.offset
        if url.endswith(".tar"):
            f.seek(end)
            tail = f.read(1024)
            if len(tail) < 1024 or tail.strip(b"\0"):
                raise BadData(f"truncated: no end-of-archive marker after byte {end}")
    if current is not None:
        yield current


def _image_of(sample: dict) -> tuple[str, bytes] | tuple[None, None]:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext, sample[ext]
    return None, None


def _label_names(index: dict | None, sources) -> tuple[list[str], list[str]]:
    if index is not None:
        return index.get("classes", []), index.get("label_names", [])
    return sources[0].classes, sources[0].label_names


def _load(target: str):
    """(urls, expected per-url counts or None, index or None, sources) for a target."""
    sources = resolve_sources(target, require_count=False)
    index = read_index(target) if os.path.isdir(target) else None
    urls = [u for s in sources for u in s.urls]
    expected = None
    if index is not None:
        expected = {str(Path(target) / s["name"]): s["num_samples"] for s in index["shards"]}
    return urls, expected, index, sources


# ----------------------------------------------------------------------------------------------
# verify


VERIFY_SIZE = 32  # decode size: whether a sample decodes does not depend on it, the time does


def _verify_shard(job) -> dict:
    """Every sample of one shard through the training loader's own decoder (shards/decode.py):
    what it would skip is a problem here, with the same reason; plus what only a check can see."""
    url, n_classes, n_labels, strict, max_pixels = job
    res = {"url": url, "n": 0, "cls": Counter(), "labels": Counter(), "bad": [], "keys": [], "not_rgb": 0}
    name = os.path.basename(url)
    spec = DecodeSpec(VERIFY_SIZE, num_classes=n_classes, need_cls=n_classes > 0, num_labels=n_labels,
                      max_pixels=max_pixels)
    try:
        for sample in iter_samples(url):
            key = sample["__key__"]
            res["n"] += 1
            res["keys"].append(key)
            out = guarded(sample, spec, random.Random(0))
            if isinstance(out, BadSample):
                res["bad"].append(f"{name} {key}: {out.reason}")
                continue
            if out["cls"] >= 0:
                res["cls"][out["cls"]] += 1
            if "labels" in out:
                res["labels"].update(int(j) for j in np.flatnonzero(out["labels"]))
            ext, data = _image_of(sample)
            with Image.open(io.BytesIO(data)) as im:  # decoded above: only the header is read here
                if im.mode != "RGB":
                    res["not_rgb"] += 1
                    if strict:
                        res["bad"].append(f"{name} {key}: image mode {im.mode}, not RGB")
            if "txt" in sample and not _is_utf8(sample["txt"]):
                res["bad"].append(f"{name} {key}: txt is not UTF-8")
    except Exception as e:  # the loader's boundary: what the data does wrong is a finding, a bug raises
        if not is_data_error(e):
            raise
        res["bad"].append(f"{name}: broken tar after {res['n']} samples: {one_line(e)}")
    return res


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _columns(pairs: list[str], width: int = 100) -> str:
    lines, line = [], "  "
    for p in pairs:
        if len(line) + len(p) + 2 > width and line.strip():
            lines.append(line.rstrip())
            line = "  "
        line += p + "  "
    if line.strip():
        lines.append(line.rstrip())
    return "\n".join(lines)


def _one_thread() -> None:
    """A verify worker resizes on one thread, as a loader worker does (there is a process per core)."""
    import torch

    torch.set_num_threads(1)


def verify(target: str, workers: int = 1, max_listed: int = 50, out=None, max_pixels: int = MAX_PIXELS) -> int:
    """Read every sample; print counts and problems. Returns the number of problems (0 = all good).
    max_pixels: as the loader's data.max_pixels (0 = no limit)."""
    out = out or sys.stdout
    urls, expected, index, sources = _load(target)
    classes, label_names = _label_names(index, sources)
    jobs = [(u, len(classes), len(label_names), index is not None, max_pixels) for u in urls]
    if workers > 1 and len(jobs) > 1:
        import torch  # noqa: F401  (the decoder resizes with it: imported once here, shared by the forked workers)

        with worker_pool(min(workers, len(jobs)), _one_thread) as pool:
            results = pool.map(_verify_shard, jobs, chunksize=1)
    else:
        results = [_verify_shard(j) for j in jobs]

    bad: list[str] = []
    total, cls_counts, label_counts, not_rgb = 0, Counter(), Counter(), 0
    seen: set[str] = set()
    for r in results:
        total += r["n"]
        cls_counts.update(r["cls"])
        label_counts.update(r["labels"])
        not_rgb += r["not_rgb"]
        bad += r["bad"]
        name = os.path.basename(r["url"])
        for k in r["keys"]:
            if k in seen:
                bad.append(f"{name} {k}: key appears more than once in the set")
            seen.add(k)
        if expected is not None and expected.get(r["url"]) != r["n"]:
            bad.append(f"{name}: {r['n']} samples, index says {expected.get(r['url'])}")
    want = sum(s.num_samples for s in sources) if all(s.num_samples is not None for s in sources) else None
    if index is not None:
        if index.get("class_counts") and index["class_counts"] != [cls_counts.get(i, 0) for i in range(len(classes))]:
            bad.append("per-class counts differ from the index's class_counts")
        counted = [label_counts.get(i, 0) for i in range(len(label_names))]
        if index.get("label_counts") and index["label_counts"] != counted:
            bad.append("per-label counts differ from the index's label_counts")
    if want is not None and want != total:
        bad.append(f"{total} samples read, {want} expected ({sources[0].count_from or 'given'})")

    print(f"{target}: {len(urls)} shards, {total} samples read"
          + (f" ({want} expected)" if want is not None else " (no count to compare with)"), file=out)
    if cls_counts:
        names = classes or [str(i) for i in range(max(cls_counts) + 1)]
        print(f"per class ({len(names)}):", file=out)
        print(_columns([f"{n}:{cls_counts.get(i, 0)}" for i, n in enumerate(names)]), file=out)
        empty = [n for i, n in enumerate(names) if not cls_counts.get(i)]
        if empty:
            print(f"classes without samples: {len(empty)} (first: {empty[0]})", file=out)
    if label_counts:
        print(f"per label ({len(label_names)}):", file=out)
        print(_columns([f"{n}:{label_counts.get(i, 0)}" for i, n in enumerate(label_names)]), file=out)
    if not_rgb and index is None:
        print(f"note: {not_rgb} images are not RGB (the training pipeline converts them)", file=out)
    if bad:
        print(f"bad: {len(bad)} problem(s)" + (f", first {max_listed}:" if len(bad) > max_listed else ":"), file=out)
        for b in bad[:max_listed]:
            print(f"  {b}", file=out)
        print("FAILED", file=out)
    else:
        print("OK: every sample decodes and its labels agree with the index", file=out)
    return len(bad)


# ----------------------------------------------------------------------------------------------
# inspect


def inspect(target: str, num_samples: int = 3, size_samples: int = 200, out=None) -> None:
    out = out or sys.stdout
    urls, expected, index, sources = _load(target)
    classes, label_names = _label_names(index, sources)
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"{target}")
    if index is not None:
        src = index.get("source", {})
        p(f"  made by:      python -m shards {src.get('kind', '?')}"
          + (f" from {src['path']}" if src.get("path") else "") + f" ({index.get('created', '?')})")
        p(f"  samples:      {index['num_samples']} in {len(index['shards'])} shards "
          f"({sum(s.get('bytes', 0) for s in index['shards']) / 1e6:.1f} MB)")
        p(f"  images:       {index.get('image_policy', '?')}; bad inputs skipped: {index.get('num_bad', '?')}")
    else:
        counts = [s.num_samples for s in sources]
        how = sources[0].count_from or "unknown"
        total = sum(counts) if all(c is not None for c in counts) else "unknown"
        p(f"  samples:      {total} in {len(urls)} shards (count from: {how}; no index.json)")
    if classes:
        shown = ", ".join(classes[:8]) + (", ..." if len(classes) > 8 else "")
        p(f"  classes:      {len(classes)}: {shown}")
        if index is not None and index.get("class_counts"):
            cc = index["class_counts"]
            p(f"  per class:    min {min(cc)}, max {max(cc)}")
    else:
        p("  classes:      none (no cls)")
    if label_names:
        shown = ", ".join(label_names[:8]) + (", ..." if len(label_names) > 8 else "")
        p(f"  label_names:  {len(label_names)}: {shown}")
    if not urls:
        return
    widths, heights, fields, n = [], [], Counter(), 0
    try:
        for sample in iter_samples(urls[0]):
            n += 1
            fields.update(k for k in sample if k != "__key__")
            ext, data = _image_of(sample)
            if ext is not None:
                try:
                    with Image.open(io.BytesIO(data)) as im:
                        w, h, mode = *im.size, im.mode
                    widths.append(w)
                    heights.append(h)
                except Exception:
                    w = h = mode = "?"
            if n <= num_samples:
                p(f"  sample {sample['__key__']}:")
                for k in sorted(sample):
                    if k == "__key__":
                        continue
                    v = sample[k]
                    if k == ext:
                        p(f"    {k:5s} {len(v)} bytes, {w}x{h} {mode}")
                    elif k == "cls":
                        c = v.decode(errors="replace").strip()
                        name = classes[int(c)] if classes and c.isdigit() and int(c) < len(classes) else ""
                        p(f"    cls   {c}" + (f" ({name})" if name else ""))
                    else:
                        text = v.decode(errors="replace")
                        p(f"    {k:5s} {text[:160]}" + ("..." if len(text) > 160 else ""))
            if n >= size_samples:
                break
    except Exception as e:  # verify's boundary: the data's fault is a finding, a bug of ours raises
        if not is_data_error(e):
            raise
        p(f"  {os.path.basename(urls[0])}: broken tar after {n} samples ({one_line(e)})")
    if widths:
        p(f"  image sizes:  over the first {len(widths)} samples of {os.path.basename(urls[0])}: width "
          f"{min(widths)}..{max(widths)} (median {statistics.median(widths):.0f}), height "
          f"{min(heights)}..{max(heights)} (median {statistics.median(heights):.0f})")
        p(f"  fields:       {', '.join(f'{k} ({c})' for k, c in sorted(fields.items()))}")
