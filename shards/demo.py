"""A generated, labelled image set for trying things out: coloured shapes on textured backgrounds.

Class (`cls`) = the shape, one of ten. Colour, size, position, a small rotation, an outline and the
background texture vary independently of it, so a conditional model has to learn the shape and
nothing else from the class. Seven binary attributes go into `json.labels` as multi-hot indices
into `label_names` (`ATTRIBUTES`), and a caption into `txt`, so multi-label and text conditioning
can be tried on the same data.

Every sample is a pure function of (seed, sample index, image size): the parameters are drawn in
the writer process from `numpy.random.default_rng([seed, index])` (they also go into the json),
the texture noise in the worker from `[seed, index, 1]`. Same arguments -> byte-identical shards,
whatever `--workers`.
"""

from __future__ import annotations

import colorsys
import functools
import io
import math

import numpy as np
from PIL import Image, ImageDraw

from shards.build import Item

SHAPES = ["circle", "square", "triangle", "pentagon", "hexagon", "star", "cross", "ring", "crescent", "heart"]
BACKGROUNDS = ["gradient", "stripes", "checker", "noise"]
ATTRIBUTES = ["warm", "large", "outlined", "dark_background", "stripes", "checker", "noise"]
_HUE_NAMES = [(15, "red"), (40, "orange"), (70, "yellow"), (160, "green"), (200, "cyan"), (255, "blue"),
              (290, "purple"), (335, "pink"), (360, "red")]
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: smooth edges at any size


def _hue_name(h: float) -> str:
    return next(name for top, name in _HUE_NAMES if h < top)


def _rgb(h: float, s: float, v: float) -> list[float]:
    return [round(c, 4) for c in colorsys.hsv_to_rgb(h / 360.0, s, v)]


def sample_spec(seed: int, i: int) -> tuple[int, dict, str]:
    """(class, json meta incl. multi-hot labels, caption) of demo sample i."""
    rng = np.random.default_rng([seed, i])
    cls = i % len(SHAPES)
    hue = float(rng.uniform(0, 360))
    color = _rgb(hue, float(rng.uniform(0.65, 1.0)), float(rng.uniform(0.75, 1.0)))
    radius = float(rng.uniform(0.18, 0.42))  # circumradius as a fraction of the image side
    cx, cy = (float(v) for v in rng.uniform(radius * 0.9, 1 - radius * 0.9, size=2))
    angle = float(rng.uniform(-20, 20))
    outlined = bool(rng.random() < 0.5)
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    dark = bool(rng.random() < 0.5)
    lo, hi = (0.05, 0.35) if dark else (0.6, 0.95)
    bg_colors = [_rgb(float(rng.uniform(0, 360)), float(rng.uniform(0.0, 0.5)), float(rng.uniform(lo, hi)))
                 for _ in range(2)]
    bg_angle = float(rng.uniform(0, 180))
    bg_scale = float(rng.uniform(0.08, 0.25))  # stripe period / checker cell / noise blob, fraction of side
    warm = hue < 40 or hue >= 335
    large = radius > 0.32
    on = [warm, large, outlined, dark, background == "stripes", background == "checker", background == "noise"]
    labels = [j for j, v in enumerate(on) if v]
    size_word = "large" if large else ("small" if radius < 0.25 else "medium")
    bg_word = {"gradient": "shaded", "stripes": "striped", "checker": "checkered", "noise": "mottled"}[background]
    caption = (f"a {size_word} {_hue_name(hue)} {SHAPES[cls]}{' with a dark outline' if outlined else ''} "
               f"on a {'dark' if dark else 'light'} {bg_word} background")
    meta = {"labels": labels, "shape": SHAPES[cls], "color": color, "radius": round(radius, 4),
            "center": [round(cx, 4), round(cy, 4)], "angle": round(angle, 2), "outlined": outlined,
            "background": background, "background_colors": bg_colors, "background_angle": round(bg_angle, 2),
            "background_scale": round(bg_scale, 4)}
    return cls, meta, caption


def demo_items(num_samples: int, seed: int) -> list[Item]:
    items = []
    for i in range(num_samples):
        cls, meta, caption = sample_spec(seed, i)
        items.append(Item(key=f"{i:06d}", cls=cls, meta=meta, txt=caption))
    return items


# ----------------------------------------------------------------------------------------------
# rendering (runs in the worker processes)


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return yy, xx


def _background(meta: dict, size: int, rng: np.random.Generator) -> np.ndarray:
    c1, c2 = (np.asarray(c, dtype=np.float32) for c in meta["background_colors"])
    yy, xx = _grid(size)
    a = math.radians(meta["background_angle"])
    proj = xx * math.cos(a) + yy * math.sin(a)
    scale = meta["background_scale"]
    kind = meta["background"]
    if kind == "gradient":
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
    elif kind == "stripes":
        t = 0.5 + 0.5 * np.tanh(4.0 * np.sin(2 * math.pi * proj / scale))
    elif kind == "checker":
        t = ((np.floor(xx / scale) + np.floor(yy / scale)) % 2).astype(np.float32)
    else:  # noise: smooth blobs from a coarse random grid
        cells = max(2, round(1 / scale))
        coarse = Image.fromarray(rng.random((cells, cells), dtype=np.float32), "F")
        t = np.asarray(coarse.resize((size, size), Image.BICUBIC), dtype=np.float32).clip(0, 1)
    img = c1 * (1 - t[..., None]) + c2 * t[..., None]
    img += rng.standard_normal(img.shape, dtype=np.float32) * 0.015  # a little grain
    return img


def _polygon(n: int, r: float, cx: float, cy: float, angle: float, inner: float = 0.0) -> list[tuple[float, float]]:
    """Regular n-gon (or n-pointed star when inner > 0), first vertex pointing up."""
    pts = []
    steps = 2 * n if inner else n
    for k in range(steps):
        rad = r * (inner if inner and k % 2 else 1.0)
        t = math.radians(angle) - math.pi / 2 + 2 * math.pi * k / steps
        pts.append((cx + rad * math.cos(t), cy + rad * math.sin(t)))
    return pts


def _rotate(pts, cx, cy, angle):
    a = math.radians(angle)
    ca, sa = math.cos(a), math.sin(a)
    return [(cx + (x - cx) * ca - (y - cy) * sa, cy + (x - cx) * sa + (y - cy) * ca) for x, y in pts]


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float, angle: float) -> Image.Image:
    n = size * SUPERSAMPLE
    cx, cy, r = cx * n, cy * n, r * n
    m = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(m)
    box = lambda rr, ox=0.0, oy=0.0: [cx + ox - rr, cy + oy - rr, cx + ox + rr, cy + oy + rr]  # noqa: E731
    if shape == "circle":
        d.ellipse(box(r * 0.85), fill=255)
    elif shape == "square":
        d.polygon(_polygon(4, r, cx, cy, angle + 45), fill=255)
    elif shape == "triangle":
        d.polygon(_polygon(3, r, cx, cy + r * 0.2, angle), fill=255)
    elif shape == "pentagon":
        d.polygon(_polygon(5, r, cx, cy, angle), fill=255)
    elif shape == "hexagon":
        d.polygon(_polygon(6, r, cx, cy, angle + 30), fill=255)
    elif shape == "star":
        d.polygon(_polygon(5, r, cx, cy, angle, inner=0.42), fill=255)
    elif shape == "cross":
        w = r * 0.32
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w),
               (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
        d.polygon(_rotate([(cx + x, cy + y) for x, y in pts], cx, cy, angle), fill=255)
    elif shape == "ring":
        d.ellipse(box(r * 0.9), fill=255)
        d.ellipse(box(r * 0.5), fill=0)
    elif shape == "crescent":
        d.ellipse(box(r * 0.9), fill=255)
        a = math.radians(angle - 45)
        d.ellipse(box(r * 0.75, r * 0.45 * math.cos(a), r * 0.45 * math.sin(a)), fill=0)
    elif shape == "heart":
        pts = []
        for k in range(64):
            t = 2 * math.pi * k / 64
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((cx + x * r / 17, cy + (y + 2) * r / 17))
        d.polygon(_rotate(pts, cx, cy, angle), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return m


def _dilate(a: np.ndarray, steps: int) -> np.ndarray:
    """Grey-level dilation by a 3x3 square, `steps` times (a cheap outline at the output size)."""
    for _ in range(steps):
        p = np.pad(a, 1, mode="edge")
        h, w = a.shape
        a = np.max([p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0)
    return a


def render(meta: dict, size: int, rng: np.random.Generator) -> Image.Image:
    """The picture a demo sample's meta describes, as an RGB PIL image of size x size."""
    img = _background(meta, size, rng)
    big = _shape_mask(meta["shape"], size, *meta["center"], meta["radius"], meta["angle"])
    alpha = np.asarray(big.resize((size, size), Image.BOX), dtype=np.float32)[..., None] / 255.0
    color = np.asarray(meta["color"], dtype=np.float32)
    img = img * (1 - alpha) + color * alpha
    if meta["outlined"]:
        ring = (_dilate(alpha[..., 0], max(1, round(size * 0.015)))[..., None] - alpha).clip(0, 1)
        img = img * (1 - ring) + (color * 0.3) * ring
    return Image.fromarray((img.clip(0, 1) * 255 + 0.5).astype(np.uint8), "RGB")


def produce_demo(item: Item, *, size: int, seed: int, fmt: str = "jpg", quality: int = 95):
    rng = np.random.default_rng([seed, int(item.key), 1])
    im = render(item.meta, size, rng)
    buf = io.BytesIO()
    if fmt == "png":
        im.save(buf, format="PNG")
    else:
        im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), fmt, {"width": size, "height": size}
