"""Plain nn.Modules: building blocks, autoencoders, quantizers, perception networks. No data,
distribution or logging here, and no import from `harness` or `shards` (tests/test_layering.py).

`build_model(m)` builds the kind `m.kind` names through models/registry.py; config mistakes raise
`ModelConfigError`, a `ValueError` whose one-line message starts with the key path.
"""

from models.base import Autoencoder, AutoencoderOutput, ModelConfigError, NoPriorError
from models.registry import (
    batch_problem,
    build_model,
    check_config,
    deepspeed_unsupported,
    kinds,
    model_class,
    register,
)

__all__ = [
    "Autoencoder",
    "AutoencoderOutput",
    "ModelConfigError",
    "NoPriorError",
    "batch_problem",
    "build_model",
    "check_config",
    "deepspeed_unsupported",
    "kinds",
    "model_class",
    "register",
]
