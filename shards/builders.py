"""What each builder reads: image folders, the ImageNet layouts, COCO annotation files -> `Item`s.

These functions only list inputs and attach labels; `shards.build.build` turns the items into
shards. They raise `BuildError` (one line, no traceback) for anything the user has to fix.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from shards.build import BuildError, Item, safe_text, unique_keys
from shards.images import IMAGE_EXTENSIONS

SYNSET_RE = re.compile(r"^n\d{8}$")


# ----------------------------------------------------------------------------------------------
# listing


@dataclass
class Listing:
    images: list[str]  # image files, sorted posix paths relative to the input folder
    other: int = 0  # files seen that are not images (by extension)
    folders: list[str] = field(default_factory=list)  # first-level sub-folders read (class candidates), sorted
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (folder, reason): skipped, for bad_files.txt
    notes: list[str] = field(default_factory=list)  # one line each, for the user


def _folder_id(path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def list_images(src: Path, exclude: Path | None = None) -> Listing:
    """The image files under src. Hidden files and folders are skipped; so is `exclude` (an output
    folder inside the input).

    Links to folders are followed, but every real folder is read once (by device and inode), folders
    reached without a link first: a link back up the tree (`ln -s .. up`) would otherwise copy the set
    again and again, down to the OS's path-length limit. Such links are skipped and named in a note.
    A folder that cannot be read (`lost+found` on a disk's root, read by a user) is skipped, named in
    a note and in `unreadable` (the builders list it in bad_files.txt): a class gone missing must not
    go without a word, but neither can a build be held up by a folder its user may not touch.
    """
    if not src.is_dir():
        raise BuildError(f"{src}: no such folder")
    src_abs = src.resolve()
    exclude_abs = exclude.resolve() if exclude is not None else None
    exclude_id = _folder_id(exclude_abs) if exclude_abs is not None and exclude_abs.is_dir() else None

    def unreadable(rel: str, e: OSError) -> None:
        if not rel:  # the input folder itself
            raise BuildError(f"{src}: cannot read this folder ({e.strerror or e})")
        listing.unreadable.append((str(src / rel), f"cannot read this folder ({e.strerror or e})"))

    seen = {_folder_id(src_abs)}
    listing = Listing(images=[])
    todo: list[tuple[str, str]] = [("", str(src_abs))]  # (relative posix path, path to read)
    links: list[tuple[str, str]] = []  # links to folders: followed once every folder without one is read
    repeated: list[str] = []
    while todo or links:
        if not todo:
            rel, path = links.pop(0)
            try:
                ident = _folder_id(path)
            except OSError as e:
                unreadable(rel, e)
                continue
            if ident == exclude_id:
                continue
            if ident in seen:
                repeated.append(rel)
                continue
            seen.add(ident)
            todo.append((rel, path))
            if "/" not in rel:
                listing.folders.append(rel)
            continue
        rel, path = todo.pop()
        try:
            with os.scandir(path) as it:
                entries = list(it)
        except OSError as e:
            unreadable(rel, e)
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            erel = f"{rel}/{e.name}" if rel else e.name
            try:
                is_dir = e.is_dir()  # follows a link
            except OSError:
                is_dir = False
            if not is_dir:  # a file, a link to one, a broken link (reported when it cannot be read)
                if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                    listing.images.append(erel)
                else:
                    listing.other += 1
                continue
            if exclude_abs is not None and Path(path, e.name) == exclude_abs:
                continue
            if e.is_symlink():
                links.append((erel, e.path))
                continue
            try:
                st = e.stat()
            except OSError as err:
                unreadable(erel, err)
                continue
            ident = (st.st_dev, st.st_ino)
            if ident == exclude_id:
                continue
            if ident in seen:  # a bind mount of a folder already read
                repeated.append(erel)
                continue
            seen.add(ident)
            todo.append((erel, e.path))
            if not rel:
                listing.folders.append(erel)
    listing.images.sort()
    listing.folders.sort()
    if listing.unreadable:
        listing.unreadable.sort()
        shown = ", ".join(safe_text(r) for r, _ in listing.unreadable[:3]) + (", ..." if len(listing.unreadable) > 3
                                                                              else "")
        listing.notes.append(f"{src}: {len(listing.unreadable)} folders cannot be read: skipped, listed in "
                             f"bad_files.txt ({shown})")
    if repeated:
        repeated.sort()
        shown = ", ".join(safe_text(r) for r in repeated[:3]) + (", ..." if len(repeated) > 3 else "")
        listing.notes.append(f"{src}: skipped {len(repeated)} links to folders already read (a loop, or a "
                             f"second path to the same folder): {shown}")
    return listing


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


def _empty_classes_note(src: Path, classes: list[str], holders: set[str]) -> list[str]:
    empty = [c for c in classes if c not in holders]
    if not empty:
        return []
    shown = ", ".join(safe_text(c) for c in empty[:3]) + (", ..." if len(empty) > 3 else "")
    return [f"{src}: {len(empty)} of {len(classes)} classes have no images: kept, with 0 samples, so every "
            f"later class keeps its index ({shown})"]


def folder_items(src: Path, *, labels: bool = True, classes_file: str | None = None, exclude: Path | None = None):
    """Any tree of images, labelled by first-level sub-folder when two or more of them hold images
    (or --classes names them). Then an image beside the sub-folders is skipped, not stored without
    a label. A sub-folder without images (`__MACOSX`, `annotations/`, `lost+found`) is no class, with
    a note; a --classes file fixes the class list, empty classes included.

    Returns items, classes, descriptions, the number of non-image files, skipped inputs as
    (path, reason) and notes (one line each).
    """
    listing = list_images(src, exclude)
    paths, notes = listing.images, list(listing.notes)
    if not paths:
        raise BuildError(f"{src}: no image files found ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    # One folder holding everything, like imagenet-sample/train/..., is not a class.
    holders = {p.split("/", 1)[0] for p in paths if "/" in p}
    labelled = labels and (len(holders) > 1 or (classes_file is not None and bool(holders)))
    if classes_file is not None and not labelled:
        raise BuildError(f"{src}: --classes given, but " + ("so is --no-labels" if not labels
                                                             else "no image lies in a class sub-folder"))
    classes: list[str] = []
    descriptions: list[str] = []
    skipped: list[tuple[str, str]] = list(listing.unreadable)
    if labelled:
        stray = [p for p in paths if "/" not in p]
        if stray:
            skipped += [(str(src / p), "not inside a class sub-folder") for p in stray]
            notes.append(f"{src}: {len(stray)} images lie beside the class sub-folders, not inside one: skipped, "
                         f"listed in bad_files.txt (first: {safe_text(stray[0])}; --no-labels keeps every image, "
                         "unlabelled)")
            paths = [p for p in paths if "/" in p]
        if classes_file is None:
            classes = sorted(holders)
            unread = {r for r, _ in listing.unreadable}
            if empty := [f for f in listing.folders if f not in holders and str(src / f) not in unread]:
                shown = ", ".join(safe_text(c) for c in empty[:3]) + (", ..." if len(empty) > 3 else "")
                notes.append(f"{src}: {len(empty)} sub-folders hold no images and are not classes ({shown}); "
                             "a --classes file that names them keeps them as classes with 0 samples")
        else:
            classes, descriptions = _class_index(sorted(holders), classes_file, "sub-folders")
            notes += _empty_classes_note(src, classes, holders)
    cls_of = {c: i for i, c in enumerate(classes)}
    keys = unique_keys([os.path.splitext(p)[0] for p in paths])
    items = []
    for key, rel in zip(keys, paths):
        cls = cls_of[rel.split("/", 1)[0]] if labelled else -1
        meta = {"source": safe_text(rel)}
        if labelled:
            meta["class"] = safe_text(classes[cls])
        items.append(Item(key=key, path=str(src / rel), cls=cls, meta=meta))
    return items, [safe_text(c) for c in classes], descriptions, listing.other, skipped, notes


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

    Returns items, classes, descriptions, the number of non-image files, inputs without a label
    (val images the ground-truth file does not name) as (path, reason) pairs, the layout and notes.
    A synset folder without images is still a class (0 samples), so the class order stays standard.
    """
    if not src.is_dir():
        raise BuildError(f"{src}: no such folder")
    subdirs = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    synset_dirs = [d for d in subdirs if SYNSET_RE.match(d)]
    if not synset_dirs and {"train", "val"} & set(subdirs):
        raise BuildError(f"{src}: looks like the ImageNet root; build each split on its own, e.g. "
                         f"python -m shards imagenet {src / 'train'} OUT/train")
    listing = list_images(src, exclude)
    paths, other, notes = listing.images, listing.other, list(listing.notes)
    if not paths:
        raise BuildError(f"{src}: no image files found")
    unlabelled: list[tuple[str, str]] = list(listing.unreadable)
    if synset_dirs:  # train layout (also a val folder already sorted into synset folders)
        stray = {p for p in paths if "/" not in p or not SYNSET_RE.match(p.split("/", 1)[0])}
        unlabelled += [(str(src / p), "not inside a synset folder") for p in sorted(stray)]
        if stray:
            notes.append(f"{src}: {len(stray)} images are not inside a synset folder: skipped, listed in "
                         f"bad_files.txt (first: {safe_text(min(stray))})")
        paths = [p for p in paths if p not in stray]
        synset_of = {p: p.split("/", 1)[0] for p in paths}
        holders = set(synset_of.values())
        if classes_file is None:  # every synset folder, with images or not: the standard order stays whole
            classes, descriptions = sorted(holders | {f for f in listing.folders if SYNSET_RE.match(f)}), []
        else:
            classes, descriptions = _class_index(sorted(holders), classes_file, "synsets")
        notes += _empty_classes_note(src, classes, holders)
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
    items = [Item(key=k, path=str(src / p), cls=cls_of[synset_of[p]],
                  meta={"source": safe_text(p), "synset": synset_of[p]}) for k, p in zip(keys, paths)]
    return items, classes, descriptions, other, unlabelled, layout, notes


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
    except RecursionError:
        raise BuildError(f"{p}: not a COCO {what} file (JSON nested too deep to read)") from None
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
    name an image or a category the file does not list are left out and counted (`notes`, one line each);
    images whose file_name points outside `images` are skipped, as (path, reason) in `skipped`. A category
    id listed twice, or an image id listed with two file names, is an error."""
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
        dup = next((a["id"] for a, b in zip(cats, cats[1:]) if a["id"] == b["id"]), None)
        if dup is not None:  # one id, two label indices: one of them a phantom that no annotation sets
            names = ", ".join(repr(safe_text(c["name"])) for c in cats if c["id"] == dup)
            raise BuildError(f"{instances}: category id {dup} is listed more than once ({names})")
        label_ids = [c["id"] for c in cats]
        label_names = [c["name"] for c in cats]
        cat_index = {cid: i for i, cid in enumerate(label_ids)}

    records: dict[int, dict] = {}
    for path, data in ((instances, inst), (captions, caps)):
        if data is not None:
            for im in data["images"]:
                rec = records.setdefault(im["id"], {"file_name": im["file_name"]})
                if rec["file_name"] != im["file_name"]:  # (the same image listed by both files is fine)
                    raise BuildError(f"{path}: image id {im['id']} is listed twice, with different file names "
                                     f"({safe_text(rec['file_name'])!r} and {safe_text(im['file_name'])!r})")
    other = 0
    if inst is None and caps is None:  # images only: the id is the COCO-style number in the file name
        listing = list_images(images)
        paths, other = listing.images, listing.other
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
    ids_of: dict[str, list[int]] = {}
    for image_id, rec in records.items():
        ids_of.setdefault(os.path.normpath(rec["file_name"]), []).append(image_id)
    if shared := [(name, sorted(ids)) for name, ids in ids_of.items() if len(ids) > 1]:
        name, ids = min(shared, key=lambda s: s[1])
        notes.append(f"{len(shared)} files are listed under more than one image id (first: {safe_text(name)!r} as "
                     f"ids {', '.join(map(str, ids))}): each id is a sample of its own, with its own annotations")

    items, dropped, skipped = [], 0, []
    root = os.path.abspath(images)
    for image_id in sorted(records):
        rec = records[image_id]
        cids = sorted(cats_of.get(image_id, ()))
        if require_labels and not cids:
            dropped += 1
            continue
        # A file name is a path inside --images: "../../etc/passwd" or "/etc/hostname" must not be read.
        inside = os.path.normpath(os.path.join(root, rec["file_name"]))
        if not inside.startswith(root.rstrip(os.sep) + os.sep):
            why = "empty" if not rec["file_name"] else "lies outside --images (absolute, or with ..)"
            skipped.append((os.path.join(str(images), rec["file_name"]), f"image {image_id}: file_name {why}"))
            continue
        captions_ = [safe_text(c) for _, c in sorted(caps_of.get(image_id, []))]
        meta = {"image_id": image_id, "file_name": safe_text(rec["file_name"])}
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
    if skipped:
        notes.append(f"skipped {len(skipped)} images whose file_name names no file inside {images} "
                     f"(absolute, with .., or empty; listed in bad_files.txt)")
    return items, [safe_text(n) for n in label_names], label_ids, other, dropped, skipped, notes
