"""Consolidate a training checkpoint into one fp32 state dict, and write it as safetensors.

Handles a plain accelerate checkpoint (one process, DDP: `model.safetensors` or
`pytorch_model.bin`) and a DeepSpeed ZeRO-1/2/3 checkpoint (`pytorch_model/` with one shard per
rank), whose fp32 master weights DeepSpeed's zero_to_fp32 rebuilds. Works offline, one process.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from models.weights import load_reason, state_dict_problem
from shards.atomic import atomic_path

PLAIN_FILES = ("model.safetensors", "pytorch_model.bin")  # accelerate's names for the first model
DS_TAG = "pytorch_model"  # accelerate's DeepSpeed checkpoint tag for the first model


class ExportError(ValueError):
    """The folder is not a checkpoint this script can read (one line saying why)."""


def _fp32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # float32 for floating tensors; integer buffers (counters, indices) keep their dtype.
    return {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def _deepspeed_tag(ckpt: Path) -> str | None:
    latest = ckpt / "latest"  # written by DeepSpeed next to its tag folder
    tag = latest.read_text().strip() if latest.is_file() else DS_TAG
    return tag if (ckpt / tag).is_dir() and any((ckpt / tag).glob("*model_states.pt")) else None


def consolidate(checkpoint_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model's whole fp32 state dict from a checkpoint folder (see the module docstring)."""
    ckpt = Path(checkpoint_dir)
    if not ckpt.is_dir():
        raise ExportError(f"{ckpt} is not a folder")
    for name in PLAIN_FILES:
        if (ckpt / name).is_file():
            try:
                if name.endswith(".safetensors"):
                    from safetensors.torch import load_file

                    state = load_file(ckpt / name)
                else:
                    state = torch.load(ckpt / name, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - truncated (SafetensorError) or foreign: one line naming it
                raise ExportError(f"{ckpt / name}: cannot read the weights ({load_reason(e)})") from None
            if (why := state_dict_problem(state)) is not None:
                raise ExportError(f"{ckpt / name}: {why}")
            return _fp32(state)
    tag = _deepspeed_tag(ckpt)
    if tag is not None:
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed warns that it guessed
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError as e:
            raise ExportError(f"{ckpt} is a DeepSpeed checkpoint: install deepspeed to export it ({e})") from None
        # DeepSpeed's shards hold Python objects besides tensors and it loads them with
        # weights_only=False: every load runs the weights-only unpickler with the allow-list of
        # harness/checkpoint.py instead, so a crafted shard is refused, never executed.
        from harness.checkpoint import ResumeError, weights_only_loads

        try:
            with weights_only_loads(ckpt):
                return _fp32(get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag))
        except ResumeError as e:
            raise ExportError(str(e).replace("cannot resume", "cannot read", 1)) from None
    raise ExportError(f"{ckpt} holds neither {' nor '.join(PLAIN_FILES)} nor a DeepSpeed {DS_TAG}/ folder")


def save_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write `state` as safetensors (tied weights are stored once each: safetensors refuses shared storage)."""
    from safetensors.torch import save_file

    seen, out = {}, {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        out[k] = v.clone() if key in seen else v
        seen[key] = k
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    return path
