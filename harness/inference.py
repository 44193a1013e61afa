"""Load a trained model for sampling, evaluation and export.

`load_model(path)` accepts a run folder (its newest complete checkpoint), a checkpoint folder
(`checkpoints/step_N`, plain or DeepSpeed-sharded), or an exported folder (`model.safetensors` +
`config.yaml` from launch/export.py). The model is rebuilt from the config stored with the weights,
so a spec file edited since training cannot change it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from harness import checkpoint as ckpt
from harness.config import Config, from_dict
from models import Autoencoder, build_model


class LoadError(RuntimeError):
    """The path holds no loadable model: one line saying why."""


def find_weights_dir(path: str | Path) -> Path:
    """Run folder -> its newest complete checkpoint; a checkpoint or export folder -> itself."""
    path = Path(path)
    if not path.exists():
        raise LoadError(f"{path}: no such run, checkpoint or export folder")
    if ckpt.is_complete(path):  # a step_N folder (DeepSpeed writes a `latest` file of its own into it)
        return path
    if (path / "checkpoints").is_dir() or (path / ckpt.LATEST_NAME).is_file():
        found = ckpt.resolve(path, "latest")
        if found is None:
            raise LoadError(f"{path}: the run has no complete checkpoint yet")
        return found
    if (path / ckpt.CONFIG_NAME).is_file():
        return path
    raise LoadError(f"{path}: not a run folder, a checkpoint (step_N) or an exported model (no {ckpt.CONFIG_NAME})")


def load_config_of(folder: Path) -> Config:
    return from_dict(yaml.safe_load((folder / ckpt.CONFIG_NAME).read_text()))


def _ema_state(folder: Path) -> dict[str, torch.Tensor] | None:
    """The EMA shadow weights saved by the trainer (a registered accelerate custom object)."""
    for f in sorted(folder.glob("custom_checkpoint_*.pkl")):
        state = torch.load(f, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "shadow" in state:
            return state["shadow"]
    return None


def state_dict_of(folder: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """fp32 model weights from a checkpoint or export folder (DeepSpeed shards are consolidated)."""
    if (folder / "model.safetensors").is_file():
        state = load_file(folder / "model.safetensors")
    elif (folder / "pytorch_model.bin").is_file():
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    elif any(p.is_dir() for p in folder.glob("pytorch_model*")):  # DeepSpeed: one shard per rank
        from harness.export import consolidate

        state = consolidate(folder)
    else:
        raise LoadError(f"{folder}: no model weights (model.safetensors, pytorch_model.bin or DeepSpeed shards)")
    if ema:
        shadow = _ema_state(folder)
        if shadow is None:
            raise LoadError(f"{folder}: no EMA weights (was train.ema_decay > 0?)")
        state.update(shadow)  # EMA covers trainable parameters; buffers (codebooks, norms) stay as saved
    return state


def load_model(path: str | Path, *, ema: bool = False, device: str | torch.device = "cpu") -> tuple[Autoencoder, Config, Path]:
    folder = find_weights_dir(path)
    cfg = load_config_of(folder)
    model = build_model(cfg.model)
    state = state_dict_of(folder, ema=ema)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise LoadError(f"{folder}: weights do not fit the stored config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device).eval(), cfg, folder
