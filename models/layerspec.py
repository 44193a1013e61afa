"""The layer-spec language: an encoder or decoder written as a list of strings.

    ["C2d_3_128_3_1_1", "2*VAERB_128_128", "C2d_128_128_3_4_0", "VAEA_128", "GN_32_128", "SiLU"]

Each item is `[N*]NAME[_ARG...]`: `N*` repeats the layer N times, arguments are separated by `_`.
Run `python -m models.layerspec --tokens` for the table of names (built from `LAYERS` below).

`Latent` marks where the latent sits. An encoder's output *is* its latent input: for a Gaussian
(kind kl, double_z) axis 1 of the encoder's output holds mean and log-variance halves (2*z
channels of a feature map, or 2*z features after `Flat`/`Lin`), for vq/fsq it is the vector that
is quantized. `Latent` may end the encoder list (it is implied there), or split one single list
into encoder and decoder: ["C2d_3_8_3_2_1", "Latent", "C2d_4_3_3_1_1"] with no separate decoder.

A spec is given inline (a list) or as a path to a .json / .yaml file holding a list, or a mapping
with `encoder` and `decoder` lists (model.encoder naming such a file, with no model.decoder, takes
both). Relative paths are looked up from the working directory, then from the repository root.

Mistakes fail at build time with one line naming the item (counted from 1, as written), the token
and what was expected. `dry_run` walks the shapes at an image size and names the first item whose
input does not fit; `python -m models.layerspec SPEC --image-size N` prints it as a table.

Shapes leave the batch axis out: (c, h, w) images, (c, l) sequences, (c, d, h, w) volumes,
(f,) flat features. Axis letters in patterns: b batch, c channels, h height, w width, l length,
d depth, f features, e condition-embedding width.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from einops.layers.torch import Rearrange
from torch import nn

from models.blocks import Downsample, ResnetBlock, Upsample, exists, make_attn
from models.conditioning import concat_condition

LATENT = "Latent"
REPO_ROOT = Path(__file__).resolve().parents[1]


class SpecError(ValueError):
    """A malformed layer spec or a shape that does not fit; the message is one line."""


class ShapeError(SpecError):
    """A well-formed spec whose shapes do not fit at the size it was tried at."""


class _Bad(Exception):
    """Raised by argument parsers and shape rules; turned into a SpecError naming the item."""


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


MAX_REPEAT = 1000  # N in N*LAYER
MAX_INT = 1 << 20  # any whole-number argument (channels, features, kernel): a typo's extra digits would
# otherwise allocate until the kernel's OOM killer ends the run without a word
MAX_SLOPE = 1000.0  # LReLU_slope


@dataclass(frozen=True)
class Arg:
    name: str
    kind: str = "int"  # int (>= low) | float (in [low, high)) | choice
    low: float = 1
    high: float = math.inf
    choices: tuple[str, ...] = ()
    optional: bool = False
    default: Any = None


def _fields(text: str, **kw) -> tuple[Arg, ...]:
    """`"in,out,kernel"` -> positive int Args."""
    return tuple(Arg(n, **kw) for n in text.split(","))


def _parse_args(title: str, spec: tuple[Arg, ...], raw: list[str]) -> tuple:
    required = [a for a in spec if not a.optional]
    numeric = all(a.kind != "choice" for a in spec)
    names = ",".join(a.name for a in required) + "".join(f"[,{a.name}]" for a in spec if a.optional)
    unit = "numbers" if numeric else "arguments"
    if not spec and raw:
        raise _Bad(f"{title} takes no arguments; got {len(raw)}")
    if not len(required) <= len(raw) <= len(spec):
        raise _Bad(f"{title} needs {names}; got {len(raw)} {unit if len(raw) != 1 else unit[:-1]}")
    out = []
    for a, text in zip(spec, raw, strict=False):  # optional trailing arguments may be left out
        if a.kind == "choice":
            if text not in a.choices:
                raise _Bad(f"{title} {a.name} must be one of {', '.join(a.choices)}; got {text!r}")
            out.append(text)
            continue
        try:
            if not text.isascii():  # int() and float() also read other scripts' digits ("٣" is 3)
                raise ValueError(text)
            value = int(text) if a.kind == "int" else float(text)
        except ValueError:
            what = "a whole number" if a.kind == "int" else "a number"
            raise _Bad(f"{title} needs {what} for {a.name}; got {text!r}") from None
        if not (a.low <= value < a.high):
            bound = f">= {a.low:g}" if a.high == math.inf else f"in [{a.low:g}, {a.high:g})"
            raise _Bad(f"{title} {a.name} must be {bound}; got {text}")
        if a.kind == "int" and value > MAX_INT:
            raise _Bad(f"{title} {a.name} must be at most {MAX_INT}; got {text}")
        out.append(value)
    out += [a.default for a in spec[len(raw) :]]
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Shape rules
# ---------------------------------------------------------------------------------------------


def _need(shape: tuple, ndim: int | tuple[int, ...], what: str) -> None:
    if len(shape) not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise _Bad(f"needs {what}")


def _channels(shape: tuple, c: int) -> None:
    if shape[0] != c:
        raise _Bad(f"expects {c} channels, gets {shape[0]}")


def _conv_shape(n: int, transposed: bool = False):
    dims = {1: "(c, l)", 2: "(c, h, w)", 3: "(c, d, h, w)"}[n]

    def rule(a, s):
        _need(s, n + 1, f"a {n}-d input {dims}")
        c_in, c_out, k, stride, pad = a[:5]
        _channels(s, c_in)
        if transposed:
            out = [(x - 1) * stride - 2 * pad + k + (a[5] or 0) for x in s[1:]]
        else:
            out = [(x + 2 * pad - k) // stride + 1 for x in s[1:]]
        if min(out) < 1:
            raise _Bad(f"kernel {k} with padding {pad} does not fit size {min(s[1:])}")
        return (c_out, *out)

    return rule


def _same(a, s):
    return s


def _spatial(fn, ndim=(3,), what="a feature map (c, h, w)"):
    def rule(a, s):
        _need(s, ndim, what)
        out = tuple(fn(a, x) for x in s[1:])
        if min(out) < 1:
            raise _Bad(f"the input is too small (size {min(s[1:])})")
        return (s[0], *out)

    return rule


def _with_channels(c_index: int, rule):
    def checked(a, s):
        _need(s, 3, "a feature map (c, h, w)")
        _channels(s, a[c_index])
        return rule(a, s)

    return checked


def _resnet_shape(a, s):
    _need(s, 3, "a feature map (c, h, w)")
    _channels(s, a[0])
    return (a[1], *s[1:])


def _norm_shape(c_index: int, ndim=None, what=""):
    def rule(a, s):
        if ndim:
            _need(s, ndim, what)
        _channels(s, a[c_index])
        return s

    return rule


def _linear_shape(a, s):
    _need(s, 1, "flat features (f,); put Flat before it")
    if s[0] != a[0]:
        raise _Bad(f"expects {a[0]} features, gets {s[0]}")
    return (a[1],)


def _upsample_shape(a, s):
    factor, mode = a
    if mode == "nearest":
        _need(s, (2, 3, 4), "a (c, l), (c, h, w) or (c, d, h, w) input")
    else:
        _need(s, 3, f"a feature map (c, h, w) for {mode} upsampling")
    return (s[0], *(x * factor for x in s[1:]))


def _unflat_shape(a, s):
    _need(s, 1, "flat features (f,)")
    if s[0] != math.prod(a):
        raise _Bad(f"expects {'x'.join(map(str, a))} = {math.prod(a)} features, gets {s[0]}")
    return tuple(a)


# ---------------------------------------------------------------------------------------------
# The token table
# ---------------------------------------------------------------------------------------------


@dataclass
class BuildContext:
    """Model-wide settings the layers read: dropout of VAERB, attention kind of VAEA, GroupNorm
    groups of both, resampling of Down/Up, and the condition width of VAERB (decoder side)."""

    dropout: float = 0.0
    attn_type: str = "vanilla"
    num_groups: int = 32
    resamp_with_conv: bool = True
    cond_dim: int = 0


@dataclass(frozen=True)
class LayerDef:
    title: str
    args: tuple[Arg, ...]
    build: Callable[[tuple, BuildContext], nn.Module]
    shape: Callable[[tuple, tuple], tuple]
    help: str
    check: Callable[[tuple], None] | None = None  # extra argument checks (raise _Bad)
    widen: int | None = None  # index of the input-width argument (conditioning adds channels there)


def _conv(n):
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[n]
    return lambda a, ctx: cls(a[0], a[1], a[2], stride=a[3], padding=a[4])


_CONV = _fields("in,out,kernel,stride") + (Arg("padding", low=0),)


def _check_gn(a):
    if a[1] % a[0]:
        raise _Bad(f"GroupNorm needs channels divisible by groups; {a[1]} % {a[0]} != 0")


def _check_output_padding(a):
    if a[5] >= a[3]:
        raise _Bad(f"ConvTranspose2d output_padding must be smaller than stride; {a[5]} >= {a[3]}")


def _act(cls, title):
    return LayerDef(title, (), lambda a, ctx: cls(), _same, f"{title}()")


LAYERS: dict[str, LayerDef] = {
    "C1d": LayerDef("Conv1d", _CONV, _conv(1), _conv_shape(1), "Conv1d(in, out, kernel, stride, padding)", widen=0),
    "C2d": LayerDef("Conv2d", _CONV, _conv(2), _conv_shape(2), "Conv2d(in, out, kernel, stride, padding)", widen=0),
    "C3d": LayerDef("Conv3d", _CONV, _conv(3), _conv_shape(3), "Conv3d(in, out, kernel, stride, padding)", widen=0),
    "CT2d": LayerDef(
        "ConvTranspose2d",
        _CONV + (Arg("output_padding", low=0, optional=True, default=0),),
        lambda a, ctx: nn.ConvTranspose2d(a[0], a[1], a[2], stride=a[3], padding=a[4], output_padding=a[5]),
        _conv_shape(2, transposed=True),
        "ConvTranspose2d(in, out, kernel, stride, padding[, output_padding < stride])",
        check=_check_output_padding,
        widen=0,
    ),
    "VAERB": LayerDef(
        "ResnetBlock",
        _fields("in,out"),
        lambda a, ctx: ResnetBlock(
            in_channels=a[0], out_channels=a[1], dropout=ctx.dropout, num_groups=ctx.num_groups, cond_dim=ctx.cond_dim
        ),
        _resnet_shape,
        "latent-diffusion residual block in -> out (model.dropout, model.norm_groups; FiLM on a conditional decoder)",
    ),
    "VAEA": LayerDef(
        "AttnBlock",
        _fields("channels"),
        lambda a, ctx: make_attn(a[0], ctx.attn_type, ctx.num_groups),
        _with_channels(0, _same),
        "self-attention block (kind from model.attn_type; none = identity)",
    ),
    "GN": LayerDef(
        "GroupNorm",
        _fields("groups,channels"),
        lambda a, ctx: nn.GroupNorm(a[0], a[1], eps=1e-6),
        _norm_shape(1),
        "GroupNorm(groups, channels), eps 1e-6",
        check=_check_gn,
    ),
    "BN2d": LayerDef(
        "BatchNorm2d",
        _fields("channels"),
        lambda a, ctx: nn.BatchNorm2d(a[0]),
        _norm_shape(0, 3, "a feature map (c, h, w)"),
        "BatchNorm2d(channels)",
    ),
    "BN1d": LayerDef(
        "BatchNorm1d",
        _fields("channels"),
        lambda a, ctx: nn.BatchNorm1d(a[0]),
        _norm_shape(0, (1, 2), "flat features (f,) or a sequence (c, l)"),
        "BatchNorm1d(features)",
    ),
    "SiLU": _act(nn.SiLU, "SiLU"),
    "GELU": _act(nn.GELU, "GELU"),
    "ReLU": _act(nn.ReLU, "ReLU"),
    "Tanh": _act(nn.Tanh, "Tanh"),
    "Sigmoid": _act(nn.Sigmoid, "Sigmoid"),
    "LReLU": LayerDef(
        # bounded: a slope torch cannot hold as a float32 fails only at the first forward
        "LeakyReLU", (Arg("slope", "float", 0.0, MAX_SLOPE),), lambda a, ctx: nn.LeakyReLU(a[0]), _same,
        f"LeakyReLU(slope), 0 <= slope < {MAX_SLOPE:g}",
    ),
    "Drop": LayerDef(
        "Dropout", (Arg("p", "float", 0.0, 1.0),), lambda a, ctx: nn.Dropout(a[0]), _same, "Dropout(p), 0 <= p < 1"
    ),
    "MaxP": LayerDef(
        "MaxPool2d",
        (Arg("kernel"), Arg("stride", optional=True)),
        lambda a, ctx: nn.MaxPool2d(a[0], stride=a[1] or a[0]),
        _spatial(lambda a, x: (x - a[0]) // (a[1] or a[0]) + 1),
        "MaxPool2d(kernel[, stride = kernel])",
    ),
    "UpS": LayerDef(
        "Upsample",
        (
            Arg("factor"),
            Arg("mode", "choice", choices=("nearest", "bilinear", "bicubic"), optional=True, default="nearest"),
        ),
        lambda a, ctx: nn.Upsample(scale_factor=a[0], mode=a[1]),
        _upsample_shape,
        "Upsample(factor[, nearest | bilinear | bicubic]), e.g. UpS_2_bilinear",
    ),
    "Down": LayerDef(
        "Downsample",
        _fields("channels"),
        lambda a, ctx: Downsample(in_channels=a[0], with_conv=ctx.resamp_with_conv),
        _with_channels(0, _spatial(lambda a, x: x // 2)),
        "latent-diffusion 2x downsampling (strided conv, or avg pool with model.resamp_with_conv=false)",
    ),
    "Up": LayerDef(
        "Upsample2x",
        _fields("channels"),
        lambda a, ctx: Upsample(in_channels=a[0], with_conv=ctx.resamp_with_conv),
        _with_channels(0, _spatial(lambda a, x: 2 * x)),
        "latent-diffusion 2x nearest upsampling (+ 3x3 conv with model.resamp_with_conv)",
    ),
    "Lin": LayerDef(
        "Linear", _fields("in,out"), lambda a, ctx: nn.Linear(a[0], a[1]), _linear_shape, "Linear(in, out)", widen=0
    ),
    "Flat": LayerDef(
        "Flatten", (), lambda a, ctx: Rearrange("b ... -> b (...)"), lambda a, s: (math.prod(s),), "b ... -> b (...)"
    ),
    "Unflat": LayerDef(
        "Unflatten",
        _fields("c,size") + (Arg("size", optional=True), Arg("size", optional=True)),
        lambda a, ctx: _unflatten([x for x in a if x is not None]),
        lambda a, s: _unflat_shape([x for x in a if x is not None], s),
        "Unflat_c_h_w: b (c h w) -> b c h w; Unflat_c_l gives (c, l), Unflat_c_d_h_w gives (c, d, h, w)",
    ),
}
LATENT_HELP = "marks where the latent sits (ends the encoder; splits a single list into encoder and decoder)"


def _unflatten(dims: list[int]) -> nn.Module:
    if len(dims) == 2:
        return Rearrange("b (c l) -> b c l", c=dims[0], l=dims[1])
    if len(dims) == 3:
        return Rearrange("b (c h w) -> b c h w", c=dims[0], h=dims[1], w=dims[2])
    return Rearrange("b (c d h w) -> b c d h w", c=dims[0], d=dims[1], h=dims[2], w=dims[3])


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One item of a spec as written: `count` copies of layer `name` with parsed `args`."""

    index: int  # 1-based position in the list as written
    token: str
    name: str
    args: tuple = ()
    count: int = 1

    @property
    def label(self) -> str:
        return f'item {self.index} "{self.token}"'


def parse_item(index: int, token: Any) -> Item:
    if not isinstance(token, str):
        raise SpecError(f'item {index} ({token!r}): a layer must be a string like "C2d_3_128_3_1_1"')
    text = token.strip()
    label = f'item {index} "{text}"'
    count = 1
    if "*" in text:
        head, text = text.split("*", 1)
        head = head.strip()
        if not (head.isascii() and head.isdigit()) or int(head) < 1:  # isdigit() alone takes "²"
            raise SpecError(f"{label}: repetition must be a positive whole number before '*', like \"2*VAERB_128_128\"")
        count = int(head)
        if count > MAX_REPEAT:  # a typo's extra digits would build for minutes before anything is said
            raise SpecError(f"{label}: {count} repetitions, more than {MAX_REPEAT}")
    name, *raw = text.strip().split("_")
    if name == LATENT:
        if raw or count != 1:
            raise SpecError(f"{label}: {LATENT} takes no arguments and no repetition")
        return Item(index, token.strip(), LATENT)
    if name not in LAYERS:
        lower = {k.lower(): k for k in [*LAYERS, LATENT]}
        close = lower.get(name.lower()) or next(iter(difflib.get_close_matches(name, [*LAYERS, LATENT], n=1)), None)
        hint = f'did you mean "{close}"? ' if close else ""
        raise SpecError(f'{label}: unknown layer "{name}"; {hint}known: {", ".join([*LAYERS, LATENT])}')
    layer = LAYERS[name]
    try:
        args = _parse_args(layer.title, layer.args, raw)
        if layer.check:
            layer.check(args)
    except _Bad as e:
        raise SpecError(f"{label}: {e}") from None
    return Item(index, token.strip(), name, args, count)


class SpecPart(list):
    """Layer strings cut out of a longer list as the user wrote it (the decoder after `Latent` in
    the encoder list): `side` names that list and `start` is the position of the first string in
    it, so an error names the item where the user can find it."""

    def __init__(self, tokens, side: str, start: int):
        super().__init__(tokens)
        self.side, self.start = side, start


def spec_side(spec: list, default: str) -> str:
    """The list a spec was written in: `default`, unless it was cut from another one."""
    return spec.side if isinstance(spec, SpecPart) else default


def parse_spec(spec: list) -> list[Item]:
    """Parse a list of layer strings; raises SpecError naming the first bad item."""
    if isinstance(spec, str) or not isinstance(spec, (list, tuple)):
        raise SpecError(f"a layer spec must be a list of strings; got {type(spec).__name__}")
    if not spec:
        raise SpecError("the layer spec is empty")
    start = spec.start if isinstance(spec, SpecPart) else 1
    return [parse_item(i, tok) for i, tok in enumerate(spec, start=start)]


def load_spec(value: Any, side: str = "encoder") -> list:
    """A spec from a config value: an inline list, or a path to a .json/.yaml file holding a list
    or a mapping with an `encoder` / `decoder` list (`side` picks which)."""
    if isinstance(value, (list, tuple)):
        return list(value)
    found, data = read_spec_file(value)
    if isinstance(data, dict):
        if side not in data:
            raise SpecError(f"{found}: the mapping has no {side!r} list (keys: {', '.join(map(str, data))})")
        data = data[side]
    if not isinstance(data, list):
        raise SpecError(f"{found}: expected a list of layer strings, got {type(data).__name__}")
    return data


def read_spec_file(value: Any) -> tuple[Path, Any]:
    """Find (working directory, then repository root) and read a .json/.yaml spec file."""
    if not isinstance(value, str) or not value:
        raise SpecError(f"expected a list of layer strings or a path to a .json/.yaml file; got {value!r}")
    path = Path(value).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, REPO_ROOT / path]
    found = None
    try:
        found = next((p for p in candidates if p.is_file()), None)
        if not found:
            raise SpecError(f"{value!r} is neither a list of layer strings nor an existing .json/.yaml file")
        text = found.read_text()
    except UnicodeDecodeError:
        raise SpecError(f"{found}: not a UTF-8 text file (a layer spec file is JSON or YAML text)") from None
    except OSError as e:  # no permission, an I/O error (/proc/self/mem), a name too long
        why = e.strerror or type(e).__name__
        raise SpecError(f"{found or value}: cannot read the layer spec file ({why})") from None
    kind = "JSON" if found.suffix == ".json" else "YAML"
    try:
        return found, json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise SpecError(f"{found}: not valid {kind} ({str(e).splitlines()[0]})") from None


def check_groups(items: list[Item], num_groups: int, attn_type: str = "vanilla") -> None:
    """VAERB/VAEA normalise with `num_groups` GroupNorm groups: their channels must divide (VAEA is an
    identity, without a norm, when `attn_type` is none)."""
    grouped = ("VAERB",) if attn_type == "none" else ("VAERB", "VAEA")
    for item in items:
        if item.name in grouped:
            for c in item.args:
                if c % num_groups:
                    raise SpecError(
                        f"{item.label}: {c} channels are not divisible into model.norm_groups={num_groups} groups"
                    )


def check_condition_input(items: list[Item]) -> None:
    """A condition enters a conditioned network as extra inputs of its first layer: that layer must
    be one whose input width can grow."""
    first = items[0]
    if LAYERS[first.name].widen is None:
        raise SpecError(
            f"{first.label}: a condition enters as extra inputs of the first layer, which must be "
            f"{', '.join(k for k, v in LAYERS.items() if v.widen is not None)}"
        )


def _is_latent(token: Any) -> bool:
    return isinstance(token, str) and token.split("*")[-1].strip() == LATENT


def split_at_latent(encoder: list, decoder: list | None = None) -> tuple[list, list]:
    """Encoder and decoder token lists, with the `Latent` marker resolved (see the module docstring).

    A decoder cut from the encoder list comes back as a `SpecPart`: its errors name the items by
    their place in model.encoder.
    """
    if not isinstance(decoder, SpecPart):
        decoder = list(decoder or [])
    enc_marks = [i for i, t in enumerate(encoder) if _is_latent(t)]
    if len(enc_marks) > 1:
        where = ", ".join(str(i + 1) for i in enc_marks)
        raise SpecError(f"encoder: {LATENT} appears {len(enc_marks)} times (items {where}); one latent only")
    for i in enc_marks:  # "2*Latent" would otherwise pass as the marker
        if "*" in encoder[i]:
            raise SpecError(f'encoder: item {i + 1} "{encoder[i].strip()}": {LATENT} takes no repetition')
    dec_marks = [i + 1 for i, t in enumerate(decoder) if _is_latent(t)]
    if dec_marks:
        raise SpecError(f"decoder: item {dec_marks[0]} \"{LATENT}\": the latent marker belongs in the encoder list")
    if enc_marks:
        cut = enc_marks[0]
        rest = SpecPart(encoder[cut + 1 :], "encoder", cut + 2)
        encoder = list(encoder[:cut])
        if rest and decoder:
            raise SpecError(f"encoder: layers follow {LATENT} and a decoder is also given; use one or the other")
        decoder = rest or decoder
    if not encoder:
        raise SpecError("encoder: the layer spec is empty")
    if not decoder:
        try:  # a misspelt marker ("latent", "Latent_4") is the mistake to name, not the decoder it hid
            parse_spec(encoder)
        except SpecError as e:
            raise SpecError(f"encoder: {e}") from None
        raise SpecError(f"decoder: missing; give a decoder list, or put the decoder after {LATENT} in the encoder list")
    return list(encoder), decoder


# ---------------------------------------------------------------------------------------------
# Shapes: dry run
# ---------------------------------------------------------------------------------------------


def fmt(shape: tuple) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


@dataclass
class DryRun:
    """Shapes through a spec: one row (item, input, output) per layer as written."""

    rows: list[tuple[Item, tuple, tuple]] = field(default_factory=list)
    in_shape: tuple = ()
    out_shape: tuple = ()

    def table(self) -> str:
        lines = []
        for item, s_in, s_out in self.rows:
            lines.append(f"  {item.index:>3}  {item.token:<26} {fmt(s_in):>18} -> {fmt(s_out)}")
        return "\n".join(lines)


def dry_run(spec: list | list[Item], in_shape: tuple) -> DryRun:
    """Walk `in_shape` (no batch axis) through the spec; SpecError at the first item that does not fit."""
    items = spec if spec and isinstance(spec[0], Item) else parse_spec(spec)
    run = DryRun(in_shape=tuple(in_shape))
    shape = tuple(in_shape)
    for item in items:
        if item.name == LATENT:
            continue
        start = shape
        for r in range(item.count):
            try:
                shape = tuple(LAYERS[item.name].shape(item.args, shape))
            except _Bad as e:
                rep = f" (copy {r + 1} of {item.count})" if item.count > 1 else ""
                title = LAYERS[item.name].title
                raise ShapeError(f"{item.label}{rep}: input {fmt(shape)} does not fit {title}: {e}") from None
        run.rows.append((item, start, shape))
    run.out_shape = shape
    return run


@dataclass
class AutoencoderShapes:
    encoder: DryRun
    decoder: DryRun
    latent: tuple
    decoder_side: str = "decoder"  # "encoder" when the decoder follows Latent in the encoder list

    def report(self) -> str:
        return "\n".join(
            [
                f"encoder {fmt(self.encoder.in_shape)} -> {fmt(self.encoder.out_shape)}",
                self.encoder.table(),
                f"latent {fmt(self.latent)}",
                f"decoder {fmt(self.decoder.in_shape)} -> {fmt(self.decoder.out_shape)}",
                self.decoder.table(),
            ]
        )


def check_autoencoder(
    encoder: list,
    decoder: list | None = None,
    *,
    image_size: int,
    in_channels: int = 3,
    out_channels: int = 3,
    latent: str = "gaussian",
    latent_dim: int | None = None,
    num_groups: int | None = None,
    attn_type: str = "vanilla",
) -> AutoencoderShapes:
    """Dry-run an encoder/decoder pair at `image_size` and check that they pair up.

    latent: "gaussian" (axis 1 of the encoder output is mean and log-variance halves) or "plain"
    (the encoder output is the latent); latent_dim, if given, is the size axis 1 of the latent must
    have (a quantizer's dimension); num_groups, if given, is checked against the channels of every
    VAERB item, and of every VAEA item unless attn_type is none. Errors start with "encoder:" or "decoder:".
    """
    encoder, decoder = split_at_latent(encoder, decoder)
    dside = spec_side(decoder, "decoder")  # "encoder" when the decoder follows Latent there
    dname = "" if dside == "decoder" else f"the layers after {LATENT}: "
    if exists(num_groups):
        for side, spec in (("encoder", encoder), (dside, decoder)):
            try:
                check_groups(parse_spec(spec), num_groups, attn_type)
            except SpecError as e:
                raise SpecError(f"{side}: {e}") from None
    try:
        enc = dry_run(encoder, (in_channels, image_size, image_size))
    except SpecError as e:
        raise type(e)(f"encoder: {e}") from None
    lat = list(enc.out_shape)
    if latent == "gaussian":
        if lat[0] % 2:
            raise ShapeError(
                f"encoder: output {fmt(enc.out_shape)} cannot be split into mean and log-variance halves "
                f"(axis 1 = {lat[0]} is odd)"
            )
        lat[0] //= 2
    if exists(latent_dim) and lat[0] != latent_dim:
        raise ShapeError(
            f"encoder: output {fmt(enc.out_shape)} has {lat[0]} channels but the quantizer needs {latent_dim}"
        )
    try:
        dec = dry_run(decoder, tuple(lat))
    except SpecError as e:
        raise type(e)(f"{dside}: {e} (the latent is {fmt(tuple(lat))})") from None
    want = (out_channels, image_size, image_size)
    if dec.out_shape != want:
        raise ShapeError(f"{dside}: {dname}output {fmt(dec.out_shape)} does not match the image {fmt(want)}")
    return AutoencoderShapes(enc, dec, tuple(lat), dside)


def batchnorm_problem(shapes: AutoencoderShapes, batch_size: int) -> str | None:
    """The first BatchNorm item that would see a single value per channel in a training batch of
    `batch_size` (torch refuses to normalise it, at the first step), as one line starting with its
    side ("encoder: item 2 ..."), or None."""
    for side, run in (("encoder", shapes.encoder), (shapes.decoder_side, shapes.decoder)):
        for item, s_in, _ in run.rows:
            if item.name in ("BN1d", "BN2d") and batch_size * math.prod(s_in[1:]) < 2:
                return (f"{side}: {item.label}: {LAYERS[item.name].title} sees one value per channel (input "
                        f"{fmt(s_in)} at train.batch_size={batch_size} per rank) and cannot normalise it in training; "
                        "raise train.batch_size to 2 or more, or use another norm (GN) there")
    return None


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------


class SpecNet(nn.Module):
    """An encoder or decoder built from a layer spec; `forward(x, emb=None)`.

    cond_in > 0: the condition embedding `b e` is appended to the input along axis 1 (channels or
    features), and the first layer (which must be a conv or Lin) is widened to take it.
    ctx.cond_dim > 0: VAERB blocks are FiLM-conditioned on the embedding (used for decoders).
    """

    def __init__(
        self, spec: list, *, in_channels: int | None = None, cond_in: int = 0, ctx: BuildContext | None = None
    ):
        super().__init__()
        ctx = ctx or BuildContext()
        self.items = [it for it in parse_spec(spec) if it.name != LATENT]
        if not self.items:
            raise SpecError("the layer spec has no layers")
        self.cond_in = cond_in
        first = self.items[0]
        if cond_in:
            check_condition_input(self.items)
        if not exists(in_channels) and LAYERS[first.name].widen is not None:
            in_channels = first.args[0]  # a conv or Lin first: its input width is the network's
        self.in_channels = in_channels
        layers = []
        for item in self.items:
            for _ in range(item.count):
                args = item.args
                if cond_in and not layers:
                    w = LAYERS[item.name].widen
                    args = args[:w] + (args[w] + cond_in,) + args[w + 1 :]
                try:
                    layers.append(LAYERS[item.name].build(args, ctx))
                except ValueError as e:  # e.g. VAERB channels not divisible into model.norm_groups
                    raise SpecError(f"{item.label}: {e}") from None
        self.layers = nn.ModuleList(layers)

    def infer(self, in_shape: tuple) -> tuple:
        return dry_run(self.items, in_shape).out_shape

    def out_shape(self, image_size: int) -> tuple:
        """Output shape for a square image of side `image_size` with `in_channels` channels."""
        if not exists(self.in_channels):
            raise SpecError(f"{self.items[0].label}: cannot tell the input channels; pass in_channels")
        return self.infer((self.in_channels, image_size, image_size))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        if self.cond_in:
            x = concat_condition(x, emb)
        for layer in self.layers:
            x = layer(x, emb) if getattr(layer, "takes_cond", False) else layer(x)
        return x


# ---------------------------------------------------------------------------------------------
# Command line: python -m models.layerspec SPEC --image-size N
# ---------------------------------------------------------------------------------------------


def token_table() -> str:
    rows = [f"  {name:<8} {d.help}" for name, d in LAYERS.items()]
    rows.append(f"  {LATENT:<8} {LATENT_HELP}")
    return "  N*TOKEN  repeat a layer N times\n" + "\n".join(rows)


class _Usage(Exception):
    """A usage mistake on the command line (exit code 2)."""


def _spec_from_cli(text: str, arg: str = "SPEC") -> Any:
    """A file path, a JSON list, or tokens separated by commas/spaces."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as e:
            raise _Usage(f"{arg} {stripped[:40]!r}: not a valid JSON list ({e}); quote each layer, "
                         '\'["C2d_3_8_3_1_1", "SiLU"]\'') from None
    if Path(stripped).suffix in (".json", ".yaml", ".yml") or Path(stripped).is_file():
        return stripped
    return [t for t in stripped.replace(",", " ").split() if t]


def main(argv: list[str] | None = None, prog: str = "python -m models.layerspec") -> int:
    """The layer-spec dry run's command line (launch/layerspec.py)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Dry-run a layer spec: shapes per item, the first item that does not fit, the latent shape.",
        epilog="layers:\n" + token_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("spec", nargs="?", help="a .json/.yaml file (a list, or {encoder, decoder}), a JSON list, or tokens")
    p.add_argument("decoder", nargs="?", help="a decoder spec when SPEC is an encoder only")
    p.add_argument("--image-size", type=int, default=256, help="square input size in pixels (default 256)")
    p.add_argument("--in-channels", type=int, default=3, help="image channels (default 3)")
    p.add_argument("--norm-groups", type=int, default=32,
                   help="GroupNorm groups of VAERB/VAEA, model.norm_groups (default 32, the config default)")
    p.add_argument("--attn-type", choices=["vanilla", "linear", "none"], default="vanilla",
                   help="model.attn_type (none: VAEA is an identity, without norm groups)")
    p.add_argument("--latent", choices=["gaussian", "plain"], default="gaussian",
                   help="gaussian: the encoder output holds mean and log-variance halves (default)")
    p.add_argument("--tokens", action="store_true", help="print the layer names and exit")
    args = p.parse_args(argv)
    if args.tokens or not args.spec:
        print(token_table())
        return 0
    try:
        for flag, value in (("--image-size", args.image_size), ("--in-channels", args.in_channels),
                            ("--norm-groups", args.norm_groups)):
            if value < 1:
                raise _Usage(f"{flag} {value}: must be a positive whole number")
        raw = _spec_from_cli(args.spec)
        decoder_raw = _spec_from_cli(args.decoder, "DECODER") if args.decoder else None
    except _Usage as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        both = isinstance(raw, str) and isinstance(read_spec_file(raw)[1], dict)
        encoder = load_spec(raw, "encoder")
        decoder = None
        if decoder_raw is not None:
            decoder = load_spec(decoder_raw, "decoder")
        elif both:
            decoder = load_spec(raw, "decoder")
        has_marker = any(_is_latent(t) for t in encoder)
        if decoder is None and not has_marker:
            items = parse_spec(encoder)
            check_groups(items, args.norm_groups, args.attn_type)
            run = dry_run(items, (args.in_channels, args.image_size, args.image_size))
            print(f"{fmt(run.in_shape)} -> {fmt(run.out_shape)}")
            print(run.table())
            return 0
        size, c = args.image_size, args.in_channels
        shapes = check_autoencoder(encoder, decoder, image_size=size, in_channels=c, out_channels=c, latent=args.latent,
                                   num_groups=args.norm_groups, attn_type=args.attn_type)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(shapes.report())
    print(f"ok: latent {fmt(shapes.latent)} at {args.image_size}x{args.image_size}; encoder and decoder pair up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
