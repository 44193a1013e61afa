"""Exponential moving average of model weights, kept in fp32 beside the model."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """`shadow = d * shadow + (1 - d) * param` after every optimizer step, with
    d = min(decay, (1 + n) / (10 + n)) at the n-th update (n = 1, 2, ...: counted before it is used,
    as latent-diffusion's LitEma does, so the first d is 2/11): the LitEma warm-up, so that with
    decay 0.9999 the average is not mostly the random initial weights for thousands of steps.

    Registered with `accelerator.register_for_checkpointing`, so it is saved and restored with
    the rest of the training state.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module, applied: torch.Tensor | None = None) -> None:
        """applied: a bool tensor on the device, for a step that may have been skipped there (weight 0
        then; the warm-up still counts it, as the host cannot know without a sync)."""
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        params = dict(model.named_parameters())
        names = list(self.shadow)
        shadow, current = [self.shadow[n] for n in names], [params[n].detach().float() for n in names]
        if applied is None:
            torch._foreach_lerp_(shadow, current, 1.0 - decay)
        else:  # a weight per tensor (a 0-dim tensor weight would be read back to the host, a sync)
            weight = applied.float() * (1.0 - decay)
            torch._foreach_lerp_(shadow, current, [weight.expand_as(t) for t in shadow])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        # The decay stays the configured one: a resume may change train.ema_decay on purpose.
        self.num_updates = state["num_updates"]
        for n, t in state["shadow"].items():
            self.shadow[n].copy_(t)
