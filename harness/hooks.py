"""Things that plug into the training step without a branch inside it.

A hook sees the step at three points: `on_loss` (may add a term before backward), `after_backward`
(once per micro-batch, inside accelerate's `accumulate`), `after_step` (once per optimizer step,
with the step's outcome). It owns its checkpointed state (`state()`, `after_resume`). What a resume
must keep is checked before any hook exists (harness/resume.py: `check_ema_matches` here,
`check_resume_layout` in harness/discriminator.py). The EMA and the discriminator are hooks.
"""

from __future__ import annotations

from pathlib import Path

from harness import scale
from harness.checkpoint import ResumeError, read_config
from harness.ema import EMA


class Hook:
    """Does nothing at every point; subclasses override what they need."""

    trained_models: tuple = ()  # prepared models it trains: kept in accumulate()'s no_sync with the autoencoder

    def on_loss(self, trainer, x, out, losses, stats) -> None:
        pass

    def after_backward(self, trainer, x, out, stats) -> None:
        pass

    def after_step(self, trainer, outcome, stats) -> None:
        pass

    def after_resume(self, trainer) -> None:
        pass

    def settle(self, trainer) -> None:
        """Read what the hook counted on the device during deferred steps (at a log and before a save)."""

    def state(self) -> dict:
        """Entries for trainer_state.json."""
        return {}


class EMAHook(Hook):
    """An EMA of the weights (harness/ema.py), updated after every applied optimizer step.
    Registered for checkpointing after the scheduler: it is accelerate's custom object 1."""

    def __init__(self, trainer, decay: float):
        self.decay = decay
        with scale.full_parameters(trainer.engine.model):  # collective under ZeRO-3
            self.ema = EMA(trainer.engine.unwrapped(), decay)
        trainer.accelerator.register_for_checkpointing(self.ema)

    def after_step(self, trainer, outcome, stats) -> None:
        if outcome.deferred:  # skipped or not is known on the device only: a zero weight for a skipped step
            self.ema.update(trainer.engine.unwrapped(), applied=outcome.finite)
        elif outcome.applied:
            with scale.full_parameters(trainer.engine.model):  # collective under ZeRO-3: every rank enters
                self.ema.update(trainer.engine.unwrapped())


def check_ema_matches(path: Path, decay: float) -> None:
    """An EMA saved and none asked for (or the reverse) cannot resume: accelerate's custom objects
    are numbered, and the scheduler is 0, the EMA 1."""
    # The config saved with it, not custom_checkpoint_1's presence: without an EMA, that is the discriminator's.
    train = read_config(path).get("train")
    had = train.get("ema_decay", 0) if isinstance(train, dict) else 0
    saved = had > 0
    if saved != (decay > 0):
        raise ResumeError(f"cannot resume {path}: it was trained {'with' if saved else 'without'} an EMA of "
                          f"the weights (train.ema_decay={had}) and this run asks for train.ema_decay="
                          f"{decay}; keep it {'on' if saved else 'off'} to resume")
