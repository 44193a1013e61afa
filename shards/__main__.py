"""python -m shards: turn images into WebDataset shards, and look into shard sets.

    python -m shards demo OUT                                   # generated shapes, 10 classes
    python -m shards folder SRC OUT                             # any image tree; sub-folders = classes
    python -m shards imagenet <imagenet>/train OUT/train
    python -m shards imagenet <imagenet>/val OUT/val --labels LOC_val_solution.csv
    python -m shards coco --images <coco>/train2017 --instances <coco>/annotations/instances_train2017.json \\
        --captions <coco>/annotations/captions_train2017.json OUT
    python -m shards inspect OUT
    python -m shards verify OUT

Every build writes OUT/000000.tar, 000001.tar, ..., OUT/bad_files.txt and, last, OUT/index.json.
Re-running an interrupted build with the same arguments resumes it. Exit codes: 0 success,
1 verify found problems (or an I/O error), 2 a usage mistake, 75 stopped by SIGTERM (the same clean
stop as Ctrl-C; 75 as launch/train.py: stopped, resumable), 130 interrupted (Ctrl-C), 141 the reader
of the output went away (`| head`).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import sys
from pathlib import Path

from shards.build import BuildError, BuildOptions, build, produce_file
from shards.images import RESIZE_FILTERS

_SIZE_RE = re.compile(r"^\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def _size(text: str) -> int:
    """'500MB', '1G', '2e9', '1048576' -> bytes (decimal units; KiB etc. read as binary)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500MB, 1GB, 1e9)")
    binary = "i" in text.lower()
    mult = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[m.group(2).lower()]
    value = float(m.group(1)) * ((1024 if binary else 1000) ** mult)
    if not math.isfinite(value):  # 1e400: int(inf) would be an OverflowError
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500MB, 1GB, 1e9)")
    return int(value)


def _check_out(out: Path, src: Path) -> None:
    """The shards may go inside the input folder (that folder is left out of the listing), but not into
    the input folder itself, nor into a folder that holds input images: those would be left out of the
    set silently (a whole ImageNet class, and every later class index one lower)."""
    from shards.images import IMAGE_EXTENSIONS

    o, s = out.resolve(), src.resolve()
    if o == s:
        raise BuildError(f"{out}: is the input folder; write the shards into a folder of their own")
    if s in o.parents and o.is_dir():
        found = next((p for p in o.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()), None)
        if found is not None:
            raise BuildError(f"{out}: lies inside the input folder and holds its images ({found.relative_to(o)}, "
                             "...): they would be left out of the set; write the shards into a new folder")


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _quality(text: str) -> int:
    v = _positive(text)
    if v > 100:
        raise argparse.ArgumentTypeError(f"JPEG quality is 1..100, got {v}")
    return v


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _common(p: argparse.ArgumentParser, *, shard_size: int = 1000, images: bool = True):
    g = p.add_argument_group("output")
    g.add_argument("--workers", type=_positive, default=_cpus(), metavar="N",
                   help="encoding processes (default: all %(default)s usable cores); "
                        "the writer runs in the main process")
    g.add_argument("--shard-size", type=_positive, default=shard_size, metavar="N",
                   help="samples per shard (default %(default)s)")
    g.add_argument("--shard-bytes", type=_size, default=0, metavar="SIZE",
                   help="also start a new shard once one holds about this much image data, e.g. 500MB "
                        "(default: no limit)")
    g.add_argument("--quality", type=_quality, default=95, metavar="Q",
                   help="JPEG quality of re-encoded images (default %(default)s)")
    if images:
        g.add_argument("--max-size", type=int, default=0, metavar="PIXELS",
                       help="re-encode images whose longest side is larger, down to this (e.g. 256; default 0 = keep "
                            "original bytes unless an image needs converting)")
        g.add_argument("--resize-filter", choices=sorted(RESIZE_FILTERS), default="bicubic",
                       help="downscaling filter for --max-size (default %(default)s; area = img2dataset's "
                            "default, about 2x faster)")
        g.add_argument("--shuffle-seed", type=int, default=0, metavar="SEED",
                       help="seed of the sample order across shards (default %(default)s); "
                            "--no-shuffle keeps sorted order")
        g.add_argument("--no-shuffle", action="store_true", help="write samples in sorted input order")
        g.add_argument("--max-samples", type=int, default=0, metavar="N",
                       help="use only the first N images after shuffling (a quick trial; default 0 = all)")
    g.add_argument("--overwrite", action="store_true", help="replace shards of a different build found in OUT")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def _options(a: argparse.Namespace) -> BuildOptions:
    images = hasattr(a, "max_size")
    if images and a.max_size < 0:
        raise BuildError(f"--max-size must be 0 (keep) or a number of pixels, got {a.max_size}")
    if images and a.max_samples < 0:
        raise BuildError(f"--max-samples must be 0 (all) or a number of images, got {a.max_samples}")
    return BuildOptions(workers=a.workers, max_size=a.max_size if images else 0, quality=a.quality,
                        resize_filter=a.resize_filter if images else "bicubic",
                        shard_size=a.shard_size, shard_bytes=a.shard_bytes,
                        shuffle_seed=None if (not images or a.no_shuffle) else a.shuffle_seed,
                        max_samples=a.max_samples if images else 0, overwrite=a.overwrite, progress=not a.quiet)


def _produce(opts: BuildOptions):
    from functools import partial

    return partial(produce_file, max_size=opts.max_size, quality=opts.quality, resize_filter=opts.resize_filter)


def _source(kind: str, opts: BuildOptions, **fields) -> dict:
    settings = {"max_size": opts.max_size, "quality": opts.quality, "resize_filter": opts.resize_filter,
                "shard_size": opts.shard_size,
                "shard_bytes": opts.shard_bytes, "shuffle_seed": opts.shuffle_seed, "max_samples": opts.max_samples}
    return {"kind": kind, **fields, "options": settings}


def _note_other(other: int, src: Path):
    if other:
        print(f"{src}: ignored {other} files that are not images (by extension)", file=sys.stderr)


def _notes(notes: list[str]):
    for note in notes:
        print(f"note: {note}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# commands


def cmd_demo(a) -> int:
    from functools import partial

    from shards.demo import ATTRIBUTES, SHAPES, demo_items, produce_demo

    if not 8 <= a.image_size <= 8000:  # a larger square is past the loader's 64-megapixel data.max_pixels
        raise BuildError(f"--image-size must be in 8..8000 (a larger square is past the loader's 64-megapixel "
                         f"data.max_pixels), got {a.image_size}")
    opts = _options(a)
    items = demo_items(a.num_samples, a.seed)
    produce = partial(produce_demo, size=a.image_size, seed=a.seed, fmt=a.format, quality=a.quality)
    build(a.out, items, produce, opts, order=False,
          source=_source("demo", opts, seed=a.seed, image_size=a.image_size, format=a.format),
          classes=SHAPES, label_names=ATTRIBUTES)
    return 0


def cmd_folder(a) -> int:
    from shards.builders import folder_items

    opts = _options(a)
    src = Path(a.src)
    _check_out(Path(a.out), src)
    items, classes, descriptions, other, skipped, notes = folder_items(
        src, labels=not a.no_labels, classes_file=a.classes, exclude=Path(a.out))
    _note_other(other, src)
    _notes(notes)
    extra = {"class_descriptions": descriptions} if descriptions else {}
    build(a.out, items, _produce(opts), opts, skipped=skipped,
          source=_source("folder", opts, path=str(src.resolve())), classes=classes, index_extra=extra)
    return 0


def cmd_imagenet(a) -> int:
    from shards.builders import imagenet_items

    opts = _options(a)
    src = Path(a.src)
    _check_out(Path(a.out), src)
    items, classes, descriptions, other, unlabelled, layout, notes = imagenet_items(
        src, classes_file=a.classes, labels_file=a.labels, exclude=Path(a.out))
    _note_other(other, src)
    _notes(notes)
    extra = {"class_descriptions": descriptions} if any(descriptions) else {}
    build(a.out, items, _produce(opts), opts, skipped=unlabelled,
          source=_source("imagenet", opts, path=str(src.resolve()), layout=layout,
                         labels=str(Path(a.labels).resolve()) if a.labels else None),
          classes=classes, index_extra=extra)
    return 0


def cmd_coco(a) -> int:
    from shards.builders import coco_items

    opts = _options(a)
    images = Path(a.images)
    _check_out(Path(a.out), images)
    items, label_names, label_ids, other, dropped, skipped, notes = coco_items(
        images, instances=a.instances, captions=a.captions, require_labels=a.require_labels)
    _note_other(other, images)
    _notes(notes)
    if dropped:
        print(f"{images}: left out {dropped} images without instance annotations (--require-labels)", file=sys.stderr)
    extra = {"label_ids": label_ids} if label_ids else {}
    build(a.out, items, _produce(opts), opts, label_names=label_names, index_extra=extra, skipped=skipped,
          source=_source("coco", opts, path=str(images.resolve()),
                         instances=str(Path(a.instances).resolve()) if a.instances else None,
                         captions=str(Path(a.captions).resolve()) if a.captions else None,
                         require_labels=a.require_labels))
    return 0


def cmd_inspect(a) -> int:
    from shards.check import inspect

    inspect(a.target, num_samples=a.samples)
    return 0


def cmd_verify(a) -> int:
    from shards.check import verify

    return 1 if verify(a.target, workers=a.workers) else 0


# ----------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="python -m shards", description=__doc__, formatter_class=fmt)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    d = sub.add_parser("demo", help="a generated, labelled set: coloured shapes, 10 classes",
                       description="A deterministic generated set: coloured shapes (cls = shape, 10 classes) on "
                                   "textured backgrounds, with 7 multi-hot attributes in json.labels and a caption "
                                   "in txt. Same arguments -> byte-identical shards.")
    d.add_argument("out", metavar="OUT", help="output folder")
    d.add_argument("--num-samples", type=_positive, default=2000, help="images (default %(default)s)")
    d.add_argument("--image-size", type=int, default=64, help="side in pixels (default %(default)s)")
    d.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    d.add_argument("--format", choices=("jpg", "png"), default="jpg", help="image encoding (default %(default)s)")
    _common(d, shard_size=500, images=False)
    d.set_defaults(func=cmd_demo)

    f = sub.add_parser("folder", help="any tree of images (sub-folder names become classes)",
                       description="Any tree of images. When at least two first-level sub-folders hold images, "
                                   "the sub-folder names are the classes (sorted, or in --classes order; one without "
                                   "images is no class, unless --classes lists it) and each sample gets cls; "
                                   "images beside the sub-folders are then skipped (listed in bad_files.txt). "
                                   "Otherwise, or with "
                                   "--no-labels, the set is unlabelled.")
    f.add_argument("src", metavar="SRC", help="folder of images")
    f.add_argument("out", metavar="OUT", help="output folder")
    f.add_argument("--classes", metavar="FILE", help="class order: one sub-folder name per line")
    f.add_argument("--no-labels", action="store_true", help="ignore sub-folders: no cls")
    _common(f)
    f.set_defaults(func=cmd_folder)

    i = sub.add_parser("imagenet", help="ImageNet train/<synset>/ or the flat val/ folder",
                       description="ImageNet (ILSVRC-2012). SRC is either train/ (train/<synset>/*.JPEG; cls = "
                                   "index of the synset in sorted order, the standard 1000-class order) or the flat "
                                   "val/ folder, labelled from --labels (LOC_val_solution.csv, found by itself "
                                   "when it lies in SRC or up to 3 folders above, or a file with one synset per "
                                   "line). Pass the same --classes file (e.g. LOC_synset_mapping.txt) to both "
                                   "splits when one of them may miss classes, so their cls agree.")
    i.add_argument("src", metavar="SRC", help="train/ or val/ folder")
    i.add_argument("out", metavar="OUT", help="output folder")
    i.add_argument("--classes", metavar="FILE", help="class order: one synset per line (LOC_synset_mapping.txt works)")
    i.add_argument("--labels", metavar="FILE", help="ground truth of a flat val/ folder")
    _common(i)
    i.set_defaults(func=cmd_imagenet)

    c = sub.add_parser("coco", help="COCO 2017 images + instances/captions annotations",
                       description="COCO (train2017 or val2017). json per sample: image_id, file_name, width, "
                                   "height, labels (the categories present, as indices 0..79 into label_names in "
                                   "category-id order), category_ids (original ids), captions; txt = first "
                                   "caption. Images without annotations are kept unless --require-labels.")
    c.add_argument("out", metavar="OUT", help="output folder")
    c.add_argument("--images", required=True, metavar="DIR", help="e.g. coco/train2017")
    c.add_argument("--instances", metavar="JSON", help="e.g. annotations/instances_train2017.json")
    c.add_argument("--captions", metavar="JSON", help="e.g. annotations/captions_train2017.json")
    c.add_argument("--require-labels", action="store_true", help="leave out images without instance annotations")
    _common(c)
    c.set_defaults(func=cmd_coco)

    n = sub.add_parser("inspect", help="counts, classes, a few samples, image sizes",
                       description="Summarize a shard set: OUT, a brace pattern, img2dataset output or a list file.")
    n.add_argument("target", metavar="OUT", help="shard folder or pattern")
    n.add_argument("--samples", type=int, default=3, help="samples to show (default %(default)s)")
    n.set_defaults(func=cmd_inspect)

    v = sub.add_parser("verify", help="decode every sample, check labels against the index",
                       description="Read every sample of every shard: the image decodes, cls and json.labels lie "
                                   "within the index's classes and label_names, counts per shard and per class "
                                   "match the index, keys are unique. Exit code 1 when anything is wrong.")
    v.add_argument("target", metavar="OUT", help="shard folder or pattern")
    v.add_argument("--workers", type=_positive, default=_cpus(), metavar="N", help="processes (default %(default)s)")
    v.set_defaults(func=cmd_verify)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, `timeout`, a scheduler): stopped exactly as Ctrl-C stops a build."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the teardown short
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: no handler of ours
        previous = None
    try:
        return _run(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(args) -> int:
    from shards.sources import DataSourceError

    try:
        rc = args.func(args)
        sys.stdout.flush()  # a reader that went away (`| head`) is found here, not in the interpreter's exit
        return rc
    except BrokenPipeError:  # the reader of our output is gone: stop quietly, as `cat` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE
    except (BuildError, DataSourceError) as e:
        print(f"shards {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        more = "; run the same command again to resume" if args.command not in ("inspect", "verify") else ""
        print(f"shards {args.command}: interrupted{more}", file=sys.stderr)
        return 75 if isinstance(e, Terminated) else 130  # the trainer's codes: 75 resumable stop, 130 Ctrl-C
    except OSError as e:  # disk full, permissions: the environment, not a bug in here
        print(f"shards {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
