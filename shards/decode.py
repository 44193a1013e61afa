"""One sample's bytes -> a training sample, and the one boundary between bad data and bugs.

The training loader (harness/data.py), evaluation and `python -m shards verify` all call
`decode_sample` through `guarded`, so what the loader would skip is exactly what verify reports.

The boundary (`is_data_error`), defined here once and applied at two places only (the tar reader,
per shard, and `guarded`, per sample):
- `BadData`: one of our parsers rejected a value (a `cls` that is no integer or outside the
  model's classes, malformed multi-label `json`, an image over `data.max_pixels`, a tar header
  whose size runs past the end of the shard ...);
- `OSError`: the storage did not deliver the bytes;
- anything raised *inside a library* while it read the bytes (PIL's EXIF parser raising
  `struct.error`, zlib, json, webdataset's openers ...), whatever its type.
An exception raised by a line of this repository's own code is a bug and propagates: our own
parsing of untrusted values therefore checks explicitly and raises `BadData`, never relies on a
builtin's ValueError. No list of exception types to grow: a library may fail on hostile bytes in
any way it likes.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from shards.images import MAX_PIXELS, UPRIGHT, BadImage, exif_orientation, to_rgb

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
# MAX_PIXELS: default pixel limit (data.max_pixels, `shards verify --max-pixels`); defined beside the
# builder, which skips what the loader would (shards/images.py)
# Our own code: a venv inside the checkout must not make PIL "ours".
_OURS = tuple(f"{Path(__file__).resolve().parents[1] / p}/" for p in ("models", "shards", "harness", "launch", "tests"))
_INT = re.compile(rb"\s*-?[0-9]{1,18}\s*")


class BadData(ValueError):
    """The data, not our code, is wrong: a one-line reason."""


@dataclass(frozen=True)
class BadSample:
    """A sample (or the rest of a shard) that could not be read: what the stream carries instead."""

    key: str  # "" when the problem is the shard itself (empty, unreadable from the start)
    shard: str
    reason: str  # one line

    def __str__(self) -> str:
        # The folder too: two sources of one run may both hold a 000001.tar.
        shard = Path(self.shard)
        name = f"{shard.parent.name}/{shard.name}" if shard.parent.name else shard.name
        where = f"{name} {self.key}".strip() if self.shard else self.key
        return f"{where}: {self.reason}"


def is_data_error(exn: BaseException) -> bool:
    """True when `exn` is the data's fault (see the module docstring), False for a bug of ours."""
    if isinstance(exn, (BadData, OSError)):
        return True
    if not isinstance(exn, Exception):
        return False  # KeyboardInterrupt, SystemExit, GeneratorExit
    tb = exn.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and not os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_OURS)


def one_line(exn: BaseException, limit: int = 200) -> str:
    """The reason of a bad sample: our own message as it is, a library's with its exception type."""
    # PIL names the in-memory file by its address ("cannot identify image file <_io.BytesIO object at 0x7f..>"):
    # different in every run, meaningless in a log
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", " ".join(str(exn).split()))
    what = getattr(exn, "__notes__", None)
    if not isinstance(exn, BadData):
        kind = type(exn).__qualname__ if type(exn).__module__ == "builtins" else \
            f"{type(exn).__module__}.{type(exn).__qualname__}"  # struct.error, not "error"
        text = f"{kind}: {text}" if text else kind
        text = f"{what[-1]}: {text}" if what else text
    return text[:limit]


# ---------------------------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------------------------


def load_image(data: bytes, size: int, crop: str, hflip: bool, rng: random.Random, max_pixels: int = MAX_PIXELS,
               out: np.ndarray | None = None) -> np.ndarray:
    """Decode, square-crop (random or center), resize to `size`, maybe flip -> uint8 `h w c`.

    With `out` (a writable uint8 `size x size x 3` array, e.g. a slot of the loader's batch) the pixels are
    written there and `out` is returned: no array of its own, no copy into the batch afterwards."""
    img = Image.open(io.BytesIO(data))  # reads the header only: the size is known before any pixel
    w, h = img.size
    if max_pixels and w * h > max_pixels:
        raise BadData(f"image {w}x{h} has {w * h / 1e6:.0f} megapixels, over data.max_pixels={max_pixels}")
    img.draft("RGB", (size, size))  # JPEG only: decode at a reduced scale still >= size (much faster)
    img.load()  # every pixel decoded here, inside PIL: a corrupt stream fails as a library error
    # The EXIF orientation, read as the shard builders read it: an EXIF block PIL cannot parse (hostile or
    # just odd bytes) leaves the picture as stored, as any other loader shows it (exif_transpose would
    # raise on it, and a good picture would be a bad sample every epoch). Read after load(): for a PNG,
    # PIL decodes the pixels to find the EXIF, and a decoding error there would pass for "no EXIF".
    orient = exif_orientation(img)
    if orient in UPRIGHT:
        img = img.transpose(UPRIGHT[orient])
    try:
        img = to_rgb(img)  # the shard builders' conversion: img2dataset's or anyone's shards decode the same way
    except BadImage as e:  # its own check of the pixel values (a float image of unknown scale)
        raise BadData(str(e)) from None
    w, h = img.size
    side = min(w, h)
    if crop == "random":
        x0, y0 = rng.randint(0, w - side), rng.randint(0, h - side)
    else:
        x0, y0 = (w - side) // 2, (h - side) // 2
    if out is None:
        out = np.empty((size, size, 3), np.uint8)
    elif out.shape != (size, size, 3) or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"load_image: out must be a C-contiguous uint8 array of {(size, size, 3)}, not "
                         f"{out.dtype} {out.shape}")
    box, scale = (x0, y0, x0 + side, y0 + side), None
    if side >= 8 * size:  # a big PNG/WebP (a JPEG was drafted): box-average by an integer factor first, in PIL,
        # to a crop still >= 4 x size (PIL's reducing_gap idea: within a few levels of resizing it all), so
        # that no full-size array is made. The reduced crop is side/f pixels wide, its last pixel partial
        # when f does not divide side: the resize is told that scale, not the pixel count.
        factor = side // (4 * size)
        img, scale = img.reduce(factor, box=box), size * factor / side
    elif (w, h) != (side, side):
        img = img.crop(box)  # np.asarray copies the whole picture it is given: only the crop
    resize_into(np.asarray(img), out, scale)
    if hflip and rng.random() < 0.5:
        out[...] = out[:, ::-1]  # numpy buffers an overlapping copy
    return out


_torch = None  # imported on first use: `python -m shards` builders never resize through it


def _import_torch():
    global _torch
    import warnings

    import torch

    if not hasattr(torch.ops.aten, "_upsample_bicubic2d_aa"):
        raise RuntimeError(f"torch {torch.__version__} has no uint8 bicubic resampling kernel "
                           "(aten::_upsample_bicubic2d_aa); the loader needs torch >= 2.3")
    # PIL hands out its pixels as a read-only array, which torch warns about once per process; the resize
    # only reads them. (Once: after this, torch says it for no other read-only array in this process.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.from_numpy(np.frombuffer(b"", np.uint8))
    _torch = torch
    return torch


def resize_into(pixels: np.ndarray, out: np.ndarray, scale: float | None = None) -> None:
    """Resize uint8 `h w c` pixels into `out` (uint8 `H W c`) with PIL's bicubic filter (a = -0.5, widened
    by the scale when shrinking: antialiased), computed by torch's uint8 kernel, which writes `out` directly.
    `scale`: output pixels per input pixel, when that is not the ratio of the shapes (a partial last pixel).

    3-4x faster than PIL's own resize (0.19 vs 0.57 ms for 256x192 -> 256 on one core), which was more
    than half of decoding a 256 px JPEG; pixels agree with PIL's resize of the same crop to +-2 levels
    (fixed-point rounding). PIL's `resize(box=...)` also reads source pixels just outside the box at its
    edges; this resizes the crop itself, as torchvision's tensor transforms do."""
    torch = _torch or _import_torch()
    if not pixels.size:  # PIL refuses a picture without pixels when it opens it; never resized
        raise BadData(f"no pixels to resize ({pixels.shape[1]}x{pixels.shape[0]})")
    if pixels.shape == out.shape and scale is None:
        out[...] = pixels
        return
    # 1 c h w views with channels_last strides (numpy's views cost a tenth of torch's)
    src, dst = torch.from_numpy(pixels.transpose(2, 0, 1)[None]), torch.from_numpy(out.transpose(2, 0, 1)[None])
    try:
        torch.ops.aten._upsample_bicubic2d_aa.out(src, list(out.shape[:2]), False, scale, scale, out=dst)
    except Exception as e:  # our inputs, not the data's: a bug (or a torch that changed), never a bad sample
        raise RuntimeError(f"resizing {tuple(pixels.shape)} pixels to {tuple(out.shape)} failed in torch: "
                           f"{e}") from e


def parse_cls(raw: bytes, num_classes: int) -> int:
    """A `cls` field: an integer, inside 0..num_classes-1 when num_classes is known."""
    if not _INT.fullmatch(raw):
        raise BadData(f"cls {raw[:20]!r} is not an integer")
    c = int(raw)
    if num_classes and not 0 <= c < num_classes:
        raise BadData(f"cls {c} outside 0..{num_classes - 1} (the classes of the model or the index)")
    return c


def parse_labels(raw: bytes | None, num_labels: int) -> np.ndarray:
    """Multi-hot labels from a `json` field {"labels": [i, ...]}, every i inside 0..num_labels-1."""
    if raw is None:
        raise BadData(f"no json, but the shards have {num_labels} label names")
    with _reading("json does not parse"):
        meta = json.loads(raw)
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if not isinstance(labels, list) or not all(type(i) is int for i in labels):
        raise BadData("json has no labels list of integers")
    if any(not 0 <= i < num_labels for i in labels):
        raise BadData(f"json labels {labels[:8]} outside 0..{num_labels - 1}")
    out = np.zeros(num_labels, dtype=np.float32)
    out[labels] = 1.0
    return out


@dataclass(frozen=True)
class DecodeSpec:
    """What decoding one sample needs; the same for the loader, evaluation and verify."""

    image_size: int
    crop: str = "center"
    hflip: bool = False
    num_classes: int = 0  # a cls outside 0..num_classes-1 is bad (0 = not checked)
    need_cls: bool = False  # a sample without cls is bad (class-conditional models)
    num_labels: int = 0  # multi-hot length from json labels (0 = no labels)
    max_pixels: int = MAX_PIXELS  # images with more pixels are bad, checked before decoding (0 = no limit)


def decode_sample(sample: dict, spec: DecodeSpec, rng: random.Random, out: np.ndarray | None = None) -> dict:
    """One raw sample -> {"image": uint8 h w c, "key", "cls" (-1 = none)[, "labels"]}; raises on bad data.
    With `out`, the image is decoded into it (see `load_image`)."""
    ext = next((k for k in IMAGE_KEYS if k in sample), None)
    if ext is None:
        found = ", ".join(sorted(k for k in sample if not k.startswith("__"))) or "nothing"
        raise BadData(f"no image ({'/'.join(IMAGE_KEYS)}); has {found}")
    with _reading(f"{ext} does not decode"):
        image = load_image(sample[ext], spec.image_size, spec.crop, spec.hflip, rng, spec.max_pixels, out)
    if "cls" in sample:
        cls = parse_cls(sample["cls"], spec.num_classes)
    elif spec.need_cls:
        raise BadData("no cls, but the model reads class labels")
    else:
        cls = -1
    out = {"key": sample["__key__"], "cls": cls}
    if spec.num_labels:
        out["labels"] = parse_labels(sample.get("json"), spec.num_labels)
    elif "json" in sample:
        with _reading("json does not parse"):
            json.loads(sample["json"])  # json is never malformed silently
    out["image"] = image
    return out


class _reading:
    """Name the field a library failed on ("jpg does not decode: struct.error: ..."); changes nothing
    else (the exception and where it was raised stay as they are: the boundary reads that). A class,
    not @contextmanager: two per sample, and a generator's setup costs several microseconds."""

    __slots__ = ("what",)

    def __init__(self, what: str):
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exn, tb) -> bool:
        if isinstance(exn, Exception):
            # add_note is Python 3.11+; on 3.10 the same list is set by hand (what the reader reads)
            exn.__notes__ = [*getattr(exn, "__notes__", []), self.what]
        return False  # raised on, unchanged


def guarded(sample: dict, spec: DecodeSpec, rng: random.Random, out: np.ndarray | None = None
            ) -> dict | BadSample:
    """`decode_sample`, with bad data turned into a BadSample; a bug of ours propagates."""
    try:
        return decode_sample(sample, spec, rng, out)
    except Exception as exn:
        if not is_data_error(exn):
            raise
        return BadSample(str(sample.get("__key__", "")), str(sample.get("__url__", "")), one_line(exn))
