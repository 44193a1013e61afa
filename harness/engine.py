"""What differs between DDP (or one process) and DeepSpeed, behind one small object.

The Trainer calls `engine.backward(loss)` once per micro-batch and `engine.step()` once per
optimizer step, and reads a `StepOutcome`; it never asks which backend it holds.

- `DDPEngine`: accelerate's backward (with its fp16 loss scaler, if any); at the step, the global
  gradient norm is measured (and clipped). Non-finite values are caught there, not at the loss:
  gradients are all-reduced, so every rank sees the same norm and takes the same branch without
  another collective (a NaN loss on one rank makes NaN gradients everywhere). With fp16 loss
  scaling an overflow is the scaler's business: it skips the step and lowers the scale.
- `DeepSpeedEngine`: DeepSpeed clips and steps inside `backward` at the accumulation boundary, so
  a non-finite loss must be caught before it (one all-reduce per micro-batch, so that every rank
  skips together); DeepSpeed counts its own fp16 overflows (`skipped_steps`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from harness import scale
from harness.dist import all_reduce_sum


@dataclass
class StepOutcome:
    finite: bool  # gradients (and, under DeepSpeed, losses) were finite on every rank
    overflow: bool  # an fp16 loss scaler skipped the step
    grad_norm: float | None  # the global gradient norm before clipping, when finite

    @property
    def applied(self) -> bool:
        """The weights changed: EMA and step counters follow only such steps."""
        return self.finite and not self.overflow


class Engine:
    def __init__(self, accelerator, model, optimizer, *, grad_clip: float, grad_accum: int):
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.grad_accum = grad_accum
        self.input_dtype = scale.input_dtype(model)  # DeepSpeed bf16/fp16 casts the module, no autocast

    @property
    def scaler(self):
        return self.accelerator.scaler

    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> StepOutcome:
        raise NotImplementedError


class DDPEngine(Engine):
    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def step(self) -> StepOutcome:
        clip = self.grad_clip or float("inf")  # inf: measure the norm, change nothing
        norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), clip))
        finite, overflow = math.isfinite(norm), False
        if finite or self.scaler is not None:
            self.optimizer.step()
            overflow = self.optimizer.step_was_skipped
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(finite, overflow, norm if finite else None)


class DeepSpeedEngine(Engine):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._finite = True
        self._skipped_before = None  # read at each step's first backward: load_state restores the counter

    def backward(self, loss: torch.Tensor) -> None:
        if self._skipped_before is None:
            self._skipped_before = scale.skipped_steps(self.model)
        bad = float(not torch.isfinite(loss))
        self._finite &= all_reduce_sum([bad], self.accelerator.device)[0] == 0
        if self._finite:
            self.accelerator.backward(loss)  # DeepSpeed clips and steps at the boundary

    def step(self) -> StepOutcome:
        finite, norm = self._finite, None
        if finite:
            value = self.accelerator.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            norm = float(value) if value is not None and math.isfinite(value) else None
        elif self.grad_accum > 1:
            # Micro-batches before the bad one already left gradients in the engine, and its
            # zero_grad is a no-op: clear them through its optimizer (works under ZeRO-1/3;
            # under ZeRO-2 they may carry into the next step, noted in the README).
            try:
                self.model.optimizer.zero_grad(set_to_none=True)
            except Exception:  # noqa: BLE001 - best effort: DeepSpeed's optimizers differ by stage
                pass
        before = scale.skipped_steps(self.model) if self._skipped_before is None else self._skipped_before
        overflow = scale.skipped_steps(self.model) > before
        self._skipped_before, self._finite = None, True
        return StepOutcome(finite, overflow, norm)


def make_engine(accelerator, model, optimizer, *, grad_clip: float, grad_accum: int) -> Engine:
    """The engine for what `accelerator.prepare()` returned."""
    cls = DeepSpeedEngine if scale.deepspeed_engine(model) is not None else DDPEngine
    return cls(accelerator, model, optimizer, grad_clip=grad_clip, grad_accum=grad_accum)
