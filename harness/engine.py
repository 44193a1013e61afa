"""What differs between DDP (or one process) and DeepSpeed, behind one small object.

The Trainer calls `engine.backward(loss)` once per micro-batch and `engine.step()` once per
optimizer step, and reads a `StepOutcome`; it never asks which backend it holds.

- `DDPEngine`: accelerate's backward (with its fp16 loss scaler, if any); at the step, the global
  gradient norm is measured (and clipped). Non-finite values are caught there, not at the loss:
  gradients are all-reduced, so every rank sees the same norm and takes the same branch without
  another collective (a NaN loss on one rank makes NaN gradients everywhere). With fp16 loss
  scaling an overflow is the scaler's business: it skips the step and lowers the scale.
  With AdamW's fused kernel and no loss scaler the step is *deferred*: the norm never leaves the
  device, the kernel itself skips a non-finite step (its `found_inf`, as GradScaler uses it), and
  the outcome holds device tensors the trainer reads at the next log. No host sync in the step.
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
    finite: bool | torch.Tensor  # gradients (and, under DeepSpeed, losses) were finite on every rank
    overflow: bool  # an fp16 loss scaler skipped the step
    grad_norm: float | torch.Tensor | None  # the global gradient norm before clipping, when finite (deferred: 0 if not)

    @property
    def deferred(self) -> bool:
        """`finite` and `grad_norm` are still on the device (a bool and a float tensor)."""
        return isinstance(self.finite, torch.Tensor)

    @property
    def applied(self) -> bool:
        """The weights changed: EMA and step counters follow only such steps (a deferred outcome is
        read here, a host sync: callers that can stay on the device use `finite`)."""
        return bool(self.finite) and not self.overflow


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
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        # Only the fused kernels can skip a step on the device (they read `found_inf`); a loss scaler
        # decides on the host itself.
        self.deferred = self.scaler is None and bool(inner.defaults.get("fused"))

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def step(self) -> StepOutcome:
        clip = self.grad_clip or float("inf")  # inf: measure the norm, change nothing
        if self.deferred:
            return self._step_on_device(clip)
        norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), clip))
        finite, overflow = math.isfinite(norm), False
        if finite or self.scaler is not None:
            self.optimizer.step()
            # accelerate tells a skip by the optimizer's step not being called; GradScaler calls a fused
            # one's anyway (with found_inf, which makes its kernel skip): a non-finite norm is the overflow.
            overflow = self.optimizer.step_was_skipped or (self.scaler is not None and not finite)
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(finite, overflow, norm if finite else None)

    def _step_on_device(self, clip: float) -> StepOutcome:
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), clip)  # a tensor: not read here
        finite = torch.isfinite(norm)
        step_unless(self.optimizer, ~finite)
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(finite, False, torch.where(finite, norm, torch.zeros_like(norm)))


def step_unless(optimizer, skip: torch.Tensor) -> None:
    """A fused AdamW's step, skipped on the device where `skip` (a bool tensor) is true: its kernel then
    leaves weights, moments and step count as they were (its `found_inf` input, as GradScaler uses it)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper steps the inner one
    inner.found_inf = skip.float()
    try:
        optimizer.step()
    finally:
        del inner.found_inf


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


class DeferredSkips:
    """The non-finite steps of deferred outcomes, counted on the device and read once per log."""

    def __init__(self):
        self.run = self.worst = self.skipped = None  # skips in a row now, most in a row since the read, skips

    def add(self, finite: torch.Tensor) -> None:
        bad = (~finite).long()
        if self.run is None:
            self.run = self.worst = self.skipped = torch.zeros_like(bad)
        self.run = (self.run + 1) * bad
        self.worst = torch.maximum(self.worst, self.run)
        self.skipped = self.skipped + bad

    def read(self) -> tuple[int, int, int]:
        """(skipped since the last read, most in a row among them, in a row now): one host sync."""
        if self.run is None:
            return 0, 0, 0
        skipped, worst, run = torch.stack([self.skipped, self.worst, self.run]).tolist()
        self.skipped, self.worst = torch.zeros_like(self.skipped), self.run
        return skipped, worst, run


def make_engine(accelerator, model, optimizer, *, grad_clip: float, grad_accum: int) -> Engine:
    """The engine for what `accelerator.prepare()` returned."""
    cls = DeepSpeedEngine if scale.deepspeed_engine(model) is not None else DDPEngine
    return cls(accelerator, model, optimizer, grad_clip=grad_clip, grad_accum=grad_accum)


def place_steps(optimizer) -> None:
    """Adam's step counters where the group's kind of step wants them: on the parameter's device in float32
    for a fused (or capturable) one, on the CPU otherwise. torch places them by the flag saved with the
    state, so a resume that switches `fused` would hand a fused CUDA kernel CPU counters."""
    for group in optimizer.param_groups:
        on_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].to(dtype=torch.float32, device=p.device if on_device else "cpu")
