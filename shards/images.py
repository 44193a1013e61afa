"""Turn the bytes of one image file into what goes into a shard: 8-bit RGB, upright, maybe smaller.

Every image in a shard decodes with plain PIL to an 8-bit RGB picture the right way up, so no
reader has to care about grayscale, CMYK, palettes, alpha, 16-bit samples or EXIF orientation.
The original bytes are kept when they already are that (JPEG/PNG/WebP, 8-bit RGB, no transparent
colour, no rotation, readable EXIF, within `max_size`): re-encoding would cost time and quality for
nothing. Everything else is re-encoded as JPEG at `quality`, without EXIF.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

# A picture bigger than this is almost surely a mistake or an attack; PIL's own guard is 89 Mpx
# as a warning and twice that as an error. We turn both into a skip with a reason.
Image.MAX_IMAGE_PIXELS = 200_000_000
# The training loader's default limit (data.max_pixels; shards.decode reads it from here). A stored
# image over it would be skipped by every read, so the builder skips it once, saying why; with
# --max-size it is downscaled first and only decoding has to fit under the limit above.
MAX_PIXELS = 64_000_000

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # formats stored as they are
EXIF_ORIENTATION = 0x0112
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit greyscale (PIL opens a 16-bit PNG as I;16 or I)
# Downscaling filters. "area" (PIL's BOX: the average over each output pixel's footprint) is what
# img2dataset uses by default (cv2.INTER_AREA) and costs about 40% of "bicubic" here.
RESIZE_FILTERS = {"bicubic": Image.BICUBIC, "area": Image.BOX, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS}


class BadImage(Exception):
    """An input that cannot become a sample; the message is the reason written to bad_files.txt.
    (Raised by `to_rgb` also when the loader calls it: shards.decode turns it into its BadData.)"""


@dataclass
class Encoded:
    data: bytes
    ext: str  # "jpg" | "png" | "webp"
    width: int  # of the stored image
    height: int
    orig_width: int  # of the input, after EXIF rotation
    orig_height: int
    reencoded: bool


def _is_png16(data: bytes) -> bool:
    """A PNG with 16 bits per sample. PIL opens a 16-bit RGB PNG as mode "RGB" (it drops the low
    bytes while decoding), so the mode alone cannot tell: the IHDR bit depth (byte 24) can."""
    return data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) > 24 and data[24] == 16


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: alpha composited on white, 16-bit and float scaled, not clipped."""
    transparent = "transparency" in im.info and im.mode in ("1", "L", "P", "RGB")  # a tRNS key colour
    if im.mode == "RGB" and not transparent:
        return im
    if im.mode in INT_MODES or im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        # The scale follows the mode, never the pixel values: a dark 16-bit picture stays dark.
        # Float has no fixed range: [0, 1] is read as that; anything else (0..1.2? 0..255? HDR?)
        # would be a guess, and a wrong guess is a silently wrong picture.
        if im.mode == "F" and a.size and not (a.min() >= 0.0 and a.max() <= 1.0):  # (NaN fails too)
            raise BadImage("float image with values outside [0, 1]: its brightness scale is unknown")
        # PIL reads 16-bit files as mode "I" too; values past 16 bits (a 32-bit TIFF) were clipped to white
        if im.mode != "F" and a.size and not (a.min() >= 0.0 and a.max() <= 65535.0):
            raise BadImage(f"{im.mode} image with values outside 0..65535 (more than 16 bits): its brightness scale "
                           "is unknown")
        hi = 1.0 if im.mode == "F" else 65535.0
        a = np.clip(np.rint(a * (255.0 / hi)), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if transparent or im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    # CMYK (PIL undoes Adobe's inverted storage when it decodes), L, 1, YCbCr, LAB, HSV, plain P.
    return im.convert("RGB")


def exif_orientation(im: Image.Image) -> int | None:
    """The EXIF orientation (1 = upright, 0 and missing read as 1), or None when the EXIF block cannot
    be read. Such a block must not make a good picture bad, but the builder must not keep it either:
    ImageOps.exif_transpose would raise on it. So the builder re-encodes without it, and the loader
    (shards/decode.py, which reads the orientation through here too) shows such a picture as stored."""
    try:
        value = im.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # PIL's parser fails on hostile bytes in any way it likes (struct.error, ...)
        return None
    if value is None or value == 0:
        return 1
    return value if type(value) is int else None


# What each EXIF orientation asks for: ImageOps.exif_transpose's table. Applied here rather than
# through exif_transpose, which also rewrites the EXIF block and can fail on it.
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def _fit(w: int, h: int, max_size: int) -> tuple[int, int]:
    """(w, h) scaled so the longest side is at most max_size (0 = no limit), aspect kept."""
    if not max_size or max(w, h) <= max_size:
        return w, h
    s = max_size / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def encode_jpeg(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _check_pixels(ow: int, oh: int, tw: int, th: int, max_size: int) -> None:
    """Refuse an image that would be stored (tw x th) over the training loader's default pixel limit."""
    if tw * th > MAX_PIXELS:
        size = f"{ow}x{oh}" + (f" (stored as {tw}x{th})" if (tw, th) != (ow, oh) else "")
        raise BadImage(f"{size} is {tw * th / 1e6:.0f} megapixels, over the training loader's default "
                       f"data.max_pixels ({MAX_PIXELS / 1e6:.0f} megapixels): pass "
                       f"{'a smaller ' if max_size else ''}--max-size to downscale it")


def process_image(data: bytes, *, max_size: int = 0, quality: int = 95, resize_filter: str = "bicubic") -> Encoded:
    """Check and normalize one encoded image. Raises BadImage with a short reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt, mode = im.format, im.mode
            w0, h0 = im.size
            if fmt != "JPEG":
                # Outside JPEG the EXIF may come after the pixels (PNG's eXIf chunk): PIL decodes them to
                # read it, and exif_orientation would take a decoding error for "no EXIF" and keep a
                # broken image. So: the size from the header (the area is the same either way up), then
                # every pixel decoded here, where an error is one.
                _check_pixels(w0, h0, *_fit(w0, h0, max_size), max_size)
                im.load()
            orient = exif_orientation(im)  # None: unreadable EXIF, re-encoded without it
            rotated = orient in (5, 6, 7, 8)
            ow, oh = (h0, w0) if rotated else (w0, h0)
            tw, th = _fit(ow, oh, max_size)
            _check_pixels(ow, oh, tw, th, max_size)  # a JPEG: known from the header, nothing decoded yet
            animated = getattr(im, "is_animated", False)  # stored as its first frame
            plain = mode == "RGB" and "transparency" not in im.info and not (fmt == "PNG" and _is_png16(data))
            keep = fmt in KEEP_FORMATS and plain and orient == 1 and (tw, th) == (ow, oh) and not animated
            if fmt == "JPEG":
                # DCT-domain scaling: decoding at 1/8 still reads every byte (so a truncated file is
                # still caught) at a fraction of the cost; when resizing, decode no larger than needed.
                if keep:
                    im.draft(None, (max(1, w0 // 8), max(1, h0 // 8)))
                elif (tw, th) != (ow, oh):
                    dw, dh = (th, tw) if rotated else (tw, th)
                    im.draft(None, (dw, dh))
            im.load()
    except Image.DecompressionBombError as e:
        raise BadImage(f"too large: {e}") from None
    except Image.DecompressionBombWarning as e:
        raise BadImage(f"too large: {e}") from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image PIL can read") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as e:
        raise BadImage(f"cannot decode: {e}") from None
    if keep:
        return Encoded(data, KEEP_FORMATS[fmt], ow, oh, ow, oh, reencoded=False)
    try:
        if orient in UPRIGHT:
            im = im.transpose(UPRIGHT[orient])
        im = to_rgb(im)
        if im.size != (tw, th):
            im = im.resize((tw, th), RESIZE_FILTERS[resize_filter])
        out = encode_jpeg(im, quality)
    except (OSError, ValueError) as e:
        raise BadImage(f"cannot convert: {e}") from None
    return Encoded(out, "jpg", tw, th, ow, oh, reencoded=True)
