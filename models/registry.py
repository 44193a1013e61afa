"""Model kinds: the value of `model.kind` -> the class that builds it.

A kind's class needs one thing, `from_config(m)` building it from a `ModelConfig` `m`, and may
have four more (models/base.py gives autoencoders all of them):
    check_config(m, image_size)  raise `ModelConfigError` before any work; may fill in derived keys
    batch_problem(m, image_size, batch_size)  why `m` cannot train on that many images per rank, or None
    deepspeed_unsupported(m)     why `m` cannot train under DeepSpeed (one line), or None
    config_keys                  the `model.*` keys the class reads
Nothing here assumes encode/decode: a classifier registers the same way.

A new kind is one new file with its class plus one `register` line at the bottom of this one.
"""

from __future__ import annotations

import difflib

from torch import nn

from models.autoencoder_kl import AutoencoderKL
from models.base import ModelConfigError
from models.classifier import Classifier, RotationClassifier
from models.prior import CodePrior
from models.vqvae import VQAutoencoder

_KINDS: dict[str, type[nn.Module]] = {}


def register(kind: str, cls: type[nn.Module] | None = None):
    """Make `model.kind=<kind>` build `cls`; also usable as a class decorator, `@register("kind")`."""

    def add(c: type[nn.Module]) -> type[nn.Module]:
        if not callable(getattr(c, "from_config", None)):
            raise TypeError(f"register({kind!r}): {c.__name__} has no from_config(m) classmethod")
        if _KINDS.get(kind, c) is not c:
            raise ValueError(f"register({kind!r}): already taken by {_KINDS[kind].__name__}")
        _KINDS[kind] = c
        return c

    return add if cls is None else add(cls)


def kinds() -> list[str]:
    """The registered kinds, in registration order."""
    return list(_KINDS)


def model_class(kind: str) -> type[nn.Module]:
    """The class registered for `kind`; an unknown kind is one line naming the known ones."""
    if kind not in _KINDS:
        close = difflib.get_close_matches(str(kind), _KINDS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ModelConfigError(
            f"model.kind: {kind!r} is not allowed; {hint}choose one of {' | '.join(map(repr, _KINDS))}"
        )
    return _KINDS[kind]


def check_config(m, image_size: int) -> None:
    """Validate `ModelConfig` `m` for square images of side `image_size` (its kind's own checks)."""
    cls = model_class(m.kind)
    if hasattr(cls, "check_config"):
        cls.check_config(m, image_size)


def batch_problem(m, image_size: int, batch_size: int) -> str | None:
    """Why a checked `m` cannot train on micro-batches of `batch_size` images per rank (one line naming
    the key), or None."""
    why = getattr(model_class(m.kind), "batch_problem", None)
    return why(m, image_size, batch_size) if why else None


def build_model(m) -> nn.Module:
    """The model `ModelConfig` `m` describes (`m.kind` picks the class, which reads the rest)."""
    return model_class(m.kind).from_config(m)


def deepspeed_unsupported(m) -> str | None:
    """Why `m` cannot train under DeepSpeed (one line naming the key), or None."""
    why = getattr(model_class(m.kind), "deepspeed_unsupported", None)
    return why(m) if why else None


register("kl", AutoencoderKL)
register("vq", VQAutoencoder)
register("fsq", VQAutoencoder)
register("classifier", Classifier)
register("rotnet", RotationClassifier)
register("prior", CodePrior)
