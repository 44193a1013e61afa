"""Resolve what `data.train` / `data.val` name into concrete shard lists with sample counts.

`data.train` is a string or a list of strings; each string is one *item*:

    runs/shards/imagenet-train           a folder of shards: made by `python -m shards` (index.json)
                                         or by img2dataset ({00000..N}.tar + *_stats.json)
    data/{000000..000099}.tar            a brace pattern of shards
    data/000003.tar                      one shard
    pipe:curl -s https://host/{0..9}.tar remote shards (webdataset URL syntax; count from num_samples)
    sets.txt                             a list file: one item per line (blank lines and # comments
                                         skipped, relative paths taken from the list file's folder)
    ITEM::0.7                            any of the above with a sampling weight (default 1)

Every item is one `ShardSource`, except that the unweighted lines of a list file are pooled into a
single source (their shards together, counts summed); its weighted lines stay separate sources.
A list file's own weight multiplies the weights of its lines.

Sample counts come from, in order: the folder's `index.json`; img2dataset's per-shard
`<shard>_stats.json` (`successes`); the `num_samples` passed in (`data.num_samples`), which is
shared over the sources that have no count in proportion to their number of shards. Sources
whose class names (or multi-hot label names) disagree cannot be mixed: their labels would mean
different things; a brace pattern over several folders is held to that as a list of them is. For a
model that reads them (`needs`), every source must name them: an unnamed one would give nothing
but bad samples. Weights, a list file's times its lines', must stay finite and above 0, and so
must their total (the mixer draws from it).
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand

from shards.index import read_index


class DataSourceError(ValueError):
    """A user error in the data sources: one line naming the source and the problem."""


@dataclass
class ShardSource:
    urls: list[str]
    num_samples: int | None  # None = unknown (only when resolve_sources(require_count=False))
    weight: float = 1.0  # relative sampling weight among the sources of one data.train
    classes: list[str] = field(default_factory=list)  # names for `cls` ([] = unlabelled)
    label_names: list[str] = field(default_factory=list)  # names for multi-hot `json.labels` ([] = none)
    spec: str = ""  # the item this came from, for messages
    count_from: str = ""  # "index" | "stats" | "num_samples" | "" (unknown)


_WEIGHT_RE = re.compile(r"^(.*)::\s*([^:]+)$")
_REMOTE_RE = re.compile(r"^(pipe:|[a-z][a-z0-9+.-]*://)")
_MAX_LIST_DEPTH = 8


def _is_remote(url: str) -> bool:
    return bool(_REMOTE_RE.match(url))


def weighted_items(spec: str | list[str]) -> list[str]:
    """The items of `spec` given a weight other than 1 (`ITEM::w`), read from the text alone."""
    out = []
    for item in [spec] if isinstance(spec, str) else spec:
        try:
            _, w = _split_weight((item or "").strip())
        except DataSourceError:  # a weight that is no number is still a weight
            w = math.nan
        if w is not None and w != 1.0:
            out.append(item)
    return out


def _split_weight(item: str) -> tuple[str, float | None]:
    m = _WEIGHT_RE.match(item)
    if not m:
        return item, None
    try:
        w = float(m.group(2))
    except ValueError:
        raise DataSourceError(f"{item}: weight after '::' must be a number, got {m.group(2)!r}") from None
    if not (w > 0 and math.isfinite(w)):
        raise DataSourceError(f"{item}: weight must be a positive number, got {m.group(2)!r}")
    return m.group(1).strip(), w


# ----------------------------------------------------------------------------------------------
# counts from files next to the shards


def _stats_count(url: str) -> int | None:
    """`successes` from img2dataset's `<shard>_stats.json` next to a local shard, or None."""
    if _is_remote(url):
        return None
    stats = url[: -len(".tar")] + "_stats.json" if url.endswith(".tar") else None
    if stats is None or not os.path.isfile(stats):
        return None
    try:
        with open(stats) as f:
            value = json.load(f).get("successes")
    except (OSError, json.JSONDecodeError, AttributeError):
        raise DataSourceError(f"{stats}: unreadable img2dataset stats file") from None
    if not isinstance(value, int) or value < 0:
        raise DataSourceError(f"{stats}: no valid 'successes' count")
    return value


def _stats_total(urls: list[str]) -> int | None:
    counts = [_stats_count(u) for u in urls]
    return None if any(c is None for c in counts) else sum(counts)


def _read_index(folder: Path, spec: str) -> dict | None:
    try:
        return read_index(folder)
    except ValueError as e:
        raise DataSourceError(f"{spec}: {e}") from None


def _unfinished(folder: Path) -> bool:
    return (folder / ".progress.json").is_file() or bool(glob.glob(glob.escape(str(folder)) + "/*.tar.tmp"))


# ----------------------------------------------------------------------------------------------
# one item -> one source


def _from_folder(folder: Path, spec: str) -> ShardSource:
    index = _read_index(folder, spec)
    if index is not None:
        urls = [str(folder / s["name"]) for s in index["shards"]]
        missing = [u for u in urls if not os.path.isfile(u)]
        if missing:
            raise DataSourceError(f"{spec}: index.json names {len(missing)} shards that do not exist "
                                  f"(first: {missing[0]})")
        return ShardSource(urls, index["num_samples"], classes=index.get("classes", []),
                           label_names=index.get("label_names", []), spec=spec, count_from="index")
    urls = sorted(glob.glob(glob.escape(str(folder)) + "/*.tar"))
    if _unfinished(folder):
        raise DataSourceError(f"{spec}: shard build not finished (no index.json yet); re-run the same "
                              "`python -m shards` command to complete it")
    if not urls:
        raise DataSourceError(f"{spec}: folder holds no .tar shards")
    count = _stats_total(urls)
    return ShardSource(urls, count, spec=spec, count_from="stats" if count is not None else "")


MAX_PATTERN_SHARDS = 2_000_000  # LAION-5B is 500,000 shards of 10,000; a range past this is a typo
_INT_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?\}")


def _pattern_bound(pattern: str) -> int:
    """At least as many names as `pattern` expands to: the product of its numeric ranges' lengths. Counted
    from the text, since braceexpand holds a whole range in memory before it yields the first name
    ({000000..99999999}: 100 million strings, gigabytes and minutes)."""
    bound = 1
    for a, b, step in _INT_RANGE.findall(pattern):
        bound *= abs(int(b) - int(a)) // max(1, abs(int(step or 1))) + 1
    return bound


def _from_pattern(pattern: str, spec: str, names: bool = True, needs: str | None = None) -> ShardSource:
    if _pattern_bound(pattern) > MAX_PATTERN_SHARDS:
        raise DataSourceError(f"{spec}: names more than {MAX_PATTERN_SHARDS:,} shards (a range with a digit too "
                              "many?); a folder of shards or a list file holds any number")
    urls = list(braceexpand.braceexpand(pattern))
    if any(_is_remote(u) for u in urls):
        return ShardSource(urls, None, spec=spec)
    missing = [u for u in urls if not os.path.exists(u)]
    if missing:
        raise DataSourceError(f"{spec}: {len(missing)} of {len(urls)} shards do not exist (first: {missing[0]})")
    # Each folder's index gives the counts and names of the shards the pattern names in it. A pattern over
    # several folders ({cats,dogs}/000000.tar) is a list of them: their names are checked as a list's are.
    folders: dict[Path, list[str]] = {}
    for u in urls:
        folders.setdefault(Path(u).parent, []).append(u)
    if len(folders) == 1:
        return _in_folder(*folders.popitem(), spec)
    parts = [_in_folder(folder, part, f"{spec} [{folder}]") for folder, part in folders.items()]
    merged = _merge(parts, spec, 1.0, names, needs)
    merged.urls = urls  # in the pattern's own order
    return merged


def _in_folder(folder: Path, urls: list[str], spec: str) -> ShardSource:
    """Shards `urls` of one `folder`: counts and names from its index where it has one."""
    index = _read_index(folder, spec)
    if index is not None:
        counts = {str(folder / s["name"]): s["num_samples"] for s in index["shards"]}
        if all(u in counts for u in urls):
            return ShardSource(urls, sum(counts[u] for u in urls), classes=index.get("classes", []),
                               label_names=index.get("label_names", []), spec=spec, count_from="index")
    count = _stats_total(urls)
    classes = index.get("classes", []) if index else []
    labels = index.get("label_names", []) if index else []
    return ShardSource(urls, count, classes=classes, label_names=labels, spec=spec,
                       count_from="stats" if count is not None else "")


def _merge(sources: list[ShardSource], spec: str, weight: float, names: bool = True,
           needs: str | None = None) -> ShardSource:
    _check_names(sources, names, needs)
    counts = [s.num_samples for s in sources]
    known = all(c is not None for c in counts)
    return ShardSource([u for s in sources for u in s.urls], sum(counts) if known else None, weight=weight,
                       classes=next((s.classes for s in sources if s.classes), []),
                       label_names=next((s.label_names for s in sources if s.label_names), []), spec=spec,
                       count_from="+".join(sorted({s.count_from for s in sources})) if known else "")


def _from_list_file(path: Path, spec: str, weight: float, depth: int, names: bool = True,
                    needs: str | None = None) -> list[ShardSource]:
    if depth > _MAX_LIST_DEPTH:
        raise DataSourceError(f"{spec}: list files nested more than {_MAX_LIST_DEPTH} deep (a cycle?)")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataSourceError(f"{spec}: cannot read list file ({e})") from None
    pooled: list[ShardSource] = []
    separate: list[ShardSource] = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        target, w = _split_weight(line)
        if not _is_remote(target) and not os.path.isabs(target):
            target = str(path.parent / target)
        product = weight * (w or 1.0)
        if not (product > 0 and math.isfinite(product)):  # each is fine alone: 1e300 x 1e300, 1e-200 x 1e-200
            raise DataSourceError(f"{spec}:{n}: weight {w:g} times the list file's {weight:g} is {product:g}, "
                                  "not a finite number above 0; use weights nearer 1 (only their ratios matter)")
        for src in _resolve_item(target, f"{spec}:{n}", product, depth + 1, names, needs):
            (separate if w is not None else pooled).append(src)
    if not pooled and not separate:
        raise DataSourceError(f"{spec}: list file names no shards")
    if pooled:
        separate.insert(0, _merge(pooled, spec, weight, names, needs))
    return separate


def _resolve_item(item: str, spec: str, weight: float, depth: int = 0, names: bool = True,
                  needs: str | None = None) -> list[ShardSource]:
    path = Path(item)
    if not _is_remote(item) and path.is_dir():
        src = [_from_folder(path, spec)]
    elif item.endswith(".txt") and not _is_remote(item):
        if not path.is_file():
            raise DataSourceError(f"{spec}: list file does not exist")
        return _from_list_file(path, spec, weight, depth, names, needs)
    elif "{" in item or _is_remote(item) or item.endswith(".tar"):
        src = [_from_pattern(item, spec, names, needs)]
    elif not path.exists():
        raise DataSourceError(f"{spec}: no such folder or file")
    else:
        raise DataSourceError(f"{spec}: not a folder of shards, a .tar pattern or a .txt list file")
    for s in src:
        s.weight = weight
    return src


_NEEDS = {"cls": ("classes", "class names", "class labels (cls)"),
          "labels": ("label_names", "label names", "multi-hot labels (json labels)")}  # a batch field -> its names


def _check_names(sources: list[ShardSource], strict: bool = True, needs: str | None = None):
    """Sources mixed into one stream name their classes (labels) alike where they name them. Not
    `strict` (for a model that reads neither): differing names are dropped instead, as meaningless.
    `needs` ("cls" or "labels": what the model reads): every source names them, else its samples would
    all be bad (without a `cls`, a `json`), or fewer of them the smaller its weight, and not a word."""
    if needs is not None:
        attr, what, reads = _NEEDS[needs]
        for s in sources:
            if not getattr(s, attr):
                raise DataSourceError(f"{s.spec}: no {what} in its index.json, but the model reads {reads}; "
                                      "every data source must have them (leave this one out)")
    for attr, what in (("classes", "class names"), ("label_names", "label names")):
        named = [s for s in sources if getattr(s, attr)]
        for s in named[1:]:
            if getattr(s, attr) != getattr(named[0], attr):
                if not strict:
                    for t in sources:
                        setattr(t, attr, [])
                    break
                raise DataSourceError(
                    f"{s.spec}: its {what} ({len(getattr(s, attr))}) differ from those of {named[0].spec} "
                    f"({len(getattr(named[0], attr))}); build both with the same --classes file")


# ----------------------------------------------------------------------------------------------


def resolve_sources(spec: str | list[str], num_samples: int = 0, *, require_count: bool = True,
                    names: bool = True, needs: str | None = None) -> list[ShardSource]:
    """Turn `data.train`-style input into sources; raises DataSourceError on anything missing.

    num_samples: the dataset size to use where neither index.json nor *_stats.json gives one
    (`data.num_samples`; 0 = none). With several such sources it is shared among them in
    proportion to their number of shards. require_count=False leaves unknown counts as None
    (for tools that only read the shards) instead of raising. names=False: for a model that reads
    neither classes nor labels, sources whose names differ may be mixed (their names are dropped).
    needs="cls" / "labels": the model reads them, so every source must name its classes / labels.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    sources: list[ShardSource] = []
    for s in specs:
        s = (s or "").strip()
        if not s:
            continue
        target, w = _split_weight(s)
        sources += _resolve_item(target, s, w or 1.0, names=names or needs is not None, needs=needs)
    if not sources:
        raise DataSourceError("no data sources given")
    _check_names(sources, names or needs is not None, needs)
    total = sum(s.weight for s in sources)  # as random.choices adds them up
    if not math.isfinite(total):
        raise DataSourceError(f"{', '.join(specs)}: the weights add up to {total:g}, more than a float holds; use "
                              "smaller weights (only their ratios matter)")
    unknown = [s for s in sources if s.num_samples is None]
    if unknown and num_samples > 0:
        shards = sum(len(s.urls) for s in unknown)
        given = 0
        for s in unknown:
            s.num_samples = num_samples * len(s.urls) // shards
            s.count_from = "num_samples"
            given += s.num_samples
        unknown[0].num_samples += num_samples - given  # the rounding remainder
    elif unknown and require_count:
        raise DataSourceError(f"{unknown[0].spec}: no sample count (no index.json, no img2dataset *_stats.json); "
                              "set data.num_samples to the number of samples in these shards")
    for s in sources:
        if s.num_samples == 0:
            raise DataSourceError(f"{s.spec}: holds no samples")
    return sources
