"""Accelerate + DeepSpeed glue that the trainer applies around `Accelerator(...)` and `prepare()`.

Each function exists because of something measured with accelerate 1.15 / DeepSpeed 0.19.8
(see the README's "Scaling out" section):

- `accelerator_kwargs()`: without it, on a machine without a GPU, accelerate records
  num_processes=1 / process_index=0 on every rank (under DeepSpeed, and under a MULTI_GPU config
  without ACCELERATE_USE_CPU=1), so every rank believes it is the main process and
  DeepSpeed's "auto" train_batch_size comes out wrong.
- `configure_deepspeed()`: our loader is not passed to prepare(), so accelerate cannot fill the
  micro batch; and "auto" gradient_clipping silently becomes 1.0 whatever optim.grad_clip says.
- `full_parameters()`: under ZeRO-3 each rank holds a slice of every parameter (size-0 tensors
  outside a module's forward): reading whole weights (EMA, export, a codebook used outside
  forward) needs a collective gather on every rank.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.distributed as dist


def using_deepspeed() -> bool:
    """True inside `accelerate launch` with a DeepSpeed config (the launcher sets this variable)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def accelerator_kwargs() -> dict:
    """Extra `Accelerator(**kwargs)` so accelerate sees the real process group on this machine."""
    if torch.cuda.is_available():
        return {}
    if using_deepspeed():
        _skip_shm_comm_build()
        # cpu=True would switch DeepSpeed off; naming the backend makes accelerate read rank and
        # world size from the gloo group DeepSpeed creates.
        from accelerate.utils import InitProcessGroupKwargs

        return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    return {"cpu": True}  # MULTI_CPU with gloo when launched with >1 process, plain CPU otherwise


def _skip_shm_comm_build() -> None:
    """On CPU, DeepSpeed compiles a shared-memory all-reduce (a C++ build of about a minute, needing a
    compiler) when its comm backend starts. Only `inference_all_reduce` uses it; training collectives
    go through torch.distributed (gloo). So we skip the build: same training, no compile."""
    try:
        import deepspeed.comm.torch  # noqa: F401
    except ImportError:
        return
    # Not `import deepspeed.comm.torch as m`: that name resolves to the torch package itself.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def check_world(accelerator) -> None:
    """Refuse to train when accelerate and torch.distributed disagree about the world size."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() != accelerator.num_processes:
        raise RuntimeError(
            f"torch.distributed runs {dist.get_world_size()} processes but accelerate counts "
            f"{accelerator.num_processes} ({accelerator.distributed_type}): build the Accelerator with "
            "harness.scale.accelerator_kwargs() (or export ACCELERATE_USE_CPU=1 on a machine without GPU)"
        )


def _fill(cfg: dict, key: str, value, source: str) -> None:
    current = cfg.get(key, "auto")
    if current == "auto":
        cfg[key] = value
    elif current != value:
        raise ValueError(
            f"the DeepSpeed config sets {key}={current} but {source} gives {value}: "
            f'write "auto" for {key} in the JSON so the training config decides'
        )


def configure_deepspeed(accelerator, *, micro_batch: int, grad_accum: int, grad_clip: float) -> None:
    """Fill the DeepSpeed config from the training config. Call after Accelerator(), before prepare().

    grad_clip 0 = no clipping (DeepSpeed's own meaning of gradient_clipping=0). No-op without DeepSpeed.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    cfg = plugin.deepspeed_config
    world = dist.get_world_size() if dist.is_initialized() else accelerator.num_processes
    _fill(cfg, "train_micro_batch_size_per_gpu", micro_batch, "train.batch_size")
    _fill(cfg, "gradient_accumulation_steps", grad_accum, "train.grad_accum")
    _fill(cfg, "train_batch_size", micro_batch * grad_accum * world, "batch_size x grad_accum x world size")
    _fill(cfg, "gradient_clipping", float(grad_clip), "optim.grad_clip")


def deepspeed_engine(model):
    """The DeepSpeedEngine that prepare() returned, or None."""
    try:
        from deepspeed import DeepSpeedEngine
    except ImportError:
        return None
    return model if isinstance(model, DeepSpeedEngine) else None


def zero_stage(model) -> int:
    engine = deepspeed_engine(model)
    return engine.zero_optimization_stage() if engine is not None else 0


def skipped_steps(model) -> int:
    """Optimizer steps DeepSpeed skipped on fp16 overflow (0 without DeepSpeed; accelerate's own
    fp16 path reports a skip per step through `accelerator.optimizer_step_was_skipped`)."""
    engine = deepspeed_engine(model)
    return int(engine.skipped_steps) if engine is not None else 0


def input_dtype(model) -> torch.dtype:
    """The dtype model inputs must have. DeepSpeed bf16/fp16 casts the module itself (no autocast),
    so a float32 image into it fails ("Input type (float) and bias type (c10::BFloat16)")."""
    engine = deepspeed_engine(model)
    if engine is None:
        return torch.float32
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


def full_parameters(model):
    """Context in which `model`'s (the engine's or the unwrapped module's) parameters are whole.

    Collective under ZeRO-3: every rank must enter it. Read-only (modifier_rank=None).
    """
    params = list(model.parameters())
    if not any(hasattr(p, "ds_status") for p in params):  # only ZeRO-3 partitions parameters
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
