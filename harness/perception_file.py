"""The perception network's file: one safetensors file that builds a frozen `PerceptualDistance`.

The metadata of the file holds `format`, `arch` (the `PerceptionNet` constructor arguments, JSON)
and `info` (classes, accuracy, training details, JSON). Only safetensors is read: never pickle.
The network itself is a plain module in models/perception.py; reading and writing its file lives
here, in the harness, so that models/ stays free of files and of the atomic-write machinery.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models.perception import PerceptionArch, PerceptionNet, PerceptualDistance
from shards.atomic import atomic_path

FORMAT = "vae-harness-perception/1"


class PerceptionFileError(ValueError):
    """A perception network file is missing, unreadable or not one of ours: one line why."""


def save_perception(net: PerceptionNet, path: str | Path, info: dict | None = None) -> Path:
    """Write `net` (weights + architecture + `info`) to `path`, atomically (shards.atomic): a reader
    never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    meta = {"format": FORMAT, "arch": json.dumps(asdict(net.arch)), "info": json.dumps(info or {})}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates files private (0600); this one is a plain artifact
    return path


def read_perception_meta(path: str | Path) -> tuple[PerceptionArch, dict]:
    """Architecture and info of a perception file, without loading its weights."""
    path = Path(path)
    if not path.is_file():
        raise PerceptionFileError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for broken files
        raise PerceptionFileError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT:
        raise PerceptionFileError(f"{path}: not a perception network file (format {meta.get('format')!r}, "
                                  f"expected {FORMAT!r}; write one with launch/train_perception.py)")
    try:
        arch = PerceptionArch(**json.loads(meta["arch"]))
        info = json.loads(meta.get("info", "{}"))
    except (KeyError, TypeError, ValueError) as e:
        raise PerceptionFileError(f"{path}: broken architecture metadata ({e})") from None
    return arch, info


def load_perception(path: str | Path, device: str | torch.device = "cpu") -> tuple[PerceptionNet, dict]:
    """The network stored in `path` (frozen is up to the caller) and its info dict."""
    arch, info = read_perception_meta(path)
    try:
        with torch.device("meta"):  # no random init that the weights would overwrite anyway
            net = PerceptionNet(**asdict(arch))
    except ValueError as e:
        raise PerceptionFileError(f"{path}: {e}") from None
    try:
        state = load_file(str(path), device=str(device))
    except Exception as e:  # noqa: BLE001
        raise PerceptionFileError(f"{path}: cannot read the weights ({type(e).__name__}: {e})") from None
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise PerceptionFileError(f"{path}: the weights do not fit the stored architecture "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]})")
    net.load_state_dict(state, assign=True)
    return net.eval(), info


def load_distance(path: str | Path, device: str | torch.device = "cpu") -> PerceptualDistance:
    """The frozen perceptual distance over the network stored in `path`."""
    net, info = load_perception(path, device)
    return PerceptualDistance(net, info)
