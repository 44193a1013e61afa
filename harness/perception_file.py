"""The perception network's file: one safetensors file that builds a frozen `PerceptualDistance`.

The metadata of the file holds `format`, `arch` (the `PerceptionNet` constructor arguments, JSON)
and `info` (classes, accuracy, training details, JSON). Only safetensors is read: never pickle.
All of it is checked at load (the architecture's types and ranges, the info fields' types, weights
floating and finite; fp16 / bf16 / fp64 weights are read as fp32): a bad file is one
PerceptionFileError line before any work, not a traceback at the first forward pass.
The network itself is a plain module in models/perception.py; reading and writing its file lives
here, in the harness, so that models/ stays free of files and of the atomic-write machinery.
"""

from __future__ import annotations

import json
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


# The `info` fields launch/train_perception.py writes (harness/tasks.py), and their JSON types. A file
# may leave any out; one that holds a field with another type is refused at load, not when a
# reader (the trainer's start-up summary) formats it. bool is not a number here, though Python says so.
NUMBER = (int, float)
INFO_TYPES = {"labels": str, "classes": list, "num_classes": int, "accuracy": NUMBER, "accuracy_on": str,
              "eval_samples": int, "chance": NUMBER, "final_train_loss": NUMBER, "image_size": int, "steps": int,
              "batch_size": int, "world_size": int, "data": (str, list), "val": (str, list)}


def info_problem(info) -> str | None:
    """Why `info` (the file's JSON) is not the info dict we write, in a few words; None when it is."""
    if not isinstance(info, dict):
        return f"info is a {type(info).__name__}, not a dict"
    for key, kind in INFO_TYPES.items():  # fields we do not write are let through
        if key in info and (isinstance(info[key], bool) or not isinstance(info[key], kind)):
            names = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
            return f"info {key!r} is {info[key]!r}, expected {names}"
    for key, what in (("classes", "class names"), ("data", "shard specs"), ("val", "shard specs")):
        if isinstance(info.get(key), list) and not all(isinstance(c, str) for c in info[key]):  # data.train: a list
            return f"info {key!r} must be a list of {what}, got {info[key]!r}"
    return None


def save_perception(net: PerceptionNet, path: str | Path, info: dict | None = None) -> Path:
    """Write `net` (weights + architecture + `info`) to `path`, atomically (shards.atomic): a reader
    never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    meta = {"format": FORMAT, "arch": json.dumps(asdict(net.arch)), "info": json.dumps(info or {})}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)  # made readable like any file (shards.atomic)
    return path


FILE_NAME = "perception.safetensors"  # what launch/train_perception.py writes into its run folder


def perception_path(path: str | Path) -> Path:
    """The perception file named by `path`: the file itself, or a folder holding perception.safetensors
    (the run folder of launch/train_perception.py)."""
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / FILE_NAME).is_file():
            return path / FILE_NAME
        raise PerceptionFileError(f"{path}: a folder, and it holds no {FILE_NAME}; give the file")
    if not path.is_file():
        raise PerceptionFileError(f"{path}: no such file")
    return path


def read_perception_meta(path: str | Path) -> tuple[PerceptionArch, dict]:
    """Architecture and info of a perception file (or of a folder's perception.safetensors), without
    loading its weights."""
    path = perception_path(path)
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
    except (KeyError, TypeError, ValueError) as e:  # PerceptionArch checks each value's type and range
        raise PerceptionFileError(f"{path}: broken architecture metadata ({e})") from None
    try:
        info = json.loads(meta.get("info", "{}"))
    except ValueError as e:
        raise PerceptionFileError(f"{path}: broken info metadata ({e})") from None
    if (why := info_problem(info)) is not None:
        raise PerceptionFileError(f"{path}: broken info metadata ({why})")
    return arch, info


def load_perception(path: str | Path, device: str | torch.device = "cpu") -> tuple[PerceptionNet, dict]:
    """The network stored in `path` (frozen is up to the caller) and its info dict."""
    path = perception_path(path)
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
    # Checked now, not at the first forward pass (for eval.fd_net: the first validation, mid-run).
    # Another float precision is only a different file format: computed in fp32 like the rest.
    for k, v in state.items():
        if not v.is_floating_point():
            raise PerceptionFileError(f"{path}: weight {k} is {v.dtype}, not floating point")
        state[k] = v.float()
        if not torch.isfinite(state[k]).all():
            raise PerceptionFileError(f"{path}: weight {k} holds non-finite values (NaN or inf)")
    net.load_state_dict(state, assign=True)
    return net.eval(), info


def load_distance(path: str | Path, device: str | torch.device = "cpu") -> PerceptualDistance:
    """The frozen perceptual distance over the network stored in `path`."""
    net, info = load_perception(path, device)
    return PerceptualDistance(net, info)
