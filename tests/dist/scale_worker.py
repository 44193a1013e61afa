"""A tiny conv model trained under `accelerate launch` the way the trainer must do it under DDP or
DeepSpeed ZeRO (see harness/scale.py). Used by tests/test_scale.py.

    accelerate launch [--config_file ...] tests/dist/scale_worker.py OUT_DIR CKPT_DIR train|resume

train:  STEPS optimizer steps, save_state(CKPT_DIR) on every rank, then 3 more steps;
resume: load_state(CKPT_DIR), skip the data of the first STEPS steps, then the same 3 steps.
Each rank writes OUT_DIR/<mode>_rank<r>.json; rank 0 also OUT_DIR/<mode>_weights.pt (whole fp32
weights at the checkpoint).
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from accelerate import Accelerator  # noqa: E402

from harness import scale  # noqa: E402

STEPS, MICRO, ACCUM, CLIP = int(os.environ.get("STEPS", "6")), 4, 2, 0.5


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm, self.conv = nn.GroupNorm(4, c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv(F.silu(self.norm(x)))


class Net(nn.Module):
    def __init__(self, grad_ckpt=False):
        super().__init__()
        self.grad_ckpt = grad_ckpt
        self.inp, self.out = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 3, 3, padding=1)
        self.blocks = nn.ModuleList(Block(16) for _ in range(2))

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = checkpoint(b, h, use_reentrant=False) if self.grad_ckpt and self.training else b(h)
        return self.out(h)


class EMA:
    """Whole-weight EMA; under ZeRO-3 the weights are gathered (collectively) to read them."""

    def __init__(self, model):
        with scale.full_parameters(model):
            self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
        self.updates = 0

    def update(self, model, decay=0.9):
        with scale.full_parameters(model):
            for k, v in model.state_dict().items():
                self.shadow[k].mul_(decay).add_(v.detach().float(), alpha=1 - decay)
        self.updates += 1

    def state_dict(self):
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, sd):
        self.shadow, self.updates = sd["shadow"], sd["updates"]


def main(out_dir, ckpt_dir, mode):
    plain = os.environ.get("PLAIN_ACCELERATOR") == "1"  # what happens without harness.scale
    acc = Accelerator(gradient_accumulation_steps=ACCUM, **({} if plain else scale.accelerator_kwargs()))
    scale.check_world(acc)
    scale.configure_deepspeed(acc, micro_batch=MICRO, grad_accum=ACCUM, grad_clip=CLIP)
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)
    model = Net(grad_ckpt=os.environ.get("GRAD_CKPT") == "1")
    frozen = nn.Conv2d(3, 3, 1).requires_grad_(False)  # stands for the perception net: never prepared
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))  # not prepared
    model, opt = acc.prepare(model, opt)
    unwrapped = acc.unwrap_model(model)
    ema = EMA(unwrapped)
    acc.register_for_checkpointing(sched, ema)
    dtype = scale.input_dtype(model)

    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    target = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))

    def step():
        losses = []
        for _ in range(ACCUM):
            x = torch.randn(MICRO, 3, 8, 8, generator=gen)
            with acc.accumulate(model):
                y = model(x.to(acc.device, dtype)).float() + frozen(x)
                loss = F.mse_loss(y, target.expand_as(y))
                acc.backward(loss)
                if acc.sync_gradients:
                    grad_norm = acc.clip_grad_norm_(model.parameters(), CLIP)  # under DeepSpeed: the norm only
                opt.step()
                opt.zero_grad()
            losses.append(loss.item())
        sched.step()
        ema.update(unwrapped)
        return sum(losses) / len(losses), float(grad_norm)

    report = {"rank": rank, "world": world, "acc_num_processes": acc.num_processes, "acc_process_index": acc.process_index,
              "distributed_type": str(acc.distributed_type), "zero_stage": scale.zero_stage(model)}
    engine = scale.deepspeed_engine(model)
    if engine is not None:
        report["ds"] = {"micro": engine.train_micro_batch_size_per_gpu(), "accum": engine.gradient_accumulation_steps(),
                        "train_batch": engine.train_batch_size(), "clip": engine.gradient_clipping()}
    if mode == "train":
        report["losses"] = [step()[0] for _ in range(STEPS)]
        acc.save_state(ckpt_dir)  # collective: every rank calls it
    else:
        acc.load_state(ckpt_dir)
        for _ in range(STEPS * ACCUM):
            torch.randn(MICRO, 3, 8, 8, generator=gen)
    with scale.full_parameters(unwrapped):
        weights = {k: v.detach().float().clone() for k, v in unwrapped.state_dict().items()}
    report["ema_updates"] = ema.updates
    report["ema_shapes_whole"] = all(ema.shadow[k].shape == weights[k].shape for k in weights)
    report["lr"] = opt.param_groups[0]["lr"]
    report["after"] = [step()[0] for _ in range(3)]
    report["skipped_steps"] = scale.skipped_steps(model)
    Path(out_dir, f"{mode}_rank{rank}.json").write_text(json.dumps(report))
    if rank == 0:
        torch.save(weights, Path(out_dir, f"{mode}_weights.pt"))
    dist.barrier()
    dist.destroy_process_group()  # without it a gloo process sometimes aborts at exit (SIGABRT)


if __name__ == "__main__":
    main(*sys.argv[1:4])
