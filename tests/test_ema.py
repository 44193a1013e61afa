"""Weight EMA: latent-diffusion warm-up, state round trip, the configured decay wins at resume."""

import torch
from torch import nn

from harness.ema import EMA


def test_warmup_then_configured_decay():
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.9999)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # LitEma counts first: n=1, d = min(0.9999, 2/11) -> shadow = 9/11
    assert torch.allclose(ema.shadow["weight"], torch.tensor([[9 / 11]]))
    for _ in range(100):
        ema.update(model)
    assert ema.shadow["weight"].item() > 0.99  # without warm-up it would still be ~0.01


def test_matches_litemas_sequence():
    """The shadow after each of 5 updates toward a moving target, against LitEma's arithmetic written out:
    num_updates += 1; d = min(decay, (1 + n) / (10 + n)); shadow -= (1 - d) * (shadow - param)."""
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    ema, shadow = EMA(model, decay=0.9999), 0.0
    for n in range(1, 6):
        with torch.no_grad():
            model.weight.fill_(float(n))
        ema.update(model)
        d = min(0.9999, (1 + n) / (10 + n))
        shadow -= (1 - d) * (shadow - n)
        assert abs(ema.shadow["weight"].item() - shadow) < 1e-6, n


def test_load_keeps_the_configured_decay_and_restores_the_rest():
    model = nn.Linear(2, 2)
    a = EMA(model, decay=0.99)
    for _ in range(3):
        a.update(model)
    b = EMA(nn.Linear(2, 2), decay=0.5)
    b.load_state_dict(a.state_dict())
    assert b.decay == 0.5 and b.num_updates == 3
    assert all(torch.equal(a.shadow[k], b.shadow[k]) for k in a.shadow)
