"""Export one consolidated fp32 `model.safetensors` from a training checkpoint.

    python launch/export.py runs/kl/checkpoints/step_5000                # -> .../step_5000/export/
    python launch/export.py runs/kl/checkpoints/step_5000 --out kl_f8/   # model.safetensors + config.yaml

Works offline on one CPU process, whatever wrote the checkpoint:
- a plain accelerate checkpoint (one process, DDP): `model.safetensors` or `pytorch_model.bin`;
- a DeepSpeed ZeRO-1/2/3 checkpoint (`pytorch_model/` with one shard per rank): the fp32 master
  weights are rebuilt from the optimizer shards by DeepSpeed's zero_to_fp32 (needs deepspeed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch

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
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return _fp32(load_file(ckpt / name))
            return _fp32(torch.load(ckpt / name, map_location="cpu", weights_only=True))
    tag = _deepspeed_tag(ckpt)
    if tag is not None:
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError as e:
            raise ExportError(f"{ckpt} is a DeepSpeed checkpoint: install deepspeed to export it ({e})") from None
        # DeepSpeed's shards hold Python objects besides tensors: it loads them with
        # weights_only=False, so export only checkpoints you trust.
        return _fp32(get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag))
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
    tmp = path.with_name(path.name + ".tmp")
    save_file(out, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)
    return path


def _find_config(ckpt: Path) -> Path | None:
    # The checkpoint's own copy first, then the run folder's (runs/<name>/checkpoints/step_N).
    for candidate in (ckpt / "config.yaml", ckpt.parent.parent / "config.yaml"):
        if candidate.is_file():
            return candidate
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a checkpoint folder (runs/<name>/checkpoints/step_<N>)")
    p.add_argument("--out", help="output folder (default: <checkpoint>/export)")
    args = p.parse_args(argv)
    ckpt = Path(args.checkpoint)
    out = Path(args.out) if args.out else ckpt / "export"
    try:
        state = consolidate(ckpt)
    except ExportError as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    n = sum(v.numel() for v in state.values())
    path = save_safetensors(state, out / "model.safetensors", {"source": ckpt.resolve(), "parameters": n})
    config = _find_config(ckpt)
    if config is not None:
        shutil.copyfile(config, out / "config.yaml")
    print(f"wrote {path} ({len(state)} tensors, {n / 1e6:.2f}M values){' and config.yaml' if config else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
