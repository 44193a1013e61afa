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
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from harness.config import ConfigError
from harness.dist import DistEnvError


def set_tf32(device: torch.device, on: bool) -> None:
    """TF32 for fp32 matmuls and convolutions on CUDA (Ampere and newer): a 10-bit mantissa in the
    multiply, fp32 accumulation. torch's defaults differ (convolutions on, matmuls off); this sets
    both one way. Through the two settings every torch version and library reads without complaint:
    torch >= 2.9 raises when code reads a legacy `allow_tf32` flag after the new `fp32_precision`
    API set it (accelerate and others still read and write the legacy flags). Nothing on other
    devices (a CPU's reduced matmul precisions may mean bf16 there)."""
    if device.type != "cuda":
        return
    torch.set_float32_matmul_precision("high" if on else "highest")
    torch.backends.cudnn.allow_tf32 = on


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
    """Refuse to train when accelerate and torch.distributed disagree about the world size, or when a
    DeepSpeed accelerate config was given and accelerate left DeepSpeed out (it does under
    ACCELERATE_USE_CPU=1, without a word: the run would then have no ZeRO at all)."""
    from accelerate.utils import DistributedType

    wanted = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")
    if wanted and accelerator.distributed_type != DistributedType.DEEPSPEED:
        kind = accelerator.distributed_type.value
        raise DistEnvError(f"the accelerate config asks for DeepSpeed but this run is {kind} (ACCELERATE_USE_CPU=1 "
                           "turns it off): leave ACCELERATE_USE_CPU out, DeepSpeed runs on CPU by itself")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() != accelerator.num_processes:
        raise DistEnvError(
            f"torch.distributed runs {dist.get_world_size()} processes but accelerate counts "
            f"{accelerator.num_processes} ({accelerator.distributed_type}): build the Accelerator with "
            "harness.scale.accelerator_kwargs() (or export ACCELERATE_USE_CPU=1 on a machine without GPU)"
        )


def _fill(cfg: dict, key: str, value, source: str) -> None:
    current = cfg.get(key, "auto")
    if current == "auto":
        cfg[key] = value
    elif current != value:
        raise ConfigError(
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


def zero_partitions(checkpoint: Path) -> int:
    """Over how many ranks a checkpoint's DeepSpeed ZeRO optimizer state is split (0: not a ZeRO checkpoint)."""
    return len(list(Path(checkpoint).glob("pytorch_model*/*zero_pp_rank_*_optim_states.pt")))


def zero_layout(checkpoint: Path) -> tuple[bool, bool] | None:
    """(stage 3, bf16) of a ZeRO checkpoint as DeepSpeed named its files, or None (no ZeRO optimizer files).
    Stage 3 keeps one `zero_pp_rank_*_model_states.pt` per rank (stages 1/2 one `mp_rank_00_model_states.pt`);
    a bf16 engine prefixes its optimizer shards `bf16_`. DeepSpeed 0.19.8's ZeRO loader tries both names, but
    a resume in the other precision still failed on the bf16 name (FileNotFoundError, ZeRO-2 and -3 on CPU):
    the universal copy is what loads it."""
    optim = list(Path(checkpoint).glob("pytorch_model*/*zero_pp_rank_*_optim_states.pt"))
    if not optim:
        return None
    stage3 = any(Path(checkpoint).glob("pytorch_model*/zero_pp_rank_*_model_states.pt"))
    return stage3, all(f.name.startswith("bf16_") for f in optim)


def is_deepspeed_checkpoint(checkpoint: Path) -> bool:
    return any(p.is_dir() for p in Path(checkpoint).glob("pytorch_model*"))


def to_universal(checkpoint: Path, dest: Path) -> Path:
    """A copy of `checkpoint` that any number of ranks can load: DeepSpeed's universal format.

    Run on one rank, before prepare(). accelerate's small files (scheduler, EMA, RNG) are copied;
    each engine folder (`pytorch_model*/`) goes through DeepSpeed's `ds_to_universal`, which
    writes every parameter's fp32 weights and Adam moments whole, to be re-partitioned over the
    new world size at load. `--inject_missing_state` supplies the metadata that only Megatron
    records. Written under a temporary name and renamed, like a checkpoint."""
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in Path(checkpoint).iterdir():
        if f.is_file():
            shutil.copy2(f, tmp / f.name)
    for engine_dir in sorted(Path(checkpoint).glob("pytorch_model*")):
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(engine_dir),
               "--output_folder", str(tmp / engine_dir.name), "--inject_missing_state",
               "--num_extract_workers", "1", "--num_merge_workers", "1"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"converting {engine_dir} to a universal checkpoint failed: {last}")
    os.replace(tmp, dest)
    return dest


def load_universal_buffers(module: torch.nn.Module, checkpoint: Path) -> int:
    """Buffers (BatchNorm statistics, EMA codebooks) from a universal checkpoint into `module`.

    DeepSpeed's universal load restores parameters and optimizer state only, not the module's
    state dict; buffers are whole on every rank, so the saved module state has them as they were.
    Our own checkpoint: it holds DeepSpeed's config objects, so it is not weights-only loadable."""
    files = sorted(Path(checkpoint).glob("pytorch_model/*model_states.pt"))
    if not files:
        return 0
    saved = torch.load(files[0], map_location="cpu", weights_only=False).get("module") or {}
    n = 0
    for name, buf in module.named_buffers():
        if name in saved and saved[name].shape == buf.shape:
            buf.copy_(saved[name].to(buf.device, buf.dtype))
            n += 1
    return n


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
