"""What each builder reads: image folders, the ImageNet layouts, COCO annotation files -> `Item`s.

These functions only list inputs and attach labels; `shards.build.build` turns the items into
shards. They raise `BuildError` (one line, no traceback) for anything the user has to fix.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

from shards.build import BuildError, Item, unique_keys
from shards.images import IMAGE_EXTENSIONS

SYNSET_RE = re.compile(r"^n\d{8}$")


# ----------------------------------------------------------------------------------------------
# listing


def list_images(src: Path, exclude: Path | None = None) -> tuple[list[str], int]:
    """Image files under src as sorted posix paths relative to it, and how many other files were seen.

    Hidden files and folders are skipped; so is `exclude` (an output folder inside the input).
    """
    if not src.is_dir():
        raise BuildError(f"{src}: no such folder")
    src_abs = src.resolve()
    exclude_abs = exclude.resolve() if exclude is not None else None
    images, other = [], 0
    for root, dirs, files in os.walk(src_abs, followlinks=True):
        root_p = Path(root)
        dirs[:] = [d for d in dirs if not d.startswith(".") and (exclude_abs is None or root_p / d != exclude_abs)]
        for f in files:
            if f.startswith("."):
                continue
            if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                images.append((root_p / f).relative_to(src_abs).as_posix())
            else:
                other += 1
    images.sort()
    return images, other


def read_classes_file(path: str | Path) -> tuple[list[str], list[str]]:
    """Class names (first word of each line) and descriptions (the rest) from a classes file.

    Accepts `n01440764` per line as well as ImageNet's LOC_synset_mapping.txt
    (`n01440764 tench, Tinca tinca`). Blank lines and lines starting with # are skipped.
    """
    p = Path(path)
    if not p.is_file():
        raise BuildError(f"{p}: classes file not found")
    names, descriptions = [], []
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, desc = line.partition(" ")
        names.append(name)
        descriptions.append(desc.strip())
    if not names:
        raise BuildError(f"{p}: classes file is empty")
    dup = sorted({n for n in names if names.count(n) > 1}) if len(set(names)) != len(names) else []
    if dup:
        raise BuildError(f"{p}: class {dup[0]!r} is listed twice")
    return names, descriptions


def _class_index(found: list[str], classes_file: str | None, what: str) -> tuple[list[str], list[str]]:
    """The class list (from the file, else sorted found names) and descriptions; every found name must be in it."""
    if classes_file is None:
        return sorted(set(found)), []
    classes, descriptions = read_classes_file(classes_file)
    known = set(classes)
    missing = sorted({f for f in found if f not in known})
    if missing:
        raise BuildError(f"{classes_file}: does not list {len(missing)} {what} found in the input "
                         f"(first: {missing[0]})")
    return classes, descriptions if any(descriptions) else []


# ----------------------------------------------------------------------------------------------
# folder


def folder_items(src: Path, *, labels: bool = True, classes_file: str | None = None, exclude: Path | None = None):
    """Any tree of images. Labelled by first-level sub-folder when every image lies in one (of 2+)."""
    paths, other = list_images(src, exclude)
    if not paths:
        raise BuildError(f"{src}: no image files found ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    # Labels when every image lies in a first-level sub-folder and there are at least two of them
    # (one folder holding everything, like imagenet-sample/train/..., is not a class).
    labelled = labels and all("/" in p for p in paths) and (
        classes_file is not None or len({p.split("/", 1)[0] for p in paths}) > 1)
    if classes_file and not labelled:
        raise BuildError(f"{src}: --classes given but not every image lies in a class sub-folder")
    classes: list[str] = []
    descriptions: list[str] = []
    if labelled:
        classes, descriptions = _class_index([p.split("/", 1)[0] for p in paths], classes_file, "sub-folders")
    cls_of = {c: i for i, c in enumerate(classes)}
    keys = unique_keys([os.path.splitext(p)[0] for p in paths])
    items = []
    for key, rel in zip(keys, paths):
        cls = cls_of[rel.split("/", 1)[0]] if labelled else -1
        meta = {"source": rel}
        if labelled:
            meta["class"] = classes[cls]
        items.append(Item(key=key, path=str(src / rel), cls=cls, meta=meta))
    return items, classes, descriptions, other


# ----------------------------------------------------------------------------------------------
# ImageNet


def _find_upwards(start: Path, name: str, levels: int = 4) -> Path | None:
    p = start.resolve()
    for _ in range(levels):
        if (p / name).is_file():
            return p / name
        p = p.parent
    return None


def read_val_labels(path: Path, files: list[str]) -> tuple[dict[str, str], list[str]]:
    """({file stem: synset}, every synset the file names, sorted) for a flat val folder, from one
    of the usual ground-truth files:

    - LOC_val_solution.csv (Kaggle): `ImageId,PredictionString` with the synset first in the string;
    - `<file name> <synset>` per line;
    - one synset per line, line i for ILSVRC2012_val_<i>.JPEG (or the i-th file in sorted order).
    """
    if not path.is_file():
        raise BuildError(f"{path}: ground-truth file not found")
    text = path.read_text()
    by_stem: dict[str, str] = {}
    synsets: list[str] = []  # a one-synset-per-line file: every line, whether its image is here or not
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if lines and lines[0].replace(" ", "").lower().startswith("imageid,predictionstring"):
        for row in csv.reader(lines[1:]):
            if len(row) >= 2 and row[1].split():
                by_stem[row[0].strip()] = row[1].split()[0]
    else:
        tokens = [ln.replace(",", " ").split() for ln in lines]
        if tokens and all(len(t) >= 2 for t in tokens):
            for t in tokens:
                by_stem[os.path.splitext(os.path.basename(t[0]))[0]] = t[1]
        elif tokens and all(len(t) == 1 for t in tokens):
            synsets = [t[0] for t in tokens]
            if all(s.isdigit() for s in synsets):
                raise BuildError(f"{path}: holds class numbers, not synsets (the devkit's numbering is not the "
                                 "sorted-synset order); give LOC_val_solution.csv or a synset-per-line file")
            numbered = [re.search(r"_(\d+)$", os.path.splitext(os.path.basename(f))[0]) for f in files]
            if all(numbered):
                for f, m in zip(files, numbered):
                    i = int(m.group(1)) - 1
                    if 0 <= i < len(synsets):
                        by_stem[os.path.splitext(os.path.basename(f))[0]] = synsets[i]
            elif len(synsets) == len(files):
                for f, s in zip(files, synsets):
                    by_stem[os.path.splitext(os.path.basename(f))[0]] = s
            else:
                raise BuildError(f"{path}: {len(synsets)} synsets for {len(files)} images, and the file names carry "
                                 "no number to match them by")
        else:
            raise BuildError(f"{path}: not a ground-truth file (expected LOC_val_solution.csv, "
                             "'<file> <synset>' lines or one synset per line)")
    # Every synset of the file, not only those of the images present: a partial val folder then
    # numbers its classes as the full one (and train) does.
    every = sorted({*by_stem.values(), *synsets})
    bad = next((s for s in every if not SYNSET_RE.match(s)), None)
    if bad is not None:
        raise BuildError(f"{path}: {bad!r} is not a WordNet synset id like n01440764")
    if not by_stem:
        raise BuildError(f"{path}: no labels found")
    return by_stem, every


def imagenet_items(src: Path, *, classes_file: str | None = None, labels_file: str | None = None,
                   exclude: Path | None = None):
    """ImageNet train/<synset>/*.JPEG, or a flat val/ folder labelled by a ground-truth file.

    Returns items, classes, descriptions, the number of non-image files, and inputs without a label
    (val images the ground-truth file does not name) as (path, reason) pairs.
    """
    if not src.is_dir():
        raise BuildError(f"{src}: no such folder")
    subdirs = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    synset_dirs = [d for d in subdirs if SYNSET_RE.match(d)]
    if not synset_dirs and {"train", "val"} & set(subdirs):
        raise BuildError(f"{src}: looks like the ImageNet root; build each split on its own, e.g. "
                         f"python -m shards imagenet {src / 'train'} OUT/train")
    paths, other = list_images(src, exclude)
    if not paths:
        raise BuildError(f"{src}: no image files found")
    unlabelled: list[tuple[str, str]] = []
    if synset_dirs:  # train layout (also a val folder already sorted into synset folders)
        stray = {p for p in paths if "/" not in p or not SYNSET_RE.match(p.split("/", 1)[0])}
        unlabelled += [(str(src / p), "not inside a synset folder") for p in sorted(stray)]
        paths = [p for p in paths if p not in stray]
        synset_of = {p: p.split("/", 1)[0] for p in paths}
        classes, descriptions = _class_index(list(synset_of.values()), classes_file, "synsets")
        layout = "train"
    else:  # flat val folder
        gt = Path(labels_file) if labels_file else _find_upwards(src, "LOC_val_solution.csv")
        if gt is None:
            raise BuildError(f"{src}: a flat folder of images needs its labels: pass --labels LOC_val_solution.csv "
                             "(or a file with one synset per line)")
        by_stem, every_synset = read_val_labels(gt, paths)
        synset_of = {}
        for p in paths:
            s = by_stem.get(os.path.splitext(os.path.basename(p))[0])
            if s is None:
                unlabelled.append((str(src / p), f"no label in {gt.name}"))
            else:
                synset_of[p] = s
        paths = [p for p in paths if p in synset_of]
        if not paths:
            raise BuildError(f"{gt}: labels none of the images in {src} (wrong ground-truth file?)")
        if classes_file is None:
            classes, descriptions = every_synset, []
        else:
            classes, descriptions = _class_index(list(synset_of.values()), classes_file, "synsets")
        layout = "val"
    if not descriptions:
        mapping = _find_upwards(src, "LOC_synset_mapping.txt")
        if mapping is not None:
            names, descs = read_classes_file(mapping)
            known = dict(zip(names, descs))
            descriptions = [known.get(c, "") for c in classes]
    cls_of = {c: i for i, c in enumerate(classes)}
    keys = unique_keys([os.path.splitext(os.path.basename(p))[0] for p in paths])
    items = [Item(key=k, path=str(src / p), cls=cls_of[synset_of[p]], meta={"source": p, "synset": synset_of[p]})
             for k, p in zip(keys, paths)]
    return items, classes, descriptions, other, unlabelled, layout


# ----------------------------------------------------------------------------------------------
# COCO


def _load_json(path: str, what: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise BuildError(f"{p}: {what} file not found")
    try:
        with open(p) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BuildError(f"{p}: not valid JSON ({e})") from None
    need = {"images", "annotations"} | ({"categories"} if what == "instances" else set())
    if not isinstance(data, dict) or not need <= set(data):
        raise BuildError(f"{p}: not a COCO {what} file (needs {', '.join(sorted(need))})")
    # Every record the builder reads, with the fields it reads, of the types it reads them as: a KeyError or
    # an AttributeError deep in the build would name neither the file nor the record.
    fields = {"images": {"id": int, "file_name": str}, "categories": {"id": int, "name": str},
              "annotations": {"image_id": int} | ({"caption": str} if what == "captions" else {})}
    for part in sorted(need):
        records = data[part]
        if not isinstance(records, list):
            raise BuildError(f"{p}: '{part}' is not a list")
        for i, r in enumerate(records):
            for key, kind in fields[part].items():
                if not isinstance(r, dict) or type(r.get(key)) is not kind:
                    have = "missing" if not isinstance(r, dict) or key not in r else f"a {type(r[key]).__name__}"
                    raise BuildError(f"{p}: {part}[{i}] needs '{key}' as {'an integer' if kind is int else 'text'} "
                                     f"({have})")
    return data


def coco_items(images: Path, *, instances: str | None = None, captions: str | None = None,
               require_labels: bool = False):
    """COCO 2017 (train or val): images + multi-hot categories from instances + captions. Annotations that
    name an image or a category the file does not list are left out and counted (`notes`, one line each)."""
    if not images.is_dir():
        raise BuildError(f"{images}: no such folder")
    if require_labels and not instances:
        raise BuildError("--require-labels needs --instances")
    inst = _load_json(instances, "instances") if instances else None
    caps = _load_json(captions, "captions") if captions else None

    label_names: list[str] = []
    label_ids: list[int] = []
    cat_index: dict[int, int] = {}
    if inst is not None:
        cats = sorted(inst["categories"], key=lambda c: c["id"])
        label_ids = [c["id"] for c in cats]
        label_names = [c["name"] for c in cats]
        cat_index = {cid: i for i, cid in enumerate(label_ids)}

    records: dict[int, dict] = {}
    for data in (inst, caps):
        if data is not None:
            for im in data["images"]:
                records.setdefault(im["id"], {"file_name": im["file_name"]})
    other = 0
    if inst is None and caps is None:  # images only: the id is the COCO-style number in the file name
        paths, other = list_images(images)
        numeric = [p for p in paths if os.path.splitext(os.path.basename(p))[0].isdigit()]
        if len(numeric) != len(paths):
            raise BuildError(f"{images}: without --instances/--captions, image file names must be COCO ids "
                             f"(like 000000391895.jpg); use `python -m shards folder` for other images")
        for p in paths:
            records[int(os.path.splitext(os.path.basename(p))[0])] = {"file_name": p}

    cats_of: dict[int, set[int]] = {}
    unknown_image = unknown_category = unknown_caption = 0
    if inst is not None:
        for a in inst["annotations"]:
            if a["image_id"] not in records:
                unknown_image += 1
            elif type(a.get("category_id")) is not int or a["category_id"] not in cat_index:
                unknown_category += 1
            else:
                cats_of.setdefault(a["image_id"], set()).add(a["category_id"])
    caps_of: dict[int, list[tuple]] = {}
    if caps is not None:
        for a in caps["annotations"]:
            if a["image_id"] not in records:
                unknown_caption += 1
            else:
                caps_of.setdefault(a["image_id"], []).append((a.get("id", 0), a["caption"].strip()))
    notes = [f"left out {n} {what}" for n, what in (
        (unknown_image, "instance annotations of images the files do not list"),
        (unknown_category, "instance annotations whose category_id is not among the categories"),
        (unknown_caption, "captions of images the files do not list")) if n]

    items, dropped = [], 0
    for image_id in sorted(records):
        rec = records[image_id]
        cids = sorted(cats_of.get(image_id, ()))
        if require_labels and not cids:
            dropped += 1
            continue
        captions_ = [c for _, c in sorted(caps_of.get(image_id, []))]
        meta = {"image_id": image_id, "file_name": rec["file_name"]}
        if inst is not None:
            meta["labels"] = [cat_index[c] for c in cids]
            meta["category_ids"] = cids
        if caps is not None:
            meta["captions"] = captions_
        items.append(Item(key="", path=str(images / rec["file_name"]), meta=meta,
                          txt=captions_[0] if captions_ else ""))
    keys = unique_keys([f"{it.meta['image_id']:012d}" for it in items])
    for it, k in zip(items, keys):
        it.key = k
    return items, label_names, label_ids, other, dropped, notes
